import pytest
import torch
import torchvision
from helpers import SMALL_HEADS, randomize_norm_stats
from lightning.pytorch import Callback, Trainer

from resnext_backbones.deployment import Tiling, tiled_detections
from tasks import ImageClassifier, ObjectDetector
from tasks.data import CocoDetectionDataModule, ImageFolderDataModule
from tasks.detection import ARCHITECTURES

LEVELS = {"faster_rcnn": ["0", "1", "2", "3", "pool"], "mask_rcnn": ["0", "1", "2", "3", "pool"],
          "retinanet": ["0", "1", "2", "p6", "p7"], "fcos": ["0", "1", "2", "p6", "p7"]}
TWO_STAGE = ("faster_rcnn", "mask_rcnn")  # torchvision's RoI heads: class 0 is the background


def detector(architecture, **kwargs):
    kwargs = {"categories": {3: "square", 5: "disk", 9: "triangle"}} | kwargs
    return ObjectDetector(architecture=architecture, backbone="resnet18", num_classes=3, min_size=64, max_size=64,
                          **kwargs)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_each_architecture_gets_its_pyramid_and_background_convention(architecture):
    model = detector(architecture)
    with torch.no_grad():
        levels = model.model.backbone(torch.rand(1, 3, 64, 64))
    assert list(levels) == LEVELS[architecture]
    head = model.model.roi_heads.box_predictor.cls_score.out_features if architecture in TWO_STAGE \
        else model.model.head.classification_head.num_classes
    assert head == (4 if architecture in TWO_STAGE else 3)  # Faster/Mask R-CNN add a background class
    if architecture == "mask_rcnn":
        assert model.model.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 4


CLASSIFICATION_LOSS = {"faster_rcnn": "loss_classifier", "mask_rcnn": "loss_classifier",
                       "retinanet": "classification", "fcos": "classification"}


def with_masks(target, height, width):
    """``target`` with a mask filling each box (what Mask R-CNN trains on beside the boxes)."""
    masks = torch.zeros(len(target["boxes"]), height, width, dtype=torch.uint8)
    for mask, (x0, y0, x1, y1) in zip(masks, target["boxes"].round().long().tolist(), strict=True):
        mask[y0:y1, x0:x1] = 1
    return {**target, "masks": masks}


def force_class(model, architecture, label):
    """Make the head score contiguous label ``label`` far above every other category, through its bias (torchvision's
    conventions: Faster R-CNN's class 0 is the background, scored as high, so that its negatives cost the same
    whatever the target; RetinaNet/FCOS logits are anchor-major, class-minor)."""
    with torch.no_grad():
        if architecture in TWO_STAGE:
            bias = model.model.roi_heads.box_predictor.cls_score.bias
            bias.fill_(-50.0)
            bias[0] = bias[label + 1] = 50.0
        else:
            head = model.model.head.classification_head
            bias = head.cls_logits.bias.view(head.num_anchors, head.num_classes)
            bias.fill_(-50.0)
            bias[:, label] = 50.0


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_the_class_of_label_k_detects_the_kth_smallest_category_id(architecture):
    """The data gives category ids 3, 5, 9 the labels 0, 1, 2 (ascending ids); categories arrive in another order."""
    model = detector(architecture, categories={9: "triangle", 3: "square", 5: "disk"}).eval()
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    for label, category_id in enumerate([3, 5, 9]):
        force_class(model, architecture, label)
        with torch.no_grad():
            (det,) = model([image])
        assert len(det["labels"]) > 0
        assert det["labels"].tolist() == [category_id] * len(det["labels"]), (label, det["labels"])


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_a_training_target_of_label_k_is_the_class_the_head_scores_as_k(architecture):
    """The training side of the same map: with the head forced to label 1, a target of label 1 costs least (a target
    of another label adds ~100 (softmax) or ~50 (sigmoid) per positive, averaged with the negatives)."""
    torch.manual_seed(0)
    model = detector(architecture).train()
    force_class(model, architecture, 1)
    image, box = torch.rand(3, 64, 64), torch.tensor([[8.0, 8.0, 40.0, 40.0]])
    costs = []
    for label in range(3):
        torch.manual_seed(0)  # the same proposal sampling for every label
        target = model._training_target(with_masks({"boxes": box, "labels": torch.tensor([label])}, 64, 64))
        losses = model.model(model._inputs([image]), [target])
        costs.append(float(losses[CLASSIFICATION_LOSS[architecture]]))
    assert costs[1] + 0.1 < min(costs[0], costs[2]), costs


