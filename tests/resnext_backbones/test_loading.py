"""RGB weights into trunks of other channel counts: the stem adapted as timm's ``adapt_input_conv`` (its formula
written out here: timm is not a dependency), the report saying so, the normalisation following."""

import pytest
import torch
import torch.nn.functional as F

import resnext_backbones as rb


def timm_formula(weight, channels):
    """timm's adapt_input_conv for a 3-channel stem, one output/input pair at a time: 1 channel, the sum over RGB;
    another count, input channel k takes RGB channel k mod 3, times 3 / channels."""
    out, _, kh, kw = weight.shape
    adapted = torch.zeros(out, channels, kh, kw)
    for o in range(out):
        for k in range(channels):
            adapted[o, k] = weight[o].sum(0) if channels == 1 else weight[o, k % 3] * 3 / channels
    return adapted


@pytest.fixture(scope="module")
def rgb_state():
    torch.manual_seed(0)
    return rb.resnext("resnet18", returned_features=("c2",)).state_dict()


@pytest.mark.parametrize("channels", [1, 2, 4, 13])
def test_rgb_weights_load_into_other_channel_counts_with_the_stem_adapted_as_timm_does(rgb_state, channels):
    trunk = rb.resnext("resnet18", returned_features=("c2",), in_channels=channels)
    report = rb.load_weights(trunk, rgb_state)
    assert trunk.conv1.weight.shape[1] == channels
    torch.testing.assert_close(trunk.conv1.weight.detach(), timm_formula(rgb_state["conv1.weight"], channels))
    assert any(f"stem conv1.weight adapted from 3 to {channels} input channels" in n for n in report.converted)
    torch.testing.assert_close(trunk.layer1[0].conv1.weight, rgb_state["layer1.0.conv1.weight"])  # the rest as is
    assert len(trunk.normalization["mean"]) == len(trunk.normalization["std"]) == channels


def test_an_adapted_stem_answers_alike_inputs_as_the_rgb_stem_answers_the_image():
    weight = torch.randn(8, 3, 7, 7)
    image = torch.rand(1, 3, 20, 20)
    gray = image.mean(1, keepdim=True)
    one = rb.loading.adapt_input_conv(weight, 1)
    torch.testing.assert_close(F.conv2d(gray, one), F.conv2d(gray.expand(-1, 3, -1, -1), weight))
    six = rb.loading.adapt_input_conv(weight, 6)  # RGB twice: the same response as the RGB image once
    torch.testing.assert_close(F.conv2d(image.repeat(1, 2, 1, 1), six), F.conv2d(image, weight), atol=1e-4, rtol=1e-5)
    assert F.conv2d(image, weight).abs().mean() > 0.1


def test_the_fpn_stem_is_adapted_too_and_the_report_reads_well(rgb_state):
    fpn = rb.resnext_fpn("resnet18", in_channels=4)
    report = rb.load_weights(fpn, rgb_state, strict=False)
    torch.testing.assert_close(fpn.body.conv1.weight.detach(), timm_formula(rgb_state["conv1.weight"], 4))
    assert "converted: stem body.conv1.weight adapted from 3 to 4 input channels (timm's adapt_input_conv: RGB " \
           "repeated, scaled by 3/4)" in str(report)
    assert fpn(torch.rand(1, 4, 32, 32))["0"].shape == (1, 256, 8, 8)


def test_the_recorded_rgb_normalisation_follows_the_adaptation(tmp_path):
    c2 = dict(returned_features=("c2",))
    trunk = rb.resnext("resnet18", **c2)
    trunk.normalization = {"mean": (0.1, 0.2, 0.6), "std": (0.3, 0.2, 0.4)}
    rb.save_backbone(trunk, tmp_path / "rgb.safetensors")
    gray = rb.resnext("resnet18", in_channels=1, weights=tmp_path / "rgb.safetensors", **c2)
    assert gray.normalization["mean"] == pytest.approx((0.3,)) and gray.normalization["std"] == pytest.approx((0.3,))
    five = rb.resnext("resnet18", in_channels=5, weights=tmp_path / "rgb.safetensors", **c2)
    assert five.normalization["mean"] == pytest.approx((0.1, 0.2, 0.6, 0.1, 0.2))
    assert rb.resnext("resnet18", in_channels=13, **c2).normalization["std"][12] == rb.IMAGENET_STD[0]  # 12 mod 3


def test_a_trunk_of_other_channels_saves_and_loads_back_as_it_is_and_fuses(tmp_path):
    trunk = rb.resnext("resnet18", in_channels=4, returned_features=("c2",))
    rb.save_backbone(trunk, tmp_path / "rgbd.safetensors")
    again = rb.load_backbone(tmp_path / "rgbd.safetensors")
    assert again.in_channels == 4
    torch.testing.assert_close(again.conv1.weight, trunk.conv1.weight)
    fused = trunk.eval().fused()
    image = torch.rand(1, 4, 32, 32)
    torch.testing.assert_close(fused(image.contiguous(memory_format=torch.channels_last))["c2"],
                               trunk(image)["c2"], atol=1e-4, rtol=1e-4)


def test_a_stem_of_another_count_than_rgb_is_not_adapted_but_refused(rgb_state):
    four = rb.resnext("resnet18", returned_features=("c2",), in_channels=4).state_dict()
    with pytest.raises(rb.WeightsError, match=r"conv1.weight: file \(64, 4, 7, 7\) vs model \(64, 1, 7, 7\)"):
        rb.load_weights(rb.resnext("resnet18", returned_features=("c2",), in_channels=1), four)
    with pytest.raises(ValueError, match="in_channels=0 must be a positive integer"):
        rb.resnext("resnet18", in_channels=0)
