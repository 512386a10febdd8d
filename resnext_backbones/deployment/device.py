"""What the device at hand computes natively: the one place that asks the CPU's flags, oneDNN's limit and CUDA.

The inference copy (:func:`~resnext_backbones.deployment.inference_copy`) runs in a low precision only where it is
native, and the tasks advise on the training precision from the same answers: emulated bf16 or fp16 (on a CPU without
AVX-512 BF16 / AMX, or AVX-512 FP16 / AMX-FP16) is much slower than float32, native bf16 is faster.
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
from pathlib import Path
from typing import Optional, Tuple

import torch

from ..onednn import onednn_isa_limit, onednn_reaches

__all__ = ["ISA_FLAGS", "cpu_flags", "describe_device", "isa_flags", "native_dtype", "native_support",
           "training_precision_advice"]

ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16")  # what decides the fast path
# per low-precision dtype: the CPU flags that compute it, and oneDNN's first instruction set with its arithmetic
_CPU_SUPPORT = {torch.bfloat16: (("amx_bf16", "avx512_bf16"), "AVX512_CORE_BF16"),
                torch.float16: (("amx_fp16", "avx512_fp16"), "AVX10_1_512")}


@functools.cache
def cpu_flags() -> frozenset:
    """The CPU's feature flags (``/proc/cpuinfo``; empty where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_support(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether ``device`` computes ``dtype`` natively: float32 everywhere; on CUDA fp16, and bf16 where the GPU has
    it; on the CPU bf16 with AMX or AVX-512 BF16, fp16 with AMX-FP16 or AVX-512 FP16, unless ``ONEDNN_MAX_CPU_ISA``
    keeps oneDNN below them. Elsewhere low precision is emulated, and slower than float32."""
    device = torch.device(device)
    if dtype == torch.float32:
        return True
    if dtype not in _CPU_SUPPORT:
        raise ValueError(f"dtype={dtype} is not supported; choose one of torch.float32, torch.bfloat16, torch.float16")
    if device.type == "cuda":
        return dtype == torch.float16 or torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu" and torch.backends.mkldnn.is_available():
        flags, isa = _CPU_SUPPORT[dtype]
        if not onednn_reaches(isa):
            return False
        return bool(set(flags) & cpu_flags()) or any(getattr(torch.cpu, f"_is_{flag}_supported", bool)()
                                                     for flag in flags)
    return False


def native_dtype(dtype: torch.dtype, device: torch.device, asked: Optional[str] = None) -> torch.dtype:
    """``dtype`` where ``device`` computes it natively, else float32 with a warning that names what ``asked`` for
    ``dtype`` (default ``dtype=<dtype>``; the tasks name their configuration key) and the fallback."""
    if native_support(dtype, device):
        return dtype
    device = torch.device(device)
    warnings.warn(f"{asked or f'dtype={dtype}'} is not native on this {device.type} ({describe_device(device)}): "
                  "inference runs in float32 instead. bf16 needs a CUDA GPU with bf16 or a CPU with AMX or AVX-512 "
                  "BF16; float16 a CUDA GPU or a CPU with AMX-FP16 or AVX-512 FP16", stacklevel=3)
    return torch.float32


def training_precision_advice(precision: str, device: torch.device) -> Tuple[int, str]:
    """What training logs as it starts: the training precision (Lightning's spelling, e.g. ``bf16-mixed``) on
    ``device`` and, where another choice is faster there, that choice. Returns a logging level and the message."""
    where = f"{device.type} ({describe_device(device)})"
    name = str(precision).split("-")[0]  # "bf16-mixed" -> "bf16", "32-true" -> "32"
    low = {"bf16": torch.bfloat16, "16": torch.float16}.get(name)
    if low is not None and not native_support(low, device):
        return logging.WARNING, (f"trainer.precision={precision} on {where}, which has no native {low}: autocast "
                                 "emulates it, much slower than float32; use --trainer.precision 32-true here")
    if name == "32" and native_support(torch.bfloat16, device):
        return logging.INFO, (f"trainer.precision={precision} on {where}, which computes bf16 natively: "
                              "--trainer.precision bf16-mixed trains faster (benchmarks/README.md, 'Training "
                              "precision')")
    return logging.INFO, f"trainer.precision={precision} on {where}"


def isa_flags() -> str:
    """Which of :data:`ISA_FLAGS` this CPU has, as text, and any limit set on what oneDNN and ATen use of them."""
    text = ", ".join(f for f in ISA_FLAGS if f in cpu_flags()) or "none of " + "/".join(ISA_FLAGS)
    limit = onednn_isa_limit()
    limits = [f"oneDNN limited to {limit[1]} ({limit[0]})"] if limit else []
    if os.environ.get("ATEN_CPU_CAPABILITY"):
        limits.append(f"ATen kernels limited to {os.environ['ATEN_CPU_CAPABILITY']} (ATEN_CPU_CAPABILITY)")
    return "; ".join([text, *limits])


def describe_device(device: torch.device) -> str:
    """The GPU's name, or the CPU's flags that decide the fast path."""
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU flags: {isa_flags()}"
