"""Segmentation heads: torchvision's DeepLabV3/FCN with the same weights, Panoptic FPN's and UPerNet's published
structure."""

import pytest
import torch
import torch.nn.functional as F
import torchvision
from helpers import randomize_norm_stats
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.resnet import Bottleneck as TvBottleneck
from torchvision.models.resnet import ResNet as TvResNet
from torchvision.models.segmentation.deeplabv3 import DeepLabHead, DeepLabV3
from torchvision.models.segmentation.fcn import FCN, FCNHead

import resnext_backbones as rb
from resnext_backbones.heads import SegmentationModel, SemanticFPNHead, UPerHead


def torchvision_model(builder, head):
    """torchvision's model: its ``deeplabv3_resnet50`` / ``fcn_resnet50`` builder, or (``builder=None``) the same
    classes (``DeepLabV3`` / ``FCN`` over an ``IntermediateLayerGetter`` of its dilated ResNet, the auxiliary
    ``FCNHead`` on layer3) on ResNeXt-26 32x4d blocks, small enough for CI."""
    if builder is not None:
        return getattr(torchvision.models.segmentation, builder)(weights=None, weights_backbone=None, num_classes=5,
                                                                 aux_loss=True)
    trunk = TvResNet(TvBottleneck, [2, 2, 2, 2], groups=32, width_per_group=4,
                     replace_stride_with_dilation=[False, True, True])
    model = DeepLabV3 if head is DeepLabHead else FCN
    return model(IntermediateLayerGetter(trunk, {"layer4": "out", "layer3": "aux"}), head(2048, 5), FCNHead(1024, 5))


@pytest.mark.parametrize("name, builder, head", [
    ("resnext26_32x4d", None, DeepLabHead), pytest.param("resnext26_32x4d", None, FCNHead, marks=pytest.mark.slow),
    pytest.param("resnet50", "deeplabv3_resnet50", DeepLabHead, marks=pytest.mark.slow),
    pytest.param("resnet50", "fcn_resnet50", FCNHead, marks=pytest.mark.slow)])
