"""The inference form of a trunk: each norm folded into its convolution, the ReLU and the residual add fused in.

On the CPU, for channels_last inputs, every convolution then runs as one oneDNN kernel (convolution + bias
[+ shortcut] [+ ReLU]) on a weight reordered once into oneDNN's blocked layout. ``F.conv2d`` reorders every
weight on every call (100 MB for ResNeXt-50, per forward) and runs bias, add and ReLU as separate passes.
That holds for float32 and, with the module cast to it (``.to(torch.bfloat16)``), for bfloat16 and float16
inputs of the same dtype: oneDNN's low-precision kernels without autocast's per-call weight casts, fast on CPUs
with AMX or AVX-512 BF16 (with AMX, narrow groups of a grouped weight are joined into block-diagonal groups of at
least 32 channels, the depth of its tiles). Everywhere else (NCHW inputs, CUDA, autograd on the input, an input dtype
other than the weights' or one this CPU's oneDNN lacks, autocast to another dtype, ``torch.compile``/
``torch.export``) the same modules run the plain aten ops: the same values, and the output keeps the input's
memory format.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .onednn import onednn_reaches

__all__ = ["FusedConv2d", "FusedBlock", "merge_groups", "min_merge", "pack_convolutions"]

_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
# The low-precision kernels need CPU support (bf16: AVX-512 BW/VL/DQ or AVX-NE-CONVERT; fp16: AVX-512 FP16 or
# AVX-NE-CONVERT): elsewhere oneDNN refuses them ("bf16 path needs the cpu support ...") and F.conv2d runs them.
_LOW_PRECISION_CHECKS = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}
_ONEDNN_DTYPES = (torch.float32,) + tuple(
    dtype for dtype, check in _LOW_PRECISION_CHECKS.items() if _ONEDNN and getattr(torch.ops.mkldnn, check)())
# AMX multiplies tiles 32 bf16/fp16 deep: a group of 4 input channels (the first stage of 32x4d) fills an eighth of
# one. Groups joined into block-diagonal groups of 32 channels do more multiply-adds there, yet run faster, because
# every tile is full (benchmarks/README.md has the measurements). Not without AMX: without tiles there is nothing to
# fill, so the extra multiply-adds are only extra work (float32 on AVX-512 or AVX2, fp16 on AVX-512 FP16, bf16 with
# oneDNN kept below AMX by ONEDNN_MAX_CPU_ISA). Not for depthwise weights either (one channel per group: joining
# them multiplies the work by the group count, more than full tiles give back).
_AMX = {torch.bfloat16: ("_is_amx_tile_supported", "AVX10_1_512_AMX"),
        torch.float16: ("_is_amx_fp16_supported", "AVX10_1_512_AMX_FP16")}  # the CPU's check, oneDNN's ISA


# On CUDA, cuDNN's fused convolution-bias(-add)-ReLU: F.conv2d adds the bias in a separate broadcast kernel slower
# than the eval norm it replaces, then the add and the ReLU each pass over the output again; fused, the output is
# written once (benchmarks/README.md compares it with torchvision's eager and autocast inference).
_CUDNN_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ONEDNN, CUDNN, PLAIN = "onednn", "cudnn", "plain"  # what FusedConv2d.kernel picks: a fused kernel, or the plain ops


def amx_group_widths() -> Dict[torch.dtype, int]:
    """The least group width the packed weights get per dtype: 32 for the dtypes this CPU's AMX computes and
    oneDNN may use it for; none (groups as they are) for the others."""
    return {dtype: 32 for dtype, (check, isa) in _AMX.items()
            if getattr(torch.cpu, check, lambda: False)() and onednn_reaches(isa)}


_MIN_GROUP_WIDTH = amx_group_widths()  # oneDNN reads its limit once, at first use: so does this, at import


class FusedConv2d(nn.Module):
    """``relu(conv(x) + bias [+ shortcut])`` with the norm (if any) already folded into ``weight`` and ``bias``.

    Parameters keep the names of the convolution they replace (``weight``, ``bias``), so a fused trunk's state
    dict has ``convN.weight``/``convN.bias`` where the trunk had ``convN.weight`` and ``bnN.*``. ``norm=None``
    takes the convolution as it is (its bias, or zeros): :func:`pack_convolutions`.
    """

    PACKED_SHAPES = 8  # reordered weights kept per convolution: one per input shape, the most recently used

    def __init__(self, conv: nn.Conv2d, norm: Optional[nn.Module], relu: bool) -> None:
        super().__init__()
        folded = conv if norm is None else fuse_conv_bn_eval(conv, norm)  # torch's folding (FrozenBatchNorm2d too)
        bias = folded.bias if folded.bias is not None else torch.zeros_like(conv.weight[:, 0, 0, 0])
        self.weight = nn.Parameter(folded.weight.detach().clone(), requires_grad=False)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.stride, self.padding = list(conv.stride), list(conv.padding)
        self.dilation, self.groups, self.relu = list(conv.dilation), conv.groups, relu
        self._packed: Dict[tuple, Tuple[Tensor, int]] = {}  # (shape, dtype, weight, version) -> (weight, groups)

    def extra_repr(self) -> str:
        o, i, kh, kw = self.weight.shape
        return (f"{i * self.groups}, {o}, kernel_size=({kh}, {kw}), stride={tuple(self.stride)}, "
                f"groups={self.groups}, relu={self.relu}")

    def forward(self, x: Tensor, shortcut: Optional[Tensor] = None, inplace: bool = False,
                kernel: Optional[str] = None) -> Tensor:
        """One kernel where it can: oneDNN's on the CPU, cuDNN's convolution-bias-add-ReLU on CUDA (with a ReLU);
        else ``F.conv2d`` and the elementwise ops. ``inplace``: the sum may be written into ``shortcut`` (saves an
        activation-sized allocation). ``kernel``: :meth:`kernel`'s answer for ``x``, where the caller knows it;
        ``None`` asks :meth:`kernel`."""
        kernel = self.kernel(x) if kernel is None else kernel
        if kernel == ONEDNN:
            weight, groups = self._packed_weight(x)
            args = (weight, self.bias, self.padding, self.stride, self.dilation, groups)
            if shortcut is None:
                return torch.ops.mkldnn._convolution_pointwise(x, *args, "relu" if self.relu else "none", [], "")
            op = torch.ops.mkldnn._convolution_pointwise_ if inplace else torch.ops.mkldnn._convolution_pointwise
            first, second = (shortcut, x) if inplace else (x, shortcut)  # the in-place op takes its target first
            return op.binary(first, second, *args, "add", 1.0, "relu" if self.relu else None, [], None)
        if kernel == CUDNN and self.relu:
            args = (self.bias, self.stride, self.padding, self.dilation, self.groups)
            if shortcut is None:
                return torch.cudnn_convolution_relu(x, self.weight, *args)
            return torch.cudnn_convolution_add_relu(x, self.weight, shortcut, 1.0, *args)
        out = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        if shortcut is not None:
            out += shortcut
        return F.relu_(out) if self.relu else out

    def kernel(self, x: Tensor) -> str:
        """Which fused kernel takes ``x``: :data:`ONEDNN` (CPU, channels_last, a dtype this CPU's oneDNN computes),
        :data:`CUDNN` (CUDA, not ROCm; used where there is a ReLU to fuse), or :data:`PLAIN`, the plain ops: for another
        dtype than the weights', autograd (the fused ops have no backward), autocast to another dtype, compile
        (Inductor fuses the plain ops itself). The kernel's output is taken too, so a block asks once for all its
        convolutions: these checks run on the hot path, and at small batches asking at each convolution costs
        measurably."""
        if x.dtype != self.weight.dtype or torch.compiler.is_compiling():
            return PLAIN
        device = x.device.type
        if device not in ("cpu", "cuda") or (torch.is_autocast_enabled(device)
                                             and torch.get_autocast_dtype(device) != x.dtype):
            return PLAIN
        if device == "cpu":
            return ONEDNN if (_ONEDNN and torch.backends.mkldnn.enabled and x.dim() == 4
                              and x.is_contiguous(memory_format=torch.channels_last) and x.dtype in _ONEDNN_DTYPES
                              and not (x.requires_grad and torch.is_grad_enabled())) else PLAIN
        return CUDNN if (torch.version.hip is None and torch.backends.cudnn.enabled and x.dtype in _CUDNN_DTYPES
                         and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))) \
            else PLAIN

    def _packed_weight(self, x: Tensor) -> Tuple[Tensor, int]:
        # oneDNN picks its kernel, and the weight layout it wants, by input shape: a weight packed for another
        # shape runs several times slower. So a copy is kept per recent shape (an FPN level, a batch of another size),
        # and made again when the weight changes (load_state_dict bumps the version; .to() moves the storage).
        # Returns the packed weight and the groups it is packed for (fewer on AMX: _MIN_GROUP_WIDTH).
        key = (tuple(x.shape), x.dtype, self.weight.data_ptr(), self.weight._version)
        packed = self._packed.pop(key, None)  # re-inserted last: the dict keeps the most recently used at its end
        if packed is None:
            merge = min_merge(self.groups, self.weight.shape[1], _MIN_GROUP_WIDTH.get(x.dtype, 1))
            weight = merge_groups(self.weight.detach(), self.groups, merge)
            groups = self.groups // merge
            packed = (torch.ops.mkldnn._reorder_convolution_weight(
                weight, self.padding, self.stride, self.dilation, groups, list(x.shape)), groups)
            while len(self._packed) >= self.PACKED_SHAPES:
                self._packed.pop(next(iter(self._packed)))
        self._packed[key] = packed
        return packed

    def _apply(self, fn, recurse: bool = True):
        self._packed = {}  # .to()/.float()/.cpu(): the reordered copies belong to the old tensor
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict:  # pickle and deepcopy: the oneDNN copies are a cache, rebuilt on first use
        return {**self.__dict__, "_packed": {}}


def min_merge(groups: int, width: int, min_width: int) -> int:
    """How many neighbouring groups of ``width`` input channels to merge, a power of two dividing ``groups``: the
    least for merged groups of at least ``min_width`` channels, else the most ``groups`` allows. Depthwise weights
    (``width`` 1) stay as they are."""
    merge = 1
    while width > 1 and width * merge < min_width and groups % (2 * merge) == 0:
        merge *= 2
    return merge


def merge_groups(weight: Tensor, groups: int, merge: int) -> Tensor:
    """The weight of a convolution with ``groups`` as the same convolution with ``groups // merge`` groups: each run of
    ``merge`` neighbouring groups becomes one block-diagonal group (zeros between the groups it joins)."""
    if merge == 1:
        return weight
    out_channels, width, *kernel = weight.shape
    blocks = weight.reshape(groups // merge, merge, out_channels // groups, width, *kernel)
    merged = weight.new_zeros(groups // merge, merge, out_channels // groups, merge, width, *kernel)
    for j in range(merge):
        merged[:, j, :, j] = blocks[:, j]
    return merged.reshape(out_channels, merge * width, *kernel)


def pack_convolutions(module: nn.Module) -> nn.Module:
    """Every ``nn.Conv2d`` of ``module`` (an FPN, a detector's heads) as a :class:`FusedConv2d` without norm, in place:
    on the CPU with channels_last input, one oneDNN kernel on a weight reordered once per input shape instead of at
    every call (benchmarks/README.md has the timings); elsewhere the same ``F.conv2d``. For inference
    (the weights no longer train). Convolutions with other padding modes or string padding are left as they are."""
    for name, child in module.named_children():
        if isinstance(child, nn.Conv2d) and child.padding_mode == "zeros" and not isinstance(child.padding, str):
            setattr(module, name, FusedConv2d(child, None, relu=False))
        else:
            pack_convolutions(child)
    return module


class FusedBlock(nn.Module):
    """A residual block in inference form: its convolutions with ReLU, the last one adding the shortcut first.

    Keeps the block's attribute names (``conv1``.., ``downsample.0``) so state dict keys stay those of the
    block less its norms. The shortcut convolution is called itself, with the block's one check of its input
    (:meth:`FusedConv2d.kernel`): hooks on ``downsample``, the ``Sequential`` that keeps its name, do not run.
    ``reuse_input``: the shortcut sum may overwrite the block's input (the trunk sets it, as it never reads a
    block's input again; a caller of the block itself keeps its tensor by default).
    """

    def __init__(self, block: nn.Module, reuse_input: bool = False) -> None:
        super().__init__()
        self.convs = tuple(f"conv{k}" for k in range(1, block.num_convs + 1))
        for k, name in enumerate(self.convs, 1):
            setattr(self, name, FusedConv2d(getattr(block, name), getattr(block, f"bn{k}"), relu=True))
        self.downsample = None
        if block.downsample is not None:
            conv, norm = block.downsample
            self.downsample = nn.Sequential(FusedConv2d(conv, norm, relu=False))
        self.reuse_input = reuse_input

    def forward(self, x: Tensor) -> Tensor:
        kernel = self.conv1.kernel(x)  # the block's other convolutions see the same kind of tensor
        shortcut = x if self.downsample is None else self.downsample[0](x, kernel=kernel)
        *inner, last = self.convs
        out = x
        for name in inner:
            out = getattr(self, name)(out, kernel=kernel)
        return getattr(self, last)(out, shortcut, inplace=self.reuse_input or self.downsample is not None,
                                   kernel=kernel)
