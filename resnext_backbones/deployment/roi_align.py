"""torchvision's RoIAlign on the CPU as sparse matrix products: the same values and gradients, on all threads.

RoIAlign is linear in the features: each output value is a weighted sum of feature pixels (per bin, a grid of
bilinear samples of 4 pixels each). So the pooled features of boxes on one feature map are ``weights @ pixels``:
``pixels`` the map as a ``(pixels, channels)`` table (a view of a channels_last map), ``weights`` a sparse CSR matrix
with 4 entries per sample of each output bin. The gradient with respect to the features is the transposed product,
``weights^T @ grad``. MKL runs both products on all threads and vectorised over channels, where torchvision's CPU
kernel loops over boxes, bins and channels on one thread, forward and backward (benchmarks/README.md has the timings).

The weights follow torchvision's kernel: sample points at ``start + bin * (i + (j + 0.5) / grid)``, none beyond one
pixel outside the map, clamped to its edge; ``aligned`` shifts boxes by half a pixel and leaves them unclamped; an
adaptive ``sampling_ratio <= 0`` takes ``ceil(box side / bins)`` samples per bin side, box by box. Under CPU autocast
the products run in float32 and hand back the features' dtype, as torchvision's autocast kernel does. Elsewhere (CUDA,
half precision outside autocast, scripting, tracing, compiling) torchvision's own module runs.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Dict, Iterator, List, Tuple, Union

import torch
from torch import Tensor, nn
from torchvision.ops import MultiScaleRoIAlign

from .torchvision_private import convert_to_roi_format, filter_input, setup_scales

__all__ = ["SparseRoIAlign", "roi_align_weights", "sparse_roi_align", "sparse_roi_poolers"]

_DTYPES = (torch.float32, torch.float64)  # those of MKL's sparse products
_AUTOCAST_DTYPES = (torch.bfloat16, torch.float16)  # computed in float32 under CPU autocast, as torchvision does
POOLERS = ("box_roi_pool", "mask_roi_pool")  # the RoI poolers of torchvision's RoIHeads


class SparseRoIAlign(nn.Module):
    """``pooler`` (a torchvision ``MultiScaleRoIAlign``), computed as sparse matrix products per level on the CPU,
    with autograd."""

    def __init__(self, pooler: MultiScaleRoIAlign) -> None:
        super().__init__()
        self.pooler = pooler

    def forward(self, x: Dict[str, Tensor], boxes: List[Tensor], image_shapes: List[Tuple[int, int]]) -> Tensor:
        p = self.pooler
        features = filter_input(x, p.featmap_names)
        if not runs_sparse(features[0]):
            return p(x, boxes, image_shapes)
        if p.scales is None or p.map_levels is None:  # as torchvision sets them up, on the first call
            p.scales, p.map_levels = setup_scales(features, image_shapes, p.canonical_scale, p.canonical_level)
        rois = convert_to_roi_format(boxes)
        levels = p.map_levels(boxes) if len(features) > 1 else None
        dtype = features[0].dtype
        result = features[0].new_zeros(len(rois), features[0].shape[1], *p.output_size)
        for level, (feature, scale) in enumerate(zip(features, p.scales, strict=True)):
            index = torch.where(levels == level)[0] if levels is not None else None
            level_rois = rois if index is None else rois[index]
            if len(level_rois):
                pooled = sparse_roi_align(feature, level_rois, p.output_size, scale, p.sampling_ratio).to(dtype)
                if index is None:
                    return pooled.contiguous()
                result[index] = pooled
        return result


def runs_sparse(features: Tensor) -> bool:
    """Whether :func:`sparse_roi_align` takes ``features``: on the CPU, float32/64 (bf16/fp16 under CPU autocast),
    in eager mode."""
    return (features.device.type == "cpu"
            and (features.dtype in _DTYPES
                 or (features.dtype in _AUTOCAST_DTYPES and torch.is_autocast_enabled("cpu")))
            and not (torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling()))


def sparse_roi_align(features: Tensor, rois: Tensor, output_size: Union[int, Tuple[int, int]],
                     spatial_scale: float = 1.0, sampling_ratio: int = -1, aligned: bool = False) -> Tensor:
    """``torchvision.ops.roi_align(features, rois, ...)`` (``rois``: ``K x 5``, image index then ``x1, y1, x2, y2``)
    for a CPU tensor, as a sparse product: ``(K, C, *output_size)``, differentiable with respect to ``features``
    (boxes get no gradient, as with torchvision's kernel). bf16/fp16 features are computed in float32."""
    output_size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    if features.dtype not in _DTYPES:
        features = features.float()
    channels = features.shape[1]
    with torch.autocast("cpu", enabled=False):
        weights = roi_align_weights(rois.to(features.dtype), features.shape, spatial_scale, output_size,
                                    sampling_ratio, aligned)
        pixels = features.permute(0, 2, 3, 1).reshape(-1, channels)  # a view of channels_last maps
        pooled = _SparseProduct.apply(weights, pixels) if pixels.requires_grad else torch.mm(weights, pixels)
    return pooled.view(len(rois), *output_size, channels).permute(0, 3, 1, 2)


class _SparseProduct(torch.autograd.Function):
    """``weights @ pixels`` for a constant CSR matrix ``weights``; the gradient with respect to ``pixels`` is
    ``weights^T @ grad``, a sparse product on all threads too."""

    @staticmethod
    def forward(ctx, weights: Tensor, pixels: Tensor) -> Tensor:
        ctx.weights = weights  # an input, not an output: no reference cycle
        return torch.mm(weights, pixels)

    @staticmethod
    def backward(ctx, grad: Tensor):
        # weights.t() is the CSC form of the same arrays, no copy: MKL multiplies it as it is, where converting it to
        # CSR first would sort every entry by pixel
        return None, torch.mm(ctx.weights.t(), grad.contiguous())


def roi_align_weights(rois: Tensor, shape: torch.Size, scale: float, output_size: Tuple[int, int],
                      sampling_ratio: int, aligned: bool = False) -> Tensor:
    """The ``(boxes * bins, pixels)`` CSR matrix of RoIAlign on a feature map of ``shape`` (``N, C, H, W``): row
    ``(box, bin_y, bin_x)`` holds the bilinear weights of the bin's samples, averaged; columns index the map's
    ``(image, y, x)`` pixels. ``rois``: ``(image index, x1, y1, x2, y2)`` in image pixels, ``scale`` of the map."""
    _, _, height, width = shape
    box = rois[:, 1:] * scale - (0.5 if aligned else 0.0)
    length = box[:, 2:] - box[:, :2]  # (boxes, [x, y])
    bin_size = (length if aligned else length.clamp(min=1.0)) / length.new_tensor(output_size[::-1])
    if sampling_ratio > 0:
        grids = torch.full_like(box[:, :2], sampling_ratio, dtype=torch.int64)
    else:  # adaptive: ceil(side / bins) samples per bin side, box by box (none where an aligned box is empty)
        grids = bin_size.ceil().clamp(min=0).long()
    bins = output_size[0] * output_size[1]
    rows = len(rois) * bins
    taps = 4 * grids[:, 0] * grids[:, 1]  # per row of each box
    row_starts = torch.cat([taps.new_zeros(1), taps.repeat_interleave(bins).cumsum(0)])
    columns = taps.new_empty(int(row_starts[-1]))
    values = box.new_empty(len(columns))
    box_rows = row_starts[:-1].view(len(rois), bins)
    for grid_x, grid_y in torch.unique(grids, dim=0).tolist() if len(rois) else []:
        if grid_x == 0 or grid_y == 0:
            continue
        members = torch.where((grids[:, 0] == grid_x) & (grids[:, 1] == grid_y))[0]
        b = box[members]
        y, wy = _axis_weights(b[:, 1], bin_size[members, 1], height, output_size[0], grid_y)
        x, wx = _axis_weights(b[:, 0], bin_size[members, 0], width, output_size[1], grid_x)
        first_row = rois[members, 0].long() * height
        cols = ((first_row[:, None, None, None, None] + y[:, :, None, :, None]) * width
                + x[:, None, :, None, :])  # (boxes, bins_y, bins_x, taps_y, taps_x)
        vals = wy[:, :, None, :, None] * wx[:, None, :, None, :]
        if len(members) == len(rois):  # one grid for all boxes: their entries are in row order already
            columns, values = cols.reshape(-1), vals.reshape(-1)
            break
        group_taps = 4 * grid_x * grid_y
        positions = (box_rows[members][:, :, None] + torch.arange(group_taps)).reshape(-1)
        columns[positions], values[positions] = cols.reshape(-1), vals.reshape(-1)
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state": a matrix product is all we need
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(row_starts, columns, values, (rows, shape[0] * height * width),
                                       check_invariants=False)


def _axis_weights(start: Tensor, bin_size: Tensor, size: int, bins: int, grid: int) -> Tuple[Tensor, Tensor]:
    """Along one axis, for each box and bin: the pixel of each of its ``2 * grid`` taps (each sample's two
    neighbours) and the tap's weight, 1/grid of the sample's bilinear weight (0 outside the map)."""
    steps = torch.arange(grid, dtype=start.dtype, device=start.device)
    offsets = torch.arange(bins, dtype=start.dtype, device=start.device)[:, None] * bin_size[:, None, None]
    p = start[:, None, None] + offsets + (steps + 0.5) * bin_size[:, None, None] / grid  # (boxes, bins, grid)
    inside = (p >= -1.0) & (p <= size)
    p = p.clamp(min=0.0)
    low = p.long().clamp(max=size - 1)
    high = (low + 1).clamp(max=size - 1)  # beyond the last pixel centre both taps are the last pixel: it, whole
    frac = p - low
    weights = torch.stack([1 - frac, frac], -1) * (inside[..., None] / grid)
    return torch.stack([low, high], -1).flatten(2), weights.flatten(2)


@contextlib.contextmanager
def sparse_roi_poolers(roi_heads: nn.Module) -> Iterator[None]:
    """Inside the block, the ``MultiScaleRoIAlign`` poolers of torchvision's ``RoIHeads`` (box, and mask for Mask
    R-CNN) run as :class:`SparseRoIAlign`, with autograd (a training forward); the originals are back after, also on an
    error, so checkpoints, the export and the inference copy see torchvision's modules."""
    originals = {name: roi_heads._modules[name] for name in POOLERS
                 if isinstance(roi_heads._modules.get(name), MultiScaleRoIAlign)}
    for name, pooler in originals.items():
        roi_heads._modules[name] = SparseRoIAlign(pooler)
    try:
        yield
    finally:
        roi_heads._modules.update(originals)
