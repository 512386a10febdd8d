"""What several test modules share: models with non-trivial statistics, comparisons of detections, tiny configs and
data (fixtures are in conftest.py). ``tests/`` is on the path (pyproject's ``pythonpath``): ``from helpers import``."""

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import yaml
from lightning.pytorch import Callback, LightningDataModule
from PIL import Image, ImageOps
from torch import nn
from torchvision.models import detection
from torchvision.ops import FrozenBatchNorm2d

import resnext_backbones as rb

REPO = Path(__file__).resolve().parents[1]


def randomize_norm_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm / FrozenBatchNorm non-trivial statistics and affine parameters, so that equality
    tests exercise them (the identity init would hide a misplaced or missing norm)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)):
                n = m.running_mean.numel()
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
    return model


def assert_same_detections(got, want, box_tolerance: float, score_tolerance: float):
    """The same detections (dicts of ``boxes``, ``scores``, ``labels``, maybe ``masks``), in any order (scores equal
    to 1e-7 may swap places): the detections pair up one to one, each pair of one label, boxes within
    ``box_tolerance`` in each coordinate (relative to the coordinate beyond 1 pixel: float32 rounding amplified
    through the heads), scores within ``score_tolerance``, mask probabilities within it plus the pair's box difference
    in pixels. The pairing is a maximum matching (augmenting paths, closest partners tried first), so near-duplicates
    (boxes clipped to the same image corner) cannot leave one another without a partner, as a first-come search
    did."""
    assert len(got["boxes"]) == len(want["boxes"])
    box_scale = box_tolerance * want["boxes"].abs().amax(1).clamp(min=1.0)
    cost = torch.maximum((got["boxes"][None] - want["boxes"][:, None]).abs().amax(-1) / box_scale[:, None],
                         (got["scores"][None] - want["scores"][:, None]).abs() / score_tolerance)
    cost[want["labels"][:, None] != got["labels"][None]] = float("inf")
    candidates = [[j for j in row.argsort(stable=True).tolist() if row[j] <= 1] for row in cost]
    partner = [-1] * len(got["boxes"])  # got detection -> its expected one

    def pair(i: int, tried: set) -> bool:  # Kuhn's augmenting path from expected detection i
        for j in candidates[i]:
            if j not in tried:
                tried.add(j)
                if partner[j] < 0 or pair(partner[j], tried):
                    partner[j] = i
                    return True
        return False

    for i in range(len(want["boxes"])):
        if not pair(i, set()):
            j = int(cost[i].argmin())
            raise AssertionError(f"expected detection {i} (label {int(want['labels'][i])}, box "
                                 f"{want['boxes'][i].tolist()}, score {float(want['scores'][i]):.6f}) has no partner "
                                 f"within tolerance; nearest: box {got['boxes'][j].tolist()}, score "
                                 f"{float(got['scores'][j]):.6f}, cost {float(cost[i, j]):.3g}")
    matched = torch.empty(len(partner), dtype=torch.int64)
    matched[torch.tensor(partner)] = torch.arange(len(partner))  # expected detection -> its got one
    if "masks" in want:
        assert len(want["masks"]) == len(want["boxes"]) and want["masks"].amax() > 0.5  # masks with pixels to compare
        # a pixel on a pasted mask's edge is inside one box and outside (exactly 0) the other when a coordinate
        # moves across a pixel boundary by float rounding: allowed there, and for at most 1 in 10^5 pixels
        got_masks, want_masks = got["masks"][matched].float(), want["masks"].float()
        # pasting samples a mask at its box: a box d pixels apart moves the values by about their slope (below 1 per
        # pixel for boxes wider than the mask's 28 cells) times d, so each pair's box difference widens its tolerance
        box_shift = (got["boxes"][matched] - want["boxes"]).abs().amax(1)
        off = (got_masks - want_masks).abs() > (score_tolerance + box_shift).view(-1, *[1] * (want_masks.dim() - 1))
        assert int(off.sum()) <= want_masks.numel() // 100_000, f"{int(off.sum())} mask pixels differ"
        assert bool((torch.minimum(got_masks, want_masks)[off] == 0).all()), "mask probabilities differ"


