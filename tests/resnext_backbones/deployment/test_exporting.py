"""``rb.export``: torchvision detectors and classifiers built on our trunks, exported whole (ONNX, torch.export) for any
image size, computing what the eager model computes; torchvision is never patched while tracing.

Each detector architecture is traced once (a module fixture) and that one program serves the ONNX and the .pt2 tests.
"""

import functools
import threading
import warnings

import pytest
import torch
import torchvision
from helpers import ARCHITECTURES, REPO, Classifier, assert_same_detections, bare_detector, randomize_norm_stats

import resnext_backbones as rb
from resnext_backbones.deployment import exporting, program

# image sizes other than the one traced (160 x 200), of both kinds of resize: a shorter side brought to 160 (128 x 96,
# 200 x 150) and a longer side brought to 224 (80 x 120; 64 x 92, one of the sizes whose resize float32 arithmetic
# gets wrong by a pixel)
SIZES = [(80, 120), (128, 96), (200, 150), (64, 92)]


def shapes_images(tiny_coco, sizes):
    """The first validation images of the shapes set, one resized to each of ``sizes``, float in [0, 1]."""
    from pathlib import Path

    from torchvision.io import decode_image
    from torchvision.transforms.v2.functional import resize, to_dtype

    files = sorted(Path(tiny_coco["val_images"]).glob("*.jpg"))[:len(sizes)]
    return [to_dtype(resize(decode_image(str(f)), list(size), antialias=True), torch.float32, scale=True)
            for f, size in zip(files, sizes, strict=True)]


def eager_detections(model, image):
    """What the model gives for one image, as the export names it (``masks``: soft, as torchvision's)."""
    with torch.no_grad():
        (detections,) = model([image])
    return detections


# -- the trunk and the FPN backbone alone: torch.export and ONNX give the same values (torch.jit.script is deprecated
# as of torch 2.15 in favour of torch.export, so torch.export is what is proven)
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


@functools.cache
def trace(architecture):
    """``(architecture, model, its program)``: one trace per architecture, for the ONNX and the .pt2 tests."""
    model = bare_detector(architecture)
    return architecture, model, program(model)


@pytest.fixture
def traced(request):
    return trace(request.param)


# one ONNX translation in CI, Mask R-CNN's (Faster R-CNN's path, and masks; each is a whole trace and translation);
# RetinaNet's program runs in CI in the no-detection test, its ONNX translation and saved .pt2 under slow
IN_CI = [pytest.param(a, marks=[] if a == "mask_rcnn" else [pytest.mark.slow]) for a in ARCHITECTURES]


@pytest.mark.parametrize("traced", IN_CI, indirect=True)
def test_a_detector_exported_to_onnx_gives_the_models_detections_at_sizes_other_than_traced(traced, tiny_coco,
                                                                                           tmp_path):
    ort = pytest.importorskip("onnxruntime")
    architecture, model, exported = traced
    names = exporting.default_output_names(model)
    assert names == ["boxes", "scores", "labels"] + (["masks"] if architecture == "mask_rcnn" else [])
    exporting.onnx_program(exported, ["image"], names).save(str(tmp_path / "detector.onnx"))
    session = ort.InferenceSession(str(tmp_path / "detector.onnx"))
    assert [o.name for o in session.get_outputs()] == names
    for image in shapes_images(tiny_coco, SIZES):
        want = eager_detections(model, image)
        got = dict(zip(names, (torch.from_numpy(v) for v in session.run(None, {"image": image.numpy()})), strict=True))
        assert len(want["boxes"]) > 10 and set(want["labels"].tolist()) <= {0, 1, 2, 3}
        assert_same_detections(got, want, box_tolerance=1e-3, score_tolerance=1e-4)  # masks too, where predicted


@pytest.mark.slow  # in CI: the classifier's saved program (below) and RetinaNet's program in the no-detection test
@pytest.mark.parametrize("traced", ARCHITECTURES, indirect=True)
def test_a_detector_exported_as_a_torch_export_program_gives_the_models_detections_at_any_size(traced, tiny_coco,
                                                                                              tmp_path):
    """The saved program of the ONNX test's trace (the ONNX file is its translation: masks are proven there)."""
    architecture, model, exported = traced
    torch.export.save(exported, str(tmp_path / "detector.pt2"))
    loaded = torch.export.load(str(tmp_path / "detector.pt2")).module()
    names = exporting.default_output_names(model)
    for image in shapes_images(tiny_coco, SIZES[:2]) + [torch.zeros(3, 100, 70)]:
        want = eager_detections(model, image)
        with torch.no_grad():
            got = dict(zip(names, loaded(image), strict=True))
        assert len(want["boxes"]) > 10
        assert_same_detections(got, want, box_tolerance=1e-4, score_tolerance=1e-5)


