"""The trunk's ``normalization`` owns a task's input normalisation: the copies that the classifier's forward and
the detector's torchvision transform read are set from it, in ``set_normalization``, and travel in checkpoints."""

import torch

import resnext_backbones as rb

OWN = {"mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.3)}


def test_a_restored_classifier_normalises_with_the_saved_trunks_normalization():
    from tasks import ImageClassifier

    saved, restored = (ImageClassifier(backbone="resnet18", num_classes=3).eval() for _ in range(2))
    assert restored.mean.flatten().tolist() == torch.tensor(rb.IMAGENET_MEAN).tolist()  # the trunk's default
    saved.set_normalization(OWN)
    checkpoint = {"state_dict": saved.state_dict()}
    saved.on_save_checkpoint(checkpoint)
    restored.on_load_checkpoint(checkpoint)
    restored.load_state_dict(checkpoint["state_dict"])
    assert restored.trunk.normalization == OWN
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    mean, std = (torch.tensor(OWN[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    with torch.no_grad():
        expected = restored.fc(restored.trunk((images - mean) / std)["c5"].mean((2, 3)))
        torch.testing.assert_close(restored(images), expected)
        torch.testing.assert_close(saved(images), expected)
    assert "mean" not in checkpoint["state_dict"] and "std" not in checkpoint["state_dict"]


def test_the_detectors_transform_is_set_from_the_trunk():
    from tasks import ObjectDetector

    detector = ObjectDetector(backbone="resnet18", num_classes=3, min_size=64, max_size=64)
    assert detector.model.transform.image_mean == list(rb.IMAGENET_MEAN)
    detector.set_normalization(OWN)
    assert detector.model.backbone.body.normalization == OWN
    assert detector.model.transform.image_mean == list(OWN["mean"])
    assert detector.model.transform.image_std == list(OWN["std"])
