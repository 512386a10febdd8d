"""SegmentationDataModule: masks paired by stem, palette PNGs as indices, ADE20K's reduce_zero_label, masks moving
with their images, ignore_index padding, errors naming the file; COCO instances rasterised as pycocotools does."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from tasks.data import SegmentationDataModule, coco_semantic_masks
from tasks.data.segmentation import SegmentationFiles, read_classes, read_mask

IGNORE = 255


def write_pair(root, name, image, mask, palette=False):
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(root / "images" / f"{name}.png")
    picture = Image.fromarray(mask, mode="P" if palette else "L")
    if palette:
        picture.putpalette([0, 0, 0, 200, 10, 10, 10, 200, 10, 10, 10, 200] + [7] * (3 * 252))
    picture.save(root / "masks" / f"{name}.png")


@pytest.fixture
def folder(tmp_path):
    """Three image/mask pairs of 3 classes (one mask a palette PNG, one with ignore_index pixels), 20x30 px."""
    rng = np.random.default_rng(0)
    for i in range(3):
        mask = rng.integers(0, 3, (20, 30)).astype(np.uint8)
        if i == 2:
            mask[:4] = IGNORE
        write_pair(tmp_path, f"{i:02d}", rng.integers(0, 256, (20, 30, 3)).astype(np.uint8), mask, palette=i == 1)
    return tmp_path


def module(folder, **kwargs):
    paths = {"train_images": str(folder / "images"), "train_masks": str(folder / "masks"),
             "val_images": str(folder / "images"), "val_masks": str(folder / "masks")}
    return SegmentationDataModule(**{**paths, "classes": ["a", "b", "c"], "num_workers": 0, "batch_size": 2,
                                     **kwargs})


def test_a_palette_png_reads_as_its_indices_not_its_colours(folder):
    mask = read_mask(folder / "masks" / "01.png")
    with Image.open(folder / "masks" / "01.png") as image:
        assert image.mode == "P"
        want = np.asarray(image)  # PIL's indices, the file's own
    assert mask.dtype == torch.uint8 and set(np.unique(want)) == {0, 1, 2}
    assert np.array_equal(mask.numpy(), want)


def test_images_and_masks_pair_by_stem_and_evaluation_batches_pad_masks_with_ignore_index(folder):
    Image.fromarray(np.zeros((30, 30, 3), np.uint8)).save(folder / "images" / "03.png")  # larger image
    Image.fromarray(np.ones((30, 30), np.uint8)).save(folder / "masks" / "03.png")
    data = module(folder)
    assert data.categories == {0: "a", 1: "b", 2: "c"} and len(data.val[0]) == 4
    images, masks, sizes = next(iter(data.val_dataloader()))
    assert images.shape == (2, 3, 20, 30) and masks.dtype == torch.uint8 and sizes == [(20, 30), (20, 30)]
    want = np.asarray(Image.open(folder / "masks" / "00.png"))
    assert np.array_equal(masks[0].numpy(), want)
    *_, (images, masks, sizes) = iter(data.val_dataloader())
    assert images.shape == (2, 3, 30, 30) and bool((masks[0, 20:] == IGNORE).all()) and bool((masks[1] == 1).all())
    assert sizes == [(20, 30), (30, 30)]  # each image's own, for the model to predict it on its own pixels


def test_reduce_zero_label_ignores_zero_and_shifts_the_rest_down():
    mask = torch.tensor([[0, 1, 2, 3, IGNORE]], dtype=torch.uint8)
    files = SegmentationFiles(None, [], num_classes=3, reduce_zero_label=True)
    assert files._labels(mask, "m.png").tolist() == [[IGNORE, 0, 1, 2, IGNORE]]


def test_training_crops_move_the_mask_with_its_image_and_pad_it_with_ignore_index(folder):
    data = module(folder, crop_size=[24, 40], train_transforms=[
        v2.RandomHorizontalFlip(p=1.0),
        v2.RandomCrop([24, 40], pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE})])
    dataset = data._dataset(data.train, data.train_transforms())
    image, mask = dataset[0]
    original = np.asarray(Image.open(folder / "masks" / "00.png"))
    assert image.shape == (3, 24, 40) and mask.shape == (24, 40)
    # the 20x30 pair flipped, somewhere in the 24x40 crop; the rest padding: image 0, mask ignore_index
    inside = mask != IGNORE
    rows, columns = np.nonzero(inside.numpy())
    top, left = rows.min(), columns.min()
    assert inside.sum() == 20 * 30
    assert np.array_equal(mask[top:top + 20, left:left + 30].numpy(), original[:, ::-1])
    assert bool((image[:, ~inside] == 0).all())


def test_the_default_training_crop_is_crop_size_padded_with_ignore_index_where_the_image_is_smaller(folder):
    """The shorter side resized to 16-64 px, a 32-px crop: some draws are smaller than the crop, and padded."""
    data = module(folder, crop_size=32)
    dataset = data._dataset(data.train, data.train_transforms())
    padded = 0
    for seed in range(8):
        torch.manual_seed(seed)
        image, mask = dataset[0]
        assert image.shape == (3, 32, 32) and mask.dtype == torch.uint8
        assert set(mask.unique().tolist()) <= {0, 1, 2, IGNORE}  # the mask's labels (0's mask has no 255)
        padded += bool((mask == IGNORE).any())
    assert 0 < padded < 8


def test_errors_name_the_file_at_fault(folder, tmp_path_factory):
    Image.fromarray(np.full((20, 30), 7, np.uint8)).save(folder / "masks" / "01.png")
    with pytest.raises(ValueError, match=r"masks/01.png' has values \[7\] that are neither a class"):
        module(folder)._dataset(module(folder).val, None)[1]
    Image.fromarray(np.zeros((10, 30), np.uint8)).save(folder / "masks" / "01.png")
    with pytest.raises(ValueError, match=r"masks/01.png' is 10x30 pixels but its image .*images/01.png' is 20x30"):
        module(folder)._dataset(module(folder).val, None)[1]
    Image.fromarray(np.zeros((10, 30, 3), np.uint8)).save(folder / "masks" / "01.png")
    with pytest.raises(ValueError, match=r"masks/01.png' is a RGB image"):
        read_mask(folder / "masks" / "01.png")
    (folder / "masks" / "01.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"images/01.png' has no mask .*masks/01.png'.*skip_missing"):
        module(folder)
    assert len(module(folder, skip_missing=True).val[0]) == 2
    with pytest.raises(ValueError, match="data.ignore_index=1 is one of the 3 classes"):
        module(folder, ignore_index=1)


def test_classes_come_from_a_list_or_a_json_or_yaml_file(tmp_path):
    (tmp_path / "list.json").write_text(json.dumps(["sky", "road"]))
    (tmp_path / "map.yaml").write_text("classes:\n  0: sky\n  1: road\n")
    assert read_classes(str(tmp_path / "list.json")) == read_classes(str(tmp_path / "map.yaml")) == ["sky", "road"]
    (tmp_path / "gap.yaml").write_text("0: sky\n2: road\n")
    with pytest.raises(ValueError, match="must be 0..N-1"):
        read_classes(str(tmp_path / "gap.yaml"))


def test_the_shipped_ade20k_classes_are_its_150_names_in_label_order_and_load_as_the_data_classes(folder):
    from pathlib import Path

    path = Path(__file__).parents[3] / "configs" / "ade20k" / "classes.json"
    names = json.loads(path.read_text())["classes"]  # read here by json, not by the code under test
    assert len(names) == len(set(names)) == 150 and all(n and n == n.strip() for n in names)
    # ADE20K's objectInfo150 order, by the ends and a few rows inside (mmsegmentation's ADE20KDataset.METAINFO)
    assert names[:4] == ["wall", "building", "sky", "floor"] and names[-3:] == ["glass", "clock", "flag"]
    assert (names[7], names[12], names[20], names[100]) == ("bed", "person", "car", "poster")
    data = module(folder, classes=str(path))
    assert data.num_classes == 150 and [data.label_map.categories[i] for i in range(150)] == names


def test_coco_instances_rasterise_to_the_masks_pycocotools_decodes(tiny_coco, tmp_path):
    from pycocotools.coco import COCO

    names = coco_semantic_masks(tiny_coco["val_annotations"], str(tmp_path / "masks"))
    coco = COCO(tiny_coco["val_annotations"])
    order = {c: k + 1 for k, c in enumerate(sorted(coco.getCatIds()))}
    assert names == ["background", *[coco.cats[c]["name"] for c in sorted(coco.getCatIds())]]
    labelled = 0
    for image in coco.dataset["images"]:
        want = np.zeros((image["height"], image["width"]), np.uint8)
        for annotation in coco.loadAnns(coco.getAnnIds(imgIds=image["id"])):  # file order: later ones win
            want[coco.annToMask(annotation) > 0] = order[annotation["category_id"]]
        got = np.asarray(Image.open(tmp_path / "masks" / image["file_name"].replace(".jpg", ".png")))
        assert np.array_equal(got, want)
        labelled += int((want > 0).sum())
    assert labelled > 0
    data = SegmentationDataModule(train_images=tiny_coco["val_images"], train_masks=str(tmp_path / "masks"),
                                  val_images=tiny_coco["val_images"], val_masks=str(tmp_path / "masks"),
                                  classes=str(tmp_path / "masks" / "classes.json"), num_workers=0)
    assert data.num_classes == 4
