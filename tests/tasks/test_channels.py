"""Both tasks train and predict on images of 1, 4 and 13 channels (gray PNG, RGBA PNG as RGB-D, 13-band uint16
TIFF), read by the data modules with ``channels`` and ``max_value``."""

import json

import numpy as np
import pytest
import torch
from helpers import SMALL_HEADS
from PIL import Image

from tasks import ImageClassifier, ObjectDetector
from tasks.data import CocoDetectionDataModule, ImageFolderDataModule

tifffile = pytest.importorskip("tifffile")
MAX_VALUE = {1: None, 4: None, 13: 10000.0}


def write_image(path, channels, rng, size=(40, 48)):
    """An image of ``channels`` channels with a bright square; returns the path written."""
    h, w = size
    if channels == 13:
        bands = rng.integers(0, 3000, (13, h, w), dtype=np.uint16)
        bands[:, 8:24, 10:30] += 6000
        path = path.with_suffix(".tif")
        tifffile.imwrite(path, bands, photometric="minisblack", planarconfig="separate")
        return path
    pixels = rng.integers(0, 100, (h, w, channels), dtype=np.uint8)
    pixels[8:24, 10:30] += 120
    Image.fromarray(pixels[..., 0] if channels == 1 else pixels, "L" if channels == 1 else "RGBA").save(path)
    return path


# CI runs the 13-band TIFF detector (the classifier covers 1 and 4 channels there); the others under -m slow
@pytest.mark.parametrize("channels", [pytest.param(1, marks=pytest.mark.slow), pytest.param(4, marks=pytest.mark.slow),
                                      13])
def test_the_detector_trains_and_predicts_on_other_channel_counts(tmp_path, channels):
    rng = np.random.default_rng(channels)
    (tmp_path / "images").mkdir()
    images, anns = [], []
    for i in range(2):
        path = write_image(tmp_path / "images" / f"{i}.png", channels, rng)
        images.append({"id": i + 1, "file_name": path.name, "height": 40, "width": 48})
        anns.append({"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [10, 8, 20, 16], "area": 320,
                     "iscrowd": 0})
    (tmp_path / "a.json").write_text(json.dumps({"images": images, "annotations": anns,
                                                 "categories": [{"id": 1, "name": "square"}]}))
    paths = [str(tmp_path / "a.json"), str(tmp_path / "images")] * 2
    data = CocoDetectionDataModule(*paths, predict_images=str(tmp_path / "images"), batch_size=2, num_workers=0,
                                   channels=channels, max_value=MAX_VALUE[channels])
    data.setup("fit")
    model = ObjectDetector(backbone="resnet18", num_classes=1, categories=data.categories, min_size=32, max_size=32,
                           in_channels=channels, log_images=0, anchor_size=16, detector_kwargs=SMALL_HEADS,
                           fused_inference=False)  # the fused trunk of other channel counts: test_loading.py
    images, targets = next(iter(data.train_dataloader()))
    assert images[0].shape[0] == channels
    model.training_loss((images, targets), 0).backward()
    stem = model.model.backbone.body.conv1.weight
    assert stem.shape[1] == channels
    batch = next(iter(data.predict_dataloader()))
    detections = model.eval().predict_batch(batch)
    assert len(detections) == 2 and all(d["boxes"].shape[-1] == 4 for d in detections)
    assert len(model.model.transform.image_mean) == channels


@pytest.mark.parametrize("channels", [1, 4, 13])
def test_the_classifier_trains_and_predicts_on_other_channel_counts(tmp_path, channels):
    rng = np.random.default_rng(channels)
    for split in ("train", "val"):
        for name in ("a", "b"):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(2):
                write_image(tmp_path / split / name / f"{i}.png", channels, rng)
    data = ImageFolderDataModule(str(tmp_path / "train"), str(tmp_path / "val"), batch_size=4, num_workers=0,
                                 image_size=32, channels=channels, max_value=MAX_VALUE[channels])
    model = ImageClassifier(backbone="resnet18", num_classes=2, in_channels=channels, log_images=0,
                            normalization={"mean": [0.5] * channels, "std": [0.25] * channels})
    images, labels = next(iter(data.train_dataloader()))
    assert images.shape == (4, channels, 32, 32) and images.dtype == torch.float32
    loss = model.training_loss((images, labels), 0)
    loss.backward()
    assert torch.isfinite(loss) and model.trunk.conv1.weight.grad.abs().sum() > 0
    assert model.mean.shape == (1, channels, 1, 1) and float(model.std.flatten()[0]) == 0.25
    probabilities = model.eval().predict_batch(next(iter(data.predict_dataloader())))
    assert probabilities.shape == (4, 2)
    torch.testing.assert_close(probabilities.sum(-1), torch.ones(4))


def test_a_normalisation_of_another_channel_count_is_refused():
    with pytest.raises(ValueError, match=r"model.normalization: mean \[0.5, 0.5, 0.5\] .* one value per input "
                                         r"channel \(4, model.in_channels\)"):
        ImageClassifier(backbone="resnet18", num_classes=2, in_channels=4,
                        normalization={"mean": [0.5] * 3, "std": [0.25] * 3})
