"""ObjectDetector: torchvision's Faster R-CNN, RetinaNet or FCOS on a ResNeXt-FPN, evaluated with COCO mAP."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn
from torchmetrics.detection import MeanAveragePrecision
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.transforms.v2.functional import to_dtype

import resnext_backbones as rb

from .base import BackboneTask, check_categories, gather_objects, log, sgd


@dataclass(frozen=True)
class Architecture:
    build: Callable[..., nn.Module]
    returned_features: tuple
    extra_blocks: str
    label_offset: int  # 1 where class 0 is the background (Faster R-CNN), 0 where there is none (sigmoid heads)
    anchors: Callable[[int], AnchorGenerator]  # base anchor size -> generator over the 5 pyramid levels


ARCHITECTURES: Dict[str, Architecture] = {
    "faster_rcnn": Architecture(
        lambda bb, n, anchors, **kw: FasterRCNN(bb, num_classes=n + 1, rpn_anchor_generator=anchors, **kw),
        ("c2", "c3", "c4", "c5"), "pool", 1,
        lambda s: AnchorGenerator(tuple((s * 2**i,) for i in range(5)), ((0.5, 1.0, 2.0),) * 5)),
    "retinanet": Architecture(
        lambda bb, n, anchors, **kw: RetinaNet(bb, num_classes=n, anchor_generator=anchors, **kw),
        ("c3", "c4", "c5"), "p6p7", 0,
        lambda s: AnchorGenerator(tuple((x, int(x * 2 ** (1 / 3)), int(x * 2 ** (2 / 3)))
                                        for x in (s * 2**i for i in range(5))), ((0.5, 1.0, 2.0),) * 5)),
    "fcos": Architecture(
        lambda bb, n, anchors, **kw: FCOS(bb, num_classes=n, anchor_generator=anchors, **kw),
        ("c3", "c4", "c5"), "p6p7", 0,
        lambda s: AnchorGenerator(tuple((s * 2**i,) for i in range(5)), ((1.0,),) * 5)),
}
DEFAULT_ANCHOR = {"faster_rcnn": 32, "retinanet": 32, "fcos": 8}  # torchvision's defaults
MAP_BACKENDS = ("pycocotools", "faster_coco_eval")


def coco_map(metric: MeanAveragePrecision, preds: List[Dict[str, Tensor]], targets: List[Dict[str, Tensor]]
             ) -> Dict[str, Tensor]:
    """COCO box mAP of ``preds`` against ``targets`` (labels in category ids; ``iscrowd`` and ``area`` honoured)."""
    metric.update(preds, targets)
    result = metric.compute()
    metric.reset()
    return result


class ObjectDetector(BackboneTask):
    """Object detection on a ResNeXt-FPN backbone.

    Args:
        architecture: ``faster_rcnn`` (P2-P6) | ``retinanet`` (P3-P7) | ``fcos`` (P3-P7).
        backbone: a name from ``resnext_backbones.list_models()``.
        num_classes: object categories, without background (set by the data module in the CLI).
        weights: trunk or backbone weights, any format ``resnext_backbones.load_weights`` reads, or a checkpoint
            of either task; heads keep their initialisation.
        strict_weights: refuse weights that do not fit the trunk exactly (``false`` loads what fits).
        trainable_stages: 0..5 trunk stages to train, as torchvision's ``trainable_layers``.
        norm: trunk norm, ``frozen_bn`` | ``bn`` | ``sync_bn`` | ``gn`` (``bn`` or ``gn`` to train from scratch).
        min_size: shorter image side the detector resizes to; a list picks one at random per training batch.
        max_size: longest image side after resizing.
        anchor_size: anchor (FCOS: sampling) size at the first pyramid level, doubling per level.
        detections_per_image: most detections kept per image.
        detector_kwargs: further keyword arguments of torchvision's detector class (``box_batch_size_per_image``,
            ``rpn_post_nms_top_n_train``, ``score_thresh``, ...), e.g. to size the heads to small images.
        categories: dataset category id -> name (set by the data module); metrics and predictions use these ids.
        map_backend: ``faster_coco_eval`` (the same numbers, ~5x faster: benchmarks/README.md) | ``pycocotools``,
            for torchmetrics' ``MeanAveragePrecision``.
        log_images: validation images with predicted boxes sent to loggers that take pictures (TensorBoard).
    """

    def __init__(self, architecture: str = "faster_rcnn", backbone: str = "resnext50_32x4d", num_classes: int = 91,
                 weights: Optional[str] = None, strict_weights: bool = True, trainable_stages: int = 3,
                 norm: str = "frozen_bn", min_size: Union[int, List[int]] = 800, max_size: int = 1333,
                 anchor_size: Optional[int] = None, fpn_channels: int = 256, detections_per_image: int = 100,
                 detector_kwargs: Optional[Dict[str, Any]] = None,
                 categories: Optional[Dict[int, str]] = None, map_backend: str = "faster_coco_eval",
                 log_images: int = 4, optimizer: OptimizerCallable = sgd, lr_schedule: str = "multistep",
                 warmup_steps: int = 500, milestones: Sequence[float] = (0.667, 0.917), gamma: float = 0.1,
                 channels_last: bool = False, compile: bool = False, skip_nonfinite_loss: bool = False) -> None:
        super().__init__(optimizer=optimizer, lr_schedule=lr_schedule, warmup_steps=warmup_steps,
                         milestones=milestones, gamma=gamma, channels_last=channels_last, compile=compile,
                         skip_nonfinite_loss=skip_nonfinite_loss)
        if architecture not in ARCHITECTURES:
            raise ValueError(f"model.architecture={architecture!r} is not supported; "
                             f"choose one of {list(ARCHITECTURES)}")
        if map_backend not in MAP_BACKENDS:
            raise ValueError(f"model.map_backend={map_backend!r} is not supported; choose one of {list(MAP_BACKENDS)}")
        self.categories = check_categories(num_classes, categories)
        self.register_buffer("category_id_table", None if self.categories is None else
                             torch.tensor(list(self.categories)), persistent=False)  # contiguous label -> id
        self.save_hyperparameters(ignore=["optimizer"])
        arch = ARCHITECTURES[architecture]
        self.label_offset = arch.label_offset
        fpn = rb.resnext_fpn(backbone, returned_features=arch.returned_features, extra_blocks=arch.extra_blocks,
                             trainable_stages=trainable_stages, norm=norm, out_channels=fpn_channels)
        if weights is not None:
            log.info("%s", rb.load_weights(fpn, weights, strict=strict_weights))
        min_size = tuple(min_size) if isinstance(min_size, (list, tuple)) else min_size
        limits = ({"box_detections_per_img": detections_per_image} if architecture == "faster_rcnn"
                  else {"detections_per_img": detections_per_image})
        self.model = arch.build(fpn, num_classes, arch.anchors(anchor_size or DEFAULT_ANCHOR[architecture]),
                                min_size=min_size, max_size=max_size, **limits, **(detector_kwargs or {}))
        self.val_map = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend=map_backend,
                                            sync_on_compute=False)
        self._eval_batches: List = []
        self.log_images = log_images

    def trunk_module(self) -> nn.Module:
        return self.model.backbone.body

    # -- labels: contiguous (data) <-> model (background convention) <-> dataset category ids (metrics, output)
    def contiguous_to_category_ids(self, labels: Tensor) -> Tensor:
        if self.category_id_table is None:
            return labels
        return self.category_id_table[labels.clamp(0, len(self.category_id_table) - 1)]

    def to_category_ids(self, labels: Tensor) -> Tensor:
        """The model's labels (after its background convention) as dataset category ids."""
        return self.contiguous_to_category_ids(labels - self.label_offset)

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
        ``labels`` (dataset category ids)."""
        detections = self.model(self._inputs(images))
        for d in detections:
            d["labels"] = self.to_category_ids(d["labels"])
        return detections

    def training_step(self, batch, batch_idx: int) -> Tensor:
        if batch is None:  # every image of the batch was skipped as corrupt
            return self.zero_loss()
        images, targets = batch
        targets = [{"boxes": t["boxes"].as_subclass(Tensor), "labels": t["labels"] + self.label_offset}
                   for t in targets]
        losses = self.model(self._inputs(images), targets)
        loss = sum(losses.values())
        loss = self.guard_loss(loss, f"image ids {[int(t['image_id']) for t in batch[1]]}")
        n = len(images)
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, batch_size=n)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        if batch is None:
            return
        images, targets = batch
        detections = self(images)
        self._eval_batches.append(([{k: v.cpu() for k, v in d.items()} for d in detections],
                                   [self._metric_target(t) for t in targets]))
        if batch_idx == 0 and self.log_images:
            self._log_pictures(images, detections)

    test_step = validation_step

    def on_validation_epoch_start(self) -> None:
        self._eval_batches = []

    on_test_epoch_start = on_validation_epoch_start

    def _metric_target(self, target: Dict) -> Dict[str, Tensor]:
        return {"boxes": target["boxes"].as_subclass(Tensor).cpu(),
                "labels": self.contiguous_to_category_ids(target["labels"]).cpu(),
                "iscrowd": target["iscrowd"].cpu(), "area": target["area"].cpu()}

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
        result = coco_map(self.val_map, preds, targets)
        self.log_dict({f"{stage}/map": result["map"], f"{stage}/map_50": result["map_50"],
                       f"{stage}/map_75": result["map_75"]}, prog_bar=True, rank_zero_only=False)

    def on_validation_epoch_end(self) -> None:
        self._log_epoch_map("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch_map("test")

    def predict_step(self, batch, batch_idx: int) -> List[Dict]:
        """COCO results (``image_id``, ``category_id``, ``bbox`` as xywh, ``score``) for the batch."""
        if batch is None:
            return []
        images, targets = batch
        results = []
        for target, det in zip(targets, self(images), strict=True):
            xywh = det["boxes"].clone()
            xywh[:, 2:] -= xywh[:, :2]
            results += [{"image_id": int(target["image_id"]), "category_id": int(c), "bbox": b, "score": s}
                        for b, c, s in zip(xywh.tolist(), det["labels"].tolist(), det["scores"].tolist(), strict=True)]
        return results

    def _log_pictures(self, images: Sequence[Tensor], detections: List[Dict[str, Tensor]]) -> None:
        experiment = getattr(self.logger, "experiment", None)
        if not hasattr(experiment, "add_image"):
            return
        from torchvision.utils import draw_bounding_boxes

        for i, (image, det) in enumerate(zip(images[: self.log_images], detections, strict=False)):
            keep = det["scores"] > 0.3
            names = [str((self.categories or {}).get(int(c), int(c))) for c in det["labels"][keep]]
            picture = draw_bounding_boxes(to_dtype(image.cpu(), torch.uint8, scale=True), det["boxes"][keep].cpu(),
                                          names)
            experiment.add_image(f"val/detections_{i}", picture, self.global_step)
