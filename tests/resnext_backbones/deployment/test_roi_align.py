"""The sparse RoIAlign against torchvision's own MultiScaleRoIAlign: the same values, from any box."""

import pytest
import torch
import torchvision
from torchvision.ops import MultiScaleRoIAlign

from resnext_backbones.deployment import SparseRoIAlign

LEVELS = "0123"


def pyramid(channels=8, images=3, height=64, width=80):
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(images, channels, height >> i, width >> i, generator=g) for i, k in enumerate(LEVELS)}


def boxes_of_every_kind(counts=(40, 0, 25)):
    """Boxes of 1 to 200 pixels, some reaching beyond the image or wholly outside it, and an image without any."""
    g = torch.Generator().manual_seed(1)
    boxes = []
    for n in counts:
        corner = torch.rand(n, 2, generator=g) * torch.tensor([300.0, 250.0]) - 30
        size = torch.rand(n, 2, generator=g) ** 3 * 200 + 0.5
        boxes.append(torch.cat([corner, corner + size], 1))
    boxes[0][:2] = torch.tensor([[-40.0, -40.0, -5.0, -5.0], [0.0, 0.0, 256.0, 320.0]])
    return boxes


def torchvisions_kernel_calls(monkeypatch):
    calls = []
    kernel = torchvision.ops.poolers.roi_align
    monkeypatch.setattr(torchvision.ops.poolers, "roi_align", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    return calls


@pytest.mark.parametrize("names, output_size, sampling_ratio", [(LEVELS, 7, 2), (LEVELS, 14, 2), (LEVELS, (7, 5), 3),
                                                                 ("0", 7, 1)])
def test_sparse_roi_align_equals_torchvisions(names, output_size, sampling_ratio, monkeypatch):
    features, boxes, shapes = pyramid(), boxes_of_every_kind(), [(256, 320)] * 3
    want = MultiScaleRoIAlign(list(names), output_size, sampling_ratio)(features, boxes, shapes)
    calls = torchvisions_kernel_calls(monkeypatch)
    with torch.no_grad():
        got = SparseRoIAlign(MultiScaleRoIAlign(list(names), output_size, sampling_ratio))(features, boxes, shapes)
    assert calls == []  # the sparse product ran, not torchvision's kernel
    assert got.shape == want.shape == (65, 8, *((output_size,) * 2 if isinstance(output_size, int) else output_size))
    assert want.abs().amax() > 1 and (want[0] == 0).all()  # values to compare; a box wholly outside gives 0
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_no_boxes_give_an_empty_result():
    got = SparseRoIAlign(MultiScaleRoIAlign(list(LEVELS), 7, 2))(pyramid(), [torch.zeros(0, 4)] * 3, [(256, 320)] * 3)
    assert got.shape == (0, 8, 7, 7)


def test_with_autograd_an_adaptive_sampling_ratio_or_bf16_torchvision_runs(monkeypatch):
    features, boxes, shapes = pyramid(), boxes_of_every_kind(), [(256, 320)] * 3
    calls = torchvisions_kernel_calls(monkeypatch)
    SparseRoIAlign(MultiScaleRoIAlign(list(LEVELS), 7, 2))(features, boxes, shapes)
    assert len(calls) == 4  # one call per level
    with torch.no_grad():
        SparseRoIAlign(MultiScaleRoIAlign(list(LEVELS), 7, 0))(features, boxes, shapes)
        assert len(calls) == 8
        half = {k: v.bfloat16() for k, v in features.items()}  # MKL has no bf16 sparse product: torchvision decides
        with pytest.raises(RuntimeError, match="roi_align.*BFloat16"):  # ... that its CPU kernel has none either
            SparseRoIAlign(MultiScaleRoIAlign(list(LEVELS), 7, 2))(half, [b.bfloat16() for b in boxes], shapes)
    assert len(calls) == 9  # its kernel was called, and raised
