"""Training precision on this CPU: s/step of the two quick starts under ``32-true`` and ``bf16-mixed``.

    python -m benchmarks.precision [--configs detection.yaml classification.yaml] [--steps 6] [--repeats 3]
                                   [--threads 2] [--batch-size N]

The models and batches are the quick-start configs' (a detector config, detection.yaml or instance_segmentation.yaml:
its detector, its batch size of images of its ``min_size``, with masks for Mask R-CNN; classification.yaml: its
classifier, its batch of ``image_size`` squares), trained by
``Trainer.fit`` on one fixed batch, timed from the second step to the last, each precision in every round (order
reversed every other round), median s/step. The answer differs by machine: on CPUs with AMX, bf16 matrix units make
``bf16-mixed`` the faster; on AVX2-only CPUs it is emulated and far slower. The table names the CPU and its flags.
"""

from __future__ import annotations

import statistics
from typing import Optional

import torch

from resnext_backbones.deployment import auto_training_precision, isa_flags
from resnext_backbones.deployment.device import has_cpu_flag
from tasks import ImageClassifier, ObjectDetector

from .common import benchmark_parser, machine, publish
from .detector import lightning_step_seconds, make_batch
from .inference import quick_start_config

PRECISIONS = ("32-true", "bf16-mixed")


def quick_start(name: str, batch_size: Optional[int] = None, backbone: Optional[str] = None,
                size: Optional[int] = None):
    """A fresh model of the quick-start config ``name`` and one batch of its size (or ``batch_size``); ``backbone``
    and ``size`` (the detector's ``min_size`` and ``max_size``, the classifier's ``image_size``) replace the config's,
    for tests at toy sizes."""
    config = quick_start_config(name)
    init = {k: v for k, v in config["model"]["init_args"].items() if k != "optimizer"}
    init.update(warmup_steps=0, lr_schedule="constant", **({"backbone": backbone} if backbone else {}))
    data = {**config["data"]["init_args"], **({"batch_size": batch_size} if batch_size else {})}
    if size:
        init.update({"min_size": size, "max_size": size} if "min_size" in init else {})
        data["image_size"] = size
    optimizer = lambda params: torch.optim.SGD(params, lr=0.001, momentum=0.9)  # noqa: E731
    torch.manual_seed(0)
    task = config["model"]["class_path"].rsplit(".", 1)[-1]
    if task == "ObjectDetector":  # Faster R-CNN, RetinaNet, FCOS; Mask R-CNN with a mask filling each box
        masks = init.get("architecture") == "mask_rcnn"
        return (ObjectDetector(**init, num_classes=3, optimizer=optimizer),
                make_batch(data["batch_size"], init["min_size"], masks))
    if task == "ImageClassifier":
        size = data["image_size"]
        images = torch.rand(data["batch_size"], 3, size, size)
        return (ImageClassifier(**init, num_classes=3, log_images=0, optimizer=optimizer),
                (images, torch.arange(len(images)) % 3))
    raise ValueError(f"configs/{name}: model.class_path is {config['model']['class_path']}; this benchmark times the "
                     "quick starts of tasks.ObjectDetector and tasks.ImageClassifier only")


def main(argv=None) -> str:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--configs", nargs="+", default=["detection.yaml", "classification.yaml"],
                        help="quick-start configs under configs/")
    parser.add_argument("--batch-size", type=int, help="instead of each config's (tests use a tiny one)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = ["| quick start | 32-true s/step | bf16-mixed s/step | bf16-mixed speed-up |", "|---|---|---|---|"]
    for name in args.configs:
        times = {p: [] for p in PRECISIONS}
        for r in range(args.repeats):
            for precision in PRECISIONS if r % 2 == 0 else PRECISIONS[::-1]:
                model, batch = quick_start(name, args.batch_size)
                times[precision].append(lightning_step_seconds(model, batch, args.steps, precision))
        t = {p: statistics.median(v) for p, v in times.items()}
        rows.append(f"| configs/{name} | {t['32-true']:.3f} | {t['bf16-mixed']:.3f} | "
                    f"{t['32-true'] / t['bf16-mixed']:.2f}x |")
        print(rows[-1], flush=True)
    kind = next((flag for flag in ("amx_bf16", "avx512_bf16") if has_cpu_flag(flag)), "no_native_bf16")
    auto, why = auto_training_precision("cpu")
    body = (f"## Training precision on this CPU ({kind}): the quick starts under 32-true and bf16-mixed\n\n"
            f"`python -m benchmarks.precision --configs {' '.join(args.configs)} --steps {args.steps} "
            f"--repeats {args.repeats} --threads {args.threads}"
            f"{f' --batch-size {args.batch_size}' if args.batch_size else ''}`"
            f"; Trainer.fit on one fixed batch of each config's size, median s/step of {args.repeats} alternating "
            f"rounds. Machine: {machine()}; ISA: {isa_flags()}.\n\n" + "\n".join(rows)
            + f"\n\n`trainer.precision: auto` picks {auto} here: {why}.")
    # one section per kind of CPU, so that each kind's figures stay beside the others (the AMX one is "precision")
    return publish("precision" if kind == "amx_bf16" else f"precision_{kind}", body, args)


if __name__ == "__main__":
    main()
