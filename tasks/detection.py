"""ObjectDetector: torchvision's Faster R-CNN, RetinaNet, FCOS or Mask R-CNN on a ResNeXt-FPN, evaluated with COCO mAP
(boxes, and masks for Mask R-CNN)."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Type, Union

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn
from torchmetrics.detection import MeanAveragePrecision
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.transforms.v2.functional import to_dtype

import resnext_backbones as rb
from resnext_backbones.deployment import Tiling, sparse_roi_poolers, tiled_detections

from .base import BackboneTask, gather_objects, log, sgd
from .data.masks import EncodedMasks, binary_masks
from .per_class import per_category_ap, table, unique_names
from .pictures import detections_picture, ground_truth_picture, send_picture, side_by_side


@dataclass(frozen=True)
class Architecture:
    """What differs between torchvision's detectors, in one row each."""

    detector: Type[nn.Module]
    returned_features: tuple  # trunk stages the FPN reads
    extra_blocks: str  # FPN levels above C5
    background_classes: int  # head classes beyond the categories: 1 (softmax with background) or 0 (sigmoid)
    anchors: Callable[[int], AnchorGenerator]  # base anchor size -> generator over the 5 pyramid levels
    anchor_keyword: str  # the detector's keyword for the anchor generator
    default_anchor_size: int  # torchvision's
    detections_keyword: str  # the detector's keyword for detections per image
    masks: bool = False  # predicts instance masks: trained on them, evaluated, written and drawn with them

    def build(self, backbone: nn.Module, num_classes: int, anchor_size: Optional[int], detections_per_image: int,
              **kwargs) -> nn.Module:
        anchors = self.anchors(anchor_size or self.default_anchor_size)
        return self.detector(backbone, num_classes=num_classes + self.background_classes,
                             **{self.anchor_keyword: anchors, self.detections_keyword: detections_per_image}, **kwargs)


def _rpn_anchors(size: int) -> AnchorGenerator:
    return AnchorGenerator(tuple((size * 2**i,) for i in range(5)), ((0.5, 1.0, 2.0),) * 5)


ARCHITECTURES: Dict[str, Architecture] = {
    "faster_rcnn": Architecture(
        FasterRCNN, ("c2", "c3", "c4", "c5"), "pool", background_classes=1, anchors=_rpn_anchors,
        anchor_keyword="rpn_anchor_generator", default_anchor_size=32, detections_keyword="box_detections_per_img"),
    # Faster R-CNN's keywords, plus the mask branch (RoIAlign 14x14, four 3x3 convolutions, 28x28 masks)
    "mask_rcnn": Architecture(
        MaskRCNN, ("c2", "c3", "c4", "c5"), "pool", background_classes=1, anchors=_rpn_anchors,
        anchor_keyword="rpn_anchor_generator", default_anchor_size=32, detections_keyword="box_detections_per_img",
        masks=True),
    "retinanet": Architecture(
        RetinaNet, ("c3", "c4", "c5"), "p6p7", background_classes=0,
        anchors=lambda s: AnchorGenerator(tuple((x, int(x * 2 ** (1 / 3)), int(x * 2 ** (2 / 3)))
                                                for x in (s * 2**i for i in range(5))), ((0.5, 1.0, 2.0),) * 5),
        anchor_keyword="anchor_generator", default_anchor_size=32, detections_keyword="detections_per_img"),
    "fcos": Architecture(
        FCOS, ("c3", "c4", "c5"), "p6p7", background_classes=0,
        anchors=lambda s: AnchorGenerator(tuple((s * 2**i,) for i in range(5)), ((1.0,),) * 5),
        anchor_keyword="anchor_generator", default_anchor_size=8, detections_keyword="detections_per_img"),
}
MAP_BACKENDS = ("pycocotools", "faster_coco_eval")


def coco_map(metric: MeanAveragePrecision, preds: List[Dict], targets: List[Dict], images_per_update: int = 16
             ) -> Dict[str, Tensor]:
    """COCO mAP of ``preds`` against ``targets`` (labels in category ids; ``iscrowd`` and ``area`` honoured), boxes and,
    where the metric's ``iou_type`` has ``segm``, masks: bool tensors or :class:`~tasks.data.masks.EncodedMasks`,
    decoded ``images_per_update`` images at a time (the metric keeps them as RLE)."""
    for start in range(0, len(preds), images_per_update):
        metric.update([_decoded(p) for p in preds[start:start + images_per_update]],
                      [_decoded(t) for t in targets[start:start + images_per_update]])
    result = metric.compute()
    metric.reset()
    return result


