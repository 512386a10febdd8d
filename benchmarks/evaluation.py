"""COCO box mAP through torchmetrics: faster_coco_eval backend vs pycocotools, same inputs, same process.

    python -m benchmarks.evaluation [--images 5000] [--detections 100] [--repeats 3]

Synthetic ground truth (1-15 boxes per image over 10 sparse category ids, some crowd) and detections (jittered
true boxes plus false positives, 100 per image). Reports both backends' mAP (they must agree to 1e-4) and the
ratio of their times.
"""

from __future__ import annotations

import numpy as np
import torch
from torchmetrics.detection import MeanAveragePrecision

from .common import benchmark_parser, machine, median_seconds_alternating, publish

CATEGORY_IDS = np.array([1, 3, 7, 8, 12, 20, 33, 41, 56, 90])


def synthetic(images: int, detections: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    preds, targets = [], []
    for _ in range(images):
        n = int(rng.integers(1, 16))
        xy = rng.uniform(0, 500, (n, 2))
        wh = rng.uniform(8, 200, (n, 2))
        boxes = np.concatenate([xy, xy + wh], 1)
        labels = rng.choice(CATEGORY_IDS, n)
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels),
                        "iscrowd": torch.tensor(rng.random(n) < 0.05, dtype=torch.long)})
        hits = boxes + rng.normal(0, 6, boxes.shape)
        fxy = rng.uniform(0, 500, (detections - n, 2))
        false = np.concatenate([fxy, fxy + rng.uniform(8, 200, (detections - n, 2))], 1)
        hit_labels = np.where(rng.random(n) < 0.8, labels, rng.choice(CATEGORY_IDS, n))
        preds.append({"boxes": torch.tensor(np.concatenate([hits, false]), dtype=torch.float32),
                      "scores": torch.tensor(np.concatenate([rng.uniform(0.3, 1, n), rng.uniform(0, 0.6,
                                                                                              detections - n)]),
                                             dtype=torch.float32),
                      "labels": torch.tensor(np.concatenate([hit_labels, rng.choice(CATEGORY_IDS, detections - n)]))})
    return preds, targets


def evaluate(backend: str, preds, targets) -> dict:
    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend=backend)
    metric.update(preds, targets)
    return {k: float(v) for k, v in metric.compute().items() if k in ("map", "map_50", "map_75")}


def main(argv=None) -> str:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--detections", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    preds, targets = synthetic(args.images, args.detections)
    results = {b: evaluate(b, preds, targets) for b in ("faster_coco_eval", "pycocotools")}
    agree = all(abs(results["faster_coco_eval"][k] - results["pycocotools"][k]) <= 1e-4 for k in results["pycocotools"])
    t = median_seconds_alternating({b: (lambda b=b: evaluate(b, preds, targets)) for b in results},
                                   repeats=args.repeats, warmup=0)
    rows = ["| backend | seconds | map | map_50 | map_75 |", "|---|---|---|---|---|"]
    rows += [f"| {b} | {t[b]:.2f} | {r['map']:.5f} | {r['map_50']:.5f} | {r['map_75']:.5f} |"
             for b, r in results.items()]
    body = (f"## Evaluation: faster_coco_eval vs pycocotools (torchmetrics `MeanAveragePrecision`)\n\n"
            f"`python -m benchmarks.evaluation --images {args.images} --detections {args.detections} --repeats "
            f"{args.repeats}`; median of {args.repeats}, alternating. Machine: {machine()}.\n\n" + "\n".join(rows) +
            f"\n\nfaster_coco_eval / pycocotools speed: {t['pycocotools'] / t['faster_coco_eval']:.2f}x; "
            f"numbers agree to 1e-4: {'yes' if agree else 'NO'}.")
    print(body, flush=True)
    return publish("evaluation", body, args)


if __name__ == "__main__":
    main()
