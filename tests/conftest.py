import os
import signal

import pytest
import torch
from lightning.pytorch import Callback
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

torch.set_num_threads(2)


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


@pytest.fixture
def images():
    return torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_coco(tmp_path_factory):
    """A tiny COCO set from the shapes generator: 8 train / 5 val images (sparse category ids 3, 5, 9)."""
    from tasks.data.shapes import _generate_detection

    root = tmp_path_factory.mktemp("coco")
    _generate_detection(root, "train", 8, seed=10)
    _generate_detection(root, "val", 5, seed=11)
    return {"train_annotations": str(root / "train.json"), "train_images": str(root / "train"),
            "val_annotations": str(root / "val.json"), "val_images": str(root / "val")}


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    from tasks.data.shapes import _generate_classification

    root = tmp_path_factory.mktemp("folder")
    _generate_classification(root, "train", 6, seed=12)
    _generate_classification(root, "val", 3, seed=13)
    return {"train_dir": str(root / "train"), "val_dir": str(root / "val")}


@pytest.fixture(scope="session")
def colour_folder(tmp_path_factory):
    """A classification set that a few steps separate: 32-px images whose class is the one bright channel (red,
    green, blue); 8 training and 4 validation images per class."""
    import numpy as np
    from torchvision.io import encode_png, write_file

    root = tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(14)
    for split, count in (("train", 8), ("val", 4)):
        for channel, name in enumerate(["red", "green", "blue"]):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                image = rng.integers(0, 100, (3, 32, 32)).astype(np.uint8)
                image[channel] = rng.integers(150, 256, (32, 32))
                write_file(str(root / split / name / f"{i}.png"), encode_png(torch.from_numpy(image)))
    return {"train_dir": str(root / "train"), "val_dir": str(root / "val")}


@pytest.fixture(scope="session")
def large_object_coco(tiny_coco, tmp_path_factory):
    """``tiny_coco`` with another validation set: 5 images (an odd count) of one large shape each (with its exact
    mask), which a checkpoint of a few steps already finds now and then, so that its mAP is above zero."""
    import json

    import numpy as np

    from tasks.data.shapes import CATEGORIES, _write, draw_instances, segmentation

    root = tmp_path_factory.mktemp("large_objects")
    (root / "val").mkdir()
    rng = np.random.default_rng(15)
    ids = list(CATEGORIES)
    images, annotations = [], []
    for i in range(5):
        category = ids[i % len(ids)]
        image, [(x0, y0, x1, y1)], [mask] = draw_instances(rng, 96, 96, [CATEGORIES[category]], min_size=60,
                                                            max_size=90)
        _write(image, root / "val" / f"{i}.jpg")
        images.append({"id": 100 + i, "file_name": f"{i}.jpg", "height": 96, "width": 96})
        annotations.append({"id": i + 1, "image_id": 100 + i, "category_id": category, "iscrowd": 0,
                            "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0),
                            "segmentation": segmentation(CATEGORIES[category], mask)})
    categories = [{"id": k, "name": v} for k, v in CATEGORIES.items()]
    (root / "val.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                               "categories": categories}))
    return {**tiny_coco, "val_annotations": str(root / "val.json"), "val_images": str(root / "val")}


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


@pytest.fixture
def drawn_captions(monkeypatch):
    """The captions of every box torchvision draws from here on (the drawing itself goes on): what a picture is
    labelled with."""
    import torchvision.utils

    captions, draw = [], torchvision.utils.draw_bounding_boxes

    def recording(image, boxes, labels=None, **kwargs):
        captions.append(list(labels))
        return draw(image, boxes, labels, **kwargs)

    monkeypatch.setattr(torchvision.utils, "draw_bounding_boxes", recording)
    return captions
