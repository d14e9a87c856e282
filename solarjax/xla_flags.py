"""The XLA flags solarjax sets, in one place, and why.

Flags only take effect if they are in the environment before JAX starts its backend, so
``solarjax`` applies them at the start of every verb (``cli.main``) and ``solarjax aot`` applies
the TPU set before loading libtpu. A flag the user already set is left as the user set it;
``SOLARJAX_XLA_FLAGS=0`` turns all of this off.

TPU (``LIBTPU_INIT_ARGS``; MaxText sets the same for FSDP training): run the FSDP all-gathers
and reduce-scatters asynchronously, fused with and overlapped by the layer's compute. On one chip
they change nothing; on a pod they hide the weight all-gathers behind the matmuls.

GPU (``XLA_FLAGS``): XLA's latency-hiding scheduler, which orders collectives to overlap compute
across GPUs; a single GPU has no collectives, so there it is neutral.

Measured effect: none yet (no pod or multi-GPU machine was available); the AOT tests compile with
the TPU set, which proves libtpu accepts it.
"""

from __future__ import annotations

import os
from pathlib import Path

TPU_FLAGS = (
    "--xla_tpu_enable_async_collective_fusion=true",
    "--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true",
    "--xla_tpu_enable_async_collective_fusion_multiple_steps=true",
    "--xla_tpu_overlap_compute_collective_tc=true",
    "--xla_enable_async_all_gather=true",
)
GPU_FLAGS = ("--xla_gpu_enable_latency_hiding_scheduler=true",)


def _merge(variable: str, flags: tuple[str, ...]) -> None:
    """Append each flag whose name the variable does not already mention."""
    current = os.environ.get(variable, "")
    names = {item.split("=", 1)[0] for item in current.split()}
    extra = [flag for flag in flags if flag.split("=", 1)[0] not in names]
    if extra:
        os.environ[variable] = " ".join([current, *extra]).strip()


def detect_platform() -> str:
    """The accelerator this host has, without starting JAX: ``tpu``, ``gpu`` or ``cpu``."""
    dev = Path("/dev")
    if os.environ.get("TPU_ACCELERATOR_TYPE") and not os.environ.get("TPU_LIBRARY_PATH"):
        return "tpu"
    if any(dev.glob("accel*")) or any(dev.glob("vfio/[0-9]*")):
        return "tpu"
    if any(dev.glob("nvidia[0-9]*")):
        return "gpu"
    return "cpu"


def apply(platform: str | None = None) -> None:
    """Put the flags for ``platform`` (default: this host's) into the environment."""
    if os.environ.get("SOLARJAX_XLA_FLAGS", "1") == "0":
        return
    platform = platform or detect_platform()
    if platform == "tpu":
        _merge("LIBTPU_INIT_ARGS", TPU_FLAGS)
    elif platform == "gpu":
        _merge("XLA_FLAGS", GPU_FLAGS)
