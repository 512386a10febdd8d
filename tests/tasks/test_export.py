"""``python -m tasks export``: the Lightning wiring of ``rb.export`` (checkpoint in, the file and its class names
out), whose own tests are in tests/resnext_backbones/deployment/test_exporting.py."""

import json

import pytest
import torch
from helpers import assert_same_detections, randomize_norm_stats

# -- whole models: python -m tasks export CKPT --format onnx|torch_export --output FILE

def task_checkpoint(task, path):
    """``task`` saved as the Trainer saves it (label map and hyperparameters included)."""
    from lightning.pytorch import Trainer

    trainer = Trainer(logger=False, accelerator="cpu", enable_progress_bar=False)
    trainer.strategy.connect(task)
    trainer.save_checkpoint(path)
    return str(path)


@pytest.mark.slow  # a whole-detector trace; in CI, test_the_export_command_hands_the_detector_its_category_ids
def test_the_export_command_writes_a_detector_whose_labels_are_the_datasets_category_ids(tmp_path, capsys):
    """In process, as ``python -m tasks export`` runs it: the program gives the task's own detections (labels as
    the dataset's sparse category ids), at sizes other than the traced one, and the class names beside it."""
    from tasks import ObjectDetector
    from tasks.export import main

    torch.manual_seed(0)
    task = ObjectDetector(architecture="retinanet", backbone="resnet18", num_classes=3, min_size=160, max_size=224,
                          categories={3: "square", 5: "disk", 9: "triangle"}, norm="bn", trainable_stages=5,
                          detector_kwargs={"score_thresh": 0.0}, detections_per_image=50)  # random weights
    checkpoint = task_checkpoint(randomize_norm_stats(task), tmp_path / "detector.ckpt")
    main([checkpoint, "--format", "torch_export", "--output", str(tmp_path / "out.pt2")])
    assert f"wrote {tmp_path / 'out.pt2'} (torch_export)" in capsys.readouterr().out
    classes = json.loads((tmp_path / "out.pt2.classes.json").read_text())
    assert classes["names"] == ["square", "disk", "triangle"] and classes["category_ids"] == [3, 5, 9]
    assert classes["sides"] == [64, 4096] and classes["task"] == "ObjectDetector"
    program = torch.export.load(str(tmp_path / "out.pt2")).module()
    task.eval()
    for size in [(70, 90), (300, 200)]:
        image = torch.rand(3, *size, generator=torch.Generator().manual_seed(size[0]))
        with torch.no_grad():
            (want,) = task([image])
            got = dict(zip(["boxes", "scores", "labels"], program(image), strict=True))
        assert len(want["boxes"]) > 10 and len(set(got["labels"].tolist())) > 1
        assert set(got["labels"].tolist()) <= {3, 5, 9}
        assert_same_detections(got, want, box_tolerance=1e-4, score_tolerance=1e-5)
    with pytest.raises(SystemExit, match="2"):
        main([str(tmp_path / "missing.ckpt"), "--format", "onnx", "--output", str(tmp_path / "x.onnx")])
    assert f"checkpoint {tmp_path / 'missing.ckpt'} does not exist" in capsys.readouterr().err


