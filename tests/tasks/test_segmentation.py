"""SemanticSegmenter: mmsegmentation's dataset-level IoU against numpy, the losses, the sliding window, the heads, the
inference copy."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import randomize_norm_stats
from torchmetrics.classification import MulticlassConfusionMatrix, MulticlassJaccardIndex
from torchmetrics.segmentation import MeanIoU

from resnext_backbones.deployment import native_support
from tasks import SemanticSegmenter
from tasks.segmentation import dice_loss, segmentation_loss, segmentation_scores, sliding_window

IGNORE = 255


def numpy_iou_metric(pairs, num_classes, ignore_index=IGNORE):
    """mmsegmentation's IoUMetric, written out in numpy: per image, the areas of intersection, prediction and label
    of each class over the labelled pixels, summed over the images; IoU = intersection / union per class, mIoU the
    nanmean, aAcc = intersection / label areas summed."""
    intersect, area_pred, area_label = (np.zeros(num_classes) for _ in range(3))
    for pred, label in pairs:
        keep = label != ignore_index
        pred, label = pred[keep], label[keep]
        hit = pred[pred == label]
        intersect += np.histogram(hit, bins=num_classes, range=(0, num_classes))[0]
        area_pred += np.histogram(pred, bins=num_classes, range=(0, num_classes))[0]
        area_label += np.histogram(label, bins=num_classes, range=(0, num_classes))[0]
    union = area_pred + area_label - intersect
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = intersect / union
    return iou, np.nanmean(iou), intersect.sum() / area_label.sum()


@pytest.fixture
def predictions():
    """Five images of 4 classes (of 6): ignore_index pixels in each, class 2 absent from the first image's labels and
    predictions, class 5 never present, class 4 only ever predicted (IoU 0, counted), uneven sizes."""
    rng = np.random.default_rng(0)
    pairs = []
    for i, (h, w) in enumerate([(9, 7), (12, 12), (5, 16), (8, 8), (10, 3)]):
        label = rng.integers(0, 4, (h, w))
        pred = np.where(rng.random((h, w)) < 0.6, label, rng.integers(0, 5, (h, w)))
        pred[pred == 4] = np.where(rng.random() < 0.5, 4, 1)
        if i == 0:
            label[label == 2], pred[pred == 2] = 3, 3
        label[rng.random((h, w)) < 0.15] = IGNORE
        pairs.append((pred, label))
    return pairs


def test_scores_are_mmsegmentations_iou_metric_over_the_whole_dataset(predictions):
    metric = MulticlassConfusionMatrix(6, ignore_index=IGNORE, validate_args=False)
    for pred, label in predictions:
        metric.update(torch.from_numpy(pred)[None], torch.from_numpy(label)[None])
    scores = segmentation_scores(metric.compute())
    iou, miou, acc = numpy_iou_metric(predictions, 6)
    assert math.isnan(iou[5]) and iou[4] == 0 and 0.2 < miou < 0.9  # never present: out; only predicted: in, at 0
    np.testing.assert_allclose(scores["iou"].numpy(), iou, rtol=1e-12)
    assert float(scores["miou"]) == pytest.approx(miou, rel=1e-12)
    assert float(scores["pixel_acc"]) == pytest.approx(acc, rel=1e-12)
    # torchmetrics' MulticlassJaccardIndex (macro) computes the same from the same dataset-level matrix; its MeanIoU
    # averages per image, which is not mmsegmentation's figure
    jaccard = MulticlassJaccardIndex(6, average="macro", ignore_index=IGNORE)
    per_image = MeanIoU(num_classes=6, input_format="index")
    for pred, label in predictions:
        jaccard.update(torch.from_numpy(pred)[None], torch.from_numpy(label)[None])
        keep = torch.from_numpy(label != IGNORE)
        per_image.update(torch.from_numpy(pred)[keep][None], torch.from_numpy(label)[keep][None])
    assert float(jaccard.compute()) == pytest.approx(miou, rel=1e-6)
    assert abs(float(per_image.compute()) - miou) > 1e-3


def test_the_epoch_logs_miou_iou_per_class_name_and_prints_the_table_worst_first(predictions, caplog, monkeypatch):
    """The epoch's end: val/miou, val/pixel_acc and val/iou/<name> for the classes in the ground truth or the
    predictions (numpy's IoUMetric above), and the per-class table sorted worst first, '-' for a class in neither."""
    from types import SimpleNamespace

    names = {0: "sky", 1: "road", 2: "car", 3: "tree", 4: "sign", 5: "bus"}
    model = SemanticSegmenter(head="fpn", backbone="resnet18", num_classes=6, categories=names, log_images=0)
    for pred, label in predictions:
        model.confusion["val"].update(torch.from_numpy(pred)[None], torch.from_numpy(label)[None])
    logged = {}
    monkeypatch.setattr(model, "log_dict", lambda values, **kwargs: logged.update(values))
    model._trainer = SimpleNamespace(sanity_checking=False, is_global_zero=True)
    with caplog.at_level("INFO", logger="tasks"):
        model.on_validation_epoch_end()
    iou, miou, acc = numpy_iou_metric(predictions, 6)
    assert logged["val/miou"] == pytest.approx(miou) and logged["val/pixel_acc"] == pytest.approx(acc)
    assert {k: v for k, v in logged.items() if k.startswith("val/iou/")} == pytest.approx(
        {f"val/iou/{names[c]}": v for c, v in enumerate(iou) if not np.isnan(v)})
    (text,) = [r.getMessage() for r in caplog.records if "IoU per class" in r.getMessage()]
    rows = [line.split("|")[1:3] for line in text.splitlines()[3:]]
    order = sorted((v, names[c]) for c, v in enumerate(iou) if not np.isnan(v))
    assert [name.strip() for name, _ in rows] == [n for _, n in order] + ["bus"]  # worst first; never present: last
    assert rows[-1][1].strip() == "-"


def test_cross_entropy_averages_over_labelled_pixels_with_class_weights_and_ignores_the_rest():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, 4, requires_grad=True)
    target = torch.randint(0, 3, (2, 5, 4))
    target[0, :2] = IGNORE
    weights = torch.tensor([0.5, 1.0, 2.0])
    loss = segmentation_loss(logits, target.to(torch.uint8), "ce", IGNORE, weights)
    # numpy: -sum_i w[y_i] log softmax(x_i)[y_i] / sum_i w[y_i] over labelled pixels
    x = logits.detach().permute(0, 2, 3, 1).reshape(-1, 3).double().numpy()
    y = target.reshape(-1).numpy()
    keep = y != IGNORE
    log_p = x - np.log(np.exp(x).sum(1, keepdims=True))
    w = weights.double().numpy()[y[keep]]
    assert loss.item() == pytest.approx(-(w * log_p[keep, y[keep]]).sum() / w.sum(), rel=1e-6)
    loss.backward()
    assert logits.grad[0, :, :2].abs().sum() == 0 and logits.grad[1].abs().sum() > 0
    everything_ignored = torch.full((2, 5, 4), IGNORE, dtype=torch.uint8)
    assert float(segmentation_loss(logits, everything_ignored, "ce+dice", IGNORE)) == 0.0


