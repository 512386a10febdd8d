"""Data loading: ours (``CocoDetectionDataModule``) vs torchvision's ``CocoDetection`` + transforms v2.

    python -m benchmarks.data [--images 256] [--memory-images 20000] [--memory-boxes 200000]

Two tables, written to benchmarks/README.md:

- throughput: images/s of decode + augment + collate with 2 workers, on the same synthetic 640x480 JPEGs and the
  same transforms (flip, clamp, sanitize; torchvision's also converts to float in the workers, ours leaves that
  to the model on its device), epochs alternating, median of ``--repeats``;
- memory: resident memory (RSS) of each of 4 workers after the first and after the last batch of an epoch over a
  synthetic COCO set of ``--memory-images`` images and ``--memory-boxes`` boxes, without and with instance masks
  (each instance a polygon of ``--polygon-points`` points, every 50th a crowd region as uncompressed RLE, as COCO
  stores them). Python objects read by a worker get their reference counts written, which copies their pages into
  the worker; compact arrays are not copied.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision.io import encode_jpeg
from torchvision.transforms import v2

from tasks.data import CocoDetectionDataModule
from tasks.data.coco import collate

from .common import benchmark_parser, machine, publish


def synthetic_coco(root: Path, images: int, boxes: int, size: tuple, seed: int = 0, polygon_points: int = 0) -> dict:
    """JPEGs of smooth random content (they compress and decode like photos) and a COCO file with ``boxes``
    random boxes spread over the images; with ``polygon_points``, each box also has a segmentation: a polygon of that
    many points inside it (every 50th: a crowd region, as an uncompressed RLE of its box)."""
    g = torch.Generator().manual_seed(seed)
    (root / "images").mkdir(parents=True)
    h, w = size
    for i in range(images):
        small = torch.rand(1, 3, max(2, h // 32), max(2, w // 32), generator=g)
        image = torch.nn.functional.interpolate(small, size=(h, w), mode="bilinear")[0]
        (root / "images" / f"{i:06d}.jpg").write_bytes(encode_jpeg((image * 255).byte(), quality=90).numpy())
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, [w * 0.8, h * 0.8], (boxes, 2))
    wh = rng.uniform(4, [w * 0.2, h * 0.2], (boxes, 2))
    coco = {"images": [{"id": i + 1, "file_name": f"{i:06d}.jpg", "width": w, "height": h} for i in range(images)],
            "annotations": [{"id": j + 1, "image_id": int(j % images) + 1, "category_id": int(j % 80) + 1,
                             "bbox": [*map(float, xy[j]), *map(float, wh[j])], "area": float(wh[j].prod()),
                             "iscrowd": 0} for j in range(boxes)],
            "categories": [{"id": c + 1, "name": f"class{c + 1}"} for c in range(80)]}
    if polygon_points:
        angles = np.sort(rng.uniform(0, 2 * np.pi, (boxes, polygon_points)), axis=1)
        radii = rng.uniform(0.6, 1.0, (boxes, polygon_points))
        centres, halves = xy + wh / 2, wh / 2
        for j, ann in enumerate(coco["annotations"]):
            if j % 50 == 49:  # a crowd region: its box's pixels
                x0, y0 = np.floor(xy[j]).astype(int)
                x1, y1 = np.minimum(np.ceil(xy[j] + wh[j]).astype(int), (w, h))
                ann.update(iscrowd=1, segmentation=box_rle(x0, y0, x1, y1, h, w))
            else:
                directions = np.stack([np.cos(angles[j]), np.sin(angles[j])], 1)
                points = centres[j] + directions * radii[j][:, None] * halves[j]
                ann["segmentation"] = [np.round(points, 2).ravel().tolist()]
    (root / "train.json").write_text(json.dumps(coco))
    paths = {"annotations": str(root / "train.json"), "images": str(root / "images")}
    return {f"{split}_{key}": value for split in ("train", "val") for key, value in paths.items()}


def box_rle(x0: int, y0: int, x1: int, y1: int, h: int, w: int) -> dict:
    """The pixels of a box as COCO stores crowd regions: an uncompressed RLE, runs of 0s and 1s down the columns."""
    inside = y1 - y0
    counts = [x0 * h + y0] + [inside, h - inside] * (x1 - x0)
    counts[-1] = h * w - sum(counts[:-1])
    return {"size": [h, w], "counts": [int(c) for c in counts]}


def our_loader(paths: dict, batch: int, workers: int, masks: bool = False) -> DataLoader:
    dm = CocoDetectionDataModule(**paths, batch_size=batch, num_workers=workers, horizontal_flip=0.5, masks=masks)
    dm.setup("fit")
    return dm.train_dataloader()


def torchvision_loader(paths: dict, batch: int, workers: int, masks: bool = False) -> DataLoader:
    """What a torchvision user writes: the dataset, its v2 wrapper and the same transforms as ours (with masks:
    the wrapper's ``masks`` target, which it decodes with pycocotools from the COCO dicts)."""
    transforms = v2.Compose([v2.ToImage(), v2.RandomHorizontalFlip(0.5), v2.ToDtype(torch.float32, scale=True),
                             v2.ClampBoundingBoxes(), v2.SanitizeBoundingBoxes(min_size=1)])
    dataset = datasets.CocoDetection(paths["train_images"], paths["train_annotations"], transforms=transforms)
    keys = ("boxes", "labels", "image_id") + (("masks",) if masks else ())
    dataset = datasets.wrap_dataset_for_transforms_v2(dataset, target_keys=keys)
    return DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers, collate_fn=collate,
                      persistent_workers=workers > 0)