def test_dilated_trunk_with_torchvisions_head_equals_torchvisions_segmentation_model(name, builder, head):
    """torchvision's DeepLabV3 / FCN (output stride 8, auxiliary FCN head on layer3) with its weights loaded into
    ours: the same ``out`` and ``aux`` logits."""
    torch.manual_seed(0)
    theirs = randomize_norm_stats(torchvision_model(builder, head)).eval()
    trunk = rb.resnext(name, returned_features=("c4", "c5"), replace_stride_with_dilation=(False, True, True))
    ours = SegmentationModel(trunk, head(2048, 5), ["c5"], FCNHead(1024, 5), "c4").eval()
    renamed = {k.replace("classifier.", "decode_head.", 1).replace("aux_decode_head.", "aux_head.", 1): v
               for k, v in theirs.state_dict().items()}
    ours.load_state_dict(renamed)  # strict: the same modules under our names
    images = torch.rand(2, 3, 40, 32, generator=torch.Generator().manual_seed(1))  # dilated: slow aten kernels
    with torch.no_grad():
        want = theirs(images)
        logits, aux = ours.forward_train(images)
        assert torch.equal(ours(images), logits)
    assert want["out"].std() > 1e-3 and logits.shape == (2, 5, 40, 32)
    torch.testing.assert_close(logits, want["out"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(aux, want["aux"], rtol=1e-4, atol=1e-5)


def test_semantic_fpn_head_is_panoptic_fpns_branch():
    """Per level at stride 4, 8, 16, 32: 1, 1, 2, 3 conv-GN-ReLU blocks, each but P2's followed by 2x bilinear
    upsampling, summed, a 1x1 to the classes: written out here from the paper's description."""
    torch.manual_seed(0)
    head = SemanticFPNHead(32, 4, channels=32).eval()
    levels = [torch.randn(2, 32, 16 // 2**i, 24 // 2**i) for i in range(4)]
    assert [sum(isinstance(m, torch.nn.Conv2d) for m in h.modules()) for h in head.scale_heads] == [1, 1, 2, 3]
    with torch.no_grad():
        total = 0
        for level, blocks in zip(levels, head.scale_heads, strict=True):
            x = level
            for block in [m for m in blocks if isinstance(m, torch.nn.Sequential)]:
                conv, norm = block[0], block[1]
                assert isinstance(norm, torch.nn.GroupNorm) and norm.num_groups == 32 and conv.kernel_size == (3, 3)
                x = F.relu(F.group_norm(F.conv2d(x, conv.weight, padding=1), 32, norm.weight, norm.bias))
                if level is not levels[0]:
                    x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
            total = total + x
        want = F.conv2d(total, head.predictor.weight, head.predictor.bias)
        got = head(levels)
    assert got.shape == (2, 4, 16, 24) and want.std() > 1e-3
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_uper_head_pools_c5_at_scales_1_2_3_6_and_fuses_every_level_at_c2():
    torch.manual_seed(0)
    head = UPerHead([16, 32, 64, 128], 3, channels=32)
    pooled = [m.output_size for m in head.modules() if isinstance(m, torch.nn.AdaptiveAvgPool2d)]
    assert pooled == [1, 2, 3, 6]
    assert head.fpn_bottleneck[0].in_channels == 4 * 32 and head.bottleneck[0].in_channels == 128 + 4 * 32
    features = [torch.randn(2, c, 32 // 2**i, 24 // 2**i, requires_grad=True) for i, c in enumerate([16, 32, 64, 128])]
    logits = head(features)
    assert logits.shape == (2, 3, 32, 24)
    logits.square().sum().backward()
    assert all(f.grad.abs().sum() > 0 for f in features)  # every level reaches the logits


def test_semantic_fpn_head_as_mmsegmentations_fpn_head_has_batchnorm_and_dropout_before_the_classifier():
    """mmsegmentation's FPNHead (configs/_base_/models/fpn_r50.py: SyncBN, dropout_ratio 0.1): the same branches with
    BatchNorm, then channel-wise (2-d) dropout of the sum, then the 1x1 convolution, written out here."""
    torch.manual_seed(0)
    head = SemanticFPNHead(32, 4, channels=32, norm="bn", dropout=0.5).train()
    assert all(isinstance(m, torch.nn.BatchNorm2d) for h in head.scale_heads for m in h.modules()
               if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.GroupNorm)))
    levels = [torch.randn(2, 32, 16 // 2**i, 24 // 2**i) for i in range(4)]
    with torch.no_grad():
        total = head.scale_heads[0](levels[0])  # the branches themselves: no random numbers drawn in them
        for blocks, level in zip(head.scale_heads[1:], levels[1:], strict=True):
            total = total + blocks(level)
        torch.manual_seed(7)
        want = F.conv2d(F.dropout2d(total, 0.5, training=True), head.predictor.weight, head.predictor.bias)
        torch.manual_seed(7)
        got = head(levels)
        undropped = F.conv2d(total, head.predictor.weight, head.predictor.bias)
    assert (got - undropped).abs().max() > 1e-2  # the dropout is seen
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # evaluation: no dropout
        torch.testing.assert_close(head.eval()(levels), F.conv2d(
            sum(F.interpolate(b(x), size=(16, 24), mode="bilinear") if i else b(x)
                for i, (b, x) in enumerate(zip(head.scale_heads, levels, strict=True))),
            head.predictor.weight, head.predictor.bias), rtol=1e-5, atol=1e-5)


def test_uper_head_takes_groupnorm_for_every_block():
    head = UPerHead([16, 32, 64, 128], 3, channels=32, norm="gn")
    norms = [m for m in head.modules() if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.GroupNorm))]
    assert len(norms) == 4 + 1 + 3 + 3 + 1 and all(isinstance(m, torch.nn.GroupNorm) for m in norms)
