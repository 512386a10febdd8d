"""``rb.inference_copy`` on models a user builds without Lightning: torchvision detectors on ``rb.resnext_fpn`` and
classifiers around an rb trunk. The copy runs the fused trunk, the packed FPN and heads and the sparse RoIAlign,
computes what ``model.eval()`` computes, and leaves ``model`` as it was."""

import warnings

import pytest
import torch
from helpers import ARCHITECTURES, Classifier, assert_same_detections, bare_detector, randomize_norm_stats
from torch import nn
from torchvision.ops import MultiScaleRoIAlign

import resnext_backbones as rb
from resnext_backbones.deployment import SparseRoIAlign, native_support
from resnext_backbones.deployment import device as deployment_device
from resnext_backbones.fused import FusedConv2d

IMAGES = [torch.rand(3, 150, 170, generator=torch.Generator().manual_seed(1)),
          torch.rand(3, 170, 150, generator=torch.Generator().manual_seed(2))]
BF16_NATIVE = native_support(torch.bfloat16, torch.device("cpu"))


def convolution_dtypes(module):
    """Every convolution (plain or fused) and linear layer that runs in ``module`` from here on, as ``{path: input
    dtype}``, and the hooks' handles."""
    seen, handles = {}, []

    def record(name):
        def hook(module, args):
            seen.setdefault(name, args[0].dtype)  # and returns None: the inputs stay as they are
        return hook

    for name, sub in module.named_modules():
        if isinstance(sub, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, FusedConv2d)):
            handles.append(sub.register_forward_pre_hook(record(name)))
    return seen, handles


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_the_inference_copy_of_a_torchvision_detector_gives_its_detections_and_leaves_it_untouched(architecture):
    model = bare_detector(architecture).train()  # as a training loop leaves it
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fast = rb.inference_copy(model)
    assert model.training and not fast.training
    assert list(model.state_dict()) == list(state) and all(torch.equal(v, state[k]) for k, v in
                                                           model.state_dict().items())
    assert not any(isinstance(m, (FusedConv2d, SparseRoIAlign)) for m in model.modules())
    # in the copy: the trunk fused, the FPN and every head's convolution packed, the RoI poolers sparse
    trunk = next(m for m in fast.modules() if isinstance(m, rb.ResNeXt))
    assert isinstance(trunk.conv1, FusedConv2d)
    assert not any(type(m) is nn.Conv2d for m in fast.modules())
    assert all(isinstance(m, SparseRoIAlign) or isinstance(fast.get_submodule(n.rpartition(".")[0]), SparseRoIAlign)
               for n, m in fast.named_modules() if isinstance(m, MultiScaleRoIAlign))
    assert sum(isinstance(m, SparseRoIAlign) for m in fast.modules()) == {"faster_rcnn": 1, "mask_rcnn": 2}.get(
        architecture, 0)
    model.eval()
    with torch.no_grad():
        want, got = model(IMAGES), fast(IMAGES)
    for w, g in zip(want, got, strict=True):
        assert len(w["boxes"]) > 10 and g["boxes"].dtype == torch.float32
        assert_same_detections(g, w, box_tolerance=1e-4, score_tolerance=1e-4)  # masks too, where predicted


# 4 channels in CI; 1 channel here under slow (CI runs the task's fused path, this copy, on 1 channel:
# tests/tasks/test_inference.py)
@pytest.mark.parametrize("channels", [pytest.param(1, marks=pytest.mark.slow), 4])
def test_the_inference_copy_of_a_detector_of_other_channel_counts_gives_its_detections(channels):
    """Gray and RGB-D images (``rb.resnext_fpn(in_channels=...)``, a mean and std per channel): the copy's fused stem
    takes ``channels`` inputs and the copy gives the eager model's detections."""
    model = bare_detector("faster_rcnn", in_channels=channels)
    fast = rb.inference_copy(model)
    trunk = next(m for m in fast.modules() if isinstance(m, rb.ResNeXt))
    assert isinstance(trunk.conv1, FusedConv2d) and trunk.conv1.weight.shape[1] == channels
    images = [torch.rand(channels, 150, 170, generator=torch.Generator().manual_seed(1)),
              torch.rand(channels, 170, 150, generator=torch.Generator().manual_seed(2))]
    with torch.no_grad():
        want, got = model(images), fast(images)
    for w, g in zip(want, got, strict=True):
        assert len(w["boxes"]) > 10
        assert_same_detections(g, w, box_tolerance=1e-4, score_tolerance=1e-4)