def test_export_refuses_an_unknown_format_with_the_choices(tmp_path):
    """(``rb.export`` writing each format, with labels through ``category_ids``: tests/tasks/test_export.py.)"""
    with pytest.raises(ValueError, match=r"format='tflite' is not supported; choose one of \['onnx', 'torch_export'\]"):
        rb.export(bare_detector("retinanet"), tmp_path / "x", format="tflite")
    assert not (tmp_path / "x").exists()


# one trace in CI (RetinaNet: the sentinel boxes go through the NMS every architecture shares); the rest under slow
@pytest.mark.parametrize("architecture", ["retinanet", *(pytest.param(a, marks=pytest.mark.slow)
                                                         for a in ("faster_rcnn", "fcos", "mask_rcnn"))])
def test_an_exported_detector_gives_no_detections_where_the_model_gives_none(architecture):
    model = bare_detector(architecture, score_thresh=0.99)  # random weights: no score passes
    image = torch.rand(3, 120, 90, generator=torch.Generator().manual_seed(0))
    assert len(eager_detections(model, image)["boxes"]) == 0
    with torch.no_grad():
        boxes, scores, labels, *masks = program(model).module()(image)
    assert boxes.shape == (0, 4) and scores.shape == labels.shape == (0,)
    assert [m.shape for m in masks] == ([(0, 1, 120, 90)] if architecture == "mask_rcnn" else [])


def run_the_traceable_copy(model):
    """What the export runs, without torch.export's trace: the twins on their copy, a few times over."""
    copy = exporting.traceable_copy(model)
    with torch.no_grad():
        for seed in range(2):
            copy([torch.rand(3, 100, 130, generator=torch.Generator().manual_seed(seed))])


