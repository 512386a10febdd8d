"""How validate, test and predict run the network: a fused channels_last copy of the trunk, at ``inference_precision``.

Training runs the model as it is (BatchNorm, autograd, ``trainer.precision``). The evaluation and prediction steps
swap in, for the duration of one forward, the model's inference form: the trunk as a fused copy (norms folded, oneDNN
kernels on the CPU: :meth:`resnext_backbones.ResNeXt.fused`), and copies of the FPN and of the heads' networks
(convolutions, linear layers) whose convolutions run on weights packed once
(:func:`resnext_backbones.fused.pack_convolutions`), and RoI poolers as sparse matrix products on the CPU
(:mod:`tasks.roi_align`). In low precision the copies hold their weights in that dtype and
run natively (no autocast: it would cast every weight at every call). Each hands back float32, so box decoding, NMS
and the rest of postprocessing stay float32 whatever the precision (bf16 has 8 bits of mantissa: a box corner at
x=800 would move in steps of 4 pixels). The copies live outside the module tree: checkpoints, ``state_dict`` and the
optimizer never see them, and they are rebuilt whenever the model's weights have changed (an optimizer step, a loaded
state dict, a move to another device), so each validation sees the current weights.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import os
import warnings
from itertools import chain
from pathlib import Path
from typing import Dict, Iterator, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torchvision.ops import MultiScaleRoIAlign

from resnext_backbones.fused import pack_convolutions
from resnext_backbones.onednn import onednn_isa_limit, onednn_reaches
from tasks.roi_align import SparseRoIAlign

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


_LOWEST_NATIVE_ISA = {"bf16": "AVX512_CORE_BF16", "16": "AVX10_1_512"}  # oneDNN's first with bf16 / fp16 arithmetic


def native_support(precision: str, device: torch.device) -> bool:
    """Whether ``device`` computes ``precision`` natively: CUDA (bf16 where the GPU has it), CPUs with AMX or
    AVX-512 BF16 for bf16, AMX-FP16 or AVX-512 FP16 for 16, unless ``ONEDNN_MAX_CPU_ISA`` keeps oneDNN below them.
    Elsewhere low precision is emulated and slower than float32 (bf16 autocast ran ~20x slower on AVX2-only AMD
    EPYC)."""
    if precision == "32":
        return True
    if device.type == "cuda":
        return precision == "16" or torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu" and torch.backends.mkldnn.is_available():
        if not onednn_reaches(_LOWEST_NATIVE_ISA[precision]):
            return False
        wanted = ("amx_bf16", "avx512_bf16") if precision == "bf16" else ("amx_fp16", "avx512_fp16")
        return bool(set(wanted) & cpu_flags()) or any(getattr(torch.cpu, f"_is_{flag}_supported", bool)()
                                                      for flag in wanted)
    return False


def training_precision_advice(precision: str, device: torch.device) -> Tuple[int, str]:
    """What ``fit`` logs as it starts: the training precision on ``device`` and, where the device makes another choice
    faster, that choice. Returns a logging level and the message."""
    where = f"{device.type} ({describe_device(device)})"
    low = str(precision).split("-")[0]  # "bf16-mixed" -> "bf16", "32-true" -> "32"
    if low in ("bf16", "16") and not native_support(low, device):
        return logging.WARNING, (f"trainer.precision={precision} on {where}, which has no native {low}: autocast "
                                 "emulates it, much slower than float32 (bf16 ran ~20x slower on AVX2-only AMD EPYC); "
                                 "use --trainer.precision 32-true here")
    if low == "32" and native_support("bf16", device):
        return logging.INFO, (f"trainer.precision={precision} on {where}, which computes bf16 natively: "
                              "--trainer.precision bf16-mixed trains faster (the quick starts 1.36-1.37x on a 2-core "
                              "AMX Xeon: benchmarks/README.md, 'Training precision')")
    return logging.INFO, f"trainer.precision={precision} on {where}"


def state_fingerprint(module: nn.Module) -> tuple:
    """Changes whenever a tensor of ``module`` is written in place (optimizer step, ``load_state_dict``) or replaced
    (``.to(device)``): each tensor's storage address and version counter."""
    return tuple((t.data_ptr(), t._version) for t in chain(module.parameters(), module.buffers()))


