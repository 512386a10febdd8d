"""Per-class results: AP and AP50 per category from one COCO evaluation, accuracy per class from a confusion
matrix, metric names that stay unique, and the table of them, worst first (as detectron2 prints after evaluation)."""

from __future__ import annotations

import math
from typing import Dict, Mapping, Sequence, Tuple

import torch
from torch import Tensor


def per_category_ap(result: Mapping[str, Tensor], iou_thresholds: Sequence[float], prefix: str = ""
                    ) -> Dict[int, Tuple[float, float]]:
    """``{category id: (AP, AP50)}`` from the result of torchmetrics' ``MeanAveragePrecision(extended_summary=True)``;
    ``prefix`` picks one evaluation of several (``bbox_``, ``segm_``: torchmetrics' names when ``iou_type`` has both).

    As pycocotools' ``summarize`` of an evaluation restricted to the category (and detectron2's table): the mean of
    the precision array over IoU thresholds and recall thresholds (AP50: at IoU 0.5 only), all areas, the most
    detections. Categories without ground truth in the evaluated set have no AP (pycocotools: -1) and are left out.
    """
    if f"{prefix}precision" not in result:  # nothing was evaluated: no detections and no ground truth
        return {}
    precision = result[f"{prefix}precision"]  # (IoU thresholds, recall thresholds, classes, areas, max detections)
    at_50 = min(range(len(iou_thresholds)), key=lambda i: abs(iou_thresholds[i] - 0.5))
    values = {}
    for k, category in enumerate(result["classes"].tolist()):
        every_iou, iou_50 = precision[:, :, k, 0, -1], precision[at_50, :, k, 0, -1]
        if (every_iou > -1).any():
            values[int(category)] = (float(every_iou[every_iou > -1].mean()), float(iou_50[iou_50 > -1].mean()))
    return values


def per_class_accuracy(confusion: Tensor) -> Dict[int, float]:
    """``{class index: accuracy}`` from a confusion matrix (rows: true class, columns: predicted class): the share of
    each class's images predicted as it (recall). Classes without images are left out."""
    totals = confusion.sum(1)
    return {i: float(confusion[i, i] / totals[i]) for i in torch.nonzero(totals).flatten().tolist()}


def unique_names(categories: Mapping[int, str]) -> Dict[int, str]:
    """Names to log per class under: each category's name, with its id added where two categories share a name."""
    names = list(categories.values())
    return {i: name if names.count(name) == 1 else f"{name} ({i})" for i, name in categories.items()}


def table(title: str, columns: Sequence[str], rows: Mapping[str, Sequence[float]], first: str = "category") -> str:
    """A text table of ``rows`` (name -> values of ``columns``; ``first`` heads the names), sorted worst first by
    the first value; NaN (no value: no ground truth) last, shown as ``-``."""
    def key(item):
        value = item[1][0]
        return (math.isnan(value), value, item[0])

    cells = [[name, *("-" if math.isnan(v) else f"{v:.3f}" for v in values)]
             for name, values in sorted(rows.items(), key=key)]
    header = [first, *columns]
    widths = [max(len(str(row[i])) for row in [header, *cells]) for i in range(len(header))]
    line = lambda row: "| " + " | ".join(  # noqa: E731
        str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))) + " |"
    rule = "|" + "|".join(("-" * (w + 1)) + (":" if i else "-") for i, w in enumerate(widths)) + "|"
    return "\n".join([title, line(header), rule, *map(line, cells)])
