"""Pretrain once, reuse everywhere: task-to-task weights, export to every ecosystem, loud mismatches."""

import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision
from helpers import classification_args, randomize_norm_stats
from safetensors import safe_open

import resnext_backbones as rb
from resnext_backbones import WeightsError
from resnext_backbones.convert import convert
from tasks import ImageClassifier, ObjectDetector
from tasks.cli import cli as lightning_cli


@pytest.fixture(scope="module")
def classifier_checkpoint(tmp_path_factory, tiny_folder):
    tmp = tmp_path_factory.mktemp("pretrain")
    lightning_cli(classification_args(tmp, tiny_folder, "--trainer.max_steps", "3", "--trainer.accelerator", "cpu",
                             "--trainer.limit_val_batches", "1"))
    return next(tmp.rglob("*.ckpt"))


def trunk_tensors(trunk):
    return {k: v for k, v in trunk.state_dict().items() if not k.endswith("num_batches_tracked")}


def counted(keys):
    return {k for k in keys if not k.endswith("num_batches_tracked")}


def test_detector_starts_from_a_classifier_checkpoint_with_the_same_trunk(classifier_checkpoint):
    classifier = ImageClassifier.load_from_checkpoint(classifier_checkpoint, map_location="cpu")
    detector = ObjectDetector(backbone="resnet18", num_classes=3, weights=str(classifier_checkpoint), norm="bn")
    ours, theirs = trunk_tensors(detector.model.backbone.body), trunk_tensors(classifier.trunk)
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key])
    assert not torch.equal(classifier.trunk.conv1.weight, rb.resnext("resnet18").conv1.weight)  # it did train