def test_mask_rcnn_detects_as_torchvisions_own_with_masks_thresholded_at_a_half_in_category_ids():
    """The task's Mask R-CNN is torchvision's MaskRCNN with its defaults (anchors 32-512, P2-P6 + pool), for any number
    of categories: the same weights give the same boxes and scores, labels as the dataset's category ids, and the
    soft masks as binary masks at 0.5."""
    import resnext_backbones as rb

    categories = {2: "cat", 7: "dog", 8: "owl", 40: "bee", 41: "ant"}
    torch.manual_seed(0)
    model = ObjectDetector(architecture="mask_rcnn", backbone="resnet18", num_classes=5, categories=categories,
                           min_size=64, max_size=64, detector_kwargs={"box_score_thresh": 0.0}).eval()
    randomize_norm_stats(model)
    reference = torchvision.models.detection.MaskRCNN(
        rb.resnext_fpn("resnet18", returned_features=("c2", "c3", "c4", "c5"), extra_blocks="pool"), num_classes=6,
        min_size=64, max_size=64, box_score_thresh=0.0).eval()
    reference.load_state_dict(model.model.state_dict())
    images = [torch.rand(3, 64, 64), torch.rand(3, 48, 80)]
    with torch.no_grad():
        ours, theirs = model(images), reference([model._inputs([image])[0] for image in images])
    for mine, truth, image in zip(ours, theirs, images, strict=True):
        assert len(truth["boxes"]) > 0
        torch.testing.assert_close(mine["boxes"], truth["boxes"])
        torch.testing.assert_close(mine["scores"], truth["scores"])
        assert mine["labels"].tolist() == [[2, 7, 8, 40, 41][c - 1] for c in truth["labels"].tolist()]
        assert mine["masks"].dtype == torch.bool and mine["masks"].shape == (len(truth["boxes"]), *image.shape[1:])
        assert torch.equal(mine["masks"], truth["masks"][:, 0] > 0.5)
        assert 0 < mine["masks"].float().mean() < 1  # some pixels in, some out


def test_the_mask_head_takes_the_layers_it_is_given_and_only_mask_rcnn_has_one():
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

    model = detector("mask_rcnn", mask_head_layers=[64, 32], detector_kwargs={"box_score_thresh": 0.0}).eval()
    head, predictor = model.model.roi_heads.mask_head, model.model.roi_heads.mask_predictor
    assert type(head) is MaskRCNNHeads and type(predictor) is MaskRCNNPredictor
    convolutions = [m for m in head.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convolutions] == [(256, 64), (64, 32)]
    assert predictor.mask_fcn_logits.in_channels == 32 and predictor.mask_fcn_logits.out_channels == 4
    with torch.no_grad():
        (det,) = model([torch.rand(3, 64, 64)])
    assert det["masks"].shape == (len(det["boxes"]), 64, 64) and len(det["boxes"]) > 0
    with pytest.raises(ValueError, match="model.mask_head_layers sizes Mask R-CNN's mask head, but "
                                         "model.architecture='faster_rcnn' has none"):
        detector("faster_rcnn", mask_head_layers=[64])
    with pytest.raises(ValueError, match=r"model.mask_head_layers=\[\] must be a non-empty list"):
        detector("mask_rcnn", mask_head_layers=[])


