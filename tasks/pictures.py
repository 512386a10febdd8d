"""Pictures of what a model predicts: boxes labelled with category names (and scores) over their instance masks where
there are masks, ground truth beside the predictions, captioned classifications, the confusion matrix; and sending
them to the loggers that show pictures."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Iterable, List, Mapping, Optional, Sequence

import torch
from torch import Tensor
from torchvision.transforms.v2.functional import to_dtype

LEGIBLE_SIDE = 320  # small images are enlarged to this shorter side, so that labels in the 10-px font stay legible
MAX_SIDE = 2048  # ... but never beyond this longer side
# bright colours that black label text reads well on; a category keeps its colour in every picture
PALETTE = [(255, 99, 71), (50, 205, 50), (30, 144, 255), (255, 215, 0), (238, 130, 238), (0, 206, 209),
           (255, 165, 0), (173, 255, 47), (255, 105, 180), (135, 206, 250), (244, 164, 96), (152, 251, 152)]
CORRECT, WRONG = (50, 205, 50), (255, 99, 71)


def colour(category_id: int) -> tuple:
    return PALETTE[int(category_id) % len(PALETTE)]


def enlarged(image: Tensor) -> tuple:
    """``(uint8 RGB image, factor)``: the image as uint8 (1 or 2 channels: the first as gray; more than 3: the first
    three), enlarged by a whole factor (nearest neighbour, so pixels
    stay crisp) until its shorter side reaches :data:`LEGIBLE_SIDE` or its longer side would pass :data:`MAX_SIDE`."""
    image = to_dtype(image.detach().cpu().as_subclass(Tensor), torch.uint8, scale=True)
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    elif image.shape[0] > 3:  # RGB-D, multispectral: the first three channels, which are RGB by convention
        image = image[:3]
    elif image.shape[0] == 2:
        image = image[:1].expand(3, -1, -1)
    height, width = image.shape[-2:]
    factor = max(1, min(math.ceil(LEGIBLE_SIDE / max(1, min(height, width))), MAX_SIDE // max(height, width)))
    if factor > 1:
        image = image.repeat_interleave(factor, -2).repeat_interleave(factor, -1)
    return image.contiguous(), factor


def draw_boxes(image: Tensor, boxes: Tensor, captions: Sequence[str], colours: Sequence[tuple],
               masks: Optional[Tensor] = None) -> Tensor:
    """``image`` (uint8, or float in [0, 1]) with ``boxes`` (xyxy, in its pixels), each labelled with its caption on
    a filled background and, with ``masks`` (N x H x W, nonzero inside), over its mask in its colour; enlarged as
    :func:`enlarged` says; uint8 RGB."""
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    picture, factor = enlarged(image)
    if len(boxes) == 0:
        return picture
    if masks is not None:
        masks = masks.detach().cpu().as_subclass(Tensor).bool()
        if factor > 1:
            masks = masks.repeat_interleave(factor, -2).repeat_interleave(factor, -1)
        picture = draw_segmentation_masks(picture, masks, alpha=0.5, colors=list(colours))
    return draw_bounding_boxes(picture, boxes.detach().cpu().float().reshape(-1, 4) * factor, list(captions),
                               colors=list(colours), width=2, fill_labels=True)


def captions(category_ids: Iterable[int], names: Mapping[int, str], scores: Optional[Iterable[float]] = None
             ) -> List[str]:
    """``"square 0.93"`` per detection (``"square"`` without scores): category names, never bare ids."""
    named = [names.get(int(c), str(int(c))) for c in category_ids]
    return named if scores is None else [f"{n} {float(s):.2f}" for n, s in zip(named, scores, strict=True)]


def detections_picture(image: Tensor, detections: Mapping[str, Tensor], names: Mapping[int, str],
                       threshold: float = 0.3) -> Tensor:
    """``image`` with the detections scoring at least ``threshold`` (``boxes``, ``labels`` as category ids,
    ``scores``, and ``masks`` where the model gives them), labelled ``name score``."""
    keep = detections["scores"] >= threshold
    labels, scores = detections["labels"][keep].tolist(), detections["scores"][keep].tolist()
    masks = detections["masks"][keep] if "masks" in detections else None
    return draw_boxes(image, detections["boxes"][keep], captions(labels, names, scores), [colour(c) for c in labels],
                      masks)


def ground_truth_picture(image: Tensor, boxes: Tensor, category_ids: Sequence[int], names: Mapping[int, str],
                         masks: Optional[Tensor] = None) -> Tensor:
    """``image`` with its true boxes (and masks), labelled with their names."""
    ids = [int(c) for c in category_ids]
    return draw_boxes(image, boxes, captions(ids, names), [colour(c) for c in ids], masks)


def side_by_side(*pictures: Tensor, gap: int = 8) -> Tensor:
    """The pictures left to right on white, top-aligned."""
    height = max(p.shape[-2] for p in pictures)
    width = sum(p.shape[-1] for p in pictures) + gap * (len(pictures) - 1)
    canvas = torch.full((3, height, width), 255, dtype=torch.uint8)
    x = 0
    for p in pictures:
        canvas[:, : p.shape[-2], x: x + p.shape[-1]] = p
        x += p.shape[-1] + gap
    return canvas


def classification_picture(image: Tensor, predicted: str, probability: float, truth: str) -> Tensor:
    """``image`` captioned with the predicted class and its probability (green when right; red, with the true
    class, when wrong)."""
    right = predicted == truth
    caption = f"{predicted} {probability:.2f}" + ("" if right else f" (true: {truth})")
    height, width = image.shape[-2:]
    return draw_boxes(image, torch.tensor([[0.0, 0.0, width - 1, height - 1]]), [caption],
                      [CORRECT if right else WRONG])


def confusion_matrix_picture(confusion: Tensor, names: Sequence[str]) -> Tensor:
    """The confusion matrix (rows: true class, columns: predicted) as torchmetrics plots it, with class names;
    uint8 RGB."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from torchmetrics.utilities.plot import plot_confusion_matrix

    side = min(24.0, max(5.0, 0.45 * len(names) + 2))
    figure = Figure(figsize=(side, side), dpi=80, layout="constrained")
    canvas = FigureCanvasAgg(figure)
    with warnings.catch_warnings():  # matplotlib asks the tensor for a copy=False array, which torch does not offer
        warnings.filterwarnings("ignore", "__array__ implementation doesn't accept a copy keyword")
        plot_confusion_matrix(confusion.detach().cpu(), ax=figure.add_subplot(), add_text=len(names) <= 30,
                              labels=list(names))
    canvas.draw()
    return torch.from_numpy(np.asarray(canvas.buffer_rgba())[..., :3].copy()).permute(2, 0, 1).contiguous()