@pytest.mark.parametrize("architecture", ["faster_rcnn", "mask_rcnn"])
def test_the_trunk_of_a_detector_checkpoint_starts_the_classifier_and_exports_to_start_any_task(architecture,
                                                                                                tmp_path):
    """Directly from the checkpoint, and through ``python -m resnext_backbones export`` (Mask R-CNN's mask head is
    left behind with the other heads)."""
    detector = ObjectDetector(architecture=architecture, backbone="resnet18", num_classes=3, norm="frozen_bn")
    randomize_norm_stats(detector)
    torch.save({"state_dict": detector.state_dict(), "pytorch-lightning_version": "2.6.6"}, tmp_path / "det.ckpt")
    trained = trunk_tensors(detector.model.backbone.body)
    classifier = ImageClassifier(backbone="resnet18", num_classes=5, weights=str(tmp_path / "det.ckpt"))
    for key, value in trained.items():
        torch.testing.assert_close(classifier.trunk.state_dict()[key], value)
    result = subprocess.run([sys.executable, "-m", "resnext_backbones", "export", str(tmp_path / "det.ckpt"),
                             str(tmp_path / "trunk.safetensors")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    with safe_open(str(tmp_path / "trunk.safetensors"), framework="pt") as f:
        assert not any(k.startswith(("fpn", "roi_heads", "mask")) for k in f.keys())
    trunk = str(tmp_path / "trunk.safetensors")
    started = [ImageClassifier(backbone="resnet18", num_classes=5, weights=trunk).trunk,
               ObjectDetector(architecture="faster_rcnn", backbone="resnet18", num_classes=2, weights=trunk,
                              norm="frozen_bn").model.backbone.body]
    for trunk_module in started:
        state = trunk_module.state_dict()
        assert counted(state) == set(trained)
        for key, value in trained.items():
            torch.testing.assert_close(state[key], value, rtol=0, atol=0)


def test_exported_safetensors_carries_spec_normalisation_and_hash_and_rebuilds_the_trunk(classifier_checkpoint,
                                                                                         tmp_path):
    out = convert(classifier_checkpoint, tmp_path / "trunk.safetensors")
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert meta["spec"] == '{"depth": 18, "cardinality": 1, "base_width": 64}'
    assert meta["mean"] == "[0.485, 0.456, 0.406]" and meta["input_format"] == "RGB" and len(meta["sha256"]) == 64
    classifier = ImageClassifier.load_from_checkpoint(classifier_checkpoint, map_location="cpu").eval()
    trunk = rb.load_backbone(out).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(trunk(x)["c5"], classifier.trunk(x)["c5"])


def test_torchvision_export_loads_strictly_into_torchvision_fc_excepted(classifier_checkpoint, tmp_path):
    convert(classifier_checkpoint, tmp_path / "tv.pth", "torchvision")
    tv = torchvision.models.resnet18()
    result = tv.load_state_dict(torch.load(tmp_path / "tv.pth", weights_only=True), strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and not result.unexpected_keys
    classifier = ImageClassifier.load_from_checkpoint(classifier_checkpoint, map_location="cpu").eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        c5 = torch.nn.Sequential(*list(tv.eval().children())[:-2])(x)
        torch.testing.assert_close(c5, classifier.trunk(x)["c5"])


def test_mmdet_timm_and_detectron2_exports_hold_the_trained_trunks_values(classifier_checkpoint, tmp_path):
    trained = trunk_tensors(ImageClassifier.load_from_checkpoint(classifier_checkpoint, map_location="cpu").trunk)
    mm = torch.load(convert(classifier_checkpoint, tmp_path / "mm.pth", "mmdet"), weights_only=True)
    assert counted(mm["state_dict"]) == {"backbone." + k for k in trained}
    with safe_open(str(convert(classifier_checkpoint, tmp_path / "timm.safetensors", "timm")), framework="pt") as f:
        timm = {k: f.get_tensor(k) for k in f.keys()}
    assert counted(timm) == set(trained)
    with open(convert(classifier_checkpoint, tmp_path / "d2.pkl", "detectron2"), "rb") as f:
        d2 = pickle.load(f)
    assert d2["matching_heuristics"] is True and d2["stride_in_1x1"] is False and d2["input_format"] == "RGB"
    assert all(isinstance(v, np.ndarray) for v in d2["model"].values())
    # in each target's own names, the values of the trained trunk (detectron2's, spelled out for a few)
    for d2_name, key in [("stem.conv1.weight", "conv1.weight"), ("stem.conv1.norm.running_var", "bn1.running_var"),
                         ("res5.1.conv2.norm.bias", "layer4.1.bn2.bias"),
                         ("res3.0.shortcut.weight", "layer2.0.downsample.0.weight"),
                         ("res3.0.shortcut.norm.weight", "layer2.0.downsample.1.weight"),
                         ("res2.1.conv1.weight", "layer1.1.conv1.weight")]:
        torch.testing.assert_close(torch.from_numpy(d2["model"][d2_name]), trained[key], rtol=0, atol=0)
    for key, value in trained.items():
        torch.testing.assert_close(mm["state_dict"]["backbone." + key], value, rtol=0, atol=0)
        torch.testing.assert_close(timm[key], value, rtol=0, atol=0)
    for path in (tmp_path / "mm.pth", tmp_path / "timm.safetensors", tmp_path / "d2.pkl"):  # and each loads back
        again = rb.resnext("resnet18")
        assert rb.load_weights(again, path).ok
        for key, value in trunk_tensors(again).items():
            torch.testing.assert_close(value, trained[key], rtol=0, atol=0, msg=f"{path.name}: {key}")


def test_export_command_line(classifier_checkpoint, tmp_path):
    result = subprocess.run([sys.executable, "-m", "resnext_backbones", "export", str(classifier_checkpoint),
                             str(tmp_path / "x.pth"), "--format", "torchvision"], capture_output=True, text=True)
    assert result.returncode == 0 and "ResNeXtSpec(depth=18" in result.stdout
    result = subprocess.run([sys.executable, "-m", "resnext_backbones", "export", "missing.ckpt", "x"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "weights file 'missing.ckpt' does not exist" in result.stderr


def test_weights_of_another_spec_fail_before_training_and_load_what_fits_when_not_strict(tmp_path):
    source = rb.resnext("resnext101_32x8d")
    rb.save_backbone(source, tmp_path / "x101_32x8d.safetensors")
    with pytest.raises(WeightsError, match=r"layer1\.0\.conv1\.weight: file \(256, 64, 1, 1\) vs model \(128, 64"):
        ObjectDetector(backbone="resnext101_32x4d", num_classes=3, weights=str(tmp_path / "x101_32x8d.safetensors"))
    detector = ObjectDetector(backbone="resnext101_32x4d", num_classes=3, strict_weights=False,
                              weights=str(tmp_path / "x101_32x8d.safetensors"))
    body = detector.model.backbone.body
    torch.testing.assert_close(body.conv1.weight, source.conv1.weight)  # the stem fits and is loaded
    assert body.layer1[0].conv1.weight.shape == (128, 64, 1, 1)  # the rest keeps its own shape


MARGIN = 0.02  # map_50 points


@pytest.mark.slow
def test_two_stage_recipe_pretrain_export_finetune_beats_random_init(tmp_path):
    """configs/classification.yaml -> export -> configs/detection.yaml on the embedded data, same step budget."""
    steps = ["--trainer.max_steps", "240", "--trainer.enable_progress_bar", "false"]
    lightning_cli(["fit", "--config", "configs/classification.yaml", "--trainer.default_root_dir",
                   str(tmp_path / "cls"), "--trainer.max_steps", "150"])
    convert(next((tmp_path / "cls").rglob("last.ckpt")), tmp_path / "trunk.safetensors")
    runs = {}
    for name, weights in [("pretrained", str(tmp_path / "trunk.safetensors")), ("scratch", "null")]:
        cli = lightning_cli(["fit", "--config", "configs/detection.yaml", "--model.init_args.weights", weights,
                    "--trainer.default_root_dir", str(tmp_path / name), *steps])
        runs[name] = float(cli.trainer.callback_metrics["val/map_50"])
    print("val/map_50 after 240 steps:", runs)
    # A strict margin: an export that silently lost the trunk (random init again) would tie, not win.
    assert runs["pretrained"] > runs["scratch"] + MARGIN, runs


def test_a_checkpoint_loads_where_its_initial_weights_file_does_not_exist(tmp_path):
    rb.save_backbone(rb.resnext("resnet18"), tmp_path / "trunk.safetensors")
    model = ObjectDetector(backbone="resnet18", num_classes=3, weights=str(tmp_path / "trunk.safetensors"))
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                "pytorch-lightning_version": "2.6.6"}, tmp_path / "fine_tuned.ckpt")
    (tmp_path / "trunk.safetensors").unlink()  # shared elsewhere: the starting file is not there
    loaded = ObjectDetector.load_from_checkpoint(tmp_path / "fine_tuned.ckpt", map_location="cpu")
    torch.testing.assert_close(loaded.model.backbone.body.conv1.weight, model.model.backbone.body.conv1.weight)
