"""validate/test/predict run a fused channels_last copy of the trunk at ``inference_precision`` (tasks.inference)."""

import contextlib
import warnings

import pytest
import torch
from helpers import assert_same_detections, randomize_norm_stats
from lightning.pytorch import Callback, Trainer
from torch.utils.data import DataLoader, TensorDataset

import resnext_backbones as rb
from resnext_backbones.deployment import device as deployment_device
from resnext_backbones.deployment import native_support
from resnext_backbones.fused import FusedConv2d
from tasks import ImageClassifier, ObjectDetector
from tasks.detection import ARCHITECTURES

IMAGES = [torch.rand(3, 64, 80, generator=torch.Generator().manual_seed(1)),
          torch.rand(3, 72, 64, generator=torch.Generator().manual_seed(2))]


def detector(architecture, **kwargs):
    # seeded: with random weights a few of a thousand detections sit at a proposal cut-off or NMS near-tie, where
    # float32 rounding decides (2 of 48 seeds x detectors on an AMX Xeon); this seed has none on it
    score = {"box_score_thresh": 0.0} if architecture.endswith("rcnn") else {"score_thresh": 0.0}
    with torch.random.fork_rng():  # the other tests' random state is left as it was
        torch.manual_seed(0)
        model = ObjectDetector(architecture=architecture, backbone="resnet18", num_classes=3, min_size=64,
                               max_size=80, norm="bn", trainable_stages=5, detector_kwargs=score,
                               detections_per_image=1000,  # no cut-off at a count, where scores equal to 1e-7
                               **kwargs)                   # could swap detections
    return randomize_norm_stats(model).eval()


def predict(model, batch, batch_idx):
    """``predict_step`` as Lightning's predict loop calls it: without autograd."""
    with torch.inference_mode():
        return model.predict_step(batch, batch_idx)


def classifier(**kwargs):
    return randomize_norm_stats(ImageClassifier(backbone="resnet18", num_classes=4, **kwargs)).eval()


@contextlib.contextmanager
def trunk_forwards():
    """Every trunk forward inside the block, as ``(class of the module that ran, its first conv's class, dtype of
    C5)``: which trunk ran, fused or not, in which precision."""
    calls = []

    def hook(module, args, out):
        if isinstance(module, rb.ResNeXt):
            calls.append((type(module).__name__, type(module.conv1).__name__, out[module.returned_features[-1]].dtype))

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        yield calls
    finally:
        handle.remove()


# Mask R-CNN's 2 x 1000 masks take minutes on 2 cores: under slow (its trunk is the others', fused alike)
@pytest.mark.parametrize("architecture", [pytest.param(a, marks=[pytest.mark.slow] if a == "mask_rcnn" else [])
                                          for a in ARCHITECTURES])
def test_prediction_runs_the_fused_trunk_and_equals_the_unfused_detector(architecture):
    model = detector(architecture)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        expected = model(IMAGES)  # forward() itself: the trunk as trained
    with trunk_forwards() as calls:
        predicted = predict(model, (IMAGES, None), 0)
    assert calls == [("ResNeXt", "FusedConv2d", torch.float32)]  # the copy ran, not the training trunk
    for want, got in zip(expected, predicted, strict=True):
        assert len(want["boxes"]) > 10  # score threshold 0: many detections to compare
        assert_same_detections(got, want, box_tolerance=1e-4, score_tolerance=1e-4)
    # the training weights and the checkpoint's keys are untouched; the copy is no submodule
    assert list(model.state_dict()) == list(state)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not any(isinstance(m, FusedConv2d) for m in model.modules())


