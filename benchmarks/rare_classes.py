"""Rare classes: the rarest class's AP with LVIS repeat-factor sampling (``repeat_threshold``) and without.

    python -m benchmarks.rare_classes [--train 400] [--val 100] [--rare-images 12] [--threshold 0.3]
                                      [--steps 1500] [--seeds 0 1 2] [--precision auto]

An imbalanced version of the embedded shapes set: the training images are every generated image without a
triangle, and only the first ``--rare-images`` of those with one (a triangle in an unlabelled image would teach
the detector that triangles are background, so images are left out whole). The validation set is the balanced
generator's. The CPU quick start's detector (configs/detection.yaml, on resnet18 for speed) trains the same number
of optimizer steps both ways, from the same seed, in ``--precision`` (``auto``: what ``trainer.precision: auto``
resolves to on this machine, bf16-mixed where bf16 is native); the table gives each seed's triangle AP and mAP, and
their means.
"""

from __future__ import annotations

import json
import logging
import statistics
import tempfile
from pathlib import Path

from .common import benchmark_parser, machine, publish, training_precision

DETECTOR = dict(architecture="faster_rcnn", backbone="resnet18", norm="bn", trainable_stages=5, min_size=128,
                max_size=144, anchor_size=16, warmup_steps=50, log_images=0,
                detector_kwargs={"box_batch_size_per_image": 64, "rpn_pre_nms_top_n_train": 600,
                                 "rpn_post_nms_top_n_train": 300, "rpn_pre_nms_top_n_test": 300,
                                 "rpn_post_nms_top_n_test": 150})
RARE = "triangle"


def imbalanced_shapes(root: Path, train: int, val: int, rare_images: int) -> dict:
    """The shapes generator's sets, the training one with ``rare_images`` images holding the rare class."""
    from tasks.data.shapes import CATEGORIES, _generate_detection

    _generate_detection(root, "train", train, seed=20)
    _generate_detection(root, "val", val, seed=21)
    data = json.loads((root / "train.json").read_text())
    rare_id = next(k for k, v in CATEGORIES.items() if v == RARE)
    holding = {a["image_id"] for a in data["annotations"] if a["category_id"] == rare_id}
    kept = {i["id"] for i in data["images"] if i["id"] not in holding} | set(sorted(holding)[:rare_images])
    data["images"] = [i for i in data["images"] if i["id"] in kept]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in kept]
    (root / "train_imbalanced.json").write_text(json.dumps(data))
    return {"train_annotations": str(root / "train_imbalanced.json"), "train_images": str(root / "train"),
            "val_annotations": str(root / "val.json"), "val_images": str(root / "val"),
            "rare_fraction": min(rare_images, len(holding)) / len(kept)}


def train_and_validate(paths: dict, threshold, steps: int, seed: int, root: Path, precision: str) -> dict:
    import torch
    from lightning.pytorch import Trainer, seed_everything

    from tasks import ObjectDetector
    from tasks.data import CocoDetectionDataModule

    seed_everything(seed, verbose=False)
    data = CocoDetectionDataModule(**{k: v for k, v in paths.items() if k != "rare_fraction"}, batch_size=4,
                                   num_workers=2, repeat_threshold=threshold)
    model = ObjectDetector(num_classes=data.num_classes, categories=data.categories, **DETECTOR,
                           optimizer=lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9, weight_decay=1e-4))
    trainer = Trainer(accelerator="auto", devices=1, precision=precision, max_steps=steps, max_epochs=-1, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      gradient_clip_val=10.0, limit_val_batches=0, default_root_dir=str(root), num_sanity_val_steps=0)
    trainer.fit(model, datamodule=data)
    (metrics,) = Trainer(accelerator="auto", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False).validate(model, datamodule=data, verbose=False)
    return {"rare_ap": metrics[f"val/ap/{RARE}"], "map": metrics["val/map"]}


def main(argv=None) -> str:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--train", type=int, default=400)
    parser.add_argument("--val", type=int, default=100)
    parser.add_argument("--rare-images", type=int, default=12)
    parser.add_argument("--threshold", type=float, default=0.3)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--precision", default="auto", help="training precision; auto: as trainer.precision: auto")
    args = parser.parse_args(argv)
    import torch

    precision = training_precision(args.precision, "cuda" if torch.cuda.is_available() else "cpu")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    rows = ["| seed | sampling | triangle AP | mAP |", "|---|---|---|---|"]
    results = {"without": [], "with": []}
    with tempfile.TemporaryDirectory() as tmp:
        paths = imbalanced_shapes(Path(tmp) / "data", args.train, args.val, args.rare_images)
        for seed in args.seeds:
            for name, threshold in (("without", None), ("with", args.threshold)):
                result = train_and_validate(paths, threshold, args.steps, seed, Path(tmp) / f"{name}{seed}",
                                            precision)
                results[name].append(result)
                label = "every image once" if threshold is None else f"repeat_threshold {threshold}"
                rows.append(f"| {seed} | {label} | {result['rare_ap']:.3f} | {result['map']:.3f} |")
    means = {name: {k: statistics.mean(r[k] for r in rs) for k in ("rare_ap", "map")} for name, rs in results.items()}
    for name in ("without", "with"):
        rows.append(f"| mean | {name} repeat factors | {means[name]['rare_ap']:.3f} | {means[name]['map']:.3f} |")
    body = (f"## Rare classes: the rarest class's AP with and without repeat-factor sampling\n\n"
            f"`python -m benchmarks.rare_classes --train {args.train} --val {args.val} --rare-images "
            f"{args.rare_images} --threshold {args.threshold} --steps {args.steps} --seeds "
            f"{' '.join(map(str, args.seeds))} --precision {args.precision}`: trained in {precision}, the triangle in "
            f"{paths['rare_fraction']:.1%} of the training "
            f"images, the same number of steps both ways. Machine: {machine()}.\n\n" + "\n".join(rows))
    print(body, flush=True)
    return publish("rare_classes", body, args)


if __name__ == "__main__":
    main()
