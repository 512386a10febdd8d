import pytest
import torch
from helpers import randomize_norm_stats
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

import resnext_backbones as rb

# (our arguments, torchvision's resnet_fpn_backbone arguments) for the two pyramids torchvision's detectors use
PYRAMIDS = {
    "p2-p6": (dict(returned_features=("c2", "c3", "c4", "c5"), extra_blocks="pool"), dict(returned_layers=None)),
    "p3-p7": (dict(returned_features=("c3", "c4", "c5"), extra_blocks="p6p7"),
              dict(returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256))),
}


def twins(pyramid, name="resnet18", trainable_stages=3):
    ours_kwargs, tv_kwargs = PYRAMIDS[pyramid]
    tv = resnet_fpn_backbone(backbone_name=name, weights=None, trainable_layers=trainable_stages, **tv_kwargs)
    randomize_norm_stats(tv)
    ours = rb.resnext_fpn(name, trainable_stages=trainable_stages, **ours_kwargs)
    ours.load_state_dict(tv.state_dict(), strict=True)
    return ours.eval(), tv.eval()


@pytest.mark.parametrize("pyramid", PYRAMIDS)
def test_fpn_loads_torchvision_backbone_with_fpn_strictly_and_gives_its_outputs(pyramid, images):
    ours, tv = twins(pyramid)
    assert ours.out_channels == tv.out_channels == 256
    with torch.no_grad():
        mine, theirs = ours(images), tv(images)
    assert list(mine) == list(theirs) == (["0", "1", "2", "3", "pool"] if pyramid == "p2-p6"
                                          else ["0", "1", "2", "p6", "p7"])
    for key in theirs:
        torch.testing.assert_close(mine[key], theirs[key], rtol=1e-4, atol=1e-5)


def test_fpn_state_dict_keys_equal_torchvision_for_resnext():
    ours = rb.resnext_fpn("resnext50_32x4d")
    tv = resnet_fpn_backbone(backbone_name="resnext50_32x4d", weights=None)
    assert list(ours.state_dict()) == list(tv.state_dict())


def test_fpn_trainable_stages_match_torchvision():
    ours, tv = twins("p2-p6", trainable_stages=1)
    assert [n for n, p in ours.named_parameters() if p.requires_grad] == \
           [n for n, p in tv.named_parameters() if p.requires_grad]


def test_fpn_rejects_unknown_extra_blocks():
    with pytest.raises(ValueError, match=r"extra_blocks='p6' is not supported; choose one of \['pool', 'p6p7', None\]"):
        rb.resnext_fpn("resnet18", extra_blocks="p6")


def small(**kwargs):
    return dict(min_size=64, max_size=64, **kwargs)


DETECTORS = {
    "faster_rcnn": ("p2-p6", lambda bb: FasterRCNN(bb, num_classes=5, **small(box_score_thresh=0.0))),
    "mask_rcnn": ("p2-p6", lambda bb: MaskRCNN(bb, num_classes=5, **small(box_score_thresh=0.0))),
    "retinanet": ("p3-p7", lambda bb: RetinaNet(bb, num_classes=5, anchor_generator=AnchorGenerator(
        tuple((s, s * 2) for s in (32, 64, 128, 256, 512)), ((0.5, 1.0, 2.0),) * 5), **small(score_thresh=0.0))),
    "fcos": ("p3-p7", lambda bb: FCOS(bb, num_classes=5, anchor_generator=AnchorGenerator(
        ((8,), (16,), (32,), (64,), (128,)), ((1.0,),) * 5), **small(score_thresh=0.0))),
}


@pytest.mark.parametrize("detector", DETECTORS)
def test_torchvision_detectors_take_it_as_is_and_match_their_own_backbone(detector, images):
    pyramid, build = DETECTORS[detector]
    ours_bb, tv_bb = twins(pyramid)
    torch.manual_seed(0)
    tv = build(tv_bb).eval()
    ours = build(ours_bb).eval()
    ours.load_state_dict(tv.state_dict(), strict=True)
    with torch.no_grad():
        mine, theirs = ours(list(images)), tv(list(images))
    for m, t in zip(mine, theirs, strict=True):
        assert len(t["boxes"]) > 0
        for key in t:
            torch.testing.assert_close(m[key], t[key], rtol=1e-4, atol=1e-4)
    # and it trains
    ours.train()
    losses = ours(list(images), [{"boxes": torch.tensor([[4.0, 4.0, 40.0, 40.0]]), "labels": torch.tensor([1]),
                                  "masks": torch.zeros(1, 64, 64, dtype=torch.uint8)}] * 2)
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