def test_dice_loss_is_one_minus_the_soft_dice_per_class_over_labelled_pixels():
    torch.manual_seed(1)
    logits = torch.randn(2, 3, 4, 4)
    target = torch.randint(0, 3, (2, 4, 4))
    target[1, 0] = IGNORE
    p = logits.softmax(1).permute(0, 2, 3, 1).reshape(-1, 3).numpy()
    y = target.reshape(-1).numpy()
    keep = y != IGNORE
    p, t = p[keep], np.eye(3)[y[keep]]
    dice = (2 * (p * t).sum(0) + 1) / (p.sum(0) + t.sum(0) + 1)
    assert float(dice_loss(logits, target, IGNORE)) == pytest.approx(float((1 - dice).mean()), rel=1e-5)
    both = segmentation_loss(logits, target, "ce+dice", IGNORE)
    ce = F.cross_entropy(logits, target, ignore_index=IGNORE)
    assert float(both) == pytest.approx(float(ce) + float((1 - dice).mean()), rel=1e-5)


def _mmseg_slide(forward, image, size, stride):
    """mmsegmentation's ``slide_inference``, window by window."""
    h, w = image.shape[-2:]
    rows = max(h - size[0] + stride[0] - 1, 0) // stride[0] + 1
    columns = max(w - size[1] + stride[1] - 1, 0) // stride[1] + 1
    preds, count = 0, torch.zeros(1, 1, h, w)
    for r in range(rows):
        for c in range(columns):
            y1, x1 = r * stride[0], c * stride[1]
            y2, x2 = min(y1 + size[0], h), min(x1 + size[1], w)
            y1, x1 = max(y2 - size[0], 0), max(x2 - size[1], 0)
            preds = preds + F.pad(forward(image[:, :, y1:y2, x1:x2]), (x1, w - x2, y1, h - y2))
            count[:, :, y1:y2, x1:x2] += 1
    return preds / count


