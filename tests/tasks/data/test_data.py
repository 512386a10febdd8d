import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import odd_images
from PIL import Image, ImageOps

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

    array = np.zeros((20, 40, 3), np.uint8)
    array[:, :10] = 255  # a white band on the left of a landscape image
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(array).save(tmp_path / "rotated.jpg", exif=exif, quality=100)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(tmp_path / "rotated.jpg")).convert("RGB"))
    image = read_rgb(str(tmp_path / "rotated.jpg"))
    assert image.shape == (3, 40, 20) and expected.shape == (40, 20, 3)
    assert (image.permute(1, 2, 0).float() - torch.from_numpy(expected.copy()).float()).abs().mean() < 3


def test_after_augmentation_every_box_is_inside_its_image_with_positive_area(tiny_coco):
    from hypothesis import given, settings
    from hypothesis import strategies as st
    from torchvision import tv_tensors

    coordinate = st.floats(-50, 150, allow_nan=False)
    modules = {flip: CocoDetectionDataModule(**tiny_coco, horizontal_flip=flip) for flip in (0.0, 1.0)}

    @settings(max_examples=60, deadline=None)
    @given(h=st.integers(8, 100), w=st.integers(8, 100), flip=st.sampled_from([0.0, 1.0]),
           boxes=st.lists(st.tuples(coordinate, coordinate, coordinate, coordinate), max_size=6))
    def check(h, w, flip, boxes):
        dm = modules[flip]
        xyxy = torch.tensor([[min(a, c), min(b, d), max(a, c), max(b, d)] for a, b, c, d in boxes]).reshape(-1, 4)
        target = {"boxes": tv_tensors.BoundingBoxes(xyxy, format="XYXY", canvas_size=(h, w)),
                  "labels": torch.arange(len(boxes))}
        image, out = dm.train_transforms()(tv_tensors.Image(torch.zeros(3, h, w, dtype=torch.uint8)), target)
        b = out["boxes"]
        assert image.shape == (3, h, w) and len(b) == len(out["labels"])
        assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 2] <= w).all() and (b[:, 3] <= h).all()
        assert ((b[:, 2] - b[:, 0]) > 0).all() and ((b[:, 3] - b[:, 1]) > 0).all()

    check()


# -- images to predict on, without annotations


def touch_images(root, names):
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((6, 8, 3), np.uint8)).save(root / name)


def test_predict_images_name_a_folder_recursively_a_glob_a_list_file_or_one_image(tmp_path):
    from tasks.data.image_files import list_images

    touch_images(tmp_path / "new", ["b.png", "a.jpg", "deep/er/c.PNG", "deep/d.webp"])
    (tmp_path / "new" / "notes.txt").write_text("not an image")
    folder = list_images(str(tmp_path / "new"), "data.predict_images")
    assert folder.root == tmp_path / "new"
    assert folder.file_names == ["a.jpg", "b.png", "deep/d.webp", "deep/er/c.PNG"]  # sorted paths, no notes.txt
    glob = list_images(str(tmp_path / "new" / "**" / "*.png"), "data.predict_images")
    assert glob.root == tmp_path / "new" and glob.file_names == ["b.png"]  # the glob is case-sensitive
    glob = list_images(str(tmp_path / "new" / "deep" / "*"), "data.predict_images")
    assert glob.root == tmp_path / "new" / "deep" and glob.file_names == ["d.webp"]  # files only, no folder "er"
    (tmp_path / "list.txt").write_text(f"# to check\nnew/b.png\n\n  {tmp_path / 'new' / 'a.jpg'}  \nnew/gone.png\n")
    listed = list_images(str(tmp_path / "list.txt"), "data.predict_images")
    assert listed.root == tmp_path  # relative lines are relative to the list file; a missing file fails when read
    assert listed.file_names == ["new/b.png", "new/a.jpg", "new/gone.png"]
    one = list_images(str(tmp_path / "new" / "deep" / "d.webp"), "data.predict_images")
    assert one.root == tmp_path / "new" / "deep" and one.file_names == ["d.webp"]


def test_predict_images_that_name_nothing_fail_naming_the_setting(tmp_path):
    from tasks.data.image_files import list_images

    with pytest.raises(FileNotFoundError, match=r"data.predict_images: '.*nowhere' is neither a folder, a glob"):
        list_images(str(tmp_path / "nowhere"), "data.predict_images")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"data.predict_dir: '.*empty' holds no images"):
        list_images(str(tmp_path / "empty"), "data.predict_dir")
    with pytest.raises(ValueError, match=r"holds no images"):
        list_images(str(tmp_path / "*.png"), "data.predict_images")


