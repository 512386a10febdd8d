"""Tiled prediction on large images of small objects, beside SAHI: mAP and images/s.

    python -m benchmarks.tiling [--images 4] [--image-size 1024] [--objects 40] [--tile 128] [--overlap 48]
                                [--merge nms] [--match ios] [--train-steps 300] [--repeats 1]

A resnet18 Faster R-CNN (FPN of 64 channels, from scratch, its input ``--tile`` pixels: ``min_size = max_size``)
trains for ``--train-steps`` SGD steps on tile-sized crops of the shapes set's scenes (objects 16-48 px,
:func:`tasks.data.shapes.draw_scene`, fresh crops every step), then predicts on ``--images`` large scenes of the same
shapes: whole (each image resized to the model's input, as without tiling), by our tiles
(:func:`resnext_backbones.deployment.tiled_detections`: the tiles batched ``--tile-batch`` at a time), the same on the
model's inference copy (what ``validate``/``predict`` with ``model.tile`` run), and by SAHI (``sahi`` from PyPI, not a
dependency: its rows are left out where it is not installed): its ``TorchVisionDetectionModel`` around the same
model, ``get_sliced_prediction`` with the same tiles (overlap ratio ``overlap / tile``: the same pixels), merge
(``NMS`` or ``GREEDYNMM``), match metric and threshold. mAP is COCO's (torchmetrics, up to 500 detections per image:
a large image holds more than COCO's 100 objects' worth of detections); images/s is the median of ``--repeats``
rounds, the variants alternating.
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Callable, Dict, List

import numpy as np
import torch
from torchmetrics.detection import MeanAveragePrecision

from resnext_backbones.deployment import Tiling, inference_copy, isa_flags, tile_grid, tiled_detections
from tasks.data.shapes import CATEGORIES, draw_scene

from .common import benchmark_parser, machine, median_seconds_alternating, publish

HEADS = {"box_batch_size_per_image": 64, "rpn_pre_nms_top_n_train": 300, "rpn_post_nms_top_n_train": 150,
         "rpn_pre_nms_top_n_test": 150, "rpn_post_nms_top_n_test": 50}
MAX_DETECTIONS = 500


def scenes(rng: np.random.Generator, count: int, size: int, objects: int) -> List[Dict]:
    """``count`` square scenes of ``size`` pixels with ``objects`` shapes of 16-48 px: float images in [0, 1] and their
    targets, labels 1..3 (the detector's own: category ids 3, 5, 9 in order)."""
    model_label = {c: i + 1 for i, c in enumerate(CATEGORIES)}
    out = []
    for _ in range(count):
        image, boxes, ids = draw_scene(rng, size, size, objects, 16, 48)
        out.append({"image": torch.from_numpy(image).permute(2, 0, 1).float() / 255,
                    "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                    "labels": torch.tensor([model_label[c] for c in ids], dtype=torch.int64)})
    return out


def trained_detector(tile: int, steps: int, batch: int, seed: int = 0) -> torch.nn.Module:
    """The task's Faster R-CNN (its anchors and heads) trained on fresh ``tile``-pixel crops, 1-4 shapes each."""
    from tasks import ObjectDetector

    torch.manual_seed(seed)
    task = ObjectDetector(backbone="resnet18", num_classes=len(CATEGORIES), categories=dict(CATEGORIES), norm="bn",
                          trainable_stages=5, min_size=tile, max_size=tile, anchor_size=16, fpn_channels=64,
                          detector_kwargs=HEADS)
    model = task.model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9,
                                weight_decay=1e-4)
    rng = np.random.default_rng(seed)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = 0.01 * min(1.0, (step + 1) / 50)  # linear warmup
        crops = [scenes(rng, 1, tile, int(rng.integers(1, 5)))[0] for _ in range(batch)]
        losses = model([c["image"] for c in crops], [{"boxes": c["boxes"], "labels": c["labels"]} for c in crops])
        loss = sum(losses.values())
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"training step {step}: loss {float(loss.detach()):.3f}", flush=True)
    return model.eval()


def sahi_predictor(model: torch.nn.Module, tiling: Tiling, tile: int) -> Callable:
    """SAHI's sliced prediction with the same model and settings, giving torchvision-style detections."""
    from sahi.models.torchvision import TorchVisionDetectionModel
    from sahi.predict import get_sliced_prediction

    wrapped = TorchVisionDetectionModel(model=model, device="cpu", confidence_threshold=0.0,
                                        category_mapping={str(i + 1): n for i, n in enumerate(CATEGORIES.values())})

    def predict(images: List[torch.Tensor]) -> List[Dict[str, torch.Tensor]]:
        out = []
        for image in images:
            array = (image * 255).round().byte().permute(1, 2, 0).numpy()
            result = get_sliced_prediction(
                array, wrapped, slice_height=tile, slice_width=tile, overlap_height_ratio=tiling.overlap / tile,
                overlap_width_ratio=tiling.overlap / tile, perform_standard_pred=tiling.full_image,
                postprocess_type={"nms": "NMS", "nmm": "GREEDYNMM"}[tiling.merge],
                postprocess_match_metric=tiling.match.upper(), postprocess_match_threshold=tiling.iou,
                postprocess_class_agnostic=False, verbose=0, force_postprocess_type=True)
            found = result.object_prediction_list
            out.append({"boxes": torch.tensor([p.bbox.to_xyxy() for p in found], dtype=torch.float32).reshape(-1, 4),
                        "scores": torch.tensor([p.score.value for p in found], dtype=torch.float32),
                        "labels": torch.tensor([p.category.id for p in found], dtype=torch.int64)})
        return out

    return predict


def mean_ap(predictions: List[Dict], targets: List[Dict]) -> Dict[str, float]:
    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="faster_coco_eval",
                                  max_detection_thresholds=[1, 10, MAX_DETECTIONS])
    metric.update([{k: p[k] for k in ("boxes", "scores", "labels")} for p in predictions],
                  [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets])
    result = metric.compute()
    return {"map": float(result["map"]), "map_50": float(result["map_50"])}


