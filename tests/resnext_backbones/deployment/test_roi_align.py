"""The sparse RoIAlign against torchvision's own roi_align and MultiScaleRoIAlign: the same values and the same
gradients with respect to the features, from any box."""

import pytest
import torch
import torchvision
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign, roi_align

import resnext_backbones as rb
from resnext_backbones.deployment import SparseRoIAlign, sparse_roi_align, sparse_roi_poolers

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


def rois_of_every_kind(images=2, scale=4.0):
    """``K x 5`` rois over ``images`` images, in image pixels of a map of ``scale``: those of
    :func:`boxes_of_every_kind` (partly and wholly outside, 0.5 to 200 px), boxes under a pixel of the map, and an
    empty and an inverted box (which ``aligned`` does not clamp)."""
    boxes = boxes_of_every_kind((30, 25))[:images]
    tiny = torch.tensor([[10.0, 12.0, 10.5, 12.2], [40.0, 40.0, 41.0, 43.0], [5.0, 5.0, 5.0, 5.0],
                         [60.0, 50.0, 58.0, 47.0]]) * scale / 4
    return torch.cat([torch.cat([torch.full((len(b), 1), float(i)), b], 1)
                      for i, b in enumerate([torch.cat([boxes[0], tiny]), *boxes[1:]])])


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [1, 2, -1])
def test_gradients_wrt_the_features_equal_torchvisions_roi_align_backward(sampling_ratio, aligned):
    g = torch.Generator().manual_seed(2)
    features = torch.randn(2, 6, 40, 48, generator=g)
    rois = rois_of_every_kind()
    output_size, scale = (7, 5), 0.25
    want_input = features.clone().requires_grad_()
    want = roi_align(want_input, rois, output_size, scale, sampling_ratio, aligned)
    grad = torch.randn(want.shape, generator=g)
    want.backward(grad)
    got_input = features.clone().requires_grad_()
    got = sparse_roi_align(got_input, rois, output_size, scale, sampling_ratio, aligned)
    got.backward(grad)
    assert want.abs().amax() > 1 and want_input.grad.abs().amax() > 1  # values and gradients worth comparing
    assert (want_input.grad != 0).float().mean() > 0.05  # many pixels get a gradient, not a few
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_input.grad, want_input.grad, atol=1e-5, rtol=0)


def test_multiscale_gradients_equal_torchvisions_on_every_level(monkeypatch):
    features, boxes, shapes = pyramid(), boxes_of_every_kind(), [(256, 320)] * 3
    boxes[2] = torch.cat([boxes[2], torch.tensor([[-100.0, -100.0, 400.0, 450.0], [0.0, 0.0, 460.0, 460.0]])])  # on P5
    grad = torch.randn(67, 8, 7, 7, generator=torch.Generator().manual_seed(3))
    leaves = {k: v.clone().requires_grad_() for k, v in features.items()}
    MultiScaleRoIAlign(list(LEVELS), 7, 2)(leaves, boxes, shapes).backward(grad)
    want = {k: v.grad for k, v in leaves.items()}
    calls = torchvisions_kernel_calls(monkeypatch)
    leaves = {k: v.clone().requires_grad_() for k, v in features.items()}
    SparseRoIAlign(MultiScaleRoIAlign(list(LEVELS), 7, 2))(leaves, boxes, shapes).backward(grad)
    assert calls == []  # with autograd too, the sparse products ran
    assert all(want[k].abs().amax() > 0.1 for k in LEVELS)  # boxes on every level
    for k in LEVELS:
        torch.testing.assert_close(leaves[k].grad, want[k], atol=1e-5, rtol=0)


def test_under_cpu_autocast_it_computes_in_float32_and_gives_the_features_dtype():
    features, boxes, shapes = pyramid(), boxes_of_every_kind(), [(256, 320)] * 3
    half = {k: v.bfloat16().requires_grad_() for k, v in features.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = MultiScaleRoIAlign(list(LEVELS), 7, 2)(half, boxes, shapes)  # torchvision's: float32, then bf16
        got = SparseRoIAlign(MultiScaleRoIAlign(list(LEVELS), 7, 2))(half, boxes, shapes)
    assert got.dtype == want.dtype == torch.bfloat16 and want.abs().amax() > 1
    torch.testing.assert_close(got, want, atol=1e-2, rtol=1e-2)  # the same float32 values, each rounded to bf16
    got.float().sum().backward()
    assert half["0"].grad.dtype == torch.bfloat16 and half["0"].grad.abs().amax() > 0


def test_without_autocast_bf16_goes_to_torchvision(monkeypatch):
    features, boxes, shapes = pyramid(), boxes_of_every_kind(), [(256, 320)] * 3
    calls = torchvisions_kernel_calls(monkeypatch)
    half = {k: v.bfloat16() for k, v in features.items()}  # MKL has no bf16 sparse product: torchvision decides
    with torch.no_grad(), pytest.raises(RuntimeError, match="roi_align.*BFloat16"):  # ... that its kernel has none
        SparseRoIAlign(MultiScaleRoIAlign(list(LEVELS), 7, 2))(half, [b.bfloat16() for b in boxes], shapes)
    assert len(calls) == 1  # its kernel was called, and raised


def test_mask_rcnns_losses_and_gradients_equal_the_torchvision_paths(monkeypatch):
    """Mask R-CNN (its box and mask poolers both; Faster R-CNN's are the first) on a small FPN and heads."""
    torch.manual_seed(0)
    model = MaskRCNN(rb.resnext_fpn("resnet18", norm="frozen_bn", trainable_stages=5, out_channels=32), min_size=64,
                     max_size=64, box_batch_size_per_image=32, rpn_pre_nms_top_n_train=200,
                     rpn_post_nms_top_n_train=100, num_classes=3, mask_head=MaskRCNNHeads(32, [32], 1)).train()
    model.roi_heads.mask_predictor = MaskRCNNPredictor(32, 32, 3)
    g = torch.Generator().manual_seed(4)
    images = [torch.rand(3, 64, 64, generator=g)]
    targets = [{"boxes": torch.tensor([[6.0, 8.0, 40.0, 46.0], [26.0, 20.0, 60.0, 34.0]]),
                "labels": torch.tensor([1, 2]), "masks": torch.rand(2, 64, 64, generator=g).round().to(torch.uint8)}]

    def losses_and_gradients():
        model.zero_grad()
        torch.manual_seed(5)  # the same sampled proposals both times
        losses = model(images, targets)
        sum(losses.values()).backward()
        return losses, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    want_losses, want_grads = losses_and_gradients()
    calls = torchvisions_kernel_calls(monkeypatch)
    with sparse_roi_poolers(model.roi_heads):
        got_losses, got_grads = losses_and_gradients()
    assert calls == [] and type(model.roi_heads.box_roi_pool) is MultiScaleRoIAlign  # sparse inside, put back after
    assert type(model.roi_heads.mask_roi_pool) is MultiScaleRoIAlign
    assert want_losses["loss_classifier"] > 0.1 and want_losses["loss_mask"] > 0.1
    torch.testing.assert_close(got_losses, want_losses, atol=1e-5, rtol=1e-5)
    assert got_grads.keys() == want_grads.keys() and len(want_grads) > 40
    for name, want in want_grads.items():  # float32 sums in another order: to 1e-4 of each gradient's largest value
        assert want.abs().amax() > 0, name
        torch.testing.assert_close(got_grads[name], want, atol=1e-4 * float(want.abs().amax()), rtol=0, msg=name)
