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
from typing import Optional, Tuple, Union

import torch

from ..onednn import onednn_isa_limit, onednn_reaches

__all__ = ["BF16_TRAINING_FASTER", "ISA_FLAGS", "auto_training_precision", "cpu_flags", "describe_device", "isa_flags",
           "native_dtype", "native_support", "training_precision_advice"]

ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16")  # what decides the fast path
# per low-precision dtype: the CPU flags that compute it, and oneDNN's first instruction set with its arithmetic
_CPU_SUPPORT = {torch.bfloat16: (("amx_bf16", "avx512_bf16"), "AVX512_CORE_BF16"),
                torch.float16: (("amx_fp16", "avx512_fp16"), "AVX10_1_512")}
# The CPU kinds, by the flag that gives oneDNN native bf16, where bf16-mixed training was measured faster than 32-true
# (benchmarks/README.md, "Training precision"): where a kind with native bf16 is not here, auto keeps float32
BF16_TRAINING_FASTER = {"amx_bf16": "Intel Xeon with AMX", "avx512_bf16": "AMD EPYC (Zen 4, Zen 5) with AVX-512 BF16"}


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
        return onednn_reaches(isa) and any(has_cpu_flag(flag) for flag in flags)
    return False


def has_cpu_flag(flag: str) -> bool:
    """Whether the CPU has ``flag`` (``/proc/cpuinfo``, or torch's own probe where it has one)."""
    return flag in cpu_flags() or getattr(torch.cpu, f"_is_{flag}_supported", bool)()


def auto_training_precision(device: Union[str, torch.device]) -> Tuple[str, str]:
    """What ``trainer.precision: auto`` trains in on ``device``, and why: ``bf16-mixed`` on a CUDA GPU with bf16, and
    on a CPU that computes bf16 natively (AMX or AVX-512 BF16, within oneDNN's limit) of a kind where it was measured
    faster (:data:`BF16_TRAINING_FASTER`); elsewhere ``32-true`` (emulated bf16 is much slower than float32)."""
    kind = device.type if isinstance(device, torch.device) else str(device).split(":")[0]
    if kind not in ("cpu", "cuda"):
        return "32-true", f"bf16 training was measured on CUDA GPUs and CPUs only, not on {device}"
    device = torch.device(device)
    where = f"{device.type} ({describe_device(device)})"
    if device.type == "cuda":
        if native_support(torch.bfloat16, device):
            return "bf16-mixed", f"{where} computes bf16 natively"
        return "32-true", f"{where} has no native bf16"
    if not native_support(torch.bfloat16, device):
        return "32-true", f"{where} has no native bf16: autocast would emulate it, much slower than float32"
    kind = next((name for flag, name in BF16_TRAINING_FASTER.items() if has_cpu_flag(flag)), None)
    if kind is None:
        return "32-true", (f"{where} computes bf16 natively, but bf16-mixed training was not measured faster on this "
                           "kind of CPU (resnext_backbones.deployment.BF16_TRAINING_FASTER)")
    return "bf16-mixed", (f"{where} computes bf16 natively, and bf16-mixed trained faster than 32-true on this kind "
                          f"({kind}: benchmarks/README.md, 'Training precision')")


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
