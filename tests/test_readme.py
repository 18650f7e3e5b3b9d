"""The README's set-up commands are the ones CI runs."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def setup_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def test_readme_opens_with_install_and_test_commands():
    install, test = setup_commands()
    assert "pip install -e ." in install and install.endswith("jaxjoint evaluate")
    assert "pytest" in test


def test_ci_runs_exactly_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert setup_commands()[1] in ci


@pytest.mark.slow
def test_library_example_runs(capsys):
    """The README's library example, as written, on the embedded model."""
    text = (ROOT / "README.md").read_text()
    example = text.split("## Library API", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(example, "README.md", "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[:5]] == ["mlm", "mrf", "mrf_logit", "hcb", "ag"]
    assert lines[5].startswith("MLM unary U-NLL")
