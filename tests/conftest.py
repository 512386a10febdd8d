import os

import pytest
import torch

# The suite's threads share the machine's cores (2 in CI): under pytest-xdist (-n N) each of the N workers takes its
# share, so that the workers do not oversubscribe the cores.
torch.set_num_threads(max(1, (os.cpu_count() or 2) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))


@pytest.fixture(scope="session", autouse=True)
def private_caches(tmp_path_factory):
    """The embedded data set and the weights cache in temporary folders for the whole session: no test writes into the
    home folder's caches or reads what an earlier run left there (tests that need their own set them again)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RESNEXT_BACKBONES_DATA", str(tmp_path_factory.mktemp("data")))
        patch.setenv("RESNEXT_BACKBONES_CACHE", str(tmp_path_factory.mktemp("weights")))
        yield


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
