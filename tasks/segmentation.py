"""SemanticSegmenter: every pixel labelled, by a Semantic FPN, UPerNet, DeepLabV3 or FCN head on a ResNeXt trunk,
evaluated as mmsegmentation's ``IoUMetric`` (one confusion matrix summed over the whole dataset)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn
from torchmetrics.classification import MulticlassConfusionMatrix
from torchvision.models.segmentation.deeplabv3 import DeepLabHead
from torchvision.models.segmentation.fcn import FCNHead
from torchvision.transforms.v2.functional import to_dtype

import resnext_backbones as rb
from resnext_backbones.heads import SegmentationModel, SemanticFPNHead, UPerHead

from .base import BackboneTask, log
from .per_class import table, unique_names
from .pictures import segmentation_picture, send_picture, side_by_side

LOSSES = ("ce", "dice", "ce+dice")
DICE_SMOOTH = 1.0  # added to the dice's numerator and denominator: a class absent from the batch costs nothing


def sgd_poly(params, lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 5e-4) -> torch.optim.SGD:
    """mmsegmentation's default: SGD, lr 0.01 for 16 images, momentum 0.9, weight decay 5e-4."""
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


@dataclass(frozen=True)
class Head:
    """What differs between the heads, one row each: the backbone they read and how the head is built on it."""

    fpn: bool  # reads the FPN's levels P2-P5 (rb.resnext_fpn) rather than the trunk's maps
    returned_features: tuple  # trunk maps the backbone computes
    decode_inputs: tuple  # the backbone's outputs the head reads
    dilation: Optional[tuple]  # the trunk's replace_stride_with_dilation
    default_aux_loss: float  # weight of the auxiliary FCN head on C4 (0: none)
    # (trunk channels, fpn channels, classes, head channels, head norm, dropout; each None: the head's default) -> head
    build: Callable[..., nn.Module]
    options: bool = True  # takes head_channels, head_norm, dropout (torchvision's heads are built as torchvision does)


def _options(**given) -> dict:
    return {k: v for k, v in given.items() if v is not None}


HEADS: Dict[str, Head] = {
    # Panoptic FPN's defaults (128 channels, GroupNorm, no dropout); mmsegmentation's FPNHead: head_norm bn, dropout 0.1
    "fpn": Head(True, ("c2", "c3", "c4", "c5"), ("0", "1", "2", "3"), None, 0.0,
                lambda trunk, fpn, classes, channels, norm, dropout: SemanticFPNHead(
                    fpn, classes, **_options(channels=channels, norm=norm, dropout=dropout))),
    # mmsegmentation's upernet_r50 (512 channels, BatchNorm, dropout 0.1)
    "upernet": Head(False, ("c2", "c3", "c4", "c5"), ("c2", "c3", "c4", "c5"), None, 0.4,
                    lambda trunk, fpn, classes, channels, norm, dropout: UPerHead(
                        [trunk[c] for c in ("c2", "c3", "c4", "c5")], classes,
                        **_options(channels=channels, norm=norm, dropout=dropout))),
    "deeplabv3": Head(False, ("c4", "c5"), ("c5",), (False, True, True), 0.0,
                      lambda trunk, fpn, classes, *_: DeepLabHead(trunk["c5"], classes), options=False),
    "fcn": Head(False, ("c4", "c5"), ("c5",), (False, True, True), 0.0,
                lambda trunk, fpn, classes, *_: FCNHead(trunk["c5"], classes), options=False),
}


def segmentation_scores(confusion: Tensor) -> Dict[str, Tensor]:
    """mmsegmentation's ``IoUMetric`` from a confusion matrix summed over a whole dataset (rows: true class, columns:
    predicted; ``ignore_index`` pixels left out): ``iou`` per class (intersection over union; NaN where the class is
    neither in the ground truth nor in the predictions), ``miou`` (their mean over the classes that are not NaN) and
    ``pixel_acc`` (correct pixels over labelled pixels)."""
    confusion = confusion.double()
    intersection = confusion.diagonal()
    union = confusion.sum(0) + confusion.sum(1) - intersection
    iou = torch.where(union > 0, intersection / union.clamp(min=1), torch.full_like(union, math.nan))
    return {"iou": iou, "miou": iou.nanmean(), "pixel_acc": intersection.sum() / confusion.sum().clamp(min=1)}


