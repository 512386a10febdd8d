"""How validate, test and predict run the network: the trunk's fused, channels_last copy, at ``inference_precision``.

Training runs the trunk as it is (BatchNorm, autograd, ``trainer.precision``). The evaluation and prediction steps
swap in, for the duration of one forward, a module that runs a fused copy of the trunk (norms folded, oneDNN kernels
on the CPU: :meth:`resnext_backbones.ResNeXt.fused`) in the inference dtype, natively (no autocast around it), and
the rest of the backbone (the FPN) under autocast to that dtype; its outputs come back as float32, so the heads, box
decoding and postprocessing stay in float32 whatever the precision (bf16 has 8 bits of mantissa: a box corner at
x=800 would move in steps of 4 pixels). The copy lives outside the module tree: checkpoints, ``state_dict`` and the
optimizer never see it, and it is rebuilt whenever the trunk's weights have changed (an optimizer step, a loaded
state dict, a move to another device), so each validation sees the current weights.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import warnings
from itertools import chain
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple, Union

import torch
from torch import Tensor, nn

INFERENCE_PRECISIONS: Dict[str, torch.dtype] = {"32": torch.float32, "bf16": torch.bfloat16, "16": torch.float16}


def precision_name(precision: Union[int, str]) -> str:
    """``32`` | ``bf16`` | ``16`` (ints and Lightning's spellings ``32-true``/``bf16-mixed``/``16-mixed`` accepted)."""
    name = str(precision).removesuffix("-true").removesuffix("-mixed")
    if name not in INFERENCE_PRECISIONS:
        raise ValueError(f"model.inference_precision={precision!r} is not supported; choose one of "
                         f"{list(INFERENCE_PRECISIONS)}")
    return name


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


def native_support(precision: str, device: torch.device) -> bool:
    """Whether ``device`` computes ``precision`` natively: CUDA (bf16 where the GPU has it), CPUs with AMX or
    AVX-512 BF16 for bf16, AMX-FP16 or AVX-512 FP16 for 16. Elsewhere low precision is emulated and slower than
    float32 (bf16 autocast ran ~20x slower on AVX2-only AMD EPYC)."""
    if precision == "32":
        return True
    if device.type == "cuda":
        return precision == "16" or torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu" and torch.backends.mkldnn.is_available():
        wanted = ("amx_bf16", "avx512_bf16") if precision == "bf16" else ("amx_fp16", "avx512_fp16")
        return bool(set(wanted) & cpu_flags()) or any(getattr(torch.cpu, f"_is_{flag}_supported", bool)()
                                                      for flag in wanted)
    return False


def state_fingerprint(module: nn.Module) -> tuple:
    """Changes whenever a tensor of ``module`` is written in place (optimizer step, ``load_state_dict``) or replaced
    (``.to(device)``): each tensor's storage address and version counter."""
    return tuple((t.data_ptr(), t._version) for t in chain(module.parameters(), module.buffers()))


class InferenceBackbone(nn.Module):
    """The backbone as validate/test/predict run it: ``trunk`` (a fused copy, in ``dtype``) natively, the rest of
    ``backbone`` (an FPN around it, or nothing) under autocast to ``dtype``, outputs as float32.

    ``backbone`` is shallow-copied with ``trunk`` in place of its own (attribute ``trunk_name``), so the FPN's
    weights are shared, not copied; ``trunk_name=None`` means the backbone is the trunk.
    """

    def __init__(self, backbone: nn.Module, trunk: nn.Module, trunk_name: Optional[str], dtype: torch.dtype) -> None:
        super().__init__()
        if trunk_name is None:
            self.module = trunk
        else:
            self.module = copy.copy(backbone)  # a new module dict: the original's keeps its trunk
            self.module._modules = {**backbone._modules, trunk_name: trunk}
        self.dtype = dtype

    def forward(self, x: Tensor):
        x = x.to(self.dtype, memory_format=torch.channels_last)
        low = self.dtype != torch.float32
        with torch.autocast(x.device.type, dtype=self.dtype if low else None, enabled=low):
            out = self.module(x)
        if isinstance(out, dict):
            return type(out)((k, v.float()) for k, v in out.items())
        return out.float()


class InferenceRunner:
    """Builds, caches and swaps in the :class:`InferenceBackbone` of one task. Not an ``nn.Module``: what it holds
    stays out of the task's module tree (state dict, checkpoints, DDP's parameters)."""

    def __init__(self, precision: str, fused: bool) -> None:
        self.precision, self.fused = precision, fused
        self._cached: Optional[Tuple[tuple, InferenceBackbone]] = None
        self._warned = False

    def dtype(self, device: torch.device) -> torch.dtype:
        """The inference dtype on ``device``: ``precision``'s where natively supported, else float32 (warned once)."""
        if native_support(self.precision, device):
            return INFERENCE_PRECISIONS[self.precision]
        if not self._warned:
            self._warned = True
            warnings.warn(f"model.inference_precision={self.precision} is not native on this {device.type} "
                          f"({describe_device(device)}): validate/test/predict run in float32 instead. bf16 needs a "
                          "CUDA GPU with bf16 or a CPU with AMX or AVX-512 BF16; 16 a CUDA GPU or a CPU with "
                          "AMX-FP16 or AVX-512 FP16", stacklevel=3)
        return torch.float32

    def backbone(self, backbone: nn.Module, trunk: nn.Module, trunk_name: Optional[str]) -> InferenceBackbone:
        """The inference backbone for the trunk's current weights: the cached one, or a new one if they changed."""
        device = next(trunk.parameters()).device
        dtype = self.dtype(device)
        key = (dtype, state_fingerprint(trunk))
        if self._cached is None or self._cached[0] != key:
            self._cached = None  # free the old copy before making the new one
            # Lightning predicts under inference_mode, whose tensors have no version counter (the fused kernels key
            # their packed weights on it): the copy is made of ordinary tensors
            with torch.inference_mode(False), torch.no_grad():
                fast = trunk.fused(dtype) if self.fused and getattr(trunk, "norm", None) != "gn" else trunk
            self._cached = (key, InferenceBackbone(backbone, fast, trunk_name, dtype))
        return self._cached[1]

    def release(self) -> None:
        """Drop the copy (training is about to change the weights anyway)."""
        self._cached = None

    @contextlib.contextmanager
    def swapped_in(self, parent: nn.Module, name: str, trunk: nn.Module, trunk_name: Optional[str]) -> Iterator[None]:
        """``parent.<name>`` (the backbone) is the inference backbone inside the block, and the original again after,
        also on an error."""
        original = parent._modules[name]
        parent._modules[name] = self.backbone(original, trunk, trunk_name)
        try:
            yield
        finally:
            parent._modules[name] = original


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    wanted = ("amx_bf16", "amx_fp16", "avx512_bf16", "avx512_fp16", "avx512f", "avx2")
    return "CPU flags: " + (", ".join(f for f in wanted if f in cpu_flags()) or "none of " + "/".join(wanted))
