import pickle

import pytest
import torch
import torchvision
from conftest import randomize_norm_stats
from safetensors.torch import save_file
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

import resnext_backbones as rb
from resnext_backbones import WeightsError
from resnext_backbones.formats.detectron2 import to_detectron2


@pytest.fixture
def tv_resnet18():
    torch.manual_seed(0)
    return randomize_norm_stats(torchvision.models.resnet18()).eval()


def trunk_features(model, x):
    with torch.no_grad():
        return model.eval()(x)


def assert_trunk_equals_torchvision(trunk, tv):
    theirs = tv.state_dict()
    for key, value in trunk.state_dict().items():
        torch.testing.assert_close(value, theirs[key], msg=key)


@pytest.mark.parametrize("with_fc", [True, False])
def test_torchvision_state_dict_loads_and_reports_fc_as_ignored(tmp_path, tv_resnet18, with_fc, images):
    state = tv_resnet18.state_dict()
    if not with_fc:
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    torch.save(state, tmp_path / "resnet18.pth")
    trunk = rb.resnext("resnet18")
    report = rb.load_weights(trunk, tmp_path / "resnet18.pth")
    assert report.format == "torchvision" and report.ok
    assert report.ignored == (["fc.weight", "fc.bias"] if with_fc else [])
    assert len(report.loaded) == len([k for k in state if not k.startswith("fc.")])
    tv_c5 = torch.nn.Sequential(*list(tv_resnet18.children())[:-2])(images)
    torch.testing.assert_close(trunk_features(trunk, images)["c5"], tv_c5, rtol=1e-4, atol=1e-5)


def test_timm_safetensors_state_dict_loads(tmp_path, tv_resnet18):
    save_file(tv_resnet18.state_dict(), str(tmp_path / "model.safetensors"))  # timm's hub layout
    trunk = rb.resnext("resnet18", weights=str(tmp_path / "model.safetensors"))
    assert_trunk_equals_torchvision(trunk, tv_resnet18)


def test_mmdet_checkpoint_loads_backbone_and_ignores_heads(tmp_path, tv_resnet18):
    state = {"backbone." + k: v for k, v in tv_resnet18.state_dict().items() if not k.startswith("fc.")}
    state["neck.lateral_convs.0.conv.weight"] = torch.zeros(256, 64, 1, 1)
    torch.save({"meta": {"epoch": 12, "mmdet_version": "3.3.0"}, "state_dict": state}, tmp_path / "mmdet.pth")
    trunk = rb.resnext("resnet18")
    report = rb.load_weights(trunk, tmp_path / "mmdet.pth")
    assert report.format == "mmdet" and report.ignored == ["neck.lateral_convs.0.conv.weight"]
    assert "trunk found under prefix 'backbone.'" in report.converted
    assert_trunk_equals_torchvision(trunk, tv_resnet18)


def test_lightning_checkpoint_of_a_detector_loads_the_trunk(tmp_path, tv_resnet18):
    state = {"model.backbone.body." + k: v for k, v in tv_resnet18.state_dict().items() if not k.startswith("fc.")}
    torch.save({"state_dict": state, "pytorch-lightning_version": "2.6.6", "epoch": 3}, tmp_path / "last.ckpt")
    trunk = rb.resnext("resnet18")
    assert rb.load_weights(trunk, tmp_path / "last.ckpt").format == "lightning"
    assert_trunk_equals_torchvision(trunk, tv_resnet18)


@pytest.mark.parametrize("input_format", ["RGB", "BGR"])
def test_detectron2_pickle_round_trip_with_numpy_arrays(tmp_path, tv_resnet18, input_format):
    content = to_detectron2({k: v for k, v in tv_resnet18.state_dict().items() if not k.startswith("fc.")},
                            input_format=input_format)
    assert "res2.0.conv1.norm.running_var" in content["model"] and "stem.conv1.weight" in content["model"]
    assert "res3.0.shortcut.weight" in content["model"] and "res3.0.shortcut.norm.bias" in content["model"]
    assert all(type(v).__module__ == "numpy" for v in content["model"].values())
    with open(tmp_path / "r18.pkl", "wb") as f:
        pickle.dump(content, f)
    trunk = rb.resnext("resnet18", norm="frozen_bn")
    report = rb.load_weights(trunk, tmp_path / "r18.pkl")
    assert report.format == "detectron2" and report.ok
    assert any("BGR -> RGB" in note for note in report.converted) == (input_format == "BGR")
    assert_trunk_equals_torchvision(trunk, tv_resnet18)


def test_detectron2_training_checkpoint_with_prefix_loads(tmp_path, tv_resnet18):
    model = to_detectron2({k: v for k, v in tv_resnet18.state_dict().items() if not k.startswith("fc.")})["model"]
    model = {"backbone.bottom_up." + k: torch.from_numpy(v) for k, v in model.items()}
    torch.save({"model": model, "stride_in_1x1": False, "input_format": "RGB"}, tmp_path / "model_final.pth")
    trunk = rb.resnext("resnet18")
    assert rb.load_weights(trunk, tmp_path / "model_final.pth").format == "detectron2"
    assert_trunk_equals_torchvision(trunk, tv_resnet18)


def test_detectron2_stride_in_1x1_weights_are_refused(tmp_path, tv_resnet18):
    content = to_detectron2({k: v for k, v in tv_resnet18.state_dict().items() if not k.startswith("fc.")})
    content = {"model": content["model"], "__author__": "Detectron2 Model Zoo"}  # MSRA convention, not stated
    with open(tmp_path / "R-18.pkl", "wb") as f:
        pickle.dump(content, f)
    with pytest.raises(WeightsError, match="STRIDE_IN_1X1=True"):
        rb.resnext("resnet18", weights=str(tmp_path / "R-18.pkl"))


