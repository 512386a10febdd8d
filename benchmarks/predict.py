"""Predicting on a large folder: peak memory and images/s of ``lightning predict`` on 1,000 vs 10,000 images.

    python -m benchmarks.predict [--counts 1000 10000] [--size 32] [--batch 16] [--workers 2] [--held]

A small detector (resnet18 Faster R-CNN at 32 px, 10 detections kept per image) is fitted for one step through the
CLI on a few generated images, then ``lightning predict --data.init_args.predict_images LIST`` runs in a fresh
process per count, on list files naming the first ``count`` of the same synthetic PNGs, with the
``CocoResultsWriter`` of the shipped configs. Each run reports its wall time (start-up included), images/s, its
peak resident memory (``ru_maxrss`` of the process and its data-loader workers, from ``wait4``), and, after the
first batch and at the end (after the writer has assembled its outputs), the predicting process's peak so far and
its anonymous resident memory (what holding results would grow). Results stream to disk as batches finish, so none
of these may grow with the count. ``--held`` adds the same runs with ``--return_predictions true``, where Lightning
keeps every batch's predictions to return them, for comparison.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from lightning.pytorch import Callback
from torchvision.io import encode_png

from .common import benchmark_parser, machine, publish

SMALL_HEADS = {"rpn_pre_nms_top_n_test": 100, "rpn_post_nms_top_n_test": 50, "box_score_thresh": 0.0,
               "box_batch_size_per_image": 32, "rpn_pre_nms_top_n_train": 100, "rpn_post_nms_top_n_train": 50}


class RssProbe(Callback):
    """Records this process's peak resident memory so far and its anonymous resident memory (heap and tensors, which
    is what holding results would grow, without the shared libraries' file pages that come and go with the page
    cache), in MiB, after the first predict batch and at the end of predict (after the writer has assembled its
    outputs), to the JSON file ``output``."""

    def __init__(self, output: str) -> None:
        self.output, self.first = output, None

    @staticmethod
    def memory() -> dict:
        status = Path("/proc/self/status").read_text()
        return {key: int(status.split(f"{field}:")[1].split()[0]) / 1024 for key, field in (("anonymous", "RssAnon"),
                                                                                           ("peak", "VmHWM"))}

    def on_predict_batch_end(self, trainer, *args) -> None:
        if self.first is None:
            self.first = self.memory()

    def on_predict_end(self, trainer, pl_module) -> None:
        Path(self.output).write_text(json.dumps({"first_batch": self.first, "end": self.memory()}))


def write_images(folder: Path, count: int, size: int, seed: int = 0) -> list:
    """``count`` PNGs of smooth random content (``size`` x ``size``); their paths, in order."""
    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True)
    paths = []
    for i in range(count):
        small = torch.rand(1, 3, 4, 4, generator=g)
        image = torch.nn.functional.interpolate(small, size=(size, size), mode="bilinear")[0]
        paths.append(folder / f"{i:06d}.png")
        paths[-1].write_bytes(encode_png((image * 255).byte()).numpy().tobytes())
    return paths


def config(root: Path, size: int, batch: int, workers: int, data: dict) -> Path:
    path = root / f"config-{len(data)}.yaml"
    path.write_text(yaml.safe_dump({
        "seed_everything": 0,
        "model": {"class_path": "tasks.ObjectDetector", "init_args": {
            "backbone": "resnet18", "norm": "bn", "trainable_stages": 5, "min_size": size, "max_size": size,
            "anchor_size": 8, "detections_per_image": 10, "warmup_steps": 0, "detector_kwargs": SMALL_HEADS}},
        "data": {"class_path": "tasks.data.CocoDetectionDataModule",
                 "init_args": {**data, "batch_size": batch, "num_workers": workers}},
        "trainer": {"accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False,
                    "enable_model_summary": False, "default_root_dir": str(root), "max_steps": 1,
                    "limit_val_batches": 0, "callbacks": [
                        {"class_path": "benchmarks.predict.RssProbe", "init_args": {"output": str(root / "rss.json")}},
                        {"class_path": "tasks.CocoResultsWriter"}]}}))
    return path


def checkpoint(root: Path, size: int) -> Path:
    """A detector fitted for one step through the CLI on 8 generated shapes images."""
    from tasks.data.shapes import _generate_detection

    _generate_detection(root / "shapes", "train", 8, seed=0)
    data = {"train_annotations": str(root / "shapes" / "train.json"), "train_images": str(root / "shapes" / "train")}
    data |= {"val_annotations": data["train_annotations"], "val_images": data["train_images"]}
    run([sys.executable, "-m", "tasks", "fit", "--config", str(config(root, size, 4, 0, data)),
         "--trainer.enable_checkpointing", "true", "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
         f"--trainer.callbacks.dirpath={root / 'ckpt'}", "--trainer.callbacks.filename=model"])
    return root / "ckpt" / "model.ckpt"


def run(command: list) -> tuple:
    """Run ``command``; (wall seconds, peak RSS in MiB of it and its children)."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    errors = process.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{errors[-3000:]}")
    return seconds, usage.ru_maxrss / 1024