def test_a_classifier_checkpoint_exports_its_class_probabilities_in_the_checkpoints_class_order(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from tasks import ImageClassifier
    from tasks.export import export

    torch.manual_seed(0)
    task = randomize_norm_stats(ImageClassifier(backbone="resnet18", num_classes=4,
                                                categories={1: "a", 2: "b", 4: "c", 7: "d"}))
    checkpoint = task_checkpoint(task, tmp_path / "classifier.ckpt")
    path = export(checkpoint, "onnx", str(tmp_path / "classifier.onnx"))
    session = ort.InferenceSession(str(path))
    assert [o.name for o in session.get_outputs()] == ["probabilities"]
    assert json.loads((tmp_path / "classifier.onnx.classes.json").read_text())["names"] == ["a", "b", "c", "d"]
    task.eval()
    for shape in [(1, 3, 64, 64), (3, 3, 96, 80)]:
        images = torch.rand(shape)
        with torch.no_grad():
            want = task(images).softmax(-1)
        assert want.max() - want.min() > 0.05  # probabilities that differ
        got = torch.from_numpy(session.run(None, {"images": images.numpy()})[0])
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@pytest.mark.slow  # a whole-model trace: over 10 s on 2 shared cores
def test_a_segmenter_checkpoint_exports_as_a_torch_export_program_giving_its_logits_at_any_size(tmp_path, capsys):
    """``python -m tasks export CKPT --format torch_export``: the .pt2 program gives the segmenter's logits at the
    input's size for batches and sizes other than the traced ones, with the class names beside it."""
    from tasks import SemanticSegmenter
    from tasks.export import main

    torch.manual_seed(0)
    task = randomize_norm_stats(SemanticSegmenter(head="fpn", backbone="resnet18", num_classes=3, fpn_channels=32,
                                                  head_channels=32, categories={0: "sky", 1: "road", 2: "car"}))
    checkpoint = task_checkpoint(task, tmp_path / "segmenter.ckpt")
    main([checkpoint, "--format", "torch_export", "--output", str(tmp_path / "out.pt2"), "--image-size", "64", "64"])
    assert f"wrote {tmp_path / 'out.pt2'} (torch_export)" in capsys.readouterr().out
    classes = json.loads((tmp_path / "out.pt2.classes.json").read_text())
    assert classes["names"] == ["sky", "road", "car"] and classes["task"] == "SemanticSegmenter"
    program = torch.export.load(str(tmp_path / "out.pt2")).module()
    task.eval()
    for shape in [(1, 3, 64, 64), (3, 3, 96, 80)]:
        images = torch.rand(shape, generator=torch.Generator().manual_seed(shape[-1]))
        with torch.no_grad():
            want, got = task(images), program(images)
        assert got.shape == (shape[0], 3, *shape[-2:]) and want.std() > 1e-3
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_the_export_command_hands_the_detector_its_category_ids(tmp_path, monkeypatch, capsys):
    """The wiring without a trace (rb.export's own tests prove the files): the checkpoint's torchvision detector,
    ``category_ids`` mapping its classes (background first) to the dataset's ids, the class names beside the file."""
    import resnext_backbones as rb
    from tasks import ObjectDetector
    from tasks.export import main

    calls = []
    monkeypatch.setattr(rb, "export", lambda model, path, fmt, size, **kw: calls.append((model, fmt, size, kw)) or path)
    task = ObjectDetector(architecture="faster_rcnn", backbone="resnet18", num_classes=3, min_size=160, max_size=224,
                          categories={3: "square", 5: "disk", 9: "triangle"}, norm="bn", trainable_stages=5)
    checkpoint = task_checkpoint(task, tmp_path / "detector.ckpt")
    main([checkpoint, "--format", "onnx", "--output", str(tmp_path / "out.onnx"), "--image-size", "170", "210"])
    ((model, fmt, size, kwargs),) = calls
    assert type(model).__name__ == "FasterRCNN" and (fmt, list(size)) == ("onnx", [170, 210])
    assert kwargs == {"category_ids": [0, 3, 5, 9]}  # class 0 is Faster R-CNN's background
    classes = json.loads((tmp_path / "out.onnx.classes.json").read_text())
    assert classes["category_ids"] == [3, 5, 9] and classes["names"] == ["square", "disk", "triangle"]
    assert f"wrote {tmp_path / 'out.onnx'} (onnx)" in capsys.readouterr().out


# -- models of other than 3 channels (gray, RGB-D): traced on an input of their channels, named so in classes.json

def test_a_gray_classifier_checkpoint_exports_taking_one_channel_images(tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime")
    from tasks import ImageClassifier
    from tasks.export import main

    torch.manual_seed(0)
    task = randomize_norm_stats(ImageClassifier(backbone="resnet18", num_classes=3, in_channels=1,
                                                normalization={"mean": [0.45], "std": [0.22]}))
    checkpoint = task_checkpoint(task, tmp_path / "gray.ckpt")
    main([checkpoint, "--format", "onnx", "--output", str(tmp_path / "gray.onnx")])
    assert "wrote" in capsys.readouterr().out
    classes = json.loads((tmp_path / "gray.onnx.classes.json").read_text())
    assert classes["input"] == "1-channel float in [0, 1], images (N, 1, H, W)"
    session = ort.InferenceSession(str(tmp_path / "gray.onnx"))
    task.eval()
    for shape in [(1, 1, 64, 64), (2, 1, 96, 80)]:
        images = torch.rand(shape, generator=torch.Generator().manual_seed(shape[0]))
        with torch.no_grad():
            want = task(images).softmax(-1)
        assert want.max() - want.min() > 0.05  # probabilities that differ
        got = torch.from_numpy(session.run(None, {"images": images.numpy()})[0])
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@pytest.mark.slow  # two whole-detector traces
def test_an_rgbd_detector_checkpoint_exports_in_both_formats_giving_the_tasks_detections(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from tasks import ObjectDetector
    from tasks.export import export

    torch.manual_seed(0)
    task = ObjectDetector(architecture="faster_rcnn", backbone="resnet18", num_classes=3, min_size=160, max_size=224,
                          categories={3: "square", 5: "disk", 9: "triangle"}, norm="bn", trainable_stages=5,
                          in_channels=4, detector_kwargs={"box_score_thresh": 0.0}, detections_per_image=50)
    checkpoint = task_checkpoint(randomize_norm_stats(task), tmp_path / "rgbd.ckpt")
    onnx = ort.InferenceSession(str(export(checkpoint, "onnx", str(tmp_path / "rgbd.onnx"))))
    program = torch.export.load(str(export(checkpoint, "torch_export", str(tmp_path / "rgbd.pt2")))).module()
    classes = json.loads((tmp_path / "rgbd.pt2.classes.json").read_text())
    assert classes["input"] == "4-channel float in [0, 1], one image (4, H, W)"
    names = ["boxes", "scores", "labels"]
    task.eval()
    for size in [(70, 90), (300, 200)]:
        image = torch.rand(4, *size, generator=torch.Generator().manual_seed(size[0]))
        with torch.no_grad():
            (want,) = task([image])
            got = dict(zip(names, program(image), strict=True))
        ran = dict(zip(names, (torch.from_numpy(v) for v in onnx.run(None, {"image": image.numpy()})), strict=True))
        assert len(want["boxes"]) > 10 and set(got["labels"].tolist()) <= {3, 5, 9}
        assert_same_detections(got, want, box_tolerance=1e-4, score_tolerance=1e-5)
        assert_same_detections(ran, want, box_tolerance=1e-3, score_tolerance=1e-4)