def test_mask_rcnn_without_masks_in_its_targets_fails_naming_the_image():
    """Trained or evaluated on targets without masks (data read with data.masks: false), Mask R-CNN says which image
    and what to do, instead of torchvision's KeyError deep in its heads."""
    model = detector("mask_rcnn", mask_head_layers=[16])
    target = {"boxes": torch.tensor([[2.0, 2, 20, 20]]), "labels": torch.tensor([0]), "image_id": 41,
              "iscrowd": torch.tensor([0]), "area": torch.tensor([324.0])}
    with pytest.raises(ValueError, match=r"mask_rcnn learns instance masks, but the target of image 41 has none; "
                                         r"give data with masks \(tasks.data.CocoDetectionDataModule reads"):
        model.training_loss(([torch.rand(3, 32, 32)], [target]), 0)
    with pytest.raises(ValueError, match="mask_rcnn is evaluated on instance masks, but the target of image 41 has "
                                         "none"):
        model._metric_target(target)
    with_masks = {**target, "masks": torch.zeros(1, 32, 32, dtype=torch.uint8)}
    assert model._metric_target(with_masks)["masks"].decode().shape == (1, 32, 32)


def test_uint8_images_from_the_data_modules_detect_as_their_float_equivalent():
    model = detector("faster_rcnn", detector_kwargs={"box_score_thresh": 0.0}).eval()
    image = torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        (from_uint8,), (from_float,) = model([image]), model([image.float() / 255])
    assert len(from_float["boxes"]) == len(from_uint8["boxes"]) > 0
    torch.testing.assert_close(from_uint8["boxes"], from_float["boxes"], atol=1e-3, rtol=0)
    torch.testing.assert_close(from_uint8["scores"], from_float["scores"], atol=1e-5, rtol=0)


def test_a_tiled_detector_on_an_image_of_one_tile_detects_as_untiled_and_on_larger_ones_in_image_pixels():
    heads = {"box_score_thresh": 0.0, "rpn_pre_nms_top_n_test": 100, "rpn_post_nms_top_n_test": 50}
    tiled = detector("faster_rcnn", detector_kwargs=heads, tile={"overlap": 16}).eval()
    plain = detector("faster_rcnn", detector_kwargs=heads).eval()
    plain.load_state_dict(tiled.state_dict())
    generator = torch.Generator().manual_seed(3)
    small, large = (torch.randint(0, 256, size, dtype=torch.uint8, generator=generator)
                    for size in ((3, 64, 48), (3, 100, 150)))
    with torch.no_grad():
        (mine,), (theirs,) = tiled([small]), plain([small])  # tiles of min_size, 64: one
        (big,), (whole,) = tiled([large]), plain([large])  # 3 x 2 tiles
        (library,) = tiled_detections(plain.model, plain._inputs([large]), Tiling(size=64, overlap=16))
    assert len(theirs["boxes"]) > 0 and all(torch.equal(mine[k], theirs[k]) for k in theirs)
    # the large image by the library's tiling of the same network, labels in category ids: not the whole image's
    assert torch.equal(big["boxes"], library["boxes"]) and torch.equal(big["scores"], library["scores"])
    assert big["labels"].tolist() == [[3, 5, 9][c - 1] for c in library["labels"].tolist()]
    assert len(big["boxes"]) != len(whole["boxes"]) or not torch.equal(big["boxes"], whole["boxes"])
    with pytest.raises(ValueError, match="model.tile.overlap=64 must be below model.tile.size=64"):
        detector("fcos", tile={"size": 64, "overlap": 64})


def test_frozen_stages_have_no_gradient_so_ddp_needs_no_unused_parameter_search():
    model = detector("faster_rcnn", trainable_stages=2)
    trunk = model.model.backbone.body
    assert not any(p.requires_grad for n, p in trunk.named_parameters() if n.startswith(("conv1", "layer1", "layer2")))
    assert all(p.requires_grad for p in trunk.layer3.parameters())


def test_invalid_detector_arguments_name_the_allowed_values():
    with pytest.raises(ValueError, match=r"model.architecture='yolo' is not supported; choose one of \['faster_rcnn'"):
        detector("yolo")
    with pytest.raises(ValueError, match="model.map_backend='coco' is not supported"):
        detector("fcos", map_backend="coco")


