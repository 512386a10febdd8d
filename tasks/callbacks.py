"""Callbacks the shipped configs use."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torchvision.transforms.v2.functional import to_dtype

from .base import gather_objects

log = logging.getLogger("tasks")


class CocoResultsWriter(BasePredictionWriter):
    """On ``predict``, write the detector's results as a COCO results JSON (dataset category ids, xywh boxes).

    Args:
        output: file to write; default ``<log_dir>/predictions.json``.
        draw_dir: if set, also write each image with its boxes drawn (score >= ``draw_threshold``) as PNG here.
        draw_threshold: lowest score drawn.
    """

    def __init__(self, output: Optional[str] = None, draw_dir: Optional[str] = None,
                 draw_threshold: float = 0.3) -> None:
        super().__init__(write_interval="epoch")
        self.output, self.draw_dir, self.draw_threshold = output, draw_dir, draw_threshold

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        if not predictions or not isinstance(predictions[0], list) or \
                (predictions[0] and not isinstance(predictions[0][0], dict)):
            return  # not a detector's predictions
        results = [r for part in gather_objects([r for batch in predictions for r in batch]) for r in part]
        if trainer.is_global_zero:
            results.sort(key=lambda r: (r["image_id"], -r["score"]))
            path = Path(self.output or Path(trainer.log_dir or ".") / "predictions.json")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(results))
            log.info("wrote %d detections to %s", len(results), path)
            if self.draw_dir:
                self._draw(trainer, results)

    def _draw(self, trainer, results) -> None:
        from torchvision.io import write_png
        from torchvision.utils import draw_bounding_boxes

        dataset = trainer.predict_dataloaders.dataset
        out = Path(self.draw_dir)
        out.mkdir(parents=True, exist_ok=True)
        by_image = {}
        for r in results:
            by_image.setdefault(r["image_id"], []).append(r)
        for i in range(len(dataset)):
            image, target = dataset[i]
            dets = [r for r in by_image.get(target["image_id"], []) if r["score"] >= self.draw_threshold]
            boxes = torch.tensor([r["bbox"] for r in dets], dtype=torch.float32).reshape(-1, 4)
            boxes[:, 2:] += boxes[:, :2]
            picture = draw_bounding_boxes(to_dtype(image, torch.uint8, scale=True), boxes,
                                          [str(r["category_id"]) for r in dets])
            write_png(picture, str(out / f"{target['image_id']}.png"))
