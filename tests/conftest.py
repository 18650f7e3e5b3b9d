"""Test session setup: eight CPU devices, float64 references available.

XLA reads the device-count flag once, when the backend starts, so it is set
here before anything imports jax. Tests that want one device pass
``mesh=None`` or ``make_mesh(jax.devices()[:1])``.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