def test_torchvision_classification_weights_give_torchvision_logits(tmp_path):
    torch.manual_seed(0)
    tv = randomize_norm_stats(torchvision.models.resnet18()).eval()
    torch.save(tv.state_dict(), tmp_path / "resnet18.pth")
    model = ImageClassifier(backbone="resnet18", num_classes=1000, weights=str(tmp_path / "resnet18.pth")).eval()
    images = torch.rand(2, 3, 64, 64)
    normalized = torchvision.transforms.v2.functional.normalize(images, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    with torch.no_grad():
        torch.testing.assert_close(model(images), tv(normalized), rtol=1e-4, atol=1e-4)


def test_the_weights_report_is_logged_once_per_task(tmp_path, caplog):
    import resnext_backbones as rb

    weights = str(tmp_path / "trunk.safetensors")
    rb.save_backbone(rb.resnext("resnet18"), weights)
    for build in (lambda: detector("faster_rcnn", weights=weights),
                  lambda: ImageClassifier(backbone="resnet18", num_classes=3, weights=weights)):
        caplog.clear()
        with caplog.at_level("INFO"):
            build()
        reports = [r for r in caplog.records if " tensors from " in r.getMessage()]
        assert len(reports) == 1, [r.getMessage() for r in reports]


def test_classifier_head_of_another_size_is_left_at_init(tmp_path):
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "resnet18.pth")
    model = ImageClassifier(backbone="resnet18", num_classes=3, weights=str(tmp_path / "resnet18.pth"))
    assert model.fc.weight.shape == (3, 512)


def test_sync_batchnorm_conversion_keeps_checkpoint_keys_and_evaluates_on_cpu():
    """What ``--trainer.sync_batchnorm true`` does to a ``norm: bn`` detector (the sync itself needs GPUs)."""
    model = detector("faster_rcnn", norm="bn", trainable_stages=5)
    keys = list(model.state_dict())
    converted = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert isinstance(converted.model.backbone.body.layer1[0].bn2, torch.nn.SyncBatchNorm)
    assert list(converted.state_dict()) == keys
    with torch.no_grad():
        converted.eval()([torch.rand(3, 64, 64)])


def confident(model):
    """``model`` with a head of large weights: logits far from uniform, so that which targets the loss uses shows
    (a fresh head gives near-uniform logits, whose cross-entropy is about log(classes) whatever the targets)."""
    with torch.no_grad():
        model.fc.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(2))
    return model.eval()


def two_class_rows(soft, labels):
    """Per row of ``soft`` (MixUp/CutMix targets of one-hot ``labels``): (weight of its own class, of its partner's),
    with the check that these are its only two non-zero classes, summing to 1, the partner the previous image."""
    own = soft[torch.arange(len(labels)), labels]
    partner = soft[torch.arange(len(labels)), labels.roll(1)]
    assert torch.count_nonzero(soft, dim=1).tolist() == [2] * len(labels)
    torch.testing.assert_close(own + partner, torch.ones(len(labels)))
    return own, partner


def test_mixup_mixes_each_image_with_the_previous_one_in_the_proportions_of_its_soft_label():
    model = ImageClassifier(backbone="resnet18", num_classes=4, mixup_alpha=0.4)
    images, labels = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 3])
    torch.manual_seed(3)
    mixed, soft = model.mix(images, labels)
    own, partner = two_class_rows(soft, labels)
    lam = float(own[0])
    assert 0.05 < lam < 0.95 and torch.allclose(own, torch.full((4,), lam))  # one lam for the batch, not 0 or 1
    torch.testing.assert_close(mixed, lam * images + (1 - lam) * images.roll(1, 0))


def test_cutmix_pastes_a_box_of_the_previous_image_covering_its_label_share():
    model = ImageClassifier(backbone="resnet18", num_classes=4, cutmix_alpha=1.0)
    images, labels = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([3, 0, 2, 1])
    torch.manual_seed(0)
    mixed, soft = model.mix(images, labels)
    own, partner = two_class_rows(soft, labels)
    previous = images.roll(1, 0)
    from_partner = (mixed == previous).all(1)  # per pixel: all three channels from the previous image
    assert bool(((mixed == images).all(1) | from_partner).all())  # every pixel from one of the two
    pasted = from_partner[0]
    rows, cols = pasted.any(1).nonzero().flatten(), pasted.any(0).nonzero().flatten()
    assert 0 < pasted.sum() < 32 * 32 and bool(pasted[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all())
    assert torch.equal(from_partner, pasted.expand(4, -1, -1))  # one box for the batch, a rectangle
    torch.testing.assert_close(partner, from_partner.float().mean((1, 2)))  # the label share is the pasted area


def test_mixed_batches_train_on_the_soft_targets():
    """With a mix on, the training loss is the cross-entropy of the logits of the mixed images against the soft
    labels, with the label smoothing: computed here by hand from the same random draw."""
    model = confident(ImageClassifier(backbone="resnet18", num_classes=4, mixup_alpha=0.4, label_smoothing=0.2))
    images, labels = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 3])
    torch.manual_seed(3)
    mixed, soft = model.mix(images, labels)
    with torch.no_grad():
        log_p = model(mixed).log_softmax(-1)
        torch.manual_seed(3)
        loss = model.training_loss((images, labels), 0)
    expected = -(((1 - 0.2) * soft + 0.2 / 4) * log_p).sum(1).mean()
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    one_hot = torch.nn.functional.one_hot(labels, 4).float()
    hard = -(((1 - 0.2) * one_hot + 0.2 / 4) * log_p).sum(1).mean()  # the labels before mixing: another value
    assert abs(float(expected) - float(hard)) > 0.01  # 200x the tolerance above