def cast(value, dtype: torch.dtype):
    """``value`` with every floating-point tensor in it (in any nesting of lists, tuples and dicts) in ``dtype``."""
    if isinstance(value, Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, dict):
        return type(value)((k, cast(v, dtype)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(cast(v, dtype) for v in value)
    return value


class Native(nn.Module):
    """``module`` (its weights in ``dtype``) run natively in ``dtype``: floating inputs cast to it (with
    ``channels_last``, in that memory format too), outputs cast back to float32."""

    def __init__(self, module: nn.Module, dtype: torch.dtype, channels_last: bool = False) -> None:
        super().__init__()
        self.module, self.dtype, self.channels_last = module, dtype, channels_last

    def forward(self, *args):
        args = cast(args, self.dtype)
        if self.channels_last:
            args = [a.contiguous(memory_format=torch.channels_last) for a in args]
        return cast(self.module(*args), torch.float32)


def inference_copy(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of ``module`` for inference: weights in ``dtype``, convolutions on weights packed once
    (:func:`resnext_backbones.fused.pack_convolutions`)."""
    return pack_convolutions(copy.deepcopy(module).to(dtype))


class InferenceRunner:
    """Builds, caches and swaps in the inference form of one task's model. Not an ``nn.Module``: what it holds stays
    out of the task's module tree (state dict, checkpoints, DDP's parameters)."""

    def __init__(self, precision: str, fused: bool) -> None:
        self.precision, self.fused = precision, fused
        self._cached: Optional[Tuple[tuple, list]] = None
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
                          "AMX-FP16 or AVX-512 FP16", stacklevel=4)
        return torch.float32

    def build(self, backbone: nn.Module, trunk: nn.Module, trunk_name: Optional[str],
              heads: Sequence[nn.Module], dtype: torch.dtype) -> list:
        """``[backbone, *heads]`` in inference form, for ``dtype``."""
        if not self.fused:  # as trained, in low precision (unfused float32 runs the model itself: modules())
            network = copy.deepcopy(backbone).to(dtype)
        else:
            fast_trunk = trunk.fused(dtype) if getattr(trunk, "norm", None) != "gn" else inference_copy(trunk, dtype)
            if trunk_name is None:
                network = fast_trunk
            else:  # a shallow copy with children of its own: the fused trunk, the rest (the FPN) copied for inference
                network = copy.copy(backbone)
                network._modules = {name: fast_trunk if name == trunk_name else inference_copy(child, dtype)
                                    for name, child in backbone._modules.items()}
        return [Native(network, dtype, channels_last=True)] + [self.head(head, dtype) for head in heads]

    def head(self, head: nn.Module, dtype: torch.dtype) -> nn.Module:
        """A head's inference form: a RoI pooler as sparse matrix products (float32, it has no weights), a network
        in ``dtype``."""
        if isinstance(head, MultiScaleRoIAlign):
            return SparseRoIAlign(head) if self.fused else head
        return Native(inference_copy(head, dtype) if self.fused else copy.deepcopy(head).to(dtype), dtype)

    def modules(self, model: nn.Module, backbone: nn.Module, trunk: nn.Module, trunk_name: Optional[str],
                heads: Sequence[nn.Module]) -> list:
        """The inference form of ``[backbone, *heads]`` for the current weights of ``model`` (which holds them all):
        the cached one, or a new one if any weight changed. Unfused in float32, the model runs as it is."""
        dtype = self.dtype(next(trunk.parameters()).device)
        if not self.fused and dtype == torch.float32:
            return [backbone]
        key = (dtype, state_fingerprint(model))
        if self._cached is None or self._cached[0] != key:
            self._cached = None  # free the old copies before making new ones
            # Lightning predicts under inference_mode, whose tensors have no version counter (the fused kernels key
            # their packed weights on it): the copies are made of ordinary tensors
            with torch.inference_mode(False), torch.no_grad():
                self._cached = (key, self.build(backbone, trunk, trunk_name, heads, dtype))
        return self._cached[1]

    def release(self) -> None:
        """Drop the copies (training is about to change the weights anyway)."""
        self._cached = None

    @contextlib.contextmanager
    def swapped_in(self, model: nn.Module, backbone: Tuple[nn.Module, str], trunk: nn.Module,
                   trunk_name: Optional[str], heads: Sequence[Tuple[nn.Module, str]] = ()) -> Iterator[None]:
        """Inside the block, the backbone (``(parent, attribute)``) and the ``heads`` (each ``(parent, attribute)``) of
        ``model`` are their inference form; the originals are back after, also on an error."""
        slots = [backbone, *heads]
        originals = [owner._modules[attribute] for owner, attribute in slots]
        replacements = self.modules(model, originals[0], trunk, trunk_name, originals[1:])
        try:
            for (owner, attribute), module in zip(slots, replacements, strict=False):  # unfused fp32: as it is
                owner._modules[attribute] = module
            yield
        finally:
            for (owner, attribute), original in zip(slots, originals, strict=True):
                owner._modules[attribute] = original


ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16")  # what decides the fast path


def isa_flags() -> str:
    """Which of :data:`ISA_FLAGS` this CPU has, as text, and any limit set on what oneDNN and ATen use of them."""
    text = ", ".join(f for f in ISA_FLAGS if f in cpu_flags()) or "none of " + "/".join(ISA_FLAGS)
    limit = onednn_isa_limit()
    limits = [f"oneDNN limited to {limit[1]} ({limit[0]})"] if limit else []
    if os.environ.get("ATEN_CPU_CAPABILITY"):
        limits.append(f"ATen kernels limited to {os.environ['ATEN_CPU_CAPABILITY']} (ATEN_CPU_CAPABILITY)")
    return "; ".join([text, *limits])


def describe_device(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU flags: {isa_flags()}"