# 1 channel in CI; 4 under slow (CI runs rb.inference_copy of a 4-channel detector:
# tests/resnext_backbones/deployment/test_inference.py)
@pytest.mark.parametrize("channels", [1, pytest.param(4, marks=pytest.mark.slow)])
def test_validation_and_prediction_of_a_detector_of_other_channels_run_the_fused_trunk_and_equal_the_unfused(
        channels):
    """Gray and RGB-D images: validate and predict run the fused copy, whose stem takes ``channels`` inputs, and it
    gives the detections of the model as trained."""
    model = detector("faster_rcnn", in_channels=channels, log_images=0)
    images = [torch.rand(channels, 64, 80, generator=torch.Generator().manual_seed(1)),
              torch.rand(channels, 72, 64, generator=torch.Generator().manual_seed(2))]
    with torch.no_grad():
        expected = model(images)
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0]]), "labels": torch.tensor([1]),
                "iscrowd": torch.tensor([0]), "area": torch.tensor([884.0])} for _ in images]
    with trunk_forwards() as calls:
        predicted = predict(model, (images, None), 0)
        model.on_validation_epoch_start()
        with torch.inference_mode():
            model.validation_step((images, targets), 0)
    assert calls == [("ResNeXt", "FusedConv2d", torch.float32)] * 2  # the copy ran, not the training trunk
    ((validated, _),) = model._eval_batches  # what the epoch's mAP is computed from
    for want, got, seen in zip(expected, predicted, validated, strict=True):
        assert len(want["boxes"]) > 10
        assert_same_detections(got, want, box_tolerance=1e-4, score_tolerance=1e-4)
        assert_same_detections(seen, want, box_tolerance=1e-4, score_tolerance=1e-4)


def test_classifier_prediction_runs_the_fused_trunk_and_equals_the_unfused_logits():
    model = classifier()
    images = torch.rand(3, 3, 48, 48, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(images).softmax(-1)
    with trunk_forwards() as calls:
        predicted = predict(model, (images, None), 0)
    assert calls == [("ResNeXt", "FusedConv2d", torch.float32)]
    assert expected.max() - expected.min() > 0.05  # probabilities that differ between classes and images
    torch.testing.assert_close(predicted, expected, atol=1e-4, rtol=0)


def test_fused_inference_false_runs_the_trunk_as_trained():
    model = classifier(fused_inference=False)
    with trunk_forwards() as calls:
        predict(model, (torch.rand(1, 3, 32, 32), None), 0)
    assert calls == [("ResNeXt", "Conv2d", torch.float32)]


def test_the_copy_follows_the_weights_after_an_optimizer_step_and_a_loaded_state_dict():
    model = classifier()
    images = torch.rand(2, 3, 48, 48, generator=torch.Generator().manual_seed(4))
    predict(model, (images, None), 0)  # builds the copy of the first weights
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    torch.nn.functional.cross_entropy(model(images), torch.tensor([0, 1])).backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        after_step = model(images).softmax(-1)
    torch.testing.assert_close(predict(model, (images, None), 0), after_step, atol=1e-4, rtol=0)
    other = classifier()
    other.trunk.load_state_dict(randomize_norm_stats(rb.resnext("resnet18", returned_features=("c5",)), seed=7)
                                .state_dict())
    model.load_state_dict(other.state_dict())
    with torch.no_grad():
        loaded = model(images).softmax(-1)
    assert (loaded - after_step).abs().max() > 1e-3  # the load changed the outputs
    torch.testing.assert_close(predict(model, (images, None), 0), loaded, atol=1e-4, rtol=0)


class RecordValidation(Callback):
    """At each validation batch: the loss of the trunk as trained at that moment (computed just before the step), the
    trunks the step ran, and, once the epoch is over, the loss validation logged."""

    def __init__(self):
        self.epochs = []

    def on_validation_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0):
        with torch.no_grad():
            plain = torch.nn.functional.cross_entropy(module(batch[0]), batch[1])
        self.recording = trunk_forwards()
        self.epochs.append({"plain": float(plain), "calls": self.recording.__enter__()})

    def on_validation_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0):
        self.recording.__exit__(None, None, None)

    def on_train_epoch_end(self, trainer, module):
        self.epochs[-1]["logged"] = float(trainer.callback_metrics["val/loss"])


def test_validation_in_fit_runs_the_copy_of_each_epochs_weights(tmp_path):
    """Two epochs of fit: each validation runs the fused copy (never the trunk itself), made from that epoch's weights:
    the loss it logs equals the loss of the trunk as trained at that moment."""
    torch.manual_seed(0)
    model = ImageClassifier(backbone="resnet18", num_classes=4, log_images=0, warmup_steps=0,
                            lr_schedule="constant", optimizer=lambda params: torch.optim.SGD(params, lr=0.05))
    dataset = TensorDataset(torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(5)),
                            torch.tensor([0, 1, 2, 3]))
    loader = DataLoader(dataset, batch_size=4)
    record = RecordValidation()
    trainer = Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      callbacks=[record])
    trainer.fit(model, loader, loader)
    first, second = record.epochs
    assert first["calls"] == second["calls"] == [("ResNeXt", "FusedConv2d", torch.float32)]
    assert abs(second["plain"] - first["plain"]) > 1e-3  # the epoch in between changed the weights
    for epoch in (first, second):
        assert 0.1 < epoch["plain"] < 1e3  # finite, and not a loss that every model reaches
        assert epoch["logged"] == pytest.approx(epoch["plain"], abs=1e-4)