def dice_loss(logits: Tensor, target: Tensor, ignore_index: int, class_weights: Optional[Tensor] = None) -> Tensor:
    """1 - the soft Dice coefficient per class, ``(2 |P n T| + 1) / (|P| + |T| + 1)`` over the batch's labelled
    pixels (softmax probabilities P, one-hot targets T), averaged over the classes (weighted by
    ``class_weights``)."""
    valid = (target != ignore_index).unsqueeze(1)
    probabilities = logits.float().softmax(1) * valid
    one_hot = F.one_hot(torch.where(valid[:, 0], target, 0), logits.shape[1]).permute(0, 3, 1, 2) * valid
    dims = (0, 2, 3)
    dice = (2 * (probabilities * one_hot).sum(dims) + DICE_SMOOTH) / \
        (probabilities.sum(dims) + one_hot.sum(dims) + DICE_SMOOTH)
    weights = torch.ones_like(dice) if class_weights is None else class_weights.to(dice)
    return ((1 - dice) * weights).sum() / weights.sum()


def segmentation_loss(logits: Tensor, target: Tensor, kind: str, ignore_index: int,
                      class_weights: Optional[Tensor] = None) -> Tensor:
    """``ce`` (cross-entropy averaged over the labelled pixels, weighted by ``class_weights``), ``dice``
    (:func:`dice_loss`) or ``ce+dice`` (their sum) of logits ``(N, C, H, W)`` against labels ``(N, H, W)``; pixels
    at ``ignore_index`` take no loss, and a batch with none labelled gives a zero loss (not NaN)."""
    target = target.long()
    if not bool((target != ignore_index).any()):
        return logits.sum() * 0.0
    loss = logits.new_zeros((), dtype=torch.float32)
    if kind in ("ce", "ce+dice"):
        weight = None if class_weights is None else class_weights.to(logits)
        loss = loss + F.cross_entropy(logits, target, weight=weight, ignore_index=ignore_index)
    if kind in ("dice", "ce+dice"):
        loss = loss + dice_loss(logits, target, ignore_index, class_weights)
    return loss


def sliding_window(forward: Callable[[Tensor], Tensor], images: Tensor, size: Sequence[int], stride: Sequence[int],
                   windows_per_forward: int = 8) -> Tensor:
    """Logits of ``images`` ``(N, 3, H, W)`` as mmsegmentation's ``mode='slide'``: windows of ``size`` (h, w) every
    ``stride`` pixels, the last in each direction moved back to end at the image's edge (a window larger than the
    image is the image), each window's logits added where it lies, and every pixel divided by the windows that
    cover it. The windows of all images go through ``forward`` ``windows_per_forward`` at a time."""
    (height, width), (crop_h, crop_w), (stride_h, stride_w) = images.shape[-2:], size, stride
    rows = max(height - crop_h + stride_h - 1, 0) // stride_h + 1
    columns = max(width - crop_w + stride_w - 1, 0) // stride_w + 1
    boxes = []
    for r in range(rows):
        for c in range(columns):
            y1, x1 = r * stride_h, c * stride_w
            y2, x2 = min(y1 + crop_h, height), min(x1 + crop_w, width)
            boxes.append((max(y2 - crop_h, 0), max(x2 - crop_w, 0), y2, x2))
    crops = torch.cat([images[:, :, y1:y2, x1:x2] for y1, x1, y2, x2 in boxes])  # window-major
    logits = torch.cat([forward(part) for part in crops.split(windows_per_forward * len(images))])
    total = logits.new_zeros((len(images), logits.shape[1], height, width))
    count = logits.new_zeros((1, 1, height, width))
    for k, (y1, x1, y2, x2) in enumerate(boxes):
        total[:, :, y1:y2, x1:x2] += logits[k * len(images):(k + 1) * len(images)]
        count[:, :, y1:y2, x1:x2] += 1
    return total / count


