"""The trunk and the FPN backbone export with torch.export and to ONNX, and the exports compute the same values; so do
whole trained models (``python -m tasks export``).

(torch.jit.script is deprecated as of torch 2.15 in favour of torch.export, so torch.export is what is proven.)
"""

import json
import warnings

import pytest
import torch
from conftest import assert_same_detections, randomize_norm_stats

import resnext_backbones as rb

MODELS = {
    "trunk": lambda: rb.resnext("resnext26_32x4d", norm="frozen_bn"),
    # the inference form on channels_last input, which eager runs on oneDNN's fused kernels: under tracing it
    # computes with the plain aten ops, which export
    "fused trunk": lambda: randomize_norm_stats(rb.resnext("resnext26_32x4d", norm="frozen_bn")).eval().fuse(),
    "fpn": lambda: rb.resnext_fpn("resnet18"),
}


@pytest.fixture(params=list(MODELS))
def model_and_input(request):
    torch.manual_seed(0)
    x = torch.rand(1, 3, 64, 64)
    if request.param == "fused trunk":
        x = x.to(memory_format=torch.channels_last)
    return randomize_norm_stats(MODELS[request.param]()).eval(), x


def test_torch_export_program_gives_the_same_outputs(model_and_input):
    model, x = model_and_input
    program = torch.export.export(model, (x,))
    x2 = torch.rand_like(x)  # another input than the one traced, in its layout
    with torch.no_grad():
        ref, out = model(x2), program.module()(x2)
    assert list(out) == list(ref)
    for key in ref:
        torch.testing.assert_close(out[key], ref[key], rtol=1e-4, atol=1e-5)