@pytest.mark.parametrize("precision", ["bf16", "16"])
def test_low_precision_runs_where_native_else_warns_once_and_stays_float32(precision, monkeypatch):
    model = classifier(inference_precision=precision)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = model(images).softmax(-1)
    asked = {"bf16": torch.bfloat16, "16": torch.float16}[precision]
    native = native_support(asked, torch.device("cpu"))
    dtype = asked if native else torch.float32
    with trunk_forwards() as calls, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        predictions = [predict(model, (images, None), 0) for _ in range(2)]
    assert calls == [("ResNeXt", "FusedConv2d", dtype)] * 2
    assert len([w for w in caught if "inference_precision" in str(w.message)]) == (0 if native else 1)
    for p in predictions:
        assert p.dtype == torch.float32
        torch.testing.assert_close(p, expected, atol=2e-2 if native else 1e-4, rtol=0)

    # where the device has no native support: float32, and one warning that names the setting and the fallback
    monkeypatch.setattr(deployment_device, "native_support", lambda dtype, device: dtype == torch.float32)
    model = classifier(inference_precision=precision)
    with torch.no_grad():
        expected = model(images).softmax(-1)
    with trunk_forwards() as calls, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        predictions = [predict(model, (images, None), 0) for _ in range(3)]
    messages = [str(w.message) for w in caught if "inference_precision" in str(w.message)]
    assert len(messages) == 1, messages
    assert f"inference_precision={precision} is not native" in messages[0] and "float32" in messages[0]
    assert calls == [("ResNeXt", "FusedConv2d", torch.float32)] * 3
    torch.testing.assert_close(predictions[0], expected, atol=1e-4, rtol=0)




def test_inference_precision_32_turns_the_trainers_autocast_off():
    """Under a bf16-mixed trainer, validation at the default inference_precision=32 computes in float32."""
    model = detector("retinanet")
    with torch.no_grad():
        expected = model(IMAGES)
    with trunk_forwards() as calls:
        with torch.autocast("cpu", dtype=torch.bfloat16):  # what Lightning's bf16-mixed puts around the steps
            predicted = predict(model, (IMAGES, None), 0)
    assert calls == [("ResNeXt", "FusedConv2d", torch.float32)]
    for want, got in zip(expected, predicted, strict=True):
        assert_same_detections(got, want, box_tolerance=1e-4, score_tolerance=1e-4)


def test_unknown_inference_precision_is_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"model.inference_precision='bf32' is not supported; choose one of "
                                         r"\['32', 'bf16', '16'\]"):
        classifier(inference_precision="bf32")


def test_a_groupnorm_trunk_runs_unfused_at_inference():
    model = randomize_norm_stats(ImageClassifier(backbone="resnet18", num_classes=4, norm="gn")).eval()
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(images).softmax(-1)
    torch.testing.assert_close(predict(model, (images, None), 0), expected, atol=1e-5, rtol=0)