def uncompressed_rle(mask) -> dict:
    """``mask`` (H x W, 0/1) as COCO stores crowd regions: an uncompressed RLE, the lengths of alternating runs of 0s
    and 1s down the columns, starting with 0s. (pycocotools writes only compressed RLE; the tests check that it
    decodes this one to ``mask``.)"""
    import numpy as np

    flat = np.asarray(mask, dtype=np.uint8).flatten(order="F")
    edges = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], edges, [len(flat)]])).tolist()
    return {"size": list(np.shape(mask)), "counts": ([0] if flat[0] else []) + runs}


def classification_args(tmp_path, folder, *extra, backbone="resnet18", image_size=32):
    return ["fit", "--model", "tasks.ImageClassifier", "--model.backbone", backbone,
            "--data", "tasks.data.ImageFolderDataModule", "--data.train_dir", folder["train_dir"],
            "--data.val_dir", folder["val_dir"], "--data.image_size", str(image_size), "--data.batch_size", "6",
            "--data.num_workers", "0", "--trainer.default_root_dir", str(tmp_path),
            "--trainer.enable_progress_bar", "false", *extra]


class KillAtStep(Callback):
    """SIGKILL this process when the training batch that makes ``global_step == step`` ends: no cleanup and no
    checkpoint of that step, as when a machine is lost. (``conftest.KillAtStep`` with ``tests/`` on the path.)"""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


SMALL_HEADS = {"box_batch_size_per_image": 32, "rpn_pre_nms_top_n_train": 200, "rpn_post_nms_top_n_train": 100,
               "rpn_pre_nms_top_n_test": 100, "rpn_post_nms_top_n_test": 50, "box_score_thresh": 0.0}


def trainer_config(tmp_path, writer: str, output: str) -> dict:
    """The tiny CLI runs' trainer: one CPU epoch, CSV logs, last.ckpt in ``tmp_path/ckpt``, and the prediction
    ``writer`` callback (writing to ``output``, pictures to ``tmp_path/drawn``) last, as in the shipped configs."""
    return {"accelerator": "cpu", "devices": 1, "max_epochs": 1, "default_root_dir": str(tmp_path),
            "enable_model_summary": False, "enable_progress_bar": False, "log_every_n_steps": 1,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                       "init_args": {"save_dir": str(tmp_path), "name": "logs"}},
            "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                           "init_args": {"dirpath": str(tmp_path / "ckpt"), "save_last": True}},
                          {"class_path": writer, "init_args": {"output": output, "draw_dir": str(tmp_path / "drawn")}}]}