@pytest.mark.parametrize("export", [run_the_traceable_copy, pytest.param(program, marks=pytest.mark.slow)])
def test_a_torchvision_detector_in_another_thread_runs_torchvision_itself_while_an_export_traces(export):
    """The twins live on the traced copy: a detector run meanwhile by another thread (two images at once, which the
    export's one-image padding twin refuses) gives torchvision's own detections, every time. In CI the main thread
    runs the twins' copy eagerly (what the trace runs); the whole trace is under slow."""
    other = bare_detector("faster_rcnn", min_size=96, max_size=128)
    images = [torch.rand(3, 90, 120, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    with torch.no_grad():
        want = other(images)
    runs, failures, tracing = [], [], threading.Event()

    def run_meanwhile():
        while not tracing.is_set():  # until the export starts
            pass
        while tracing.is_set():
            try:
                with torch.no_grad():
                    got = other(images)
                for g, w in zip(got, want, strict=True):
                    assert_same_detections(g, w, box_tolerance=1e-4, score_tolerance=1e-5)  # threads: other sums
                runs.append(1)
            except Exception as error:  # noqa: BLE001 - any error is a failure, reported below
                failures.append(repr(error))

    thread = threading.Thread(target=run_meanwhile)
    thread.start()
    tracing.set()
    try:
        export(bare_detector("faster_rcnn"))
    finally:
        tracing.clear()
        thread.join()
    assert not failures, failures[:3]
    assert len(runs) >= 1  # it ran during the trace
    assert torchvision.ops.boxes.batched_nms is not exporting._batched_nms  # and torchvision's functions are its own


@pytest.mark.parametrize("architecture, min_size, warns", [("retinanet", 128, True), ("faster_rcnn", 64, True),
                                                          ("faster_rcnn", 96, False)])
def test_a_detector_whose_coarsest_level_can_be_one_cell_warns_which_images_its_export_takes(architecture, min_size,
                                                                                             warns):
    """RetinaNet's P7 has stride 128, Faster R-CNN's P6 64 (read from the FPN's strides): a shorter side resized to
    that or less can give it one cell, a size torch.export treats apart. Checked before tracing: no trace here."""
    model = bare_detector(architecture, min_size=min_size, max_size=min_size * 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exporting.warn_of_one_cell_levels(model, torch.rand(3, min_size, min_size * 5 // 4))
    messages = [str(w.message) for w in caught if "coarsest feature level" in str(w.message)]
    assert len(messages) == warns
    if warns:
        stride = 128 if architecture == "retinanet" else 64
        assert f"min_size={min_size}" in messages[0] and f"(stride {stride})" in messages[0]
        assert "Guard failed" in messages[0]


def test_a_classifier_exports_with_any_batch_and_image_size_in_both_formats(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = randomize_norm_stats(Classifier()).train()  # the export evaluates a copy: the model stays in training
    exported = program(model)
    assert model.training
    torch.export.save(exported, str(tmp_path / "classifier.pt2"))
    exporting.onnx_program(exported, ["images"], ["logits"]).save(str(tmp_path / "classifier.onnx"))
    session = ort.InferenceSession(str(tmp_path / "classifier.onnx"))
    runs = {"onnx": lambda x: torch.from_numpy(session.run(None, {"images": x.numpy()})[0]),
            "torch_export": torch.export.load(str(tmp_path / "classifier.pt2")).module()}
    model.eval()
    for shape in [(1, 3, 64, 64), (3, 3, 96, 80), (2, 3, 200, 300)]:
        images = torch.rand(shape)
        with torch.no_grad():
            want = model(images)
        assert want.std() > 0.05  # logits that differ
        for run in runs.values():
            torch.testing.assert_close(run(images), want, atol=1e-4, rtol=1e-4)
    assert exporting.image_sides(model) == (64, 4096)  # twice C5's stride: below, C5 would be one cell


# 4 channels in CI (python -m tasks export of a 1-channel classifier is there too: tests/tasks/test_export.py)
@pytest.mark.parametrize("channels", [pytest.param(1, marks=pytest.mark.slow), 4])
def test_a_classifier_of_other_channel_counts_is_traced_on_images_of_its_channels_and_exports_in_both_formats(
        tmp_path, channels):
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = randomize_norm_stats(Classifier(in_channels=channels)).eval()
    exported = program(model)
    torch.export.save(exported, str(tmp_path / "classifier.pt2"))
    exporting.onnx_program(exported, ["images"], ["logits"]).save(str(tmp_path / "classifier.onnx"))
    session = ort.InferenceSession(str(tmp_path / "classifier.onnx"))
    assert session.get_inputs()[0].shape[1] == channels  # the channel axis is the traced one's, fixed
    runs = {"onnx": lambda x: torch.from_numpy(session.run(None, {"images": x.numpy()})[0]),
            "torch_export": torch.export.load(str(tmp_path / "classifier.pt2")).module()}
    for shape in [(1, channels, 64, 64), (3, channels, 96, 80)]:
        images = torch.rand(shape, generator=torch.Generator().manual_seed(shape[0]))
        with torch.no_grad():
            want = model(images)
        assert want.std() > 0.05  # logits that differ
        for run in runs.values():
            torch.testing.assert_close(run(images), want, atol=1e-4, rtol=1e-4)


def test_the_exports_mask_pasting_equals_torchvisions():
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    g = torch.Generator().manual_seed(0)
    masks = torch.rand(30, 1, 28, 28, generator=g)
    corners = torch.rand(30, 2, generator=g) * 100
    boxes = torch.cat([corners, corners + torch.rand(30, 2, generator=g) ** 2 * 90 + 0.3], 1).clamp(max=119)
    boxes[0] = torch.tensor([0.0, 0.0, 119.0, 119.0])  # one reaching the image's edges
    want = paste_masks_in_image(masks, boxes, (128, 120))
    assert want.shape == (30, 1, 128, 120) and (want > 0).sum() > 20000
    torch.testing.assert_close(exporting._paste_masks_in_image(masks, boxes, (128, 120)), want, atol=1e-5, rtol=0)
    assert exporting._paste_masks_in_image(masks[:0], boxes[:0], (128, 120)).shape == (0, 1, 128, 120)


def test_the_torchvision_private_names_are_those_of_a_tested_version_and_pyproject_bounds_it():
    """The one list of torchvision internals the export rests on: every method it rebinds still reads the names it
    replaces, the installed torchvision is a tested one, and pyproject.toml admits exactly the tested versions."""
    import re

    from resnext_backbones.deployment import torchvision_private as tv

    assert ".".join(torchvision.__version__.split(".")[:2]) in tv.TESTED_TORCHVISION
    for cls, names in tv.REBOUND_METHODS.items():
        for name in names:
            read = set(getattr(cls, name).__code__.co_names)
            assert read & set(tv.REBOUND_GLOBALS), f"{cls.__name__}.{name} reads none of the rebound names"
    for cls, names in tv.REPLACED_METHODS.items():
        assert all(callable(getattr(cls, name)) for name in names)
    pyproject = (REPO / "pyproject.toml").read_text()
    low, high = re.search(r'"torchvision>=([\d.]+),<([\d.]+)"', pyproject).groups()
    tested = sorted(tuple(map(int, v.split("."))) for v in tv.TESTED_TORCHVISION)
    assert tuple(map(int, low.split("."))) == tested[0]
    assert tested[-1] < tuple(map(int, high.split("."))) <= (tested[-1][0], tested[-1][1] + 1)