@pytest.mark.parametrize("smoothing", [0.0, 0.3])
def test_label_smoothing_reaches_the_training_loss(smoothing):
    """(1 - eps) x cross-entropy + eps x the mean of -log p over the classes, by hand, for eps 0 and 0.3."""
    model = confident(ImageClassifier(backbone="resnet18", num_classes=5, label_smoothing=smoothing))
    images, labels = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.tensor([4, 0, 2])
    with torch.no_grad():
        loss = model.training_loss((images, labels), 0)
        log_p = model(images).log_softmax(-1)
    nll, uniform = -log_p[torch.arange(3), labels].mean(), -log_p.mean(1).mean()
    assert float(loss) == pytest.approx(float((1 - smoothing) * nll + smoothing * uniform), rel=1e-5)
    assert abs(float(nll - uniform)) > 0.05  # the two terms differ, so a smoothing left out would show


def test_a_non_finite_loss_stops_training_naming_the_step_and_images():
    model = detector("faster_rcnn")
    model.train()
    images = [torch.full((3, 64, 64), float("nan"))]
    targets = [{"boxes": torch.tensor([[2.0, 2.0, 30.0, 40.0]]), "labels": torch.tensor([0]), "image_id": 17}]
    expected = r"non-finite loss \(nan\) at step 0, batch of image ids \[17\]\. .*skip_nonfinite_loss: true"
    with pytest.raises(FloatingPointError, match=expected):
        model.training_step((images, targets), 0)


@pytest.mark.slow
def test_compile_option_keeps_outputs_and_checkpoint_keys():
    model = ImageClassifier(backbone="resnet18", num_classes=3, compile=True).eval()
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        reference = model(images)
        keys = list(model.state_dict())
        model.setup("fit")  # compiles the trunk in place
        torch.testing.assert_close(model(images), reference, rtol=1e-4, atol=1e-4)
    assert list(model.state_dict()) == keys


class RecordingExperiment:
    """What a TensorBoard logger's ``experiment`` offers for pictures, recording them."""

    def __init__(self):
        self.images = {}

    def add_image(self, tag, image, step):
        self.images[tag] = image


def test_validation_pictures_show_ground_truth_beside_predictions_labelled_with_names(monkeypatch, drawn_captions):
    from types import SimpleNamespace

    experiment = RecordingExperiment()
    monkeypatch.setattr(ObjectDetector, "loggers", property(lambda self: [SimpleNamespace(experiment=experiment)]))
    model = detector("faster_rcnn", log_images=2, detector_kwargs={"box_score_thresh": 0.0}).eval()
    force_class(model, "faster_rcnn", 1)  # every detection is a disk, scoring ~1
    images = [torch.rand(3, 64, 64), torch.rand(3, 48, 64), torch.rand(3, 64, 64)]
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 30.0, 40.0]]), "labels": torch.tensor([label])}
               for label in (0, 2, 1)]
    with torch.no_grad():
        model._log_pictures(images, targets, model(images))
    assert sorted(experiment.images) == ["val/detections_0", "val/detections_1"]  # log_images=2 of the 3
    # the 48x64 image enlarged 7 times (to a shorter side >= 320), twice, with an 8-pixel gap between
    assert experiment.images["val/detections_1"].shape == (3, 48 * 7, 64 * 7 * 2 + 8)
    assert experiment.images["val/detections_0"].dtype == torch.uint8
    truth, predicted = drawn_captions[2], drawn_captions[3]  # image 1: ground truth, then predictions
    assert truth == ["triangle"]
    assert predicted and all(c.startswith("disk 0.") or c == "disk 1.00" for c in predicted), predicted