def detection_config(tmp_path, data, **model):
    config = {
        "seed_everything": 0,
        "model": {"class_path": "tasks.ObjectDetector", "init_args": {
            "backbone": "resnet18", "norm": "bn", "trainable_stages": 5, "min_size": 64, "max_size": 64,
            "anchor_size": 16, "warmup_steps": 2, "detector_kwargs": SMALL_HEADS, **model}},
        "data": {"class_path": "tasks.data.CocoDetectionDataModule",
                 "init_args": {**data, "batch_size": 2, "num_workers": 0}},
        "trainer": trainer_config(tmp_path, "tasks.CocoResultsWriter", str(tmp_path / "predictions.json")),
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def last_metrics(log_dir: Path) -> dict:
    rows = list(csv.DictReader(open(sorted(log_dir.glob("logs/version_*/metrics.csv"))[-1])))
    merged = {}
    for row in rows:
        merged.update({k: float(v) for k, v in row.items() if v not in ("", None)})
    return merged


def run_cli(*args, cwd):
    """``python -m tasks ARGS`` of this checkout (first on its ``PYTHONPATH``: an editable install may point at
    another) in a process of its own, in ``cwd``; fails the test with its stderr on an error."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    result = subprocess.run([sys.executable, "-m", "tasks", *args], cwd=cwd, capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def run_on_two_processes(args):
    """The command under DDP on two CPU processes (Lightning launches them: a subprocess of its own); ``args[2]`` is
    the config, whose folder the command runs in."""
    return run_cli(*args, "--trainer.devices", "2", "--trainer.strategy", "ddp", cwd=Path(args[2]).parent)


def odd_images(root):
    """Images as users have them: gray, RGBA, CMYK JPEG, 16-bit PNG, EXIF-rotated JPEG; the expected decoding of each,
    by PIL (16-bit: its 8 high bits, as in training)."""
    rng = np.random.default_rng(1)
    root.mkdir(parents=True, exist_ok=True)
    rgb = Image.fromarray(rng.integers(0, 255, (9, 7, 3), dtype=np.uint8))
    rgb.convert("L").save(root / "gray.png")
    rgb.convert("RGBA").save(root / "rgba.png")
    rgb.convert("CMYK").save(root / "cmyk.jpg", quality=100)
    Image.fromarray(rng.integers(0, 65535, (9, 7), dtype=np.uint16)).save(root / "deep.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 20 high, 40 wide; shown rotated: 40 high, 20 wide
    Image.fromarray(rng.integers(0, 255, (20, 40, 3), dtype=np.uint8)).save(root / "rotated.jpg", exif=exif,
                                                                           quality=100)
    expected = {name: np.asarray(ImageOps.exif_transpose(Image.open(root / name)).convert("RGB")).transpose(2, 0, 1)
                for name in ("gray.png", "rgba.png", "cmyk.jpg", "rotated.jpg")}
    expected["deep.png"] = np.repeat((np.asarray(Image.open(root / "deep.png")).astype(np.int64) >> 8)[None], 3, 0)
    return expected


ARCHITECTURES = ["faster_rcnn", "retinanet", "fcos", "mask_rcnn"]  # torchvision's detectors, by the tasks' names
DETECTORS = {"faster_rcnn": detection.FasterRCNN, "mask_rcnn": detection.MaskRCNN, "retinanet": detection.RetinaNet,
             "fcos": detection.FCOS}


def bare_detector(architecture, score_thresh=0.0, min_size=160, max_size=224, in_channels=3):
    """A torchvision detector on ``rb.resnext_fpn`` as a user builds it in their own code, random weights (and norm
    statistics), eval mode. Shorter side resized to 160 px, longer at most 224: the smallest sizes at which RetinaNet's
    and FCOS's coarsest level (stride 128) keeps 2 cells a side, as the dynamic export needs. Images of
    ``in_channels`` channels, normalised by the trunk's mean and std for them (``normalization_for_channels``)."""
    torch.manual_seed(0)
    rcnn = architecture.endswith("rcnn")
    backbone = rb.resnext_fpn("resnet18", norm="bn", trainable_stages=5, in_channels=in_channels,
                              **({} if rcnn else {"returned_features": ("c3", "c4", "c5"), "extra_blocks": "p6p7"}))
    thresholds = {"box_score_thresh": score_thresh, "box_detections_per_img": 50} if rcnn else \
        {"score_thresh": score_thresh, "detections_per_img": 50}
    trunk_normalization = backbone.body.normalization  # the trunk's own, one mean and std per input channel
    normalization = {} if in_channels == 3 else {
        "image_mean": list(trunk_normalization["mean"]), "image_std": list(trunk_normalization["std"])}
    model = DETECTORS[architecture](backbone, num_classes=4, min_size=min_size, max_size=max_size, **thresholds,
                                    **normalization)
    return randomize_norm_stats(model).eval()


class Classifier(nn.Module):
    """A classifier as a user writes one around an rb trunk."""

    def __init__(self, classes=4, in_channels=3):
        super().__init__()
        self.trunk = rb.resnext("resnet18", returned_features=("c5",), in_channels=in_channels)
        self.fc = nn.Linear(512, classes)

    def forward(self, images):
        return self.fc(self.trunk(images)["c5"].mean((2, 3)))


class EightClassTensors(LightningDataModule):
    """A user's own data module: tensors, ``num_classes`` and no ``categories`` (labels are their own ids)."""

    num_classes = 8

    def __init__(self, images: int = 16) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(21)
        self.images = torch.rand(images, 3, 32, 32, generator=generator)
        self.labels = torch.arange(images) % self.num_classes

    def val_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(self.images, self.labels), batch_size=6)