def send_picture(loggers: Iterable, tag: str, picture: Tensor, step: int) -> int:
    """Send ``picture`` (uint8 CHW) to every logger that shows pictures (TensorBoard's ``add_image``); how many
    took it."""
    sent = 0
    for logger in loggers:
        experiment = getattr(logger, "experiment", None)
        if hasattr(experiment, "add_image"):
            experiment.add_image(tag, picture, step)
            sent += 1
    return sent


def write_png(picture: Tensor, path: Path) -> None:
    from torchvision.io import write_png as write

    path.parent.mkdir(parents=True, exist_ok=True)
    write(picture, str(path))


def segmentation_picture(image: Tensor, labels: Optional[Tensor], ignore_index: int = 255, alpha: float = 0.6
                         ) -> Tensor:
    """``image`` (uint8, or float in [0, 1]) with each class of ``labels`` (H x W class indices; ``None``: the image
    alone) over it in the class's colour (:func:`colour`), ``ignore_index`` pixels left as they are; enlarged as
    :func:`enlarged` says; uint8 RGB."""
    from torchvision.utils import draw_segmentation_masks

    picture, factor = enlarged(image)
    if labels is None:
        return picture
    labels = labels.detach().cpu().as_subclass(Tensor).long()
    if factor > 1:
        labels = labels.repeat_interleave(factor, -2).repeat_interleave(factor, -1)
    classes = [int(c) for c in labels.unique().tolist() if int(c) != ignore_index]
    if not classes:
        return picture
    masks = labels[None] == torch.tensor(classes)[:, None, None]
    return draw_segmentation_masks(picture, masks, alpha=alpha, colors=[colour(c) for c in classes])

