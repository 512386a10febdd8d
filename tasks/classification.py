"""ImageClassifier: a ResNeXt trunk, global average pooling and a linear head."""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix
from torchvision.transforms import v2

import resnext_backbones as rb

from .base import BackboneTask, log
from .per_class import per_class_accuracy, table, unique_names
from .pictures import classification_picture, confusion_matrix_picture, send_picture


def imagenet_sgd(params, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 1e-4) -> torch.optim.SGD:
    """The ImageNet default (He et al.): SGD, lr 0.1 for 256 images, momentum 0.9, wd 1e-4."""
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


class ImageClassifier(BackboneTask):
    """Image classification on a ResNeXt trunk. Inputs are floats in [0, 1] (RGB, or ``in_channels``); the model
    normalises them.

    Args:
        backbone: a name from ``resnext_backbones.list_models()``.
        num_classes: classes (set by the data module in the CLI).
        weights: trunk weights in any format ``resnext_backbones.load_weights`` reads, or a checkpoint of either
            task; a classification head of matching shape (torchvision/timm ``fc.*``) is loaded too.
        strict_weights: refuse trunk weights that do not fit exactly (``false`` loads what fits).
        trainable_stages: 0..5 trunk stages to train (5 = all).
        norm: trunk norm, ``bn`` | ``sync_bn`` | ``gn`` | ``frozen_bn``.
        zero_init_residual: start each residual branch at zero (helps large-batch training).
        categories: class index -> name (set by the data module).
        log_images: how many validation images to send, each epoch, to the loggers that show pictures (TensorBoard),
            captioned with the predicted class (and the true one where it is wrong), with the confusion matrix of
            validation and test; 0 for none.
        label_smoothing: cross-entropy label smoothing.
        mixup_alpha: MixUp's alpha (0 = off).
        cutmix_alpha: CutMix's alpha (0 = off); with both on, one of the two per batch.
        optimizer: default SGD, lr 0.1 for 256 images, momentum 0.9, weight decay 1e-4 (the ImageNet recipe).
        lr_schedule: ``multistep`` | ``cosine`` | ``poly`` | ``constant``, after a linear warmup.
        warmup_steps: optimizer steps of linear warmup from ``0.001 x lr``.
        milestones: for ``multistep``, fractions of training where the lr drops by ``gamma``.
        in_channels: channels of the input images (1 gray, 4 RGB-D, 13 multispectral, ...; the data's
            ``channels``); RGB weights are adapted to them (:func:`resnext_backbones.loading.adapt_input_conv`).
        normalization: ``{mean: [...], std: [...]}``, one value per input channel, of images in [0, 1]; unset: the
            weights' (ImageNet's, adapted to ``in_channels``).
        class_weights: a weight per class (in the order of the class names) for the training loss, as
            ``torch.nn.functional.cross_entropy``'s ``weight``; e.g. inverse class frequencies for rare classes.
    """

    def __init__(self, backbone: str = "resnext50_32x4d", num_classes: int = 1000, weights: Optional[str] = None,
                 strict_weights: bool = True, trainable_stages: int = 5, norm: str = "bn",
                 zero_init_residual: bool = False, categories: Optional[Dict[int, str]] = None,
                 log_images: int = 16, label_smoothing: float = 0.1, mixup_alpha: float = 0.0,
                 cutmix_alpha: float = 0.0,
                 optimizer: OptimizerCallable = imagenet_sgd, lr_schedule: str = "cosine", warmup_steps: int = 0,
                 milestones: Sequence[float] = (), class_weights: Optional[Sequence[float]] = None,
                 in_channels: int = 3, normalization: Optional[Dict[str, Sequence[float]]] = None,
                 **kwargs) -> None:
        super().__init__(num_classes=num_classes, categories=categories, optimizer=optimizer,
                         lr_schedule=lr_schedule, warmup_steps=warmup_steps, milestones=milestones, **kwargs)
        self.trunk = rb.resnext(backbone, norm=norm, trainable_stages=trainable_stages, returned_features=("c5",),
                                zero_init_residual=zero_init_residual, in_channels=in_channels)
        self.fc = nn.Linear(self.trunk.out_channels["c5"], num_classes)
        for name in ("mean", "std"):  # the trunk's normalization on the model's device: set by set_normalization
            self.register_buffer(name, torch.empty(1, in_channels, 1, 1), persistent=False)
        self.label_smoothing = label_smoothing
        if class_weights is not None and (len(class_weights) != num_classes or min(class_weights) < 0):
            raise ValueError(f"model.class_weights has {len(class_weights)} entries {list(class_weights)}; give one "
                             f"non-negative weight per class ({num_classes}, in the order of the class names)")
        self.register_buffer("class_weights", None if class_weights is None else
                             torch.tensor([float(w) for w in class_weights]), persistent=False)
        mixes = ([v2.MixUp(alpha=mixup_alpha, num_classes=num_classes)] if mixup_alpha > 0 else []) + \
                ([v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes)] if cutmix_alpha > 0 else [])
        self.mix = v2.RandomChoice(mixes) if mixes else None
        self.metrics = self.stage_metrics(MetricCollection({
            "acc": MulticlassAccuracy(num_classes, top_k=1, average="micro"),
            "acc_top5": MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro")}))
        self.confusion = self.stage_metrics(MulticlassConfusionMatrix(num_classes))  # and per-class accuracy
        self.log_images, self._pictures_sent = log_images, 0
        if weights is not None:
            self.load_trunk_and_head(weights, strict=strict_weights)
        # the config's, else the weights' (ImageNet's by default), into the buffers
        self.set_normalization(normalization or self.trunk.normalization)

    def load_trunk_and_head(self, weights: str, strict: bool = True) -> None:
        source = rb.read_weights(weights, model=self.hparams.backbone)  # a file, or a registered name: fetched
        rb.load_weights(self.trunk, source, strict=strict)  # logs its report
        state = source.state
        for prefix in ("fc.", "model.fc.", "head.fc."):
            head = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            if head:
                if head["weight"].shape != self.fc.weight.shape:
                    log.info("head %s* not loaded: shape %s, model has %s", prefix, tuple(head["weight"].shape),
                             tuple(self.fc.weight.shape))
                    return
                self.fc.load_state_dict(head)
                log.info("loaded classification head from %s*", prefix)
                return

    INFERENCE_NETWORK = "trunk"  # the linear head stays as it is, in float32

    def trunk_module(self) -> nn.Module:
        return self.trunk

    def set_normalization(self, normalization) -> None:
        """Also the ``mean``/``std`` buffers that :meth:`forward` reads: set here, and only here."""
        super().set_normalization(normalization)
        for name in ("mean", "std"):
            getattr(self, name).copy_(torch.tensor(self.trunk.normalization[name]).view(1, -1, 1, 1))

    def forward(self, images: Tensor) -> Tensor:
        """Logits for RGB images in [0, 1]."""
        x = ((images - self.mean) / self.std).contiguous(memory_format=self.memory_format())
        c5 = self.trunk(x)["c5"]
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(c5, 1), 1))

    def training_loss(self, batch, batch_idx: int) -> Tensor:
        images, labels = batch
        if self.mix is not None:
            images, labels = self.mix(images, labels)
        return F.cross_entropy(self(images), labels, weight=self.class_weights, label_smoothing=self.label_smoothing)

    def evaluation_step(self, batch, batch_idx: int, stage: str) -> None:
        images, labels = batch
        with self.inference():
            logits = self(images)
        metrics = self.metrics[stage]
        metrics.update(logits, labels)
        self.confusion[stage].update(logits, labels)
        self.log(f"{stage}/loss", F.cross_entropy(logits, labels), batch_size=len(images), sync_dist=True)
        self.log_dict({f"{stage}/{name}": metric for name, metric in metrics.items()}, prog_bar=stage == "val",
                      batch_size=len(images))
        if stage == "val" and self._pictures_sent < self.log_images and not self.trainer.sanity_checking:
            self._log_pictures(images, labels, logits.softmax(-1))

    def _log_pictures(self, images: Tensor, labels: Tensor, probabilities: Tensor) -> None:
        """The next images up to ``log_images`` this epoch, captioned with their predicted class, as one grid."""
        from torchvision.utils import make_grid

        names = self.label_map.names
        count = min(len(images), self.log_images - self._pictures_sent)
        top = probabilities[:count].max(-1)
        pictures = [classification_picture(image, names[int(p)], float(q), names[int(t)])
                    for image, p, q, t in zip(images[:count], top.indices, top.values, labels[:count], strict=True)]
        grid = make_grid(torch.stack(pictures), nrow=min(8, count), padding=4, pad_value=255)
        send_picture(self.loggers, f"val/predictions_{self._pictures_sent}", grid, self.global_step)
        self._pictures_sent += count

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self._pictures_sent = 0

    def on_validation_epoch_end(self) -> None:
        self._log_per_class("val")

    def on_test_epoch_end(self) -> None:
        self._log_per_class("test")

    def _log_per_class(self, stage: str) -> None:
        """``<stage>/acc/<class name>`` for each class with images, the table of them (worst first), and the
        confusion matrix as a picture."""
        confusion = self.confusion[stage].compute()
        self.confusion[stage].reset()
        if not confusion.sum():
            return
        names = unique_names(self.categories)
        accuracy = {self.label_map.category_ids[i]: value for i, value in per_class_accuracy(confusion).items()}
        self.log_dict({f"{stage}/acc/{names[c]}": value for c, value in accuracy.items()}, rank_zero_only=False)
        if self.trainer.sanity_checking or not self.trainer.is_global_zero:
            return
        rows = {names[c]: (accuracy.get(c, math.nan),) for c in self.categories}
        log.info("%s", table(f"{stage}: accuracy per class over {int(confusion.sum())} images, worst first "
                             "('-': no images)", ["accuracy"], rows, first="class"))
        if self.log_images:
            send_picture(self.loggers, f"{stage}/confusion_matrix",
                         confusion_matrix_picture(confusion, list(self.label_map.names)), self.global_step)

    def predict_batch(self, batch) -> Tensor:
        """Class probabilities of the batch's images (rows in label order: ``label_map.names``); the writer callback
        (:class:`~tasks.ClassificationResultsWriter`) pairs them with the batch's file names."""
        images, _ = batch
        with self.inference():
            return self(images).softmax(-1)

    def empty_prediction(self) -> Tensor:
        return torch.empty(0, len(self.label_map))
