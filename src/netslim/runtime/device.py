"""Where a run computes: the device, and the precision autocast runs at there.

``auto`` picks CUDA, then Apple MPS, then the CPU; no code path assumes a GPU. bf16
autocast is chosen where it is fast and safe (CUDA GPUs with bf16, CPUs with AVX512-BF16
or AMX); BatchNorm runs in fp32 under autocast either way.
"""

from __future__ import annotations

import contextlib

import torch

from netslim.errors import NetslimError


def pick_device(name: str = "auto") -> torch.device:
    """``'auto'`` picks CUDA, then Apple MPS, then the CPU; any torch device name works too."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise NetslimError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise NetslimError(
            "--device cuda was asked for but no CUDA GPU is available; use --device cpu"
        )
    return device


def pick_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device``; None means plain fp32.

    ``auto`` is bf16 where it is fast and safe (CUDA GPUs with bf16, CPUs with AVX512-BF16
    or AMX), fp32 elsewhere. BatchNorm runs in fp32 under autocast either way.
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if device.type == "cpu" and getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)():
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