@pytest.fixture
def no_tf32():
    """Convolutions in true float32 on CUDA (cuDNN's default TF32 rounds to 10 bits of mantissa)."""
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.gpu
@pytest.mark.parametrize("relu, shortcut", [(True, False), (True, True), (False, True)])
def test_fused_convolution_on_cuda_runs_cudnns_fused_kernel_with_the_values_of_conv_norm_add_relu(
        relu, shortcut, no_tf32, monkeypatch):
    conv, norm = torch.nn.Conv2d(32, 64, 3, padding=1, groups=8, bias=False), torch.nn.BatchNorm2d(64)
    randomize_norm_stats(norm)
    conv, norm = conv.cuda().eval(), norm.cuda().eval()
    fused = FusedConv2d(conv, norm, relu=relu)
    g = torch.Generator().manual_seed(5)
    x, z = (torch.randn(2, c, 20, 20, generator=g).cuda().to(memory_format=torch.channels_last) for c in (32, 64))
    calls = []

    def counted(name):
        op = getattr(torch, name)
        return lambda *args: calls.append(name) or op(*args)

    for name in ["cudnn_convolution_relu", "cudnn_convolution_add_relu"]:
        monkeypatch.setattr(torch, name, counted(name))
    with torch.no_grad():
        expected = norm(conv(x)) + (z if shortcut else 0)
        expected = expected.relu() if relu else expected
        got = fused(x, z if shortcut else None)
    assert calls == ([f"cudnn_convolution_{'add_' if shortcut else ''}relu"] if relu else [])
    assert expected.abs().max() > 1
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("precision, dtype", [("32", torch.float32), ("bf16", torch.bfloat16), ("16", torch.float16)])
def test_inference_on_cuda_runs_the_fused_trunk_in_the_precision_asked(precision, dtype, no_tf32):
    model = classifier(inference_precision=precision).cuda()
    images = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(8)).cuda()
    with torch.no_grad():
        expected = model(images).softmax(-1)
    with trunk_forwards() as calls:
        predicted = predict(model, (images, None), 0)
    assert calls == [("ResNeXt", "FusedConv2d", dtype)]
    assert predicted.dtype == torch.float32 and predicted.is_cuda
    torch.testing.assert_close(predicted, expected, atol=1e-4 if precision == "32" else 2e-2, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_detector_prediction_on_cuda_in_bf16_keeps_boxes_in_float32(architecture, no_tf32):
    model = detector(architecture, inference_precision="bf16").cuda()
    images = [image.cuda() for image in IMAGES]
    with trunk_forwards() as calls:
        predicted = predict(model, (images, None), 0)
    assert calls == [("ResNeXt", "FusedConv2d", torch.bfloat16)]
    for detections in predicted:
        assert len(detections["boxes"]) > 10 and detections["boxes"].dtype == torch.float32
        assert torch.isfinite(detections["boxes"]).all() and torch.isfinite(detections["scores"]).all()


def test_the_detection_equality_helper_pairs_near_duplicates_and_rejects_any_moved_value():
    """The helper the equality tests above rest on: a closest-first pairing would match A to a and leave B without
    its partner b here; and one detection's box, score, label or mask moved beyond tolerance fails it."""
    want = {"boxes": torch.tensor([[0.0, 0, 100, 100], [0, 0, 100, 101]]), "scores": torch.tensor([0.5, 0.5]),
            "labels": torch.tensor([1, 1])}
    got = {"boxes": torch.tensor([[0.0, 0, 100, 100.4], [0, 0, 100, 99.3]]), "scores": torch.tensor([0.5, 0.5]),
           "labels": torch.tensor([1, 1])}
    assert_same_detections(got, want, box_tolerance=0.01, score_tolerance=1e-4)
    g = torch.Generator().manual_seed(0)
    want = {"boxes": torch.rand(50, 4, generator=g) * 60, "scores": torch.rand(50, generator=g),
            "labels": torch.randint(0, 3, (50,), generator=g), "masks": torch.rand(50, 1, 20, 20, generator=g)}
    order = torch.randperm(50, generator=g)
    assert_same_detections({k: v[order] for k, v in want.items()}, want, 1e-4, 1e-4)
    for key, index, change in [("boxes", (3, 1), 0.01), ("scores", 3, 0.001), ("labels", 3, 1),
                               ("masks", (3, 0, 5, 5), 0.01)]:
        moved = {k: v[order].clone() for k, v in want.items()}
        moved[key][index] += change
        with pytest.raises(AssertionError):
            assert_same_detections(moved, want, 1e-4, 1e-4)
    # a box 0.003 px apart (within 1e-4 of its coordinates) is pasted that much apart: its own mask may differ by
    # 0.002 then, not by 0.01, and another detection's mask not by 0.002; masks without their channel dimension too
    want["masks"] = want["masks"][:, 0]
    index = int(want["boxes"].amax(1).argmax())
    for masked, change, passes in [(index, 0.002, True), (index, 0.01, False), (index - 1, 0.002, False)]:
        moved = {k: v.clone() for k, v in want.items()}
        moved["boxes"][index, 2] += 0.003
        moved["masks"][masked, 5, 5] += change
        if passes:
            assert_same_detections(moved, want, 1e-4, 1e-4)
        else:
            with pytest.raises(AssertionError, match="mask"):
                assert_same_detections(moved, want, 1e-4, 1e-4)
