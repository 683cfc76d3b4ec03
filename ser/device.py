"""Where and in what precision the models run: CUDA when present (float16 mixed precision),
else the CPU (bfloat16 where it has native units). Small and at the bottom, so that every
module that runs a model asks here. torch is imported inside the functions: the labeller
imports this before its workers start, which must happen before torch loads."""
from __future__ import annotations

from typing import TYPE_CHECKING

from ser.util import UserError

if TYPE_CHECKING:
    import torch


def pick_device(preference: str = "auto") -> "torch.device":
    """CUDA when present (or asked for), else CPU."""
    import torch

    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if preference.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device '{preference}' requested but CUDA is not available")
    return torch.device(preference)


PRECISIONS = ("float32", "bfloat16", "int8", "auto")


def autocast_dtype(device: "torch.device", precision: str = "float32") -> "torch.dtype | None":
    """The reduced precision inference runs in, None for float32. CUDA: float16 always.
    CPU: bfloat16 when asked, or with "auto" when the CPU has native bfloat16 units
    (AMX / AVX512-BF16: several times faster, labels the same but for near-ties, figures in
    docs/performance.md; elsewhere bfloat16 is emulated and slower, so auto keeps float32)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    import torch

    if device.type == "cuda":
        return torch.float16
    if precision == "bfloat16" or (precision == "auto" and _native_bfloat16()):
        return torch.bfloat16
    return None  # float32; int8 is the encoder's alone (encoder_precision), the CNN stays float32


def encoder_precision(precision: str, device_type: str = "cpu") -> str:
    """What the speech encoder runs in for `precision`. On the CPU: float32, bfloat16, or int8
    (its linear layers quantised, ser.encoder); auto: bfloat16 on CPUs with native units, else
    int8, the faster of the two where bfloat16 is emulated. On CUDA: float32 when asked (the
    features stage), else float16 (autocast, as the models run there)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    if device_type == "cuda":
        return "float32" if precision == "float32" else "float16"
    if precision != "auto":
        return precision
    return "bfloat16" if _native_bfloat16() else "int8"


def cuda_visible() -> bool:
    """Whether an NVIDIA GPU's device files exist: what decides, without importing torch, that
    a CPU-only machine needs no CUDA check (the labeller starts its workers before torch loads)."""
    from pathlib import Path

    return Path("/dev/nvidiactl").exists() or any(Path("/dev").glob("nvidia[0-9]*"))


def chosen_device(preference: str = "auto") -> str:
    """pick_device(preference) as a name ("cpu", "cuda"...); torch is imported only where an
    NVIDIA GPU's device files exist or CUDA is asked for."""
    if preference == "cpu" or (preference == "auto" and not cuda_visible()):
        return "cpu"
    return str(pick_device(preference))


def _native_bfloat16() -> bool:
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without oneDNN
        return False