def _decoded(item: Dict) -> Dict[str, Tensor]:
    masks = item.get("masks")
    return item if not isinstance(masks, EncodedMasks) else {**item, "masks": masks.decode()}


class ObjectDetector(BackboneTask):
    """Object detection on a ResNeXt-FPN backbone.

    Args:
        architecture: ``faster_rcnn`` (P2-P6) | ``mask_rcnn`` (P2-P6, instance masks) | ``retinanet`` (P3-P7) |
            ``fcos`` (P3-P7).
        backbone: a name from ``resnext_backbones.list_models()``.
        num_classes: object categories, without background (set by the data module in the CLI).
        weights: trunk or backbone weights, any format ``resnext_backbones.load_weights`` reads, or a checkpoint
            of either task; heads keep their initialisation.
        strict_weights: refuse weights that do not fit the trunk exactly (``false`` loads what fits).
        trainable_stages: 0..5 trunk stages to train, as torchvision's ``trainable_layers``.
        norm: trunk norm, ``frozen_bn`` | ``bn`` | ``sync_bn`` | ``gn`` (``bn`` or ``gn`` to train from scratch).
        min_size: shorter image side the detector resizes to; a list picks one at random per training batch.
        max_size: longest image side after resizing.
        anchor_size: anchor (FCOS: sampling) size at the first pyramid level, doubling per level (default:
            torchvision's, 32 or FCOS 8).
        fpn_channels: channels of every pyramid level.
        detections_per_image: most detections kept per image.
        mask_head_layers: Mask R-CNN: the channels of each 3x3 convolution of its mask head (torchvision's
            ``MaskRCNNHeads`` ``layers``; detectron2's ``NUM_CONV`` x ``CONV_DIM``); default torchvision's four of 256.
            The mask head runs on every positive RoI and is most of a training step on a CPU: the CPU quick start
            takes two of 128.
        sparse_roi_align: Faster and Mask R-CNN training on the CPU runs the RoI poolers as sparse matrix products,
            forward and backward on all threads (:func:`resnext_backbones.deployment.sparse_roi_align`: torchvision's
            values and gradients; its CPU kernel runs on one thread); ``false`` runs torchvision's. Validate, test and
            predict take the inference copy's poolers, sparse already (``fused_inference``).
        detector_kwargs: further keyword arguments of torchvision's detector class (``box_batch_size_per_image``,
            ``rpn_post_nms_top_n_train``, ``score_thresh``, ...), e.g. to size the heads to small images.
        categories: dataset category id -> name (set by the data module); metrics and predictions use these ids.
        map_backend: ``faster_coco_eval`` (the same numbers, faster: benchmarks/README.md) | ``pycocotools``,
            for torchmetrics' ``MeanAveragePrecision`` (of boxes, and for Mask R-CNN of masks too).
        log_images: how many validation images to send, each epoch, to the loggers that show pictures (TensorBoard):
            ground truth and predictions side by side, boxes labelled with category names (and scores); 0 for none.
        tile: validate, test and predict by overlapping tiles (images larger than the model's input, small objects):
            ``{size, overlap, merge: nms | nmm, iou, match: ios | iou, full_image, batch}``, the settings of
            :class:`resnext_backbones.deployment.Tiling` (``size`` unset: ``min_size``, the model's own input size);
            ``null`` (default): whole images. Training is untouched: train on crops of the tile size.
        optimizer: default SGD, lr 0.02 for 16 images, momentum 0.9, weight decay 1e-4 (the detection 1x recipe).
        lr_schedule: ``multistep`` | ``cosine`` | ``poly`` | ``constant``, after a linear warmup.
        warmup_steps: optimizer steps of linear warmup from ``0.001 x lr``.
        milestones: for ``multistep``, fractions of training where the lr drops by ``gamma`` (1x: [0.667, 0.917]).
        in_channels: channels of the input images (1 gray, 4 RGB-D, 13 multispectral, ...; the data's
            ``channels``); RGB weights are adapted to them (:func:`resnext_backbones.loading.adapt_input_conv`).
        normalization: ``{mean: [...], std: [...]}``, one value per input channel, of images in [0, 1]; unset: the
            weights' (ImageNet's, adapted to ``in_channels``).
    """

    def __init__(self, architecture: str = "faster_rcnn", backbone: str = "resnext50_32x4d", num_classes: int = 91,
                 weights: Optional[str] = None, strict_weights: bool = True, trainable_stages: int = 3,
                 norm: str = "frozen_bn", min_size: Union[int, List[int]] = 800, max_size: int = 1333,
                 anchor_size: Optional[int] = None, fpn_channels: int = 256, detections_per_image: int = 100,
                 mask_head_layers: Optional[List[int]] = None, sparse_roi_align: bool = True,
                 detector_kwargs: Optional[Dict[str, Any]] = None,
                 categories: Optional[Dict[int, str]] = None, map_backend: str = "faster_coco_eval",
                 log_images: int = 4, tile: Optional[Dict[str, Any]] = None, optimizer: OptimizerCallable = sgd,
                 lr_schedule: str = "multistep", warmup_steps: int = 500,
                 milestones: Sequence[float] = (0.667, 0.917), in_channels: int = 3,
                 normalization: Optional[Dict[str, Sequence[float]]] = None, **kwargs) -> None:
        if architecture not in ARCHITECTURES:
            raise ValueError(f"model.architecture={architecture!r} is not supported; "
                             f"choose one of {list(ARCHITECTURES)}")
        if map_backend not in MAP_BACKENDS:
            raise ValueError(f"model.map_backend={map_backend!r} is not supported; choose one of {list(MAP_BACKENDS)}")
        super().__init__(num_classes=num_classes, categories=categories, optimizer=optimizer,
                         lr_schedule=lr_schedule, warmup_steps=warmup_steps, milestones=milestones, **kwargs)
        arch = ARCHITECTURES[architecture]
        self.predicts_masks = arch.masks  # the data module reads this to give masks (data.masks unset)
        self.label_map = self.label_map.with_offset(arch.background_classes)
        fpn = rb.resnext_fpn(backbone, returned_features=arch.returned_features, extra_blocks=arch.extra_blocks,
                             trainable_stages=trainable_stages, norm=norm, out_channels=fpn_channels,
                             in_channels=in_channels)
        if weights is not None:
            rb.load_weights(fpn, weights, strict=strict_weights)  # logs its report
        min_size = tuple(min_size) if isinstance(min_size, (list, tuple)) else min_size
        self.model = arch.build(fpn, num_classes, anchor_size, detections_per_image, min_size=min_size,
                                max_size=max_size, **(detector_kwargs or {}))
        if mask_head_layers is not None:
            self._size_mask_head(list(mask_head_layers), fpn_channels, num_classes + arch.background_classes)
        # the config's, else the weights' input convention, into the transform's copy
        self.set_normalization(normalization or fpn.body.normalization)
        # extended_summary: the precision array, from which AP and AP50 per category come (tasks.per_class)
        self.metrics = self.stage_metrics(MeanAveragePrecision(
            box_format="xyxy", iou_type=("bbox", "segm") if arch.masks else "bbox", backend=map_backend,
            sync_on_compute=False, extended_summary=True))
        self._eval_batches: List = []
        self.log_images, self._pictures_sent = log_images, 0
        self.tiling = None if tile is None else Tiling.from_config(tile, key="model.tile")
        self.sparse_roi_align = sparse_roi_align

    def _size_mask_head(self, layers: List[int], in_channels: int, classes: int) -> None:
        if not self.predicts_masks:
            raise ValueError(f"model.mask_head_layers sizes Mask R-CNN's mask head, but model.architecture="
                             f"{self.hparams.architecture!r} has none; leave it unset or use mask_rcnn")
        if not layers or not all(isinstance(c, int) and c > 0 for c in layers):
            raise ValueError(f"model.mask_head_layers={layers!r} must be a non-empty list of positive channel counts, "
                             "e.g. [256, 256, 256, 256] (torchvision's)")
        self.model.roi_heads.mask_head = MaskRCNNHeads(in_channels, layers, 1)
        self.model.roi_heads.mask_predictor = MaskRCNNPredictor(layers[-1], layers[-1], classes)

    INFERENCE_NETWORK = "model"  # the torchvision detector, whole: resnext_backbones.inference_copy takes it

    def trunk_module(self) -> nn.Module:
        return self.model.backbone.body

    def set_normalization(self, normalization) -> None:
        """Also torchvision's transform, which normalises with a copy of its own: set here, and only here."""
        super().set_normalization(normalization)
        self.model.transform.image_mean = list(self.trunk_module().normalization["mean"])
        self.model.transform.image_std = list(self.trunk_module().normalization["std"])

    def _inputs(self, images: Sequence[Tensor]) -> List[Tensor]:
        """Plain float tensors in [0, 1]; uint8 images (as the data modules give them) are scaled here, on the
        model's device."""
        return [to_dtype(im.as_subclass(Tensor), torch.float32, scale=True) for im in images]

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.channels_last and not hasattr(self, "_nhwc_hook"):
            # torchvision batches the images itself; convert that batch where it enters the backbone
            self._nhwc_hook = self.model.backbone.register_forward_pre_hook(
                lambda module, args: (args[0].contiguous(memory_format=torch.channels_last),))

    def forward(self, images: Sequence[Tensor]) -> List[Dict[str, Tensor]]:
        """Detections per image (uint8 images, or float in [0, 1]): ``boxes`` (xyxy, input pixels), ``scores``,
        ``labels`` (dataset category ids); Mask R-CNN's also ``masks`` (N x H x W bool, in the input's pixels: its soft
        masks thresholded at 0.5, as torchvision's references and COCO evaluations take them). With ``tile`` set, by
        tiles (:func:`resnext_backbones.deployment.tiled_detections`)."""
        inputs = self._inputs(images)
        detections = self.model(inputs) if self.tiling is None else tiled_detections(self.model, inputs, self.tiling)
        for d in detections:
            d["labels"] = self.label_map.category_ids_of_model(d["labels"])
            if "masks" in d:
                d["masks"] = binary_masks(d["masks"])
        return detections

    def training_loss(self, batch, batch_idx: int) -> Tensor:
        images, targets = batch
        targets = [self._training_target(t) for t in targets]
        with self._training_poolers():
            losses = self.model(self._inputs(images), targets)
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, batch_size=len(images))
        return sum(losses.values())

    def _training_poolers(self) -> contextlib.AbstractContextManager:
        """Where the training forward's RoI poolers run as sparse products: on the CPU, for the detectors with RoI
        heads (Faster and Mask R-CNN), with ``sparse_roi_align``."""
        roi_heads = getattr(self.model, "roi_heads", None)
        if self.sparse_roi_align and roi_heads is not None and self.device.type == "cpu":
            return sparse_roi_poolers(roi_heads)
        return contextlib.nullcontext()

    def _training_target(self, target: Dict) -> Dict[str, Tensor]:
        model_target = {"boxes": target["boxes"].as_subclass(Tensor),
                        "labels": self.label_map.to_model(target["labels"])}
        if self.predicts_masks:
            model_target["masks"] = self._target_masks(target, "learns")
        return model_target

    def _target_masks(self, target: Dict, use: str) -> Tensor:
        """The instance masks of a target, which Mask R-CNN ``use``s (learns, is evaluated on); an error without."""
        if "masks" not in target:
            raise ValueError(f"model.architecture={self.hparams.architecture} {use} instance masks, but the target of "
                             f"image {target.get('image_id')} has none; give data with masks "
                             "(tasks.data.CocoDetectionDataModule reads COCO segmentations where data.masks is true "
                             "or unset)")
        return target["masks"].as_subclass(Tensor)

    def describe_batch(self, batch, batch_idx: int) -> str:
        return f"image ids {[int(t['image_id']) for t in batch[1]]}"

    def evaluation_step(self, batch, batch_idx: int, stage: str) -> None:
        images, targets = batch
        with self.inference():
            detections = self(images)
        self._eval_batches.append(([self._metric_prediction(d) for d in detections],
                                   [self._metric_target(t) for t in targets]))
        if stage == "val" and self._pictures_sent < self.log_images and not self.trainer.sanity_checking:
            self._log_pictures(images, targets, detections)

    def _metric_prediction(self, detections: Dict[str, Tensor]) -> Dict:
        """An image's detections as kept until the end of the epoch: on the CPU, masks as RLE."""
        kept = {k: v.cpu() for k, v in detections.items() if k != "masks"}
        if self.predicts_masks:
            kept["masks"] = EncodedMasks.of(detections["masks"])
        return kept

    def _metric_target(self, target: Dict) -> Dict:
        kept = {"boxes": target["boxes"].as_subclass(Tensor).cpu(),
                "labels": self.label_map.category_ids_of(target["labels"]).cpu(),
                "iscrowd": target["iscrowd"].cpu(), "area": target["area"].cpu()}
        if self.predicts_masks:
            kept["masks"] = EncodedMasks.of(self._target_masks(target, "is evaluated on"))
        return kept

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self._eval_batches, self._pictures_sent = [], 0

    def on_test_epoch_start(self) -> None:
        super().on_test_epoch_start()
        self._eval_batches, self._pictures_sent = [], 0

    def on_validation_epoch_end(self) -> None:
        self._log_epoch_map("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch_map("test")

    def _log_epoch_map(self, stage: str) -> None:
        # Each process saw a different, unpadded share of the images; gather them whole, then evaluate once per
        # process on all of them (torchmetrics' own sync needs equal shares, i.e. padding with repeated images).
        preds, targets = [], []
        for part in gather_objects(self._eval_batches):
            for batch_preds, batch_targets in part:
                preds += batch_preds
                targets += batch_targets
        self._eval_batches = []
        if not preds:
            return
        result = coco_map(self.metrics[stage], preds, targets)
        self.log_dict({f"{stage}/{name}{key}": result[f"{prefix}{key}"] for name, prefix in self._result_kinds().items()
                       for key in ("map", "map_50", "map_75")}, prog_bar=True, rank_zero_only=False)
        self._log_per_category(stage, result, len(preds))

    def _result_kinds(self) -> Dict[str, str]:
        """Our metric-name prefix -> torchmetrics' key prefix, per evaluation: torchmetrics names a single
        evaluation's results plainly, and prefixes each of several with its iou_type."""
        return {"": "bbox_", "segm_": "segm_"} if self.predicts_masks else {"": ""}

    def _log_per_category(self, stage: str, result: Dict[str, Tensor], images: int) -> None:
        """``<stage>/ap/<name>`` and ``<stage>/ap50/<name>`` (Mask R-CNN: also ``<stage>/segm_ap/<name>`` and
        ``<stage>/segm_ap50/<name>``) for each category with ground truth, and the table of them, worst first (not
        for the sanity check)."""
        names = unique_names(self.categories)
        columns, rows = [], {names[c]: [] for c in self.categories}
        for name, prefix in self._result_kinds().items():
            values = per_category_ap(result, self.metrics[stage].iou_thresholds, prefix)
            self.log_dict({f"{stage}/{name}{kind}/{names[c]}": ap[i] for c, ap in values.items()
                           for i, kind in enumerate(("ap", "ap50"))}, rank_zero_only=False)
            columns += ["mask AP", "mask AP50"] if name else ["AP", "AP50"]
            for c in self.categories:
                rows[names[c]] += values.get(c, (math.nan, math.nan))
        if not self.trainer.sanity_checking and self.trainer.is_global_zero:
            what = "box and mask AP" if self.predicts_masks else "box AP"
            log.info("%s", table(f"{stage}: {what} per category over {images} images, worst first "
                                 "('-': no ground truth)", columns, rows))

    def predict_batch(self, batch) -> List[Dict[str, Tensor]]:
        """Detections per image of the batch, on the CPU: ``boxes`` (xyxy, in the pixels of the image as read: the
        predict loaders do not transform), ``labels`` (dataset category ids), ``scores``, and Mask R-CNN's ``masks``
        (N x H x W bool, in those pixels too). The writer callbacks (:class:`~tasks.CocoResultsWriter`) pair them
        with the batch's image ids and file names."""
        images, _ = batch
        with self.inference():
            return [{k: v.cpu() for k, v in d.items()} for d in self(images)]

    def _log_pictures(self, images: Sequence[Tensor], targets: Sequence[Dict], detections: List[Dict[str, Tensor]]
                      ) -> None:
        """Ground truth and predictions side by side, for the next images up to ``log_images`` this epoch."""
        names = self.categories
        for image, target, det in zip(images, targets, detections, strict=True):
            if self._pictures_sent >= self.log_images:
                return
            truth = ground_truth_picture(image, target["boxes"].as_subclass(Tensor),
                                         self.label_map.category_ids_of(target["labels"]).tolist(), names,
                                         target.get("masks"))
            picture = side_by_side(truth, detections_picture(image, {k: v.cpu() for k, v in det.items()}, names))
            send_picture(self.loggers, f"val/detections_{self._pictures_sent}", picture, self.global_step)
            self._pictures_sent += 1