@pytest.fixture(scope="module")
def segmenter():
    torch.manual_seed(0)
    model = SemanticSegmenter(head="fpn", backbone="resnet18", num_classes=4, fpn_channels=32, head_channels=32)
    return randomize_norm_stats(model).eval()


def test_sliding_window_averages_overlapping_windows_as_mmsegmentation(segmenter):
    images = torch.rand(2, 3, 56, 76, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = sliding_window(segmenter, images, (40, 48), (24, 20), windows_per_forward=3)  # 2 x 3 windows
        want = torch.cat([_mmseg_slide(segmenter, im[None], (40, 48), (24, 20)) for im in images])
        whole = segmenter(images)
    assert got.shape == (2, 4, 56, 76) and (got - whole).abs().amax() > 1e-3  # the windows do differ from one pass
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_window_that_covers_the_image_is_the_whole_image_forward(segmenter):
    images = torch.rand(1, 3, 40, 48, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for size in [(40, 48), (64, 64)]:
            torch.testing.assert_close(sliding_window(segmenter, images, size, (32, 32)), segmenter(images))


@pytest.mark.parametrize("head, aux", [("fpn", False), ("upernet", True), ("deeplabv3", False), ("fcn", False)])
def test_every_head_trains_and_gives_logits_at_the_input_size(head, aux):
    torch.manual_seed(0)
    backbone = "resnet18" if head in ("fpn", "upernet") else "resnext26_32x4d"
    model = SemanticSegmenter(head=head, backbone=backbone, num_classes=3, fpn_channels=32, head_channels=32,
                              loss="ce+dice")
    assert (model.model.aux_head is not None) == aux and model.aux_weight == (0.4 if aux else 0.0)
    images = torch.randint(0, 256, (2, 3, 34, 42), dtype=torch.uint8)  # dilated heads: slow aten kernels
    masks = torch.randint(0, 3, (2, 34, 42), dtype=torch.uint8)
    loss = model.training_loss((images, masks), 0)
    loss.backward()
    assert math.isfinite(float(loss)) and next(model.model.decode_head.parameters()).grad is not None
    with torch.no_grad():
        assert model.eval()(images).shape == (2, 3, 34, 42)


def test_upernets_training_loss_adds_its_auxiliary_heads_cross_entropy_at_weight_0_4():
    """mmsegmentation's upernet_r50: loss_decode (weight 1.0) + loss_aux of the FCN head on C4 (weight 0.4), both
    cross-entropy over the labelled pixels, written out here with torch's cross_entropy."""
    torch.manual_seed(0)
    model = SemanticSegmenter(head="upernet", backbone="resnet18", num_classes=3, head_channels=32)
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    masks = torch.randint(0, 3, (2, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    masks[:, :8] = IGNORE
    torch.manual_seed(3)  # the heads' dropout draws the same channels in both passes
    loss = model.training_loss((images, masks), 0)
    torch.manual_seed(3)
    logits, aux = model.model.forward_train(model.normalized(images))
    decode_ce = F.cross_entropy(logits, masks.long(), ignore_index=IGNORE)
    aux_ce = F.cross_entropy(aux, masks.long(), ignore_index=IGNORE)
    assert aux.shape == logits.shape == (2, 3, 64, 64) and abs(float(aux_ce - decode_ce)) > 1e-3
    torch.testing.assert_close(loss, decode_ce + 0.4 * aux_ce)


def test_validation_runs_the_inference_copy_and_it_equals_the_model(segmenter):
    from resnext_backbones.deployment.inference import Native

    images = torch.rand(2, 3, 48, 64, generator=torch.Generator().manual_seed(4))
    model = segmenter.model
    with torch.no_grad():
        eager = segmenter(images)
        with segmenter.inference():
            copy = segmenter.model
            fast = segmenter(images)
    assert copy is not model and isinstance(copy.backbone, Native) and isinstance(copy.decode_head, Native)
    assert segmenter.model is model and eager.std() > 1e-3
    torch.testing.assert_close(fast, eager, rtol=1e-4, atol=1e-4)


def test_an_evaluation_batch_of_two_sizes_scores_each_image_as_if_it_were_alone():
    """The evaluation loaders pad a batch to its largest image and give each image's size: the confusion matrix is
    each image's own prediction (the model on its pixels alone) against its labels, summed, counted here in numpy."""
    torch.manual_seed(0)
    model = randomize_norm_stats(SemanticSegmenter(head="fpn", backbone="resnet18", num_classes=4, fpn_channels=32,
                                                   head_channels=32, log_images=0)).eval()
    g = torch.Generator().manual_seed(6)
    alone = [(torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8),
              torch.randint(0, 4, (h, w), generator=g, dtype=torch.uint8)) for h, w in [(64, 96), (96, 72)]]
    images = torch.zeros(2, 3, 96, 96, dtype=torch.uint8)
    masks = torch.full((2, 96, 96), IGNORE, dtype=torch.uint8)
    for i, (image, mask) in enumerate(alone):
        images[i, :, :image.shape[1], :image.shape[2]], masks[i, :mask.shape[0], :mask.shape[1]] = image, mask
    with torch.no_grad():
        model.evaluation_step((images, masks, [tuple(m.shape) for _, m in alone]), 0, "val")
        want = np.zeros((4, 4), np.int64)
        for image, mask in alone:
            with model.inference():
                predicted = model(image[None]).argmax(1)[0]
            want += np.bincount(4 * mask.numpy().ravel() + predicted.numpy().ravel(), minlength=16).reshape(4, 4)
    got = model.confusion["val"].compute().numpy()
    assert got.sum() == 64 * 96 + 96 * 72 and (want.diagonal() > 0).sum() > 1
    np.testing.assert_array_equal(got, want)


BF16_NATIVE = native_support(torch.bfloat16, torch.device("cpu"))


@pytest.mark.skipif(not BF16_NATIVE, reason="this CPU has no native bf16 (AMX or AVX-512 BF16): the copy would run "
                                            "float32, with a warning")
def test_the_bf16_inference_copy_convolves_in_bf16_and_predicts_what_float32_does():
    """inference_precision bf16: every convolution of the copy's trunk, FPN and decode head takes bf16 inputs (as the
    detector's bf16 test checks), the logits come back float32 within bf16's rounding of the float32 model's, and the
    labels agree on >= 99% of the pixels of a prediction that holds more than one class."""
    from resnext_backbones.fused import FusedConv2d

    torch.manual_seed(0)
    model = randomize_norm_stats(SemanticSegmenter(head="fpn", backbone="resnet18", num_classes=4, fpn_channels=32,
                                                   head_channels=32, inference_precision="bf16")).eval()
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    seen = {}

    def record(name):
        def hook(module, args):
            seen.setdefault(name, args[0].dtype)  # and returns None: the inputs stay as they are
        return hook

    with torch.no_grad():
        want = model(images)  # the model as trained, float32
        with model.inference():
            handles = [m.register_forward_pre_hook(record(n)) for n, m in model.model.named_modules()
                       if isinstance(m, (torch.nn.Conv2d, FusedConv2d))]
            got = model(images)
        for handle in handles:
            handle.remove()
    for part in ("backbone.module.body", "backbone.module.fpn", "decode_head.module"):
        ran = {name: dtype for name, dtype in seen.items() if name.startswith(part)}
        assert ran and set(ran.values()) == {torch.bfloat16}, (part, ran)
    assert got.dtype == torch.float32 and got.shape == want.shape == (2, 4, 64, 64)
    # bf16 keeps 8 significant bits (relative rounding 2^-9 per operation); some twenty layers stay within 2 % of the
    # logits' range
    torch.testing.assert_close(got, want, rtol=0.0, atol=0.02 * float(want.abs().max()))
    labels = want.argmax(1)
    assert len(labels.unique()) > 1 and (got.argmax(1) == labels).float().mean() >= 0.99


def test_arguments_that_cannot_work_are_refused_naming_the_setting():
    with pytest.raises(ValueError, match=r"model.head='pspnet'.*choose one of \['fpn', 'upernet'"):
        SemanticSegmenter(head="pspnet", backbone="resnet18", num_classes=3)
    with pytest.raises(ValueError, match="model.aux_loss.*C4"):
        SemanticSegmenter(head="fpn", backbone="resnet18", num_classes=3, aux_loss=0.4)
    with pytest.raises(ValueError, match="model.class_weights has 2 entries"):
        SemanticSegmenter(head="fpn", backbone="resnet18", num_classes=3, class_weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="model.loss='focal'"):
        SemanticSegmenter(head="fpn", backbone="resnet18", num_classes=3, loss="focal")
    with pytest.raises(ValueError, match="model.head_norm: head=deeplabv3 is torchvision's head"):
        SemanticSegmenter(head="deeplabv3", backbone="resnet18", num_classes=3, head_norm="bn")
    with pytest.raises(ValueError, match="model.head_norm='syncbn' is not supported; choose gn or bn"):
        SemanticSegmenter(head="fpn", backbone="resnet18", num_classes=3, head_norm="syncbn")


@pytest.mark.parametrize("head, norm, dropout", [("fpn", torch.nn.GroupNorm, 0.0),
                                                 ("upernet", torch.nn.BatchNorm2d, 0.1)])
def test_head_norm_and_dropout_default_to_the_heads_papers_and_follow_the_config(head, norm, dropout):
    def built(**options):
        decode = SemanticSegmenter(head=head, backbone="resnet18", num_classes=3, fpn_channels=32, head_channels=32,
                                   **options).model.decode_head
        norms = {type(m) for m in decode.modules() if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.GroupNorm))}
        return norms, decode.dropout.p

    assert built() == ({norm}, dropout)  # Panoptic FPN: GroupNorm, no dropout; mmsegmentation's UPerHead: BN, 0.1
    assert built(head_norm="bn", dropout=0.1) == ({torch.nn.BatchNorm2d}, 0.1)  # mmsegmentation's FPNHead
    assert built(head_norm="gn", dropout=0.0) == ({torch.nn.GroupNorm}, 0.0)


def test_validation_pictures_show_the_image_its_ground_truth_and_the_prediction(segmenter, monkeypatch):
    from types import SimpleNamespace

    sent = {}
    experiment = SimpleNamespace(add_image=lambda tag, image, step: sent.__setitem__(tag, image))
    monkeypatch.setattr(SemanticSegmenter, "loggers", property(lambda self: [SimpleNamespace(experiment=experiment)]))
    monkeypatch.setattr(segmenter, "log_images", 2)
    images = torch.randint(0, 256, (3, 3, 40, 64), dtype=torch.uint8)
    masks = torch.zeros(3, 40, 64, dtype=torch.uint8)
    masks[:, :, 32:] = 2
    masks[:, :4] = IGNORE
    segmenter._pictures_sent = 0
    segmenter._log_pictures(images, masks, torch.ones(3, 40, 64, dtype=torch.long))
    assert sorted(sent) == ["val/segmentation_0", "val/segmentation_1"]  # log_images=2 of the 3
    picture = sent["val/segmentation_1"]
    assert picture.dtype == torch.uint8 and picture.shape == (3, 40 * 8, 64 * 8 * 3 + 2 * 8)  # enlarged 8x, 3 panels
    image, truth, predicted = (picture[:, :, k * (512 + 8):k * (512 + 8) + 512] for k in range(3))
    assert torch.equal(truth[:, :32], image[:, :32])  # ignore_index rows: the image as it is
    assert not torch.equal(truth[:, 40:, 300:], image[:, 40:, 300:])  # class 2 drawn over it
    assert not torch.equal(predicted, image)
