"""ctelm_jax: Embedding Language Models of clinical trials in JAX/Flax.

Importing it sets JAX_PLATFORMS when the user did not and JAX is not imported yet, on a machine without a TPU:
`cpu`, or `cuda,cpu` where an NVIDIA GPU is visible and JAX has its CUDA plugin. libtpu (installed for the compile-only
TPU devices of `ctelm_jax.aot`, which need no TPU backend) is then never started as a backend where there is no TPU:
it would print errors about the missing TPU and cost ~0.3 s. A TPU, an NVIDIA GPU without the plugin (JAX says so) or
an AMD GPU leave JAX's own choice."""

import glob
import importlib.util
import os
import sys

_TPU_DEVICES = ("/dev/accel*", "/dev/vfio/[0-9]*")
_NVIDIA_DEVICES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg")  # as JAX looks for them (WSL2: dxg)


def default_platforms() -> str | None:
    """The JAX_PLATFORMS this machine gets when none is set (None: JAX's own choice)."""
    if any(glob.glob(p) for p in _TPU_DEVICES) or os.path.exists("/dev/kfd"):
        return None
    if any(os.path.exists(d) for d in _NVIDIA_DEVICES):
        plugins = importlib.util.find_spec("jax_plugins") is not None
        cuda = plugins and any(importlib.util.find_spec(f"jax_plugins.xla_cuda{v}") for v in (12, 13))
        return "cuda,cpu" if cuda else None
    return "cpu"



def _set_jax_platforms() -> None:
    if "JAX_PLATFORMS" not in os.environ and "jax" not in sys.modules and (platforms := default_platforms()):
        os.environ["JAX_PLATFORMS"] = platforms


_set_jax_platforms()