def _pair(value: Union[int, Sequence[int]], key: str) -> Tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v > 0 for v in pair):
        raise ValueError(f"model.sliding_window.{key}={value!r} must be a positive integer or [height, width]")
    return pair


class SemanticSegmenter(BackboneTask):
    """Semantic segmentation on a ResNeXt trunk: logits for every pixel at the input's size.

    Args:
        head: ``fpn`` (Panoptic FPN's semantic branch on P2-P5) | ``upernet`` (PPM on C5 + FPN fusion, with an
            auxiliary FCN head on C4 of weight 0.4) | ``deeplabv3`` | ``fcn`` (torchvision's ``DeepLabHead`` /
            ``FCNHead`` on C5 at output stride 8 by dilation, as torchvision does): :mod:`resnext_backbones.heads`.
        backbone: a name from ``resnext_backbones.list_models()``.
        num_classes: classes (set by the data module in the CLI).
        weights: trunk (or FPN backbone) weights in any format ``resnext_backbones.load_weights`` reads, a registered
            name, or a checkpoint of any task of this project; the head keeps its initialisation.
        strict_weights: refuse weights that do not fit exactly (``false`` loads what fits).
        trainable_stages: 0..5 trunk stages to train (5 = all, mmsegmentation's default).
        norm: trunk norm, ``bn`` | ``sync_bn`` | ``gn`` | ``frozen_bn`` (``trainer.sync_batchnorm: true`` turns the
            BatchNorms of trunk and head into SyncBatchNorm under DDP).
        ignore_index: the label of pixels that take no loss and are not evaluated (padding fills it too).
        class_weights: a weight per class for the loss (e.g. to lift rare classes), or ``None``.
        loss: ``ce`` | ``dice`` | ``ce+dice``.
        aux_loss: weight of the auxiliary FCN head on C4 (``upernet``, ``deeplabv3``, ``fcn``); ``None``: the head's
            default (UPerNet 0.4 as mmsegmentation, the others 0: no auxiliary head).
        fpn_channels: channels of the FPN levels (``fpn``).
        head_channels: channels inside the head (``fpn`` 128, ``upernet`` 512 by default; torchvision's heads: theirs).
        head_norm: the norm of the head's conv blocks, ``gn`` | ``bn`` (``fpn``: ``gn`` as Panoptic FPN; ``upernet``:
            ``bn`` as mmsegmentation; ``bn`` becomes SyncBatchNorm with ``trainer.sync_batchnorm``).
        dropout: 2-d dropout before the head's last 1x1 convolution (``fpn`` 0, ``upernet`` 0.1 by default;
            mmsegmentation's heads 0.1).
        sliding_window: ``{size: S or [H, W], stride: S or [H, W]}``: validate, test and predict average the logits
            of overlapping windows (mmsegmentation's ``mode='slide'``), for images larger than the model was
            trained on; ``None``: one forward of the whole image.
        categories: class index -> name (set by the data module).
        log_images: how many validation images to send, each epoch, to the loggers that show pictures
            (TensorBoard): image, ground truth and prediction side by side; 0 for none.
        optimizer: default SGD, lr 0.01, momentum 0.9, weight decay 5e-4 (mmsegmentation's).
        lr_schedule: ``multistep`` | ``cosine`` | ``poly`` | ``constant``, after a linear warmup (default ``poly``,
            mmsegmentation's: power 0.9, down to ``min_lr``).
        warmup_steps: optimizer steps of linear warmup from ``0.001 x lr``.
        milestones: for ``multistep``, fractions of training where the lr drops by ``gamma``.
    """

    def __init__(self, head: str = "fpn", backbone: str = "resnext50_32x4d", num_classes: int = 150,
                 weights: Optional[str] = None, strict_weights: bool = True, trainable_stages: int = 5,
                 norm: str = "bn", ignore_index: int = 255, class_weights: Optional[List[float]] = None,
                 loss: str = "ce", aux_loss: Optional[float] = None, fpn_channels: int = 256,
                 head_channels: Optional[int] = None, head_norm: Optional[str] = None, dropout: Optional[float] = None,
                 sliding_window: Optional[Dict[str, Union[int, List[int]]]] = None,
                 categories: Optional[Dict[int, str]] = None, log_images: int = 4,
                 optimizer: OptimizerCallable = sgd_poly, lr_schedule: str = "poly", warmup_steps: int = 0,
                 milestones: Sequence[float] = (), **kwargs) -> None:
        if head not in HEADS:
            raise ValueError(f"model.head={head!r} is not supported; choose one of {list(HEADS)}")
        if loss not in LOSSES:
            raise ValueError(f"model.loss={loss!r} is not supported; choose one of {list(LOSSES)}")
        super().__init__(num_classes=num_classes, categories=categories, optimizer=optimizer,
                         lr_schedule=lr_schedule, warmup_steps=warmup_steps, milestones=milestones, **kwargs)
        spec = HEADS[head]
        # head_channels is left to the head that has it (the quick start's value must not stop a switch of head)
        given = [k for k, v in (("head_norm", head_norm), ("dropout", dropout)) if v is not None]
        if given and not spec.options:
            raise ValueError(f"model.{given[0]}: head={head} is torchvision's head, built as torchvision builds it; "
                             "leave it unset, or use head fpn or upernet")
        if head_norm is not None and head_norm not in ("gn", "bn"):
            raise ValueError(f"model.head_norm={head_norm!r} is not supported; choose gn or bn")
        if dropout is not None and not 0 <= dropout < 1:
            raise ValueError(f"model.dropout={dropout!r} must be in [0, 1) (mmsegmentation's heads: 0.1)")
        aux_weight = spec.default_aux_loss if aux_loss is None else float(aux_loss)
        if aux_weight < 0 or (aux_weight > 0 and spec.fpn):
            raise ValueError(f"model.aux_loss={aux_loss!r}: " + (
                "the auxiliary FCN head reads the trunk's C4, which head=fpn does not expose; leave it unset or 0"
                if spec.fpn else "must be 0 (no auxiliary head) or a positive weight"))
        self.ignore_index, self.loss_kind, self.aux_weight = ignore_index, loss, aux_weight
        if class_weights is not None and len(class_weights) != num_classes:
            raise ValueError(f"model.class_weights has {len(class_weights)} entries but there are {num_classes} "
                             "classes; give one weight per class, in the data's class order")
        self.register_buffer("class_weights", None if class_weights is None else
                             torch.tensor([float(w) for w in class_weights]), persistent=False)
        self.window = None if sliding_window is None else self._window(sliding_window)
        self.model = self._build(spec, backbone, num_classes, norm, trainable_stages, fpn_channels,
                                 (head_channels, head_norm, dropout), aux_weight > 0)
        if weights is not None:
            rb.load_weights(self.model.backbone, weights, strict=strict_weights)  # logs its report
        for name in ("mean", "std"):  # the trunk's normalization on the model's device: set by set_normalization
            self.register_buffer(name, torch.empty(1, 3, 1, 1), persistent=False)
        self.set_normalization(self.trunk_module().normalization)
        # one dataset-level confusion matrix per stage (summed over the processes under DDP); ignore_index pixels out
        self.confusion = self.stage_metrics(MulticlassConfusionMatrix(num_classes, ignore_index=ignore_index,
                                                                      validate_args=False))
        self.log_images, self._pictures_sent = log_images, 0

    @staticmethod
    def _window(window: Mapping[str, Union[int, List[int]]]) -> Tuple[Tuple[int, int], Tuple[int, int]]:
        unknown = set(window) - {"size", "stride"}
        if unknown or "size" not in window:
            raise ValueError(f"model.sliding_window={dict(window)!r} takes size and stride (stride default: size, "
                             "no overlap), e.g. {size: 512, stride: 341}")
        size = _pair(window["size"], "size")
        return size, _pair(window.get("stride", size), "stride")

    @staticmethod
    def _build(spec: Head, backbone: str, num_classes: int, norm: str, trainable_stages: int, fpn_channels: int,
               head_options: tuple, auxiliary: bool) -> SegmentationModel:
        if spec.fpn:
            net = rb.resnext_fpn(backbone, returned_features=spec.returned_features, extra_blocks=None,
                                 trainable_stages=trainable_stages, norm=norm, out_channels=fpn_channels)
            trunk_channels = net.body.out_channels
        else:
            net = rb.resnext(backbone, returned_features=spec.returned_features, trainable_stages=trainable_stages,
                             norm=norm, replace_stride_with_dilation=spec.dilation)
            trunk_channels = net.out_channels
        head = spec.build(trunk_channels, fpn_channels, num_classes, *head_options)
        if not auxiliary:
            return SegmentationModel(net, head, spec.decode_inputs)
        # mmsegmentation's auxiliary FCNHead (one 3x3 conv of 256 channels, dropout 0.1) is torchvision's on C4
        return SegmentationModel(net, head, spec.decode_inputs, FCNHead(trunk_channels["c4"], num_classes), "c4")

    INFERENCE_NETWORK = "model"  # trunk fused, FPN and decode head packed: resnext_backbones.inference_copy

    def trunk_module(self) -> nn.Module:
        backbone = self.model.backbone
        return backbone.body if isinstance(backbone, rb.ResNeXtFPN) else backbone

    def set_normalization(self, normalization) -> None:
        """Also the ``mean``/``std`` buffers that :meth:`forward` reads: set here, and only here."""
        super().set_normalization(normalization)
        for name in ("mean", "std"):
            getattr(self, name).copy_(torch.tensor(self.trunk_module().normalization[name]).view(1, 3, 1, 1))

    def normalized(self, images: Tensor) -> Tensor:
        """RGB images (uint8, or float in [0, 1]) as the trunk takes them."""
        images = to_dtype(images, torch.float32, scale=True)  # the loaders give plain tensors
        return ((images - self.mean) / self.std).contiguous(memory_format=self.memory_format())

    def forward(self, images: Tensor) -> Tensor:
        """Logits ``(N, classes, H, W)`` at the images' size, for RGB images (uint8, or float in [0, 1])."""
        return self.model(self.normalized(images))

    def logits(self, images: Tensor) -> Tensor:
        """:meth:`forward`, or its :func:`sliding_window` average where ``sliding_window`` is set."""
        if self.window is None:
            return self(images)
        return sliding_window(self, images, *self.window)

    def padded_batch_logits(self, images: Tensor, sizes: Optional[Sequence[Tuple[int, int]]]) -> Tensor:
        """:meth:`logits` of a batch padded (below and right) to its largest image, each image's as if it were alone:
        one forward where every image fills the batch (or ``sizes`` is ``None``), else one per image on its own
        ``(height, width)`` pixels, zero logits in its padding. Padding would otherwise reach every pixel through
        the trunk's receptive field and the coarse levels' grid: a prediction would depend on the images beside it."""
        if sizes is None or all(tuple(size) == tuple(images.shape[-2:]) for size in sizes):
            return self.logits(images)
        parts = [self.logits(image[None, :, :h, :w])[0] for image, (h, w) in zip(images, sizes, strict=True)]
        logits = parts[0].new_zeros((len(images), parts[0].shape[0], *images.shape[-2:]))
        for logit, part in zip(logits, parts, strict=True):
            logit[:, :part.shape[-2], :part.shape[-1]] = part
        return logits

    def training_loss(self, batch, batch_idx: int) -> Tensor:
        images, masks = batch[:2]  # (training crops are of one size: their batches carry no sizes)
        logits, aux = self.model.forward_train(self.normalized(images))
        loss = segmentation_loss(logits, masks, self.loss_kind, self.ignore_index, self.class_weights)
        if aux is not None:
            aux_loss = segmentation_loss(aux, masks, self.loss_kind, self.ignore_index, self.class_weights)
            self.log_dict({"train/loss_decode": loss, "train/loss_aux": aux_loss}, batch_size=len(images))
            loss = loss + self.aux_weight * aux_loss
        return loss

    def evaluation_step(self, batch, batch_idx: int, stage: str) -> None:
        images, masks, *sizes = batch  # (images, masks, their sizes before padding) from the evaluation loaders
        with self.inference():
            logits = self.padded_batch_logits(images, sizes[0] if sizes else None)
        predictions = logits.argmax(1)
        self.confusion[stage].update(predictions, masks.long())
        loss = segmentation_loss(logits, masks, self.loss_kind, self.ignore_index, self.class_weights)
        self.log(f"{stage}/loss", loss, batch_size=len(images), sync_dist=True)
        if stage == "val" and self._pictures_sent < self.log_images and not self.trainer.sanity_checking:
            self._log_pictures(images, masks, predictions)

    def _log_pictures(self, images: Tensor, masks: Tensor, predictions: Tensor) -> None:
        """Image, ground truth and prediction side by side, for the next images up to ``log_images`` this epoch."""
        for image, mask, prediction in zip(images, masks, predictions, strict=True):
            if self._pictures_sent >= self.log_images:
                return
            picture = side_by_side(segmentation_picture(image, None, self.ignore_index),
                                   segmentation_picture(image, mask, self.ignore_index),
                                   segmentation_picture(image, prediction, self.ignore_index))
            send_picture(self.loggers, f"val/segmentation_{self._pictures_sent}", picture, self.global_step)
            self._pictures_sent += 1

    def on_validation_epoch_start(self) -> None:
        self._pictures_sent = 0

    def on_validation_epoch_end(self) -> None:
        self._log_scores("val")

    def on_test_epoch_end(self) -> None:
        self._log_scores("test")

    def _log_scores(self, stage: str) -> None:
        """``<stage>/miou``, ``<stage>/pixel_acc``, ``<stage>/iou/<name>`` for each class in the ground truth or the
        predictions, and the table of them, worst first."""
        confusion = self.confusion[stage].compute()  # every process's, summed
        self.confusion[stage].reset()
        if not confusion.sum():
            return
        scores = segmentation_scores(confusion)
        names = unique_names(self.categories)
        iou = {self.label_map.category_ids[i]: float(v) for i, v in enumerate(scores["iou"].tolist())}
        self.log_dict({f"{stage}/miou": float(scores["miou"]), f"{stage}/pixel_acc": float(scores["pixel_acc"])},
                      prog_bar=True, rank_zero_only=False)
        self.log_dict({f"{stage}/iou/{names[c]}": v for c, v in iou.items() if not math.isnan(v)},
                      rank_zero_only=False)
        if not self.trainer.sanity_checking and self.trainer.is_global_zero:
            log.info("%s", table(f"{stage}: IoU per class over {int(confusion.sum())} labelled pixels, worst first "
                                 f"(mIoU {float(scores['miou']):.4f}; '-': neither in the ground truth nor predicted)",
                                 ["IoU"], {names[c]: (v,) for c, v in iou.items()}, first="class"))

    def predict_batch(self, batch) -> List[Tensor]:
        """Per image of the batch, its labels ``(H, W)`` uint8 (int64 beyond 256 classes) at the image's size as read,
        on the CPU; the writer callback (:class:`~tasks.SegmentationWriter`) pairs them with the batch's file names.
        Each image is predicted on its own pixels, whatever the batch was padded to (:meth:`padded_batch_logits`)."""
        images, infos = batch
        sizes = [(int(info["height"]), int(info["width"])) for info in infos]
        with self.inference():
            labels = self.padded_batch_logits(images, sizes).argmax(1)
        labels = labels.to(torch.uint8) if len(self.label_map) <= 256 else labels
        return [labels[i, :h, :w].cpu() for i, (h, w) in enumerate(sizes)]
