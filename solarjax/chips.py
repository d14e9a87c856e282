"""What each accelerator can do, by ``device.device_kind``: the one table of dense bf16 peak FLOP/s,
read by the trainer's MFU and by the TPU topologies of :mod:`solarjax.aot`."""

from __future__ import annotations

from typing import Any

# First match wins (substring of device_kind, case-insensitive); CPU has no entry.
PEAK_FLOPS = {
    "H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "A10G": 125e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12, "TPU v5p": 459e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12,
    "TPU v5": 459e12, "TPU v4": 275e12, "TPU v3": 123e12,
}


def peak_flops(device: Any = None) -> float | None:
    """The dense bf16 peak FLOP/s of ``device`` (default: the first device), None when unknown."""
    import jax

    kind = (device or jax.devices()[0]).device_kind
    return next((flops for name, flops in PEAK_FLOPS.items() if name.lower() in kind.lower()), None)
