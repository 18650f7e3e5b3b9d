"""Test session setup (eight CPU devices, no network) and the fixtures tests share.

XLA reads the device-count flag once, when the backend starts, so it is set
here before anything imports jax. Tests that want one device pass
``mesh=None`` or ``make_mesh(jax.devices()[:1])``.

Tiers: ``pytest -m "not slow"`` is the fast tier (under 3 minutes on 2 cores);
``slow`` marks the multi-process, subprocess, benchmark and converged-AG tests.
"""

import os

import pytest

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# As flax's own tests do: XLA's backend optimisations cost more compile time than
# these small programs save (the fast tier runs in about 2/3 of the time). They do
# not change what is computed; plans still compile fully optimised (plan.compile).
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def sentences(tmp_path_factory):
    """A .txt data file of 100 sentences of 4-12 words from the test vocabulary."""
    import random

    from tests.words import WORDS

    rng = random.Random(0)
    path = tmp_path_factory.mktemp("sentences") / "many.txt"
    path.write_text("\n".join(" ".join(rng.choices(WORDS, k=rng.randint(4, 12))) for _ in range(100)) + "\n")
    return path


@pytest.fixture(scope="session")
def sharp_ckpt(tmp_path_factory):
    """A tiny BERT checkpoint (V = 53) with peaked conditionals, so the joint methods
    differ measurably: the model of the end-to-end, CLI and multi-process tests."""
    from tests.hf_fixtures import sharp_checkpoint

    return sharp_checkpoint(tmp_path_factory.mktemp("sharp_ckpt"))


@pytest.fixture(scope="session", autouse=True)
def isolated_plan_cache(tmp_path_factory):
    """The plan cache on disk (``$JAXJOINT_PLAN_CACHE``) starts empty for the session, as
    on a clean CI machine: a developer's warm ``~/.cache/jaxjoint/plan`` would hide compile
    time and could change results. One directory for the session's workers and the child
    processes they start (they inherit the variable), as they share the home directory
    on CI."""
    root = tmp_path_factory.getbasetemp()
    directory = (root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root) / "plan_cache"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JAXJOINT_PLAN_CACHE", str(directory))
        yield directory


@pytest.fixture
def fresh_plan_cache(monkeypatch):
    """No plan cached on disk or in memory before or after the test: each plan compiles."""
    from jaxjoint.plan import cache

    monkeypatch.setenv("JAXJOINT_PLAN_CACHE", "off")
    cache.clear_memory()
    yield
    cache.clear_memory()


@pytest.fixture
def optimised_compiles():
    """XLA's optimisations on for this test's compiles (conftest turns most off): for the
    tests whose time goes into running the embedded model's V = 4096 tables and joints,
    which run about twice as fast optimised, rather than into compiling."""
    from jaxjoint.plan.compile import fully_optimised

    with fully_optimised():
        yield