def test_images_to_predict_on_decode_as_in_training_with_their_displayed_sizes(tmp_path):
    from tasks.data.image_files import ImageFiles, list_images

    expected = odd_images(tmp_path)
    dataset = ImageFiles(list_images(str(tmp_path), "data.predict_images"))
    assert [dataset[i][1]["image_id"] for i in range(len(dataset))] == [1, 2, 3, 4, 5]  # path order
    for image, info in (dataset[i] for i in range(len(dataset))):
        reference = expected[info["file_name"]]
        assert image.dtype == torch.uint8 and image.shape == reference.shape, info["file_name"]
        assert (info["height"], info["width"]) == reference.shape[1:]
        difference = (image.long() - torch.from_numpy(reference.astype(np.int64))).abs().float().mean()
        assert difference < (3 if info["file_name"].endswith(".jpg") else 1e-9), info["file_name"]
    assert expected["rotated.jpg"].shape == (3, 40, 20)


def test_a_data_module_given_only_images_to_predict_on_has_no_classes_and_reads_no_annotations(tmp_path,
                                                                                                 monkeypatch):
    import tasks.data.shapes

    monkeypatch.setattr(tasks.data.shapes, "shapes_detection", lambda: pytest.fail("built the shapes set"))
    monkeypatch.setattr(tasks.data.shapes, "shapes_classification", lambda: pytest.fail("built the shapes set"))
    touch_images(tmp_path, ["x/1.png", "x/2.png", "x/3.png"])
    detection = CocoDetectionDataModule(predict_images=str(tmp_path / "x"), batch_size=2, num_workers=0)
    classification = ImageFolderDataModule(predict_dir=str(tmp_path / "x"), image_size=4, batch_size=2,
                                           num_workers=0)
    for dm in (detection, classification):
        assert dm.categories is None and dm.num_classes is None and dm.predicts_unlabeled
        with pytest.raises(ValueError, match="fit needs (annotated|labelled) data, and only predict_(images|dir) is"):
            dm.train_dataloader()
        with pytest.raises(ValueError, match="validation needs"):
            dm.val_dataloader()
    images, infos = next(iter(detection.predict_dataloader()))
    assert [i["file_name"] for i in infos] == ["1.png", "2.png"] and images[0].shape == (3, 6, 8)
    images, info = next(iter(classification.predict_dataloader()))
    assert info["file_name"] == ["1.png", "2.png"] and images.shape == (2, 3, 4, 4) and images.dtype == torch.float32


def test_unreadable_images_to_predict_on_are_reported_by_path_and_skipped(tmp_path, caplog):
    touch_images(tmp_path, ["1.png", "3.png"])
    (tmp_path / "2.png").write_bytes(b"not a png")
    dm = CocoDetectionDataModule(predict_images=str(tmp_path), batch_size=2, num_workers=0)
    assert not dm.skip_corrupt_images  # predict skips them all the same
    with caplog.at_level("WARNING", logger="tasks"):
        batches = list(dm.predict_dataloader())
    assert [[info["file_name"] for info in infos] for _, infos in batches] == [["1.png"], ["3.png"]]
    assert f"cannot decode image '{tmp_path / '2.png'}'" in caplog.text


# -- augmentations chosen in the config


def training_targets(dm, seed):
    dm.setup("fit")
    dataset = CocoDetection(dm.train_index, dm.train_images, dm.train_transforms(), masks=dm.wants_masks())
    torch.manual_seed(seed)
    return [dataset[i] for i in range(len(dataset))]


def test_no_augmentation_keeps_every_training_box_where_the_annotations_put_it(tiny_coco):
    dm = CocoDetectionDataModule(**tiny_coco, train_transforms=[], num_workers=0)
    annotations = json.loads(open(tiny_coco["train_annotations"]).read())["annotations"]
    for seed in range(3):
        for (_, target), image_id in zip(training_targets(dm, seed), dm.train_index.image_ids, strict=True):
            boxes = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in annotations
                                                              if a["image_id"] == image_id)]
            assert sorted(target["boxes"].tolist()) == sorted(boxes)