def test_onnx_export_runs_in_onnxruntime_with_the_same_outputs(model_and_input, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model, x = model_and_input
    with torch.no_grad():
        ref = model(x)
    torch.onnx.export(model, (x,), str(tmp_path / "model.onnx"), dynamo=True, input_names=["images"],
                      output_names=list(ref), verbose=False)
    session = ort.InferenceSession(str(tmp_path / "model.onnx"))
    names = [o.name for o in session.get_outputs()]
    assert names == list(ref)
    for name, value in zip(names, session.run(None, {"images": x.numpy()}), strict=True):
        torch.testing.assert_close(torch.from_numpy(value), ref[name], rtol=1e-4, atol=1e-4)


# -- whole models: python -m tasks export CKPT --format onnx|torch_export --output FILE

def task_checkpoint(task, path):
    """``task`` saved as the Trainer saves it (label map and hyperparameters included)."""
    from lightning.pytorch import Trainer

    trainer = Trainer(logger=False, accelerator="cpu", enable_progress_bar=False)
    trainer.strategy.connect(task)
    trainer.save_checkpoint(path)
    return str(path)


def detector_checkpoint(architecture, path):
    """A detector of random weights that resizes images to a shorter side of 160 px, a longer of at most 224: the
    smallest sizes at which RetinaNet's and FCOS's coarsest level (stride 128) has 2 cells a side, as the dynamic
    export needs (``tasks/export.py``)."""
    from tasks import ObjectDetector

    torch.manual_seed(0)
    score = {"box_score_thresh": 0.0} if architecture.endswith("rcnn") else {"score_thresh": 0.0}
    task = ObjectDetector(architecture=architecture, backbone="resnet18", num_classes=3, min_size=160, max_size=224,
                          categories={3: "square", 5: "disk", 9: "triangle"}, norm="bn", trainable_stages=5,
                          detector_kwargs=score, detections_per_image=50)  # random weights: score every box
    return task_checkpoint(randomize_norm_stats(task), path)


# image sizes other than the one the export traces (160 x 200), of both kinds of resize: a shorter side brought to 160
# (128 x 96, 200 x 150) and a longer side brought to 224 (80 x 120; 64 x 92, one of the sizes whose resize float32
# arithmetic gets wrong by a pixel)
SIZES = [(80, 120), (128, 96), (200, 150), (64, 92)]


def quick_start_images(tiny_coco, sizes):
    """The first validation images of the shapes set (as the quick start's), one resized to each of ``sizes``."""
    from pathlib import Path

    from torchvision.io import decode_image
    from torchvision.transforms.v2.functional import resize, to_dtype

    files = sorted(Path(tiny_coco["val_images"]).glob("*.jpg"))[:len(sizes)]
    return [to_dtype(resize(decode_image(str(f)), list(size), antialias=True), torch.float32, scale=True)
            for f, size in zip(files, sizes, strict=True)]


@pytest.mark.parametrize("architecture", ["faster_rcnn", "retinanet", "fcos", "mask_rcnn"])
def test_a_detector_exports_whole_to_onnx_and_onnxruntime_gives_its_detections_at_any_size(architecture, tiny_coco,
                                                                                             tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from tasks.export import export, load_task

    checkpoint = detector_checkpoint(architecture, tmp_path / "detector.ckpt")
    path = export(checkpoint, "onnx", str(tmp_path / "detector.onnx"))
    session = ort.InferenceSession(str(path))
    names = ["boxes", "scores", "labels"] + (["masks"] if architecture == "mask_rcnn" else [])
    assert [o.name for o in session.get_outputs()] == names
    task = load_task(checkpoint)
    for image in quick_start_images(tiny_coco, SIZES):
        with torch.no_grad():
            (want,) = task([image])  # the model itself, labels as category ids
            if architecture == "mask_rcnn":  # soft masks, as torchvision's Mask R-CNN gives them (the task's: >= 0.5)
                want["masks"] = task.model([image])[0]["masks"]
        got = dict(zip(names, (torch.from_numpy(v) for v in session.run(None, {"image": image.numpy()})), strict=True))
        assert len(want["boxes"]) > 10 and set(want["labels"].tolist()) <= {3, 5, 9}
        assert_same_detections(got, want, box_tolerance=1e-3, score_tolerance=1e-4)  # masks too, where predicted


def test_the_exports_mask_pasting_equals_torchvisions():
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    from tasks.export import _paste_masks_in_image

    g = torch.Generator().manual_seed(0)
    masks = torch.rand(30, 1, 28, 28, generator=g)
    corners = torch.rand(30, 2, generator=g) * 100
    boxes = torch.cat([corners, corners + torch.rand(30, 2, generator=g) ** 2 * 90 + 0.3], 1).clamp(max=119)
    boxes[0] = torch.tensor([0.0, 0.0, 119.0, 119.0])  # one reaching the image's edges
    want = paste_masks_in_image(masks, boxes, (128, 120))
    assert want.shape == (30, 1, 128, 120) and (want > 0).sum() > 20000
    torch.testing.assert_close(_paste_masks_in_image(masks, boxes, (128, 120)), want, atol=1e-5, rtol=0)
    assert _paste_masks_in_image(masks[:0], boxes[:0], (128, 120)).shape == (0, 1, 128, 120)


@pytest.mark.parametrize("architecture", ["faster_rcnn", "mask_rcnn"])  # the ONNX test runs all four's programs
def test_a_detector_exports_to_a_torch_export_program_with_the_same_detections_at_any_size(architecture, tiny_coco,
                                                                                           tmp_path):
    from tasks.export import export, load_task

    checkpoint = detector_checkpoint(architecture, tmp_path / "detector.ckpt")
    path = export(checkpoint, "torch_export", str(tmp_path / "detector.pt2"))
    program = torch.export.load(str(path)).module()
    task = load_task(checkpoint)
    for image in quick_start_images(tiny_coco, SIZES) + [torch.zeros(3, 100, 70)]:
        with torch.no_grad():
            (want,) = task([image])
            if architecture == "mask_rcnn":
                want["masks"] = task.model([image])[0]["masks"]
            names = ["boxes", "scores", "labels"] + (["masks"] if architecture == "mask_rcnn" else [])
            got = dict(zip(names, program(image), strict=True))
        assert len(want["boxes"]) > 10
        assert_same_detections(got, want, box_tolerance=1e-4, score_tolerance=1e-5)
    assert json.loads((tmp_path / "detector.pt2.classes.json").read_text())["names"] == ["square", "disk", "triangle"]


@pytest.mark.parametrize("architecture", ["faster_rcnn", "retinanet", "fcos", "mask_rcnn"])
def test_an_exported_detector_gives_no_detections_where_the_model_gives_none(architecture):
    from tasks import ObjectDetector
    from tasks.export import program

    torch.manual_seed(0)
    score = {"box_score_thresh": 0.99} if architecture.endswith("rcnn") else {"score_thresh": 0.99}
    task = ObjectDetector(architecture=architecture, backbone="resnet18", num_classes=3, min_size=160, max_size=224,
                          norm="bn", trainable_stages=5, detector_kwargs=score)  # random weights: no score passes
    exported = program(randomize_norm_stats(task).eval()).module()
    image = torch.rand(3, 120, 90, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert len(task([image])[0]["boxes"]) == 0
        boxes, scores, labels, *masks = exported(image)
    assert boxes.shape == (0, 4) and scores.shape == labels.shape == (0,)
    assert [m.shape for m in masks] == ([(0, 1, 120, 90)] if architecture == "mask_rcnn" else [])


@pytest.mark.parametrize("fmt", ["onnx", "torch_export"])
def test_a_classifier_exports_with_any_batch_and_image_size(fmt, tmp_path):
    from tasks import ImageClassifier
    from tasks.export import export

    torch.manual_seed(0)
    task = randomize_norm_stats(ImageClassifier(backbone="resnet18", num_classes=4,
                                                categories={1: "a", 2: "b", 4: "c", 7: "d"}))
    checkpoint = task_checkpoint(task, tmp_path / "classifier.ckpt")
    path = export(checkpoint, fmt, str(tmp_path / f"classifier.{fmt}"))
    if fmt == "onnx":
        ort = pytest.importorskip("onnxruntime")
        session = ort.InferenceSession(str(path))
        run = lambda x: torch.from_numpy(session.run(None, {"images": x.numpy()})[0])  # noqa: E731
    else:
        run = torch.export.load(str(path)).module()
    task.eval()
    for shape in [(1, 3, 64, 64), (3, 3, 96, 80), (2, 3, 200, 300)]:
        images = torch.rand(shape)
        with torch.no_grad():
            want = task(images).softmax(-1)
        assert want.max() - want.min() > 0.05  # probabilities that differ
        torch.testing.assert_close(run(images), want, atol=1e-4, rtol=0)


def test_the_export_command_writes_a_detector_that_takes_any_image_size(tmp_path, capsys):
    import subprocess
    import sys

    checkpoint = detector_checkpoint("retinanet", tmp_path / "detector.ckpt")
    result = subprocess.run([sys.executable, "-m", "tasks", "export", checkpoint, "--format", "torch_export",
                             "--output", str(tmp_path / "out.pt2")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out.pt2").exists()
    classes = json.loads((tmp_path / "out.pt2.classes.json").read_text())
    assert classes["sides"] == [64, 4096] and "image_size" not in classes
    program = torch.export.load(str(tmp_path / "out.pt2")).module()
    assert [len(program(torch.rand(3, *size))) for size in [(70, 90), (300, 200)]] == [3, 3]
    from tasks.export import main

    with pytest.raises(SystemExit, match="2"):
        main([str(tmp_path / "missing.ckpt"), "--format", "onnx", "--output", str(tmp_path / "x.onnx")])
    assert f"checkpoint {tmp_path / 'missing.ckpt'} does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("architecture, min_size, warns", [("retinanet", 128, True), ("faster_rcnn", 64, True),
                                                          ("faster_rcnn", 96, False)])
def test_exporting_a_detector_whose_coarsest_level_can_be_one_cell_warns_which_images_it_takes(architecture, min_size,
                                                                                              warns):
    """RetinaNet's P7 has stride 128, Faster R-CNN's P6 64: a shorter side resized to that or less can give it one
    cell, a size torch.export treats apart."""
    from tasks import ObjectDetector
    from tasks.export import program

    task = ObjectDetector(architecture=architecture, backbone="resnet18", num_classes=3, min_size=min_size,
                          max_size=min_size * 2, norm="bn", trainable_stages=5).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exported = program(task).module()
    messages = [str(w.message) for w in caught if "coarsest feature level" in str(w.message)]
    assert len(messages) == warns
    if warns:
        assert f"model.min_size={min_size}" in messages[0] and "Guard failed" in messages[0]
    else:  # and the program takes images of other shapes
        assert len(exported(torch.rand(3, 150, 100))) == 3
