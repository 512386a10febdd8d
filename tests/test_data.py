import json

import numpy as np
import pytest
import torch
from PIL import Image

from tasks import ImageClassifier, ObjectDetector
from tasks.data import CocoDetection, CocoDetectionDataModule, CocoIndex, ImageFolderDataModule, LabelMap
from tasks.data.coco import check_image_files
from tasks.data.images import CorruptImageError, image_size, read_rgb


def write_coco(path, images, annotations, categories):
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return str(path)


@pytest.fixture
def crowd_coco(tmp_path):
    (tmp_path / "img").mkdir()
    for i, size in [(1, (40, 50)), (2, (30, 30))]:
        Image.fromarray(np.zeros((*size, 3), np.uint8)).save(tmp_path / "img" / f"{i}.png")
    anns = [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [5, 5, 10, 20], "area": 150, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [0, 0, 30, 30], "area": 900, "iscrowd": 1}]
    images = [{"id": 1, "file_name": "1.png", "height": 40, "width": 50},
              {"id": 2, "file_name": "2.png", "height": 30, "width": 30}]  # image 2: no objects
    path = write_coco(tmp_path / "a.json", images, anns, [{"id": 7, "name": "b"}, {"id": 2, "name": "a"}])
    return path, str(tmp_path / "img")


def test_sparse_category_ids_map_to_contiguous_labels_and_images_without_objects_are_kept(crowd_coco):
    index = CocoIndex.from_file(crowd_coco[0])  # the file lists category 7 before category 2
    assert index.label_map.category_ids == (2, 7) and index.label_map.names == ("a", "b")
    assert index.labels.tolist() == [1, 0]  # category 7's box, then category 2's (crowd) box
    assert len(index) == 2
    _, target = CocoDetection(index, crowd_coco[1])[1]
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)


def test_crowd_boxes_are_left_out_of_training_targets_and_kept_for_evaluation(crowd_coco):
    index = CocoIndex.from_file(crowd_coco[0])
    _, train = CocoDetection(index, crowd_coco[1])[0]
    _, evaluation = CocoDetection(index, crowd_coco[1], keep_crowd=True)[0]
    assert train["labels"].tolist() == [1] and train["boxes"].tolist() == [[5, 5, 15, 25]]
    assert evaluation["iscrowd"].tolist() == [0, 1] and evaluation["area"].tolist() == [150, 900]