def test_the_default_augmentation_is_a_flip_then_the_box_clean_up(tiny_coco):
    from torchvision.transforms import v2

    dm = CocoDetectionDataModule(**tiny_coco, num_workers=0)
    dm.setup("fit")
    reference = v2.Compose([v2.RandomHorizontalFlip(0.5), v2.ClampBoundingBoxes(), v2.SanitizeBoundingBoxes(1)])
    ours = training_targets(dm, seed=4)
    torch.manual_seed(4)
    theirs = [item for item in CocoDetection(dm.train_index, dm.train_images, reference)]
    unchanged = CocoDetection(dm.train_index, dm.train_images)
    flipped = 0
    for i, ((image, target), (ref_image, ref_target)) in enumerate(zip(ours, theirs, strict=True)):
        assert torch.equal(image, ref_image) and torch.equal(target["boxes"], ref_target["boxes"])
        flipped += not torch.equal(image, unchanged[i][0])
    assert 0 < flipped < len(ours)  # a flip at 0.5, not always nor never


class InvalidBoxes:
    """A transform that moves boxes where no box may be: inverted, outside the image, not finite; the last one
    stays valid."""

    def __call__(self, image, target):
        from torchvision import tv_tensors

        count = len(target["boxes"])
        bad = torch.tensor([[30.0, 30.0, 10.0, 10.0], [-40.0, -40.0, -5.0, -5.0], [float("nan"), 1.0, 5.0, 5.0],
                            [2.0, 3.0, 12.0, 14.0]])[-count:]
        boxes = tv_tensors.wrap(bad.reshape(-1, 4), like=target["boxes"])
        return image, {**target, "boxes": boxes}


def test_a_transform_that_returns_invalid_boxes_is_cleaned_up_not_a_crash(tmp_path):
    (tmp_path / "img").mkdir()
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(tmp_path / "img" / "1.png")
    path = one_image_coco(tmp_path, [{"bbox": [1, 1, 5, 5], "area": 10 + i} for i in range(4)])
    dm = CocoDetectionDataModule(path, str(tmp_path / "img"), path, str(tmp_path / "img"),
                                 train_transforms=[InvalidBoxes()], num_workers=0)
    _, target = training_targets(dm, seed=0)[0]
    assert target["boxes"].tolist() == [[2.0, 3.0, 12.0, 14.0]]
    assert target["labels"].tolist() == [0] and target["area"].tolist() == [13.0]  # the fields follow their box


def test_a_flip_probability_beside_a_transform_list_is_refused():
    with pytest.raises(ValueError, match="data.horizontal_flip sets the default augmentation, which "
                                         "data.train_transforms replaces"):
        CocoDetectionDataModule(train_transforms=[], horizontal_flip=0.0)
    with pytest.raises(ValueError, match="data.crop_scale sets the default augmentation"):
        ImageFolderDataModule(train_transforms=[], crop_scale=(0.5, 1.0))


def test_classification_transforms_from_the_config_are_applied_and_must_end_in_image_size_squares(tiny_folder):
    from torchvision.transforms import v2

    dm = ImageFolderDataModule(**tiny_folder, image_size=16, num_workers=0,
                               train_transforms=[v2.Resize(16), v2.CenterCrop(16), v2.RandomVerticalFlip(1.0)])
    image = read_rgb(f"{tiny_folder['train_dir']}/disk/0000.png")
    expected = v2.functional.vertical_flip(v2.functional.center_crop(v2.functional.resize(image, 16), 16))
    torch.testing.assert_close(dm.train_transforms()(image), expected.float() / 255)
    dm = ImageFolderDataModule(**tiny_folder, image_size=16, num_workers=0, train_transforms=[v2.Resize(20)])
    with pytest.raises(ValueError, match=r"data.train_transforms gave an image of 20x20 pixels, but data.image_size "
                                         r"is 16: end the list with a transform that gives 16x16"):
        dm.train_transforms()(image)


# -- instance masks


