"""Run at Python start-up by ``jaxjoint-cpu-default.pth``: JAX on its CPU alone where
there is no accelerator, so that it does not probe for a GPU or TPU that is not there.

The ``plan`` extra installs JAX's CUDA plugin and libtpu (``jaxjoint plan`` compiles
for GPUs and TPUs with them, without the hardware). JAX loads every installed plugin
when it first needs a device: with no cuDNN the CUDA plugin prints a traceback
("Unable to load cuDNN"), and libtpu, with no TPU, its worker-hostname errors, about
20 lines on stderr of every script that touches JAX. Installing jaxjoint adds a
``.pth`` file that runs ``apply()`` when Python starts, before any ``import jax``:
when this machine shows no NVIDIA GPU, no AMD GPU and no TPU, and ``JAX_PLATFORMS``
is not set, it sets ``JAX_PLATFORMS=cpu``. JAX then registers the CUDA plugin
without its cuDNN check and never loads libtpu as a backend, and the deviceless GPU
and TPU compiles of ``plan`` work as before. On a machine with an accelerator it
does nothing, and JAX loads its plugins as usual. Set ``JAX_PLATFORMS`` yourself
(``JAX_PLATFORMS=`` lets JAX choose) to opt out.

Standard library only and a few file checks: it runs in every Python process of
the environment, so it must cost nothing and never fail.
"""

from __future__ import annotations

import glob
import os

# What JAX itself looks for (jax._src.hardware_utils), and a little more, so that
# any accelerator present leaves JAX to choose: NVIDIA device nodes (WSL2's
# /dev/dxg too), AMD's KFD, TPU chips by PCI id (Google's vendor id also marks
# gVNIC network cards) and the accel/vfio nodes TPU VMs expose.
GPU_NODES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg", "/dev/kfd")
GOOGLE_PCI_VENDOR = "0x1ae0"
TPU_PCI_DEVICES = ("0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076")


def has_accelerator() -> bool:
    """Whether this machine shows an NVIDIA or AMD GPU or a TPU chip."""
    if any(os.path.exists(node) for node in GPU_NODES) or glob.glob("/dev/accel*"):
        return True
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(vendor) as f:
                if f.read().strip() != GOOGLE_PCI_VENDOR:
                    continue
            with open(os.path.join(os.path.dirname(vendor), "device")) as f:
                if f.read().strip() in TPU_PCI_DEVICES:
                    return True
        except OSError:
            continue
    return False


def apply() -> None:
    """Set ``JAX_PLATFORMS=cpu`` when it is unset and there is no accelerator."""
    try:
        if "JAX_PLATFORMS" not in os.environ and not has_accelerator():
            os.environ["JAX_PLATFORMS"] = "cpu"
    except Exception:  # noqa: BLE001 - Python's start-up must never fail here
        pass


if __name__ in ("__main__", "<run_path>"):
    apply()
