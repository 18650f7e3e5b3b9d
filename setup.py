"""Packaging beyond pyproject.toml: install ``jaxjoint-cpu-default.pth`` beside the packages.

A ``.pth`` file in site-packages runs its ``import`` line at every Python start-up;
this one runs ``jaxjoint/cpu_default.py`` (JAX on its CPU alone where the machine
has no accelerator: README "Quiet on a CPU"). Written by ``build_py`` so that it
lands in the wheel's root, the same for ``pip install .`` and ``pip install -e .``.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "jaxjoint-cpu-default.pth"
# find_spec locates the package without importing it (which would import JAX).
LINE = ('import importlib.util as u, pathlib; s = u.find_spec("jaxjoint"); '
        'p = s and s.submodule_search_locations and pathlib.Path(s.submodule_search_locations[0], "cpu_default.py"); '
        'p and p.is_file() and exec(p.read_text(), {"__name__": "__main__"})\n')


class BuildWithPth(build_py):
    def run(self) -> None:
        super().run()
        # An editable install keeps the packages in place and puts into its wheel only
        # what is in the install directory (setuptools' editable_wheel sets it).
        where = self.get_finalized_command("install").install_lib if self.editable_mode else self.build_lib
        target = Path(where, PTH)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(LINE)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib, PTH))]

    def get_output_mapping(self) -> dict[str, str]:
        return {**super().get_output_mapping(), str(Path(self.build_lib, PTH)): PTH}


setup(cmdclass={"build_py": BuildWithPth})