def test_files_that_are_not_coco_json_fail_naming_the_file(tmp_path):
    (tmp_path / "a.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"a.json: not a JSON file"):
        CocoIndex.from_file(str(tmp_path / "a.json"))
    (tmp_path / "b.json").write_text("[]")
    with pytest.raises(ValueError, match=r"b.json: a COCO file holds one JSON object, not a list"):
        CocoIndex.from_file(str(tmp_path / "b.json"))
    write_coco(tmp_path / "c.json", [], [], [{"id": 1, "name": "a"}, {"id": 1, "name": "b"}])
    with pytest.raises(ValueError, match=r"c.json: duplicate category ids \[1\]"):
        CocoIndex.from_file(str(tmp_path / "c.json"))


def test_unknown_category_is_an_error_naming_the_annotation(tmp_path):
    path = write_coco(tmp_path / "bad.json", [{"id": 1, "file_name": "x.png", "height": 4, "width": 4}],
                      [{"id": 42, "image_id": 1, "category_id": 9, "bbox": [0, 0, 2, 2], "iscrowd": 0}],
                      [{"id": 1, "name": "a"}])
    with pytest.raises(ValueError, match=r"annotation 42 has category_id 9, which is not in 'categories' \[1\]"):
        CocoIndex.from_file(path)


def test_horizontal_flip_moves_the_boxes(crowd_coco):
    dm = CocoDetectionDataModule(crowd_coco[0], crowd_coco[1], crowd_coco[0], crowd_coco[1], horizontal_flip=1.0,
                                 num_workers=0)
    dm.setup("fit")
    image, target = CocoDetection(dm.train_index, crowd_coco[1], dm.train_transforms())[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 40, 50)  # scaled to float by the model
    assert target["boxes"].tolist() == [[50 - 15, 5, 50 - 5, 25]]


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK"])
def test_gray_rgba_and_cmyk_jpeg_decode_to_the_rgb_of_pil(tmp_path, mode):
    rng = np.random.default_rng(0)
    path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    Image.fromarray(rng.integers(0, 255, (9, 7, 3), dtype=np.uint8)).convert(mode).save(path, quality=100)
    expected = np.asarray(Image.open(path).convert("RGB")).transpose(2, 0, 1)
    assert torch.equal(read_rgb(str(path)), torch.from_numpy(expected.copy()))


def test_16_bit_png_keeps_its_8_most_significant_bits(tmp_path):
    values = np.random.default_rng(0).integers(0, 65535, (9, 7), dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "x.png")
    decoded_by_pil = np.asarray(Image.open(tmp_path / "x.png")).astype(np.int64)  # PIL's convert("RGB") clips to 255
    assert (decoded_by_pil == values).all()
    image = read_rgb(str(tmp_path / "x.png"))
    assert image.dtype == torch.uint8
    for channel in image:
        assert torch.equal(channel, torch.from_numpy(decoded_by_pil >> 8).to(torch.uint8))


def test_data_module_gives_classes_and_names(tiny_coco, tiny_folder):
    det = CocoDetectionDataModule(**tiny_coco, num_workers=0)
    assert det.num_classes == 3 and det.categories == {3: "square", 5: "disk", 9: "triangle"}
    cls = ImageFolderDataModule(**tiny_folder, num_workers=0)
    assert cls.num_classes == 3 and cls.categories == {0: "disk", 1: "square", 2: "triangle"}


def test_building_the_data_modules_prints_nothing(tiny_coco, tiny_folder, capfd):
    """pycocotools' "loading annotations..." / "creating index..." do not reach the console."""
    CocoDetectionDataModule(**tiny_coco, num_workers=0).setup("fit")
    ImageFolderDataModule(**tiny_folder, num_workers=0)
    assert capfd.readouterr().out == ""


def test_the_label_map_orders_categories_by_id_and_refuses_what_is_out_of_range():
    labels = LabelMap.from_categories({9: "triangle", 3: "square", 5: "disk"})
    assert labels.category_ids == (3, 5, 9) and labels.names == ("square", "disk", "triangle")
    assert labels.labels([9, 3, 5, 5]).tolist() == [2, 0, 1, 1]
    assert labels.category_ids_of(torch.tensor([2, 0, 1])).tolist() == [9, 3, 5]
    with pytest.raises(ValueError, match=r"category ids \[4\] are not in the label map \[3, 5, 9\]"):
        labels.labels([3, 4])
    with pytest.raises(ValueError, match=r"label 3 is out of range 0..2"):  # no clamping to 9
        labels.category_ids_of(torch.tensor([0, 3]))
    behind_background = labels.with_offset(1)  # Faster R-CNN: class 0 is the background
    assert behind_background.to_model(torch.tensor([0, 2])).tolist() == [1, 3]
    assert behind_background.category_ids_of_model(torch.tensor([1, 3])).tolist() == [3, 9]
    with pytest.raises(ValueError, match=r"model class 0 is out of range 1..3"):
        behind_background.category_ids_of_model(torch.tensor([0]))
    with pytest.raises(ValueError, match=r"model class 4 is out of range 1..3"):
        behind_background.category_ids_of_model(torch.tensor([4]))
    assert LabelMap.from_dict(behind_background.to_dict()) == behind_background


def test_missing_paths_fail_naming_the_key(tiny_coco):
    with pytest.raises(FileNotFoundError, match="data.val_images: 'nowhere' does not exist"):
        CocoDetectionDataModule(**(tiny_coco | {"val_images": "nowhere"}))
    with pytest.raises(ValueError, match="or none of them for the embedded shapes set"):
        CocoDetectionDataModule(train_annotations=tiny_coco["train_annotations"])


def one_image_coco(tmp_path, annotations, images=None):
    images = images or [{"id": 1, "file_name": "1.png", "height": 40, "width": 50}]
    anns = [{"id": i + 1, "image_id": 1, "category_id": 1, "iscrowd": 0} | a for i, a in enumerate(annotations)]
    return write_coco(tmp_path / "a.json", images, anns, [{"id": 1, "name": "a"}])


def test_boxes_are_fitted_to_the_image_file_with_summaries(tmp_path, caplog):
    (tmp_path / "img").mkdir()
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(tmp_path / "img" / "1.png")
    path = one_image_coco(tmp_path, [{"bbox": [5, 5, 10, 10]}, {"bbox": [5, 5, 0, 10]}, {"bbox": [5, 5, 10, -1]},
                                     {"bbox": [45, 30, 20, 20]}, {"bbox": [60, 5, 10, 10]}],
                          [{"id": 1, "file_name": "1.png", "height": 20, "width": 20}])  # the JSON size is wrong
    with caplog.at_level("WARNING", logger="tasks"):
        index = check_image_files(CocoIndex.from_file(path), str(tmp_path / "img"), "val_images", False)
    assert index.sizes.tolist() == [[40, 50]]  # the file wins
    assert index.boxes.tolist() == [[5, 5, 15, 15], [45, 30, 50, 40]]  # clipped to 50x40, not to 20x20
    assert "dropped 2 of 5 boxes with zero or negative width or height" in caplog.text
    assert "clipped 1 boxes partly outside their image, dropped 1 entirely outside" in caplog.text
    assert "1 images have a width/height in the annotations that differs from the file" in caplog.text
    assert "json (20, 20) vs file (40, 50)" in caplog.text


@pytest.mark.parametrize("annotations, images, message", [
    ([{"bbox": [1, float("nan"), 3, 3]}], None, r"annotations \[1\] have non-finite bbox coordinates"),
    ([{"bbox": [1, 1, 3, 3], "image_id": 7}], None, "annotation 1 refers to image_id 7, which has no entry"),
    ([{"bbox": [1, 1, 3, 3]}, {"bbox": [1, 1, 3, 3], "id": 1}], None, r"duplicate annotation ids \[1\]"),
    ([], [{"id": 1, "file_name": "1.png"}, {"id": 1, "file_name": "2.png"}], r"duplicate image ids \[1\]"),
])
def test_broken_annotation_files_fail_naming_the_ids(tmp_path, annotations, images, message):
    with pytest.raises(ValueError, match=message):
        CocoIndex.from_file(one_image_coco(tmp_path, annotations, images))


def test_missing_image_files_fail_with_the_first_paths_or_are_skipped(crowd_coco, tmp_path, caplog):
    path, images = crowd_coco
    (tmp_path / "img" / "2.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"data.val_images: 1 of 2 listed images are missing, first: \[.*2.png"):
        CocoDetectionDataModule(path, images, path, images)
    with caplog.at_level("WARNING", logger="tasks"):
        dm = CocoDetectionDataModule(path, images, path, images, skip_missing_images=True, num_workers=0)
    assert dm.val_index.image_ids.tolist() == [1] and dm.val_index.boxes.shape == (2, 4)
    assert "dropping them (data.skip_missing_images)" in caplog.text


def truncated(path):
    """Cut an image file in half: its header still reads, its body no longer decodes."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_truncated_and_corrupt_files_fail_naming_their_path(tmp_path, suffix):
    path = tmp_path / f"x{suffix}"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    truncated(path)
    with pytest.raises(CorruptImageError, match=rf"cannot decode image '.*x\{suffix}'"):
        read_rgb(str(path))
    (tmp_path / "y.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    with pytest.raises(CorruptImageError, match=r"cannot read image header of '.*y\.jpg'"):
        image_size(tmp_path / "y.jpg")


@pytest.fixture
def coco_with_bad_images(tmp_path):
    """Six images: 2.jpg truncated (its header reads, its body does not decode), 5.jpg not an image at all."""
    (tmp_path / "img").mkdir()
    rng = np.random.default_rng(0)
    for i in range(1, 7):
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(tmp_path / "img" / f"{i}.jpg")
    truncated(tmp_path / "img" / "2.jpg")
    (tmp_path / "img" / "5.jpg").write_bytes(b"not a jpeg")
    images = [{"id": i, "file_name": f"{i}.jpg", "height": 40, "width": 50} for i in range(1, 7)]
    anns = [{"id": i, "image_id": i, "category_id": 1, "bbox": [5, 5, 10, 10], "iscrowd": 0} for i in range(1, 7)]
    path = write_coco(tmp_path / "a.json", images, anns, [{"id": 1, "name": "a"}])
    return {"train_annotations": path, "train_images": str(tmp_path / "img"), "val_annotations": path,
            "val_images": str(tmp_path / "img")}


def test_corrupt_images_fail_naming_the_file_unless_skipped(coco_with_bad_images, caplog):
    with pytest.raises(CorruptImageError, match=r"data.val_images: 1 of 6 listed images cannot be read \(cannot "
                       r"read image header of '.*5.jpg'.*set data.skip_corrupt_images: true"):
        CocoDetectionDataModule(**coco_with_bad_images, num_workers=0)
    with caplog.at_level("WARNING", logger="tasks"):
        dm = CocoDetectionDataModule(**coco_with_bad_images, num_workers=0, skip_corrupt_images=True)
    assert dm.val_index.image_ids.tolist() == [1, 2, 3, 4, 6]  # 5.jpg dropped at startup
    assert "dropping them (data.skip_corrupt_images)" in caplog.text

    strict = CocoDetectionDataModule(**coco_with_bad_images, num_workers=0, skip_corrupt_images=True)
    strict.skip_corrupt_images = False
    with pytest.raises(CorruptImageError, match=r"cannot decode image '.*2.jpg'.*skip_corrupt_images: true"):
        list(strict.val_dataloader())


@pytest.mark.parametrize("num_workers", [0, 2])
def test_skipped_corrupt_images_leave_their_batch_and_are_counted(coco_with_bad_images, num_workers, caplog):
    dm = CocoDetectionDataModule(**coco_with_bad_images, batch_size=2, num_workers=num_workers,
                                 skip_corrupt_images=True)
    dm.setup("fit")
    with caplog.at_level("WARNING", logger="tasks"):
        batches = list(dm.val_dataloader())
    image_ids = [t["image_id"] for _, targets in batches for t in targets]
    assert image_ids == [1, 3, 4, 6]  # 2.jpg is left out of its batch, 5.jpg was dropped at startup
    assert [len(images) for images, _ in batches] == [1, 2, 1]
    assert dm.skipped_images == 1
    if num_workers == 0:  # worker processes log to their own stderr
        assert "cannot decode image" in caplog.text and "skipped (data.skip_corrupt_images), 1 so far" in caplog.text
    assert len(list(dm.train_dataloader())) == 3 and dm.skipped_images == 2


def test_a_batch_of_only_skipped_images_is_none_and_trains_as_a_zero_step(coco_with_bad_images):
    from tasks.data.base import SkipNone
    from tasks.data.coco import collate

    assert SkipNone(collate)([None, None]) is None
    model = ObjectDetector(backbone="resnet18", num_classes=1, min_size=64, max_size=64)
    loss = model.training_step(None, 0)
    assert loss.item() == 0.0 and loss.requires_grad
    assert model.validation_step(None, 0) is None and model.test_step(None, 0) is None  # and evaluation skips it
    assert model.predict_step(None, 0) == []
    assert ImageClassifier(backbone="resnet18", num_classes=3).predict_step(None, 0).shape == (0, 3)


def test_exif_rotated_jpeg_loads_upright_like_pil(tmp_path):
    from PIL import ImageOps

    array = np.zeros((20, 40, 3), np.uint8)
    array[:, :10] = 255  # a white band on the left of a landscape image
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(array).save(tmp_path / "rotated.jpg", exif=exif, quality=100)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(tmp_path / "rotated.jpg")).convert("RGB"))
    image = read_rgb(str(tmp_path / "rotated.jpg"))
    assert image.shape == (3, 40, 20) and expected.shape == (40, 20, 3)
    assert (image.permute(1, 2, 0).float() - torch.from_numpy(expected.copy()).float()).abs().mean() < 3


def test_after_augmentation_every_box_is_inside_its_image_with_positive_area():
    from hypothesis import given, settings
    from hypothesis import strategies as st
    from torchvision import tv_tensors

    coordinate = st.floats(-50, 150, allow_nan=False)

    @settings(max_examples=60, deadline=None)
    @given(h=st.integers(8, 100), w=st.integers(8, 100), flip=st.sampled_from([0.0, 1.0]),
           boxes=st.lists(st.tuples(coordinate, coordinate, coordinate, coordinate), max_size=6))
    def check(h, w, flip, boxes):
        dm = CocoDetectionDataModule.__new__(CocoDetectionDataModule)  # just its transforms
        dm.horizontal_flip = flip
        xyxy = torch.tensor([[min(a, c), min(b, d), max(a, c), max(b, d)] for a, b, c, d in boxes]).reshape(-1, 4)
        target = {"boxes": tv_tensors.BoundingBoxes(xyxy, format="XYXY", canvas_size=(h, w)),
                  "labels": torch.arange(len(boxes))}
        image, out = dm.train_transforms()(tv_tensors.Image(torch.zeros(3, h, w, dtype=torch.uint8)), target)
        b = out["boxes"]
        assert image.shape == (3, h, w) and len(b) == len(out["labels"])
        assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 2] <= w).all() and (b[:, 3] <= h).all()
        assert ((b[:, 2] - b[:, 0]) > 0).all() and ((b[:, 3] - b[:, 1]) > 0).all()

    check()