def test_validation_pictures_of_mask_rcnn_draw_true_and_predicted_masks(monkeypatch, drawn_captions):
    """Ground truth masks beside the predicted ones (those scoring at least 0.3), enlarged with their image, under
    labelled boxes."""
    from types import SimpleNamespace

    import torchvision.utils

    drawn, draw = [], torchvision.utils.draw_segmentation_masks
    monkeypatch.setattr(torchvision.utils, "draw_segmentation_masks",
                        lambda image, masks, **kwargs: drawn.append(masks) or draw(image, masks, **kwargs))
    experiment = RecordingExperiment()
    monkeypatch.setattr(ObjectDetector, "loggers", property(lambda self: [SimpleNamespace(experiment=experiment)]))
    model = detector("mask_rcnn", log_images=1, detector_kwargs={"box_score_thresh": 0.0}).eval()
    force_class(model, "mask_rcnn", 2)  # every detection a triangle, scoring ~1
    image = torch.rand(3, 40, 64)
    target = with_masks({"boxes": torch.tensor([[4.0, 4.0, 30.0, 20.0]]), "labels": torch.tensor([0])}, 40, 64)
    with torch.no_grad():
        (detections,) = model([image])
        model._log_pictures([image], [target], [detections])
    assert list(experiment.images) == ["val/detections_0"]
    truth, predicted = drawn
    assert torch.equal(truth, target["masks"].bool().repeat_interleave(8, -2).repeat_interleave(8, -1))
    kept = detections["scores"] >= 0.3
    assert kept.any() and torch.equal(predicted, detections["masks"][kept].repeat_interleave(8, -2)
                                      .repeat_interleave(8, -1))
    assert drawn_captions[0] == ["square"] and all(c.startswith("triangle") for c in drawn_captions[1])


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_batches_with_empty_images_and_mixed_sizes_train(architecture):
    model = detector(architecture).train()
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long), "image_id": 1}
    one = {"boxes": torch.tensor([[4.0, 4.0, 30.0, 40.0]]), "labels": torch.tensor([1]), "image_id": 2}
    for images, targets in [([torch.rand(3, 64, 64), torch.rand(3, 48, 80)], [empty, one]),  # empty first
                            ([torch.rand(3, 64, 64), torch.rand(3, 40, 56)], [empty, empty])]:  # only empty
        if model.predicts_masks:
            targets = [with_masks(t, *image.shape[-2:]) for image, t in zip(images, targets, strict=True)]
        loss = model.training_step((images, targets), 0)
        loss.backward()
        assert torch.isfinite(loss)


