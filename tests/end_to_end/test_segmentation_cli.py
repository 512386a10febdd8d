"""Semantic segmentation as users run it: fit, validate (one process and two), predict and export through the CLI on
a tiny shapes set; the trunk shared with the other tasks."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import last_metrics, run_on_two_processes, trainer_config
from PIL import Image

from tasks import ImageClassifier, ObjectDetector, SemanticSegmenter
from tasks.cli import cli as lightning_cli


@pytest.fixture(scope="module")
def tiny_segmentation(tmp_path_factory):
    from tasks.data.shapes import SEGMENTATION_CLASSES, _generate_segmentation

    root = tmp_path_factory.mktemp("segmentation")
    _generate_segmentation(root, "train", 8, seed=20)
    _generate_segmentation(root, "val", 5, seed=21)
    (root / "classes.json").write_text(json.dumps(SEGMENTATION_CLASSES))
    return {"train_images": str(root / "train" / "images"), "train_masks": str(root / "train" / "masks"),
            "val_images": str(root / "val" / "images"), "val_masks": str(root / "val" / "masks"),
            "classes": str(root / "classes.json")}


def segmentation_config(tmp_path, data, **model):
    config = {
        "seed_everything": 0,
        "model": {"class_path": "tasks.SemanticSegmenter", "init_args": {
            "head": "fpn", "backbone": "resnet18", "fpn_channels": 32, "head_channels": 32, "warmup_steps": 1,
            "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.002}}, **model}},
        "data": {"class_path": "tasks.data.SegmentationDataModule",
                 "init_args": {**data, "crop_size": 64, "batch_size": 4, "num_workers": 0}},
        "trainer": trainer_config(tmp_path, "tasks.SegmentationWriter", str(tmp_path / "predictions")),
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, tiny_segmentation):
    tmp = tmp_path_factory.mktemp("fit")
    config = segmentation_config(tmp, tiny_segmentation)
    lightning_cli(["fit", "--config", config])
    return config, tmp


def test_fit_logs_miou_pixel_accuracy_and_iou_per_class_and_writes_a_checkpoint(fitted):
    _, tmp = fitted
    metrics = last_metrics(tmp)
    assert 0 <= metrics["val/miou"] <= 1 and 0 < metrics["val/pixel_acc"] <= 1
    assert math.isfinite(metrics["train/loss"]) and "val/iou/background" in metrics
    assert (tmp / "ckpt" / "last.ckpt").is_file()


def test_predict_writes_an_index_png_per_image_at_its_size_with_the_class_names(fitted, tiny_segmentation):
    config, tmp = fitted
    lightning_cli(["predict", "--config", config, "--ckpt_path", str(tmp / "ckpt" / "last.ckpt"),
                   "--data.init_args.predict_images", tiny_segmentation["val_images"]])
    written = sorted((tmp / "predictions").glob("*.png"))
    images = sorted(Path(tiny_segmentation["val_images"]).glob("*.jpg"))
    assert [p.stem for p in written] == [p.stem for p in images] and len(written) == 5
    for mask, image in zip(written, images, strict=True):
        labels = np.asarray(Image.open(mask))
        assert labels.shape == np.asarray(Image.open(image)).shape[:2] and labels.max() < 4
    assert json.loads((tmp / "predictions" / "classes.json").read_text()) == \
        ["background", "square", "disk", "triangle"]
    assert len(list((tmp / "drawn").glob("*.png"))) == 5


@pytest.mark.slow  # suite time: a DDP launch; CI keeps the detector's DDP tests
def test_validate_on_two_processes_gives_the_single_process_miou(fitted, tmp_path):
    """Each process evaluates its share of the 5 images (no padding); the confusion matrices are summed, so mIoU,
    pixel accuracy and every class's IoU equal one process's."""
    config, tmp = fitted
    results = {}
    for name, run in (("one", lightning_cli), ("two", run_on_two_processes)):
        run(["validate", "--config", config, "--ckpt_path", str(tmp / "ckpt" / "last.ckpt"),
             "--data.init_args.batch_size", "1", "--trainer.logger.init_args.save_dir", str(tmp_path / name)])
        results[name] = last_metrics(tmp_path / name)
    one, two = results["one"], results["two"]
    keys = [k for k in one if k.startswith("val/iou/") or k in ("val/miou", "val/pixel_acc")]
    assert len(keys) >= 3 and one["val/pixel_acc"] > 0
    assert {k: two[k] for k in keys} == pytest.approx({k: one[k] for k in keys}, rel=1e-6)


def test_the_trunk_is_shared_with_the_detector_and_the_classifier_both_ways(fitted, tmp_path):
    _, tmp = fitted
    checkpoint = str(tmp / "ckpt" / "last.ckpt")
    segmenter = SemanticSegmenter.load_from_checkpoint(checkpoint, map_location="cpu")
    trained = {k: v for k, v in segmenter.model.backbone.body.state_dict().items()
               if not k.endswith("num_batches_tracked")}
    detector = ObjectDetector(backbone="resnet18", num_classes=3, norm="bn", weights=checkpoint, fpn_channels=32)
    classifier = ImageClassifier(backbone="resnet18", num_classes=3, weights=checkpoint)
    for key, value in trained.items():
        torch.testing.assert_close(detector.model.backbone.body.state_dict()[key], value)
        torch.testing.assert_close(classifier.trunk.state_dict()[key], value)
    # the FPN travels too where the detector's has the same levels
    torch.testing.assert_close(detector.model.backbone.fpn.state_dict()["inner_blocks.0.0.weight"],
                               segmenter.model.backbone.fpn.state_dict()["inner_blocks.0.0.weight"])
    torch.save({"state_dict": classifier.state_dict(), "pytorch-lightning_version": "2.6.6"}, tmp_path / "cls.ckpt")
    for head in ("fpn", "upernet"):
        started = SemanticSegmenter(head=head, backbone="resnet18", num_classes=3, weights=str(tmp_path / "cls.ckpt"),
                                    fpn_channels=32, head_channels=32)
        trunk = started.trunk_module().state_dict()
        for key, value in classifier.trunk.state_dict().items():
            torch.testing.assert_close(trunk[key], value)
    assert trained["bn1.running_mean"].abs().sum() > 0  # it did train (the norms start at zero mean)


@pytest.mark.slow  # a whole-model trace and its ONNX translation: a minute on 2 shared cores
def test_an_exported_segmenter_gives_the_eager_logits_in_onnxruntime_at_any_size(fitted, tmp_path):
    import onnxruntime

    from tasks.export import export

    _, tmp = fitted
    path = export(str(tmp / "ckpt" / "last.ckpt"), "onnx", str(tmp_path / "segmenter.onnx"), image_size=(64, 64))
    classes = json.loads(open(f"{path}.classes.json").read())
    assert classes["names"] == ["background", "square", "disk", "triangle"] and classes["task"] == "SemanticSegmenter"
    segmenter = SemanticSegmenter.load_from_checkpoint(str(tmp / "ckpt" / "last.ckpt"), map_location="cpu").eval()
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for size in [(64, 64), (96, 80)]:
        images = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(size[1]))
        with torch.no_grad():
            want = segmenter(images)
        (got,) = session.run(None, {"images": images.numpy()})
        assert got.shape == (1, 4, *size) and want.std() > 1e-3
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-4)