def epoch_seconds(loader: DataLoader) -> float:
    start = time.perf_counter()
    for _ in loader:
        pass
    return time.perf_counter() - start


def throughput(paths: dict, images: int, batch: int, repeats: int) -> str:
    loaders = {"ours": our_loader(paths, batch, 2), "torchvision": torchvision_loader(paths, batch, 2)}
    for loader in loaders.values():  # start the workers, warm the file cache
        epoch_seconds(loader)
    times = {name: [] for name in loaders}
    order = list(loaders.items())
    for r in range(repeats):
        for name, loader in order if r % 2 == 0 else order[::-1]:
            times[name].append(epoch_seconds(loader))
    t = {name: statistics.median(v) for name, v in times.items()}
    return ("| loader | images/s |\n|---|---|\n"
            + "".join(f"| {name} | {images / t[name]:.1f} |\n" for name in loaders)
            + f"\nours / torchvision: **{t['torchvision'] / t['ours']:.2f}x**\n")


def memory_mib(pid: int) -> np.ndarray:
    """(RSS, private) memory of a process in MiB; private pages are those it copied or wrote (Linux)."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:])
    kib = lambda key: int(fields[key].split()[0])  # noqa: E731
    return np.array([kib("Rss"), kib("Private_Clean") + kib("Private_Dirty")]) / 1024


def worker_memory(loader: DataLoader) -> tuple:
    """Mean worker (RSS, private) MiB after the first and after the last batch of one epoch; the epoch's seconds."""
    iterator = iter(loader)
    start = time.perf_counter()
    next(iterator)
    pids = [w.pid for w in iterator._workers]
    first = np.mean([memory_mib(p) for p in pids], 0)
    for i, _ in enumerate(iterator, start=2):
        if i == len(loader):  # the last batch: read while the workers still live
            last = np.mean([memory_mib(p) for p in pids], 0)
    return first, last, time.perf_counter() - start


def memory(paths: dict, batch: int) -> str:
    rows = ["| loader | targets | worker RSS, first batch (MiB) | last batch (MiB) | RSS growth | private, first -> "
            "last (MiB) | epoch s |", "|---|---|---|---|---|---|---|"]
    for masks in (False, True):
        for name, build in (("ours", our_loader), ("torchvision", torchvision_loader)):
            first, last, seconds = worker_memory(build(paths, batch, 4, masks))
            rows.append(f"| {name} | {'boxes, masks' if masks else 'boxes'} | {first[0]:.1f} | {last[0]:.1f} | "
                        f"{100 * (last[0] / first[0] - 1):+.1f}% | {first[1]:.1f} -> {last[1]:.1f} | {seconds:.0f} |")
            print(rows[-1], flush=True)
    index = our_loader(paths, batch, 0, masks=True).dataset.dataset.index
    json_mib = Path(paths["train_annotations"]).stat().st_size / 2**20
    return ("\n".join(rows) + f"\n\nOurs keeps the {len(index.segmentations):,} segmentations in "
            f"{index.segmentations.nbytes / 2**20:.1f} MiB of arrays (the annotation file: {json_mib:.1f} MiB of "
            "JSON); each is decoded when its image is loaded.\n")


def main(argv=None) -> str:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--images", type=int, default=256, help="640x480 JPEGs for the throughput table")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--memory-images", type=int, default=20000)
    parser.add_argument("--memory-boxes", type=int, default=200000)
    parser.add_argument("--polygon-points", type=int, default=24, help="points per instance polygon, for the masks")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        print(f"writing {args.images} JPEGs of 640x480 ...", flush=True)
        paths = synthetic_coco(Path(tmp) / "speed", args.images, args.images * 7, (480, 640))
        speed = throughput(paths, args.images, args.batch, args.repeats)
        print(speed, flush=True)
        rss = "(not measured: --memory-images 0)\n"
        if args.memory_images:
            print(f"writing {args.memory_images} JPEGs of 32x32 with {args.memory_boxes} boxes ...", flush=True)
            paths = synthetic_coco(Path(tmp) / "memory", args.memory_images, args.memory_boxes, (32, 32),
                                   polygon_points=args.polygon_points)
            rss = memory(paths, args.batch)
    body = (f"## Data loading: `CocoDetectionDataModule` vs torchvision `CocoDetection` + transforms v2\n\n"
            f"`python -m benchmarks.data --images {args.images} --repeats {args.repeats} --memory-images "
            f"{args.memory_images} --memory-boxes {args.memory_boxes} --polygon-points {args.polygon_points}`. "
            f"Machine: {machine()}.\n\n"
            f"Throughput: decode + flip + clamp + sanitize + collate, batch {args.batch}, 2 workers, "
            f"{args.images} JPEGs of 640x480, median of {args.repeats} alternating epochs. Ours hands uint8 images "
            "to the model (ObjectDetector scales them on its device); the torchvision pipeline converts to float "
            f"in the workers, as its documentation writes it.\n\n{speed}\n"
            f"Memory: one epoch, 4 workers, batch {args.batch}, {args.memory_images} JPEGs of 32x32 with "
            f"{args.memory_boxes} boxes; with masks, each instance a polygon of {args.polygon_points} points (every "
            "50th a crowd region as uncompressed RLE), decoded to an N x 32 x 32 mask per image.\n\n"
            f"{rss}")
    return publish("data", body, args)


if __name__ == "__main__":
    main()