def test_caffe2_named_detectron2_file_is_refused_with_advice(tmp_path):
    import numpy as np

    with open(tmp_path / "R-50.pkl", "wb") as f:
        pickle.dump({"blobs": {"res2_0_branch2a_w": np.zeros(1)}}, f)
    with pytest.raises(WeightsError, match="no ResNet/ResNeXt trunk found"):
        rb.resnext("resnet50", weights=str(tmp_path / "R-50.pkl"))


def test_safetensors_backbone_round_trip_rebuilds_the_trunk_without_a_name(tmp_path, images):
    trunk = randomize_norm_stats(rb.resnext(depth=26, cardinality=8, base_width=4)).eval()
    rb.save_backbone(trunk, tmp_path / "trunk.safetensors")
    again = rb.load_backbone(tmp_path / "trunk.safetensors").eval()
    assert again.spec == trunk.spec == rb.ResNeXtSpec(26, 8, 4)
    for key, value in trunk_features(trunk, images).items():
        torch.testing.assert_close(trunk_features(again, images)[key], value)


def test_tampered_safetensors_fails_its_sha256(tmp_path):
    from safetensors import safe_open

    path = tmp_path / "trunk.safetensors"
    rb.save_backbone(rb.resnext("resnet18"), path)
    with safe_open(str(path), framework="pt") as f:
        meta, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    state["conv1.weight"][0, 0, 0, 0] += 1
    save_file(state, str(path), metadata=meta)
    with pytest.raises(WeightsError, match="do not match the sha256"):
        rb.load_backbone(path)


def test_load_backbone_refuses_a_file_without_spec(tmp_path):
    save_file({"conv1.weight": torch.zeros(64, 3, 7, 7)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(WeightsError, match="was not written by save_backbone"):
        rb.load_backbone(tmp_path / "x.safetensors")


def test_mismatched_spec_fails_naming_keys_and_shapes_and_non_strict_loads_what_fits(tmp_path):
    rb.save_backbone(rb.resnext(depth=26, cardinality=8, base_width=8), tmp_path / "8x8d.safetensors")
    target = rb.resnext(depth=26, cardinality=8, base_width=4)
    with pytest.raises(WeightsError) as err:
        rb.load_weights(target, tmp_path / "8x8d.safetensors")
    assert "layer1.0.conv1.weight: file (64, 64, 1, 1) vs model (32, 64, 1, 1)" in str(err.value)
    report = rb.load_weights(target, tmp_path / "8x8d.safetensors", strict=False)
    assert "conv1.weight" in report.loaded and report.mismatched and not report.ok


def test_big_c5_into_small_spec_is_refused(tmp_path):
    torch.save(torchvision.models.resnet50().state_dict(), tmp_path / "r50.pth")
    expected = r"layer1\.0\.conv1\.weight: file \(64, 64, 1, 1\) vs model \(64, 64, 3, 3\)"
    with pytest.raises(WeightsError, match=expected):
        rb.resnext("resnet18", weights=str(tmp_path / "r50.pth"))


def test_fpn_takes_a_trunk_file_or_a_whole_backbone_with_fpn(tmp_path, tv_resnet18, images):
    torch.save(tv_resnet18.state_dict(), tmp_path / "r18.pth")
    fpn = rb.resnext_fpn("resnet18", weights=str(tmp_path / "r18.pth"))
    assert_trunk_equals_torchvision(fpn.body, tv_resnet18)
    tv_fpn = randomize_norm_stats(resnet_fpn_backbone(backbone_name="resnet18", weights=None)).eval()
    detector = {"backbone." + k: v for k, v in tv_fpn.state_dict().items()} | {"roi_heads.x": torch.zeros(1)}
    torch.save({"model": detector}, tmp_path / "detector.pth")
    fpn = rb.resnext_fpn("resnet18")
    report = rb.load_weights(fpn, tmp_path / "detector.pth")
    assert report.ok and report.ignored == ["roi_heads.x"] and len(report.loaded) == len(tv_fpn.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fpn.eval()(images)["pool"], tv_fpn(images)["pool"])


class _WritesAFile:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("kind", ["torch", "pickle"])
def test_a_pickle_that_would_run_code_is_refused_and_runs_nothing(tmp_path, kind):
    victim, bad = tmp_path / "pwned.txt", tmp_path / f"bad.{kind}"
    payload = {"conv1.weight": torch.zeros(1), "evil": _WritesAFile(str(victim))}
    if kind == "torch":
        torch.save(payload, bad)
    else:
        with open(bad, "wb") as f:
            pickle.dump(payload, f)
    victim.unlink(missing_ok=True)
    with pytest.raises(WeightsError, match="refusing to load .* could run code"):
        rb.load_weights(rb.resnext("resnet18"), bad)
    assert not victim.exists()


def test_missing_file_is_named():
    with pytest.raises(WeightsError, match="weights file 'nowhere.pth' does not exist"):
        rb.resnext("resnet18", weights="nowhere.pth")


def test_report_reads_well(tmp_path, tv_resnet18):
    torch.save(tv_resnet18.state_dict(), tmp_path / "r18.pth")
    text = str(rb.load_weights(rb.resnext("resnet18"), tmp_path / "r18.pth"))
    assert text.startswith(f"loaded {len(tv_resnet18.state_dict()) - 2} tensors from")
    assert "ignored (2): fc.weight, fc.bias" in text