def main(argv=None) -> str:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--images", type=int, default=4, help="large images to predict on")
    parser.add_argument("--image-size", type=int, default=1024, help="their side in pixels")
    parser.add_argument("--objects", type=int, default=40, help="shapes per large image")
    parser.add_argument("--tile", type=int, default=128, help="tile side = the detector's input size")
    parser.add_argument("--overlap", type=int, default=48, help="pixels neighbouring tiles share (>= 48: objects' "
                                                                 "largest side)")
    parser.add_argument("--merge", choices=["nms", "nmm"], default="nms")
    parser.add_argument("--match", choices=["ios", "iou"], default="ios")
    parser.add_argument("--iou", type=float, default=0.5, help="match threshold")
    parser.add_argument("--full-image", action="store_true", help="add the whole-image pass to the merge")
    parser.add_argument("--tile-batch", type=int, default=16, help="our tiles per forward")
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--train-batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                        help="run each variant once on a corner of an image first (first-call costs)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model = trained_detector(args.tile, args.train_steps, args.train_batch)
    train_seconds = time.perf_counter() - start
    tiling = Tiling(size=args.tile, overlap=args.overlap, merge=args.merge, iou=args.iou, match=args.match,
                    full_image=args.full_image, batch=args.tile_batch)
    data = scenes(np.random.default_rng(1), args.images, args.image_size, args.objects)
    images = [d["image"] for d in data]
    fused = inference_copy(model)
    variants: Dict[str, Callable] = {
        "whole image (resized to the model's input)": lambda ims: model(ims),
        "ours: tiles batched": lambda ims: tiled_detections(model, ims, tiling),
        "ours: tiles batched, inference copy": lambda ims: tiled_detections(fused, ims, tiling),
    }
    try:
        variants["SAHI: TorchVisionDetectionModel, get_sliced_prediction"] = sahi_predictor(model, tiling, args.tile)
        sahi_note = ""
    except ImportError:
        sahi_note = " SAHI is not installed here (`pip install sahi`): its row is left out."
    predictions: Dict[str, List[Dict]] = {}

    def run(name: str) -> Callable[[], None]:
        def go() -> None:
            with torch.no_grad():
                predictions[name] = [d for image in images for d in variants[name]([image])]
        return go

    with torch.no_grad():  # warm up each on a corner of one image (first-call costs), not a whole pass
        for predict in variants.values() if args.warmup else ():
            predict([images[0][:, :args.tile * 2, :args.tile * 2]])
    seconds = median_seconds_alternating({name: run(name) for name in variants}, repeats=args.repeats, warmup=0)
    rows = ["| variant | mAP | mAP@0.5 | detections | images/s | vs SAHI |", "|---|---|---|---|---|---|"]
    sahi_seconds = next((s for n, s in seconds.items() if n.startswith("SAHI")), math.nan)
    for name in variants:
        quality = mean_ap(predictions[name], data)
        count = sum(len(p["boxes"]) for p in predictions[name])
        ratio = "" if name.startswith(("SAHI", "whole")) or math.isnan(sahi_seconds) else \
            f"{sahi_seconds / seconds[name]:.2f}x"
        rows.append(f"| {name} | {quality['map']:.3f} | {quality['map_50']:.3f} | {count:,} | "
                    f"{args.images / seconds[name]:.3f} | {ratio} |")
        print(rows[-1], flush=True)
    tiles = len(tile_grid(args.image_size, args.image_size, args.tile, args.overlap))
    command = (f"python -m benchmarks.tiling --images {args.images} --image-size {args.image_size} --objects "
               f"{args.objects} --tile {args.tile} --overlap {args.overlap} --merge {args.merge} --match {args.match} "
               f"--iou {args.iou}{' --full-image' if args.full_image else ''} --tile-batch {args.tile_batch} "
               f"--train-steps {args.train_steps} --train-batch {args.train_batch} --repeats {args.repeats}"
               f"{f' --threads {args.threads}' if args.threads else ''}")
    whole_pass = ", with the whole-image pass" if args.full_image else ""
    body = (f"## Tiled prediction on large images, beside SAHI\n\n`{command}`: a resnet18 Faster R-CNN (FPN of 64 "
            f"channels, input {args.tile} px) trained from scratch for {args.train_steps} steps of {args.train_batch} "
            f"crops of {args.tile} px ({train_seconds:.0f} s), then {args.images} images of {args.image_size}x"
            f"{args.image_size} with {args.objects} shapes of 16-48 px each: {tiles} tiles an image, merged by "
            f"{args.merge} on {args.match} > {args.iou}{whole_pass}. mAP: COCO's, up to {MAX_DETECTIONS} detections "
            f"an image; images/s: median of {args.repeats} alternating rounds.{sahi_note}\nMachine: {machine()}; "
            f"ISA: {isa_flags()}.\n\n" + "\n".join(rows) + "\n")
    return publish("tiling", body, args)


if __name__ == "__main__":
    main()
