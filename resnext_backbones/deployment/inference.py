"""The inference copy of a model built on our trunks: :func:`inference_copy`.

The copy runs the trunk fused (norms folded, ReLU and residual add fused in, oneDNN kernels on the CPU:
:meth:`resnext_backbones.ResNeXt.fused`), the FPN and the heads' networks on convolution weights packed once
(:func:`resnext_backbones.fused.pack_convolutions`), and RoI poolers as sparse matrix products on the CPU
(:class:`~resnext_backbones.deployment.SparseRoIAlign`). In a low precision those parts hold their weights in that
dtype and run natively (no autocast: it would cast every weight at every call); each hands back float32, so box
decoding, NMS and the rest of postprocessing stay float32 whatever the precision (bf16 has 8 bits of mantissa: a box
corner at x=800 would move in steps of 4 pixels).
"""

from __future__ import annotations

import copy
from typing import Dict, Iterator

import torch
from torch import Tensor, nn
from torchvision.ops import MultiScaleRoIAlign

from ..fpn import ResNeXtFPN
from ..fused import pack_convolutions
from ..trunk import ResNeXt
from .device import native_dtype
from .roi_align import SparseRoIAlign

__all__ = ["HEADS", "Native", "cast", "inference_copy"]

# Where torchvision's detectors keep the parts with an inference form: networks (run in the copy's dtype) and RoI
# poolers (sparse products). Paths that a model lacks, or holds None at (Faster R-CNN's mask head), are passed over.
HEADS = ("rpn.head", "roi_heads.box_roi_pool", "roi_heads.box_head", "roi_heads.box_predictor",
         "roi_heads.mask_roi_pool", "roi_heads.mask_head", "roi_heads.mask_predictor", "head",
         "decode_head")  # resnext_backbones.heads.SegmentationModel's


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


def inference_copy(model: nn.Module, dtype: torch.dtype = torch.float32, *, fused: bool = True) -> nn.Module:
    """A copy of ``model`` for inference, in eval mode, that computes what ``model.eval()`` does (to float
    tolerance in float32); ``model`` is left as it is.

    ``model``: a torchvision ``FasterRCNN``, ``MaskRCNN``, ``RetinaNet`` or ``FCOS`` whose backbone is
    :func:`resnext_backbones.resnext_fpn`, a :class:`resnext_backbones.heads.SegmentationModel` (its
    ``decode_head`` packed and in ``dtype`` too), or any module holding :class:`~resnext_backbones.ResNeXt` trunks or
    :class:`~resnext_backbones.ResNeXtFPN` backbones (a classifier; a trunk or backbone itself). In the copy each
    trunk runs fused and channels_last, the FPN and heads on packed convolutions, RoI poolers as sparse products on
    the CPU (``fused=False``: as they are, only in ``dtype``). ``dtype`` applies where the device computes it natively
    (CUDA; CPUs with AMX or AVX-512 BF16 / FP16), else float32 with a warning. Call it again after the weights change
    or the model moves: the copy holds weights of its own. A GroupNorm trunk is not fused (its norm depends on the
    input), only its convolutions packed.
    """
    parameter = next(model.parameters(), None)
    if parameter is None:
        raise ValueError(f"{type(model).__name__} has no parameters: nothing to make an inference copy of")
    dtype = native_dtype(dtype, parameter.device)
    # The replaced parts go straight into the copy: deepcopy takes a module found in its memo as its own copy.
    memo: Dict[int, nn.Module] = {}
    # Lightning predicts under inference_mode, whose tensors have no version counter (the fused kernels key their
    # packed weights on it): the copy is made of ordinary tensors
    with torch.inference_mode(False), torch.no_grad():
        for backbone in _outermost(model, (ResNeXtFPN, ResNeXt)):
            memo[id(backbone)] = Native(_fast_backbone(backbone, dtype, fused), dtype, channels_last=True)
        if not memo:
            raise ValueError(f"{type(model).__name__} holds no resnext_backbones trunk (ResNeXt or ResNeXtFPN): "
                             "build it on rb.resnext(...) or rb.resnext_fpn(...)")
        for path in HEADS:
            head = _submodule(model, path)
            if head is not None and id(head) not in memo:
                memo[id(head)] = _fast_head(head, dtype, fused)
        return copy.deepcopy(model, memo).eval()


def _fast_backbone(backbone: nn.Module, dtype: torch.dtype, fused: bool) -> nn.Module:
    """A trunk, or an FPN backbone, in inference form for ``dtype``."""
    if not fused:
        return copy.deepcopy(backbone).to(dtype).eval()
    if isinstance(backbone, ResNeXt):
        return backbone.fused(dtype) if backbone.norm != "gn" else _packed(backbone, dtype)
    fast = copy.copy(backbone)  # a shallow copy with children of its own: the fused trunk, the FPN packed
    fast._modules = {name: _fast_backbone(child, dtype, fused) if name == "body" else _packed(child, dtype)
                     for name, child in backbone._modules.items()}
    return fast.eval()


def _fast_head(head: nn.Module, dtype: torch.dtype, fused: bool) -> nn.Module:
    """A RoI pooler as sparse products (float32: it has no weights), a network in ``dtype``."""
    if isinstance(head, MultiScaleRoIAlign):
        return SparseRoIAlign(copy.deepcopy(head)) if fused else copy.deepcopy(head)
    return Native(_packed(head, dtype) if fused else copy.deepcopy(head).to(dtype).eval(), dtype)


def _packed(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    return pack_convolutions(copy.deepcopy(module).to(dtype)).eval()


def _outermost(model: nn.Module, kinds: tuple) -> Iterator[nn.Module]:
    """The modules of ``model`` (itself included) of one of ``kinds`` that no other such module contains."""
    if isinstance(model, kinds):
        yield model
        return
    for child in model.children():
        yield from _outermost(child, kinds)


def _submodule(model: nn.Module, path: str):
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None
