"""torchvision's ``MultiScaleRoIAlign`` on the CPU as sparse matrix products: the same values, on all threads.

RoIAlign is linear in the features: each output value is a weighted sum of feature pixels (per bin,
``sampling_ratio`` x ``sampling_ratio`` bilinear samples of 4 pixels each). So the pooled features of the boxes
assigned to a pyramid level are ``weights @ pixels``: ``pixels`` the level's features as a ``(pixels, channels)``
table (a view of a channels_last map), ``weights`` a sparse CSR matrix with ``4 * sampling_ratio**2`` entries per
output bin. MKL runs that product on all threads and vectorised over channels, where torchvision's CPU kernel loops
over boxes, bins and channels on one thread (benchmarks/README.md has the timings).

The weights follow torchvision's kernel (``aligned=False``, as ``MultiScaleRoIAlign`` calls it): sample points at
``start + bin * (i + (j + 0.5) / sampling_ratio)``, none beyond one pixel outside the map, clamped to its edge.
Elsewhere (CUDA, autograd, half precision, adaptive ``sampling_ratio <= 0``, tracing) torchvision's module runs itself.
"""

import warnings
from typing import Dict, List, Tuple

import torch
from torch import Tensor, nn
from torchvision.ops import MultiScaleRoIAlign

from .torchvision_private import convert_to_roi_format, filter_input, setup_scales

_DTYPES = (torch.float32, torch.float64)  # those of MKL's sparse products


class SparseRoIAlign(nn.Module):
    """``pooler`` (a torchvision ``MultiScaleRoIAlign``), computed as a sparse matrix product per level on the CPU."""

    def __init__(self, pooler: MultiScaleRoIAlign) -> None:
        super().__init__()
        self.pooler = pooler

    def forward(self, x: Dict[str, Tensor], boxes: List[Tensor], image_shapes: List[Tuple[int, int]]) -> Tensor:
        p = self.pooler
        features = filter_input(x, p.featmap_names)
        if (features[0].device.type != "cpu" or p.sampling_ratio <= 0 or features[0].dtype not in _DTYPES
                or torch.is_grad_enabled() or torch.jit.is_scripting() or torch.compiler.is_compiling()):
            return p(x, boxes, image_shapes)
        if p.scales is None or p.map_levels is None:  # as torchvision sets them up, on the first call
            p.scales, p.map_levels = setup_scales(features, image_shapes, p.canonical_scale, p.canonical_level)
        rois = convert_to_roi_format(boxes)
        levels = p.map_levels(boxes) if len(features) > 1 else rois.new_zeros(len(rois), dtype=torch.int64)
        order = levels.argsort(stable=True)  # the boxes level by level: each level's products fill one slice
        bins = p.output_size[0] * p.output_size[1]
        pooled = features[0].new_empty(len(rois) * bins, features[0].shape[1])
        start = 0
        for feature, scale, count in zip(features, p.scales, torch.bincount(levels, minlength=len(features)).tolist(),
                                         strict=True):
            if count:
                weights = roi_align_weights(rois[order[start:start + count]], feature.shape, scale, p.output_size,
                                            p.sampling_ratio).to(feature.dtype)
                pixels = feature.permute(0, 2, 3, 1).reshape(-1, feature.shape[1])  # a view of channels_last maps
                torch.mm(weights, pixels, out=pooled[start * bins:(start + count) * bins])
                start += count
        result = pooled.new_empty(len(rois), pooled.shape[1], *p.output_size)
        result[order] = pooled.view(len(rois), *p.output_size, -1).permute(0, 3, 1, 2)
        return result


def roi_align_weights(rois: Tensor, shape: torch.Size, scale: float, output_size: Tuple[int, int],
                      sampling_ratio: int) -> Tensor:
    """The ``(boxes * bins, pixels)`` CSR matrix of RoIAlign on a feature map of ``shape`` (``N, C, H, W``): row
    ``(box, bin_y, bin_x)`` holds the bilinear weights of the bin's samples, averaged; columns index the map's
    ``(image, y, x)`` pixels. ``rois``: ``(image index, x1, y1, x2, y2)`` in image pixels, ``scale`` of the map."""
    _, _, height, width = shape
    box = rois[:, 1:] * scale
    y, wy = _axis_weights(box[:, 1], box[:, 3], height, output_size[0], sampling_ratio)  # (boxes, bins_y, taps)
    x, wx = _axis_weights(box[:, 0], box[:, 2], width, output_size[1], sampling_ratio)
    first_row = rois[:, 0].long() * height
    columns = ((first_row[:, None, None, None, None] + y[:, :, None, :, None]) * width
               + x[:, None, :, None, :])  # (boxes, bins_y, bins_x, taps_y, taps_x)
    values = wy[:, :, None, :, None] * wx[:, None, :, None, :]
    rows, taps = len(rois) * output_size[0] * output_size[1], values.shape[-1] * values.shape[-2]
    row_starts = torch.arange(0, rows * taps + 1, taps, device=rois.device)
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state": a matrix product is all we need
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(row_starts, columns.reshape(-1), values.reshape(-1),
                                       (rows, shape[0] * height * width), check_invariants=False)


def _axis_weights(start: Tensor, end: Tensor, size: int, bins: int, sampling_ratio: int) -> Tuple[Tensor, Tensor]:
    """Along one axis, for each box and bin: the pixel of each of its ``2 * sampling_ratio`` taps (each sample's
    two neighbours) and the tap's weight, 1/sampling_ratio of the sample's bilinear weight (0 outside the map)."""
    bin_size = (end - start).clamp(min=1.0) / bins
    grid = torch.arange(sampling_ratio, dtype=start.dtype, device=start.device)
    offsets = torch.arange(bins, dtype=start.dtype, device=start.device)[:, None] * bin_size[:, None, None]
    p = start[:, None, None] + offsets + (grid + 0.5) * bin_size[:, None, None] / sampling_ratio  # (boxes, bins, sr)
    inside = (p >= -1.0) & (p <= size)
    p = p.clamp(min=0.0)
    low = p.long().clamp(max=size - 1)
    high = (low + 1).clamp(max=size - 1)  # beyond the last pixel centre both taps are the last pixel: it, whole
    frac = p - low
    weights = torch.stack([1 - frac, frac], -1) * (inside[..., None] / sampling_ratio)
    return torch.stack([low, high], -1).flatten(2), weights.flatten(2)