@pytest.fixture
def masks_coco(tmp_path):
    """Two images: on the first, instances in each form of COCO ``segmentation`` (two polygons of one instance, a
    compressed RLE with text counts, a crowd region as an uncompressed RLE); the second has no objects. Sizes differ
    in height and width, so that a transposed mask would not fit."""
    from helpers import uncompressed_rle
    from pycocotools import mask as mask_utils

    (tmp_path / "img").mkdir()
    for i, size in [(1, (40, 50)), (2, (30, 20))]:
        Image.fromarray(np.zeros((*size, 3), np.uint8)).save(tmp_path / "img" / f"{i}.png")
    disk = np.zeros((40, 50), np.uint8)
    yy, xx = np.mgrid[:40, :50]
    disk[(yy - 25) ** 2 + (xx - 30) ** 2 <= 36] = 1
    rle = mask_utils.encode(np.asfortranarray(disk))
    crowd = np.zeros((40, 50), np.uint8)
    crowd[2:12, 35:48] = 1
    anns = [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [2, 3, 20, 12], "area": 99, "iscrowd": 0,
             "segmentation": [[2.5, 3, 12, 3, 12, 10.2, 2.5, 10.2], [14, 8, 22, 8, 18, 15]]},
            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [24, 19, 13, 13], "area": 113, "iscrowd": 0,
             "segmentation": {"size": [40, 50], "counts": rle["counts"].decode("ascii")}},
            {"id": 3, "image_id": 1, "category_id": 2, "bbox": [35, 2, 13, 10], "area": 130, "iscrowd": 1,
             "segmentation": uncompressed_rle(crowd)}]
    images = [{"id": 1, "file_name": "1.png", "height": 40, "width": 50},
              {"id": 2, "file_name": "2.png", "height": 30, "width": 20}]
    path = write_coco(tmp_path / "a.json", images, anns, [{"id": 7, "name": "b"}, {"id": 2, "name": "a"}])
    return path, str(tmp_path / "img")


def test_masks_decode_from_polygons_rle_and_crowd_rle_as_pycocotools_does(masks_coco):
    from pycocotools.coco import COCO

    index = CocoIndex.from_file(masks_coco[0], masks=True)
    dataset = CocoDetection(index, masks_coco[1], keep_crowd=True, masks=True)
    _, target = dataset[0]
    reference = COCO(masks_coco[0])
    expected = np.stack([reference.annToMask(a) for a in reference.loadAnns([1, 2, 3])])
    assert target["masks"].dtype == torch.uint8 and type(target["masks"]).__name__ == "Mask"
    assert target["masks"].shape == (3, 40, 50) and np.array_equal(target["masks"].numpy(), expected)
    assert all(m.sum() > 20 for m in expected)  # every form gives a real mask
    assert target["iscrowd"].tolist() == [0, 0, 1]
    _, empty = dataset[1]
    assert empty["masks"].shape == (0, 30, 20)
    _, training = CocoDetection(index, masks_coco[1], masks=True)[0]  # the crowd region left out, with its mask
    assert np.array_equal(training["masks"].numpy(), expected[:2])
    # compact until loaded: flat numeric arrays, no Python object per instance
    arrays = vars(index.segmentations)
    assert all(isinstance(getattr(a, "values", a), np.ndarray) and getattr(a, "values", a).dtype != object
               for a in arrays.values())


def test_an_instance_without_a_usable_segmentation_fails_naming_it_only_where_masks_are_needed(tmp_path):
    (tmp_path / "img").mkdir()
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(tmp_path / "img" / "1.png")
    path = one_image_coco(tmp_path, [{"bbox": [1, 1, 5, 5], "segmentation": [[1, 1, 6, 1, 6, 6]]},
                                     {"id": 17, "bbox": [1, 1, 5, 5]}])
    with pytest.raises(ValueError, match=r"a.json: annotation 17 has no segmentation \(polygons or an RLE\), which "
                                         r"masks need; .*or set data.masks: false"):
        CocoIndex.from_file(path, masks=True)
    assert CocoIndex.from_file(path, masks=None).segmentations is None  # where present: not in every annotation
    path = one_image_coco(tmp_path, [{"id": 5, "bbox": [1, 1, 5, 5], "segmentation": [[1, 1, 6, 1, 6]]}])
    with pytest.raises(ValueError, match="annotation 5 has a polygon that is not a list of finite x, y pairs"):
        CocoIndex.from_file(path, masks=True)
    path = one_image_coco(tmp_path, [{"id": 5, "bbox": [1, 1, 5, 5], "segmentation": {"size": [20, 20],
                                                                                        "counts": "PP<"}}])
    dataset = CocoDetection(CocoIndex.from_file(path, masks=True), str(tmp_path / "img"), masks=True)
    with pytest.raises(ValueError, match=r"1.png: an RLE segmentation of 20x20 pixels on an image of 40x50"):
        dataset[0]


class CropTopLeft:
    """Keep the top-left ``size`` x ``size`` pixels of the image, its boxes and masks (a v2 kernel per kind)."""

    def __init__(self, size):
        self.size = size

    def __call__(self, image, target):
        from torchvision.transforms.v2 import functional as F

        crop = lambda x: F.crop(x, 0, 0, self.size, self.size)  # noqa: E731
        return crop(image), {**target, "boxes": crop(target["boxes"]), "masks": crop(target["masks"])}