@pytest.mark.skipif(not BF16_NATIVE, reason="this CPU has no native bf16 (AMX or AVX-512 BF16)")
def test_in_bf16_the_trunk_fpn_and_heads_run_natively_and_postprocessing_stays_float32():
    model = bare_detector("mask_rcnn")
    fast = rb.inference_copy(model, dtype=torch.bfloat16)
    seen, handles = convolution_dtypes(fast)
    try:
        with torch.no_grad():
            got = fast(IMAGES)
    finally:
        for handle in handles:
            handle.remove()
    for part in ("backbone.module.body", "backbone.module.fpn", "rpn.head", "roi_heads.box_head",
                 "roi_heads.box_predictor", "roi_heads.mask_head", "roi_heads.mask_predictor"):
        ran = {name: dtype for name, dtype in seen.items() if part in name}
        assert ran and set(ran.values()) == {torch.bfloat16}, (part, ran)
    assert all(d[k].dtype == torch.float32 for d in got for k in ("boxes", "scores", "masks"))
    with torch.no_grad():
        want = model(IMAGES)
    assert abs(len(got[0]["boxes"]) - len(want[0]["boxes"])) <= 5  # bf16 rounding moves a few across a threshold
    top = want[0]["scores"].argmax()
    assert (got[0]["boxes"] - want[0]["boxes"][top]).abs().amax(1).min() < 2.0  # the best box found again


def test_low_precision_where_it_is_not_native_warns_and_runs_float32(monkeypatch):
    monkeypatch.setattr(deployment_device, "native_support", lambda dtype, device: dtype == torch.float32)
    model = randomize_norm_stats(Classifier()).eval()
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = rb.inference_copy(model, dtype=torch.bfloat16)
    (message,) = [str(w.message) for w in caught if "not native" in str(w.message)]
    assert message.startswith("dtype=torch.bfloat16 is not native on this cpu (CPU flags: ") and "float32" in message
    with torch.no_grad():
        torch.testing.assert_close(fast(images), model(images), atol=1e-4, rtol=1e-4)
    assert next(fast.trunk.parameters()).dtype == torch.float32


def test_the_inference_copy_of_a_classifier_gives_its_logits():
    """A module holding a trunk, and an ``nn.Sequential`` around one: the trunk in the copy is fused, the rest as
    it was."""
    torch.manual_seed(0)
    model = randomize_norm_stats(Classifier()).eval()
    sequential = nn.Sequential(randomize_norm_stats(rb.resnext("resnet18", returned_features=("c5",))), Pick("c5"),
                               nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 3)).eval()
    images = torch.rand(3, 3, 64, 80, generator=torch.Generator().manual_seed(4))
    for net in (model, sequential):
        fast = rb.inference_copy(net)
        assert sum(isinstance(m, FusedConv2d) for m in fast.modules()) > 10
        with torch.no_grad():
            want = net(images)
            assert want.std() > 0.05
            torch.testing.assert_close(fast(images), want, atol=1e-4, rtol=1e-4)


class Pick(nn.Module):
    def __init__(self, name):
        super().__init__()
        self.name = name

    def forward(self, features):
        return features[self.name]


def test_a_groupnorm_trunk_is_copied_unfused_with_its_convolutions_packed():
    model = randomize_norm_stats(rb.resnext_fpn("resnet18", norm="gn", trainable_stages=5)).eval()
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    fast = rb.inference_copy(model)
    assert any(isinstance(m, nn.GroupNorm) for m in fast.modules())
    with torch.no_grad():
        want, got = model(images), fast(images)
    assert list(got) == list(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-4, rtol=1e-4)


def test_a_model_without_our_trunk_is_refused_with_what_to_do():
    with pytest.raises(ValueError, match=r"Sequential holds no resnext_backbones trunk .*rb.resnext\(\.\.\.\)"):
        rb.inference_copy(nn.Sequential(nn.Conv2d(3, 8, 3)))