def main(argv=None) -> str:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--counts", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--held", action="store_true", help="also run with --return_predictions true")
    args = parser.parse_args(argv)
    rows = ["| images | predictions | wall s (start-up included) | images/s | peak RSS, process + workers (MiB) | "
            "the process's peak RSS: at batch 1 -> at the end (MiB) | its anonymous RSS: after batch 1 -> at the end "
            "(MiB) | "
            "detections written |", "|---|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ckpt = checkpoint(root, args.size)
        print(f"writing {max(args.counts)} PNGs of {args.size}x{args.size} ...", flush=True)
        paths = write_images(root / "images", max(args.counts), args.size)
        predict_config = config(root, args.size, args.batch, args.workers, {})
        modes = [("streamed", "false")] + ([("held by Lightning", "true")] if args.held else [])
        for mode, held in modes:
            for count in args.counts:
                listing = root / f"list-{count}.txt"
                listing.write_text("".join(f"{p}\n" for p in paths[:count]))
                output = root / f"predictions-{count}-{held}.json"
                seconds, rss = run([sys.executable, "-m", "tasks", "predict", "--config", str(predict_config),
                                    "--ckpt_path", str(ckpt), "--data.init_args.predict_images", str(listing),
                                    "--return_predictions", held, f"--trainer.callbacks.init_args.output={output}"])
                detections = len(json.loads(output.read_text()))
                first, end = (json.loads((root / "rss.json").read_text())[k] for k in ("first_batch", "end"))
                rows.append(f"| {count:,} | {mode} | {seconds:.1f} | {count / seconds:.1f} | {rss:.0f} | "
                            f"{first['peak']:.0f} -> {end['peak']:.0f} | {first['anonymous']:.0f} -> "
                            f"{end['anonymous']:.0f} ({end['anonymous'] - first['anonymous']:+.1f}) | {detections:,} |")
                print(rows[-1], flush=True)
    body = (f"## Predict on a folder: memory and speed by image count\n\n"
            f"`python -m benchmarks.predict --counts {' '.join(map(str, args.counts))} --size {args.size} "
            f"--batch {args.batch} --workers {args.workers}{' --held' if args.held else ''}`: `lightning predict` "
            f"of a resnet18 Faster R-CNN ({args.size} px, 10 detections per image) on list files of "
            f"{args.size}x{args.size} PNGs, batch {args.batch}, {args.workers} data-loading workers, "
            "`CocoResultsWriter`; one fresh process per row; peak RSS is the largest of the process and its "
            f"workers.\nMachine: {machine()}.\n\n" + "\n".join(rows) + "\n")
    return publish("predict", body, args)


if __name__ == "__main__":
    main()