def test_augmentations_move_masks_with_boxes_and_drop_instances_whose_mask_is_left_empty(tmp_path):
    """A triangle (apex up) whose box keeps its empty top-left corner after a crop is dropped with its box and
    counted; the square beside it keeps its cropped mask. A flip flips the masks."""
    from tasks.data.shapes import _shape_mask, segmentation

    (tmp_path / "img").mkdir()
    Image.fromarray(np.zeros((60, 60, 3), np.uint8)).save(tmp_path / "img" / "1.png")
    triangle, square = _shape_mask("triangle", 60, 60, (10, 10, 50, 50)), _shape_mask("square", 60, 60, (2, 2, 8, 30))
    path = one_image_coco(tmp_path, [{"bbox": [10, 10, 40, 40], "segmentation": segmentation("triangle", triangle)},
                                     {"bbox": [2, 2, 6, 28], "segmentation": segmentation("square", square)}],
                          [{"id": 1, "file_name": "1.png", "height": 60, "width": 60}])
    images = str(tmp_path / "img")
    dm = CocoDetectionDataModule(path, images, path, images, train_transforms=[CropTopLeft(20)], num_workers=0)
    dm.trainer = SimpleNamespace(lightning_module=SimpleNamespace(predicts_masks=True))  # as Mask R-CNN's
    (_, target), = training_targets(dm, seed=0)
    assert triangle[:20, :20].sum() == 0 and (triangle[10:20, 10:20].shape == (10, 10))  # its box would keep area
    assert target["boxes"].tolist() == [[2, 2, 8, 20]] and target["area"].tolist() == [6 * 28]
    assert np.array_equal(target["masks"].numpy(), square[None, :20, :20])
    assert dm.empty_masks.dropped == 1
    dm = CocoDetectionDataModule(path, images, path, images, horizontal_flip=1.0, masks=True, num_workers=0)
    (_, flipped), = training_targets(dm, seed=0)
    assert np.array_equal(flipped["masks"].numpy(), np.stack([triangle, square])[:, :, ::-1])
    assert dm.empty_masks.dropped == 0


def test_the_data_module_gives_masks_when_the_model_predicts_them_or_when_told(tiny_coco):
    def first_target(dm, model):
        dm.trainer = SimpleNamespace(lightning_module=model)
        dm.setup("fit")
        return dm.train_dataloader().dataset.dataset[0][1], dm.val_dataloader().dataset.dataset[0][1]

    mask_rcnn, faster_rcnn = SimpleNamespace(predicts_masks=True), SimpleNamespace(predicts_masks=False)
    assert all("masks" in t for t in first_target(CocoDetectionDataModule(**tiny_coco, num_workers=0), mask_rcnn))
    assert not any("masks" in t for t in first_target(CocoDetectionDataModule(**tiny_coco, num_workers=0),
                                                      faster_rcnn))
    assert all("masks" in t for t in first_target(CocoDetectionDataModule(**tiny_coco, num_workers=0, masks=True),
                                                  faster_rcnn))
    with pytest.raises(ValueError, match="the model predicts instance masks.*but data.masks is false"):
        first_target(CocoDetectionDataModule(**tiny_coco, num_workers=0, masks=False), mask_rcnn)


def test_the_shapes_set_writes_each_shapes_exact_pixels_as_polygons_and_rle(tmp_path):
    """pycocotools rasterises what the generator writes (pixel-edge polygons for squares and triangles, RLE for disks
    and shapes cut in two by a later one) to exactly the pixels that show each shape."""
    from pycocotools import mask as mask_utils

    from tasks.data.shapes import draw_instances, segmentation

    rng, forms = np.random.default_rng(0), set()
    for _ in range(40):
        kinds = [str(k) for k in rng.choice(["square", "disk", "triangle"], 3)]
        image, boxes, masks = draw_instances(rng, 96, 128, kinds, 20, 56)
        for kind, box, mask in zip(kinds, boxes, masks, strict=True):
            field = segmentation(kind, mask)
            forms.add((kind, type(field).__name__))
            rle = mask_utils.merge(mask_utils.frPyObjects(field, 96, 128)) if isinstance(field, list) else field
            assert np.array_equal(mask_utils.decode(rle).astype(bool), mask), kind
            x0, y0, x1, y1 = box
            assert mask.any() and mask[:, :x0].sum() == mask[:y0].sum() == mask[:, x1:].sum() == mask[y1:].sum() == 0
    assert {("square", "list"), ("triangle", "list"), ("disk", "dict")} <= forms