class NanAtStep(Callback):
    """Fill the trunk's first convolution with NaN right before the training batch that ends at ``global_step ==
    step + 1``: every loss of that batch, and none before it, is NaN."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.trunk_module().conv1.weight.fill_(float("nan"))


def tiny_trainer(tmp_path, **kwargs) -> Trainer:
    return Trainer(accelerator="cpu", devices=1, max_steps=4, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                   limit_val_batches=0, default_root_dir=tmp_path, **kwargs)


@pytest.mark.parametrize("task", ["detection", "classification"])
def test_a_nan_loss_inside_fit_stops_training_naming_its_step_and_batch(task, tmp_path, tiny_coco, tiny_folder):
    if task == "detection":
        model, batch = detector("faster_rcnn"), r"image ids \[\d+, \d+\]"
        data = CocoDetectionDataModule(**tiny_coco, batch_size=2, num_workers=0)
    else:
        model, batch = ImageClassifier(backbone="resnet18", num_classes=3), r"6 images \(batch 2\)"
        data = ImageFolderDataModule(**tiny_folder, image_size=32, batch_size=6, num_workers=0)
    with pytest.raises(FloatingPointError, match=rf"non-finite loss \(nan\) at step 2, batch of {batch}\. "):
        tiny_trainer(tmp_path, callbacks=[NanAtStep(2)]).fit(model, data)


def test_skip_nonfinite_loss_counts_the_step_and_gives_a_zero_gradient():
    model = detector("faster_rcnn", skip_nonfinite_loss=True)
    model.train()
    images = [torch.full((3, 64, 64), float("nan"))]
    targets = [{"boxes": torch.tensor([[2.0, 2.0, 30.0, 40.0]]), "labels": torch.tensor([0]), "image_id": 17}]
    loss = model.training_step((images, targets), 0)
    loss.backward()
    assert loss.item() == 0 and model.skipped_steps == 1
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.count_nonzero(g) == 0 for g in grads)


class FixedLogits:
    """Logits chosen per image: image ``i`` (its first pixel holds ``i``) is predicted as ``predicted[i]``."""

    def __init__(self, predicted, classes):
        self.table = torch.nn.functional.one_hot(torch.tensor(predicted), classes).float() * 10

    def __call__(self, images):
        return self.table[images[:, 0, 0, 0].long()]


@pytest.mark.parametrize("log_images", [16, 0])
def test_classification_logs_accuracy_per_class_a_table_worst_first_and_the_confusion_matrix(tmp_path, caplog,
                                                                                            log_images):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    labels = [0, 0, 0, 0, 1, 1, 2, 2, 2]
    predicted = [0, 0, 1, 2, 1, 1, 2, 0, 2]  # by hand: a 2 of 4, b 2 of 2, c 2 of 3
    model = ImageClassifier(backbone="resnet18", num_classes=3, categories={0: "a", 1: "b", 2: "c"},
                            log_images=log_images)
    model.forward = FixedLogits(predicted, 3)
    images = torch.zeros(len(labels), 3, 4, 4)
    images[:, 0, 0, 0] = torch.arange(len(labels)).float()
    batches = [(images[i:i + 4], torch.tensor(labels[i:i + 4])) for i in range(0, len(labels), 4)]
    trainer = Trainer(accelerator="cpu", logger=TensorBoardLogger(tmp_path), enable_progress_bar=False,
                      enable_model_summary=False)
    with caplog.at_level("INFO", logger="tasks"):
        (metrics,) = trainer.validate(model, torch.utils.data.DataLoader(batches, batch_size=None))
    assert metrics["val/acc/a"] == pytest.approx(0.5) and metrics["val/acc/b"] == 1.0
    assert metrics["val/acc/c"] == pytest.approx(2 / 3)
    (table,) = [r.getMessage() for r in caplog.records if "accuracy per class" in r.getMessage()]
    assert [row.split("|")[1].strip() for row in table.splitlines()[3:]] == ["a", "c", "b"]  # worst first
    tags = EventAccumulator(str(tmp_path / "lightning_logs" / "version_0")).Reload().Tags()["images"]
    assert sorted(tags) == (["val/confusion_matrix", "val/predictions_0", "val/predictions_4", "val/predictions_8"]
                            if log_images else [])  # a grid per batch (4, 4, 1 images); log_images: 0, none


@pytest.mark.parametrize("sparse", [True, False])
def test_the_training_forward_of_mask_rcnn_runs_sparse_roi_poolers_on_the_cpu_unless_told_not_to(sparse, monkeypatch):
    from torchvision.ops import MultiScaleRoIAlign, poolers

    model = detector("mask_rcnn", sparse_roi_align=sparse, fpn_channels=32, mask_head_layers=[16],
                     detector_kwargs=SMALL_HEADS).train()
    calls, kernel = [], poolers.roi_align
    monkeypatch.setattr(poolers, "roi_align", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    target = with_masks({"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]), "labels": torch.tensor([1]),
                         "image_id": 1}, 64, 64)
    loss = model.training_step(([torch.rand(3, 64, 64)], [target]), 0)
    loss.backward()
    assert torch.isfinite(loss) and bool(calls) == (not sparse)  # torchvision's kernel only where told
    assert type(model.model.roi_heads.box_roi_pool) is type(model.model.roi_heads.mask_roi_pool) is MultiScaleRoIAlign
