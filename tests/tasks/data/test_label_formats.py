"""YOLO and Pascal VOC labels read into the COCO index: one small data set written in all three forms by the test's
own writers (independent of the readers) gives the same samples and the same validate metrics, pycocotools reads
the converted files as the COCO original, and globox (another project's reader) reads the YOLO and VOC files as ours
does."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from tasks import ObjectDetector
from tasks.data import CocoDetectionDataModule
from tasks.data.__main__ import main as data_main
from tasks.data.label_formats import detect_format

NAMES = ["cat", "dog", "bird"]
# per image: (height, width), objects as (class number, polygon in pixels: x y x y ...)
IMAGES = [((48, 64), [(0, [4, 6, 30, 6, 30, 40]), (2, [40, 2, 60, 10, 50, 30])]),
          ((40, 40), [(1, [2, 2, 20, 2, 20, 20, 2, 20])]),
          ((32, 56), []),  # no objects
          ((36, 48), [(1, [10, 4, 40, 30, 12, 30]), (0, [30, 2, 46, 2, 46, 12]), (2, [1, 20, 9, 20, 5, 35])])]


def polygon_box(polygon):
    xs, ys = polygon[0::2], polygon[1::2]
    return [min(xs), min(ys), max(xs), max(ys)]


def write_images(folder):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, ((h, w), _) in enumerate(IMAGES):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")


def write_coco(root):
    """The reference: category ids 1..3 as VOC's, area = box area as YOLO and VOC give it."""
    write_images(root / "images")
    images, anns = [], []
    for i, ((h, w), objects) in enumerate(IMAGES):
        images.append({"id": i + 1, "file_name": f"{i:03d}.png", "height": h, "width": w})
        for c, polygon in objects:
            x0, y0, x1, y1 = polygon_box(polygon)
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": c + 1, "iscrowd": 0,
                         "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0),
                         "segmentation": [polygon]})
    path = root / "labels.json"
    path.write_text(json.dumps({"images": images, "annotations": anns,
                                "categories": [{"id": c + 1, "name": n} for c, n in enumerate(NAMES)]}))
    return str(path), str(root / "images")


def write_yolo(root, polygons=False):
    """ultralytics' layout: images/train, labels/train, data.yaml with the names."""
    write_images(root / "images" / "train")
    (root / "labels" / "train").mkdir(parents=True)
    for i, ((h, w), objects) in enumerate(IMAGES):
        lines = []
        for c, polygon in objects:
            if polygons:
                lines.append(" ".join([str(c)] + [f"{v / (w if k % 2 == 0 else h):.10f}"
                                                  for k, v in enumerate(polygon)]))
            else:
                x0, y0, x1, y1 = polygon_box(polygon)
                lines.append(f"{c} {(x0 + x1) / 2 / w:.10f} {(y0 + y1) / 2 / h:.10f} {(x1 - x0) / w:.10f} "
                             f"{(y1 - y0) / h:.10f}")
        if objects:
            (root / "labels" / "train" / f"{i:03d}.txt").write_text("\n".join(lines) + "\n")
    (root / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/train\nnames:\n"
                                    + "".join(f"  {c}: {n}\n" for c, n in enumerate(NAMES)))
    return str(root / "data.yaml"), str(root / "images" / "train")


def write_voc(root, difficult=()):
    """VOC's development kit layout; boxes as 1-based pixel indices (xmin = x0 + 1, xmax = x1)."""
    write_images(root / "JPEGImages")
    (root / "Annotations").mkdir()
    (root / "ImageSets" / "Main").mkdir(parents=True)
    for i, ((h, w), objects) in enumerate(IMAGES):
        parts = [f"<annotation>\n  <filename>{i:03d}.png</filename>\n  <size><width>{w}</width><height>{h}</height>"
                 "<depth>3</depth></size>\n"]
        for j, (c, polygon) in enumerate(objects):
            x0, y0, x1, y1 = polygon_box(polygon)
            parts.append(f"  <object>\n    <name>{NAMES[c]}</name>\n    <difficult>{int((i, j) in difficult)}"
                         f"</difficult>\n    <bndbox><xmin>{x0 + 1}</xmin><ymin>{y0 + 1}</ymin><xmax>{x1}</xmax>"
                         f"<ymax>{y1}</ymax></bndbox>\n  </object>\n")
        (root / "Annotations" / f"{i:03d}.xml").write_text("".join(parts) + "</annotation>\n")
    (root / "ImageSets" / "Main" / "train.txt").write_text("".join(f"{i:03d}\n" for i in range(len(IMAGES))))
    return str(root / "ImageSets" / "Main" / "train.txt"), str(root / "JPEGImages")


def data_module(annotations, images, **kwargs):
    return CocoDetectionDataModule(annotations, images, annotations, images, batch_size=2, num_workers=0, **kwargs)


def same_classes(fmt):
    """VOC's ids in the order of NAMES, as COCO's and YOLO's are (unset, VOC's are the sorted names')."""
    return {"classes": NAMES} if fmt == "voc" else {}


@pytest.fixture
def three_formats(tmp_path):
    return {"coco": write_coco(tmp_path / "coco"), "yolo": write_yolo(tmp_path / "yolo"),
            "voc": write_voc(tmp_path / "voc")}


def test_the_format_is_detected_from_the_annotation_path(three_formats, tmp_path, caplog):
    assert {fmt: detect_format(paths[0])[0] for fmt, paths in three_formats.items()} == \
        {"coco": "coco", "yolo": "yolo", "voc": "voc"}
    names = tmp_path / "names.txt"
    names.write_text("cat\ndog\n")
    assert detect_format(str(names))[0] == "yolo"
    assert detect_format(str(tmp_path / "voc" / "Annotations"))[0] == "voc"
    with caplog.at_level("INFO", logger="tasks"):
        data_module(*three_formats["voc"])
    assert "read as voc labels (a file in ImageSets/Main/" in caplog.text
    with pytest.raises(ValueError, match="cannot tell the label format of .*set data.format"):
        detect_format(str(tmp_path / "nothing"))


def test_coco_yolo_and_voc_of_the_same_data_give_the_same_samples(three_formats):
    modules = {fmt: data_module(*paths, masks=False, **same_classes(fmt)) for fmt, paths in three_formats.items()}
    assert modules["yolo"].categories == dict(enumerate(NAMES))  # YOLO: the class numbers
    assert modules["voc"].categories == modules["coco"].categories == {1: "cat", 2: "dog", 3: "bird"}
    samples = {}
    for fmt, module in modules.items():
        module.setup("fit")
        samples[fmt] = list(module.val_dataloader().dataset.dataset)
    reference = samples["coco"]
    assert sum(len(t["boxes"]) for _, t in reference) == 6
    for fmt in ("yolo", "voc"):
        for (image, target), (want_image, want) in zip(samples[fmt], reference, strict=True):
            assert torch.equal(image, want_image) and target["image_id"] == want["image_id"]
            torch.testing.assert_close(target["boxes"].as_subclass(torch.Tensor),
                                       want["boxes"].as_subclass(torch.Tensor), atol=1e-4, rtol=0)
            assert torch.equal(target["labels"], want["labels"]) and torch.equal(target["iscrowd"], want["iscrowd"])
            torch.testing.assert_close(target["area"], want["area"], atol=1e-3, rtol=0)


def test_yolo_polygons_give_the_masks_of_the_same_coco_polygons(tmp_path):
    coco = data_module(*write_coco(tmp_path / "coco"), masks=True)
    yolo = data_module(*write_yolo(tmp_path / "yolo", polygons=True), masks=True)
    for module in (coco, yolo):
        module.setup("fit")
    pairs = zip(yolo.val_dataloader().dataset.dataset, coco.val_dataloader().dataset.dataset, strict=True)
    pixels = 0
    for (_, got), (_, want) in pairs:
        torch.testing.assert_close(got["boxes"].as_subclass(torch.Tensor), want["boxes"].as_subclass(torch.Tensor),
                                   atol=1e-4, rtol=0)
        assert torch.equal(got["masks"], want["masks"])
        pixels += int(want["masks"].sum())
    assert pixels > 500


class PlantedDetector(nn.Module):
    """Fixed detections per image (found by its size): each true box moved by a few pixels, and a false one."""

    def __init__(self, offset):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))  # inference code asks for the device
        self.detections = {}
        for (h, w), objects in IMAGES:
            boxes = [polygon_box(p) for _, p in objects] + [[0, 0, 8, 8]]
            moved = torch.tensor(boxes, dtype=torch.float32) + torch.tensor([1.0, -1.0, 2.0, 0.0])
            self.detections[(h, w)] = {"boxes": moved.clamp(min=0),
                                       "labels": torch.tensor([c for c, _ in objects] + [1]) + offset,
                                       "scores": torch.linspace(0.9, 0.3, len(boxes))}

    def forward(self, images):
        return [{k: v.clone() for k, v in self.detections[tuple(im.shape[-2:])].items()} for im in images]


def test_coco_yolo_and_voc_of_the_same_data_give_the_same_validate_metrics(three_formats):
    from lightning.pytorch import Trainer

    metrics = {}
    for fmt, paths in three_formats.items():
        module = data_module(*paths, **same_classes(fmt))
        model = ObjectDetector(backbone="resnet18", num_classes=module.num_classes, categories=module.categories,
                               min_size=32, max_size=64, fused_inference=False, log_images=0)
        model.model = PlantedDetector(model.label_map.offset)
        trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
        (metrics[fmt],) = trainer.validate(model, datamodule=module, verbose=False)
    assert 0.2 < metrics["coco"]["val/map"] < 0.95  # the moved boxes miss at the higher IoU thresholds
    assert "val/ap/bird" in metrics["coco"]
    for fmt in ("yolo", "voc"):
        assert metrics[fmt] == pytest.approx(metrics["coco"], abs=1e-6), fmt


@pytest.mark.parametrize("fmt", ["yolo", "voc"])
def test_pycocotools_reads_the_converted_file_as_the_coco_original(three_formats, tmp_path, fmt, capsys):
    from pycocotools.coco import COCO

    annotations, images = three_formats[fmt]
    output = tmp_path / f"{fmt}.json"
    data_main(["convert", annotations, "--images", images, "--to", "coco", str(output)])
    assert f"({fmt} -> coco)" in capsys.readouterr().out
    got, want = COCO(str(output)), COCO(three_formats["coco"][0])
    got_names = {c["id"]: c["name"] for c in got.loadCats(got.getCatIds())}
    want_names = {c["id"]: c["name"] for c in want.loadCats(want.getCatIds())}
    assert sorted(got_names.values()) == sorted(NAMES)
    for image in want.loadImgs(want.getImgIds()):
        (same,) = [i for i in got.loadImgs(got.getImgIds()) if i["file_name"] == image["file_name"]]
        assert (same["height"], same["width"]) == (image["height"], image["width"])
        by_name = sorted((want_names[a["category_id"]], a["bbox"]) for a in want.loadAnns(want.getAnnIds(image["id"])))
        mine = sorted((got_names[a["category_id"]], a["bbox"]) for a in got.loadAnns(got.getAnnIds(same["id"])))
        assert [n for n, _ in mine] == [n for n, _ in by_name]
        np.testing.assert_allclose([b for _, b in mine], [b for _, b in by_name], atol=1e-4) if mine else None


@pytest.mark.parametrize("fmt", ["yolo", "voc"])
def test_globox_reads_the_yolo_and_voc_files_as_our_reader_does(three_formats, fmt):
    """globox (an independent reader of both formats) and ours find, per image, the same size, boxes (to 1e-3 px)
    and classes. globox keeps VOC's xmin and ymin as written; the development kit counts pixels from 1, so our boxes
    start one pixel before (xmin - 1, as detectron2 reads them: tasks/data/label_formats.py)."""
    import globox  # in the test extra: a missing oracle fails, it does not skip

    annotations, images = three_formats[fmt]
    if fmt == "yolo":  # labels/train beside images/train; globox's labels are the class numbers as written
        theirs = globox.AnnotationSet.from_yolo_darknet(Path(images).parents[1] / "labels" / "train",
                                                        image_folder=images, image_extension=".png")
        shift = 0.0
    else:  # VOC's labels are the names
        theirs = globox.AnnotationSet.from_pascal_voc(Path(images).parent / "Annotations")
        shift = 1.0
    index = data_module(annotations, images).val_index
    names = dict(zip(index.label_map.category_ids, index.label_map.names, strict=True))
    found = 0
    for i, file_name in enumerate(index.file_names):
        rows = slice(index.offsets[i], index.offsets[i + 1])
        ids = index.label_map.category_ids_of(torch.as_tensor(index.labels[rows])).tolist()
        labels = [str(c) if fmt == "yolo" else names[c] for c in ids]
        ours = sorted(zip(labels, index.boxes[rows].tolist(), strict=True))
        if file_name not in theirs.image_ids:  # globox reads YOLO label files: an image without one has no objects
            assert fmt == "yolo" and ours == []
            continue
        annotation = theirs[file_name]
        assert annotation.image_size == (index.sizes[i][1], index.sizes[i][0])  # (width, height)
        got = sorted((b.label, [b.xmin - shift, b.ymin - shift, b.xmax, b.ymax]) for b in annotation.boxes)
        assert [label for label, _ in ours] == [label for label, _ in got], file_name
        if ours:
            np.testing.assert_allclose([box for _, box in ours], [box for _, box in got], atol=1e-3, rtol=0)
        found += len(ours)
    assert found == 6 and len(index.file_names) == 4


def test_the_voc_converter_finds_jpegimages_beside_annotations(three_formats, tmp_path):
    output = tmp_path / "voc.json"
    data_main(["convert", three_formats["voc"][0], "--to", "coco", str(output)])
    assert len(json.loads(output.read_text())["annotations"]) == 6


def test_voc_difficult_objects_are_crowd_left_out_of_training_and_kept_for_evaluation(tmp_path):
    module = data_module(*write_voc(tmp_path, difficult={(0, 1)}))
    module.setup("fit")
    assert module.val_index.iscrowd.tolist() == [0, 1, 0, 0, 0, 0]
    assert len(module.train_dataloader().dataset.dataset[0][1]["boxes"]) == 1
    assert module.val_dataloader().dataset.dataset[0][1]["iscrowd"].tolist() == [0, 1]


def test_voc_ids_follow_the_classes_given_or_else_the_sorted_names_found(tmp_path):
    paths = write_voc(tmp_path)
    assert data_module(*paths, classes=["dog", "cat", "fish", "bird"]).categories == \
        {1: "dog", 2: "cat", 3: "fish", 4: "bird"}
    assert data_module(*paths).categories == {1: "bird", 2: "cat", 3: "dog"}


def test_voc_ids_are_the_same_for_every_split(tmp_path):
    """The names of every file of Annotations/, not only of the split's: a split without birds still numbers them."""
    annotations, images = write_voc(tmp_path)
    dogs = tmp_path / "ImageSets" / "Main" / "dogs.txt"
    dogs.write_text("001\n")  # image 001 holds one dog only
    module = CocoDetectionDataModule(str(dogs), images, annotations, images, batch_size=2, num_workers=0)
    assert module.categories == {1: "bird", 2: "cat", 3: "dog"}
    module.setup("fit")
    (_, target), = module.train_dataloader().dataset.dataset
    assert module.label_map.category_ids_of(target["labels"]).tolist() == [3]


def test_a_format_set_is_read_as_given_and_a_wrong_one_or_classes_for_yolo_are_refused(three_formats, caplog):
    yolo = three_formats["yolo"]
    with caplog.at_level("INFO", logger="tasks"):
        module = data_module(*yolo, format="yolo")
    assert "read as" not in caplog.text and module.categories == dict(enumerate(NAMES))  # given, not detected
    with pytest.raises(ValueError, match=r"data.format='xml'; choose one of \['coco', 'yolo', 'voc'\]"):
        data_module(*yolo, format="xml")
    with pytest.raises(ValueError, match="data.classes names VOC's classes; yolo labels name their own"):
        data_module(*yolo, classes=NAMES)


def test_an_unknown_class_fails_naming_the_file_and_line(tmp_path):
    yolo = write_yolo(tmp_path / "yolo")
    label = tmp_path / "yolo" / "labels" / "train" / "003.txt"
    lines = label.read_text().splitlines()
    label.write_text("\n".join(lines[:1] + ["7" + lines[1][1:]] + lines[2:]) + "\n")
    with pytest.raises(ValueError, match=rf"{label} line 2 has category_id 7, which is not in 'categories' "
                                         r"\[0, 1, 2\] \['cat', 'dog', 'bird'\]"):
        data_module(*yolo)
    voc = write_voc(tmp_path / "voc")
    with pytest.raises(ValueError, match=rf"{tmp_path / 'voc' / 'Annotations' / '000.xml'} line 4 has category_id "
                                         "'cat', which is not in"):
        data_module(*voc, classes=["dog", "bird"])


def test_boxes_outside_the_image_are_named_by_file_and_line_then_clipped(tmp_path, caplog):
    annotations, images = write_yolo(tmp_path)
    label = tmp_path / "labels" / "train" / "001.txt"
    label.write_text("1 0.9 0.5 0.4 0.5\n")  # x from 0.7 to 1.1 of the width
    with caplog.at_level("WARNING", logger="tasks"):
        module = data_module(annotations, images)
    assert f"1 boxes reach outside their image, first: {label} line 1" in caplog.text
    assert "clipped 1 boxes partly outside their image" in caplog.text
    assert module.val_index.boxes[2].tolist() == pytest.approx([28, 10, 40, 30])


def test_malformed_lines_and_missing_images_fail_naming_the_file(tmp_path):
    annotations, images = write_yolo(tmp_path)
    label = tmp_path / "labels" / "train" / "001.txt"
    label.write_text("1 0.5 0.5\n")
    with pytest.raises(ValueError, match=rf"{label} line 1: 3 numbers; a box line has 5"):
        data_module(annotations, images)
    label.write_text("1 0.5 0.5 0.2 0.2\n")
    (tmp_path / "labels" / "train" / "042.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    with pytest.raises(FileNotFoundError, match=r"1 YOLO label files have no image in .*042.txt"):
        data_module(annotations, images)
    assert len(data_module(annotations, images, skip_missing_images=True).val_index) == 4
    voc, voc_images = write_voc(tmp_path / "voc")
    (tmp_path / "voc" / "JPEGImages" / "002.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"data.val_images: 1 of 4 listed images are missing, first: "
                                                r"\['.*002.png'\]"):
        data_module(voc, voc_images)


@pytest.mark.parametrize("fmt, ids, names", [("yolo", [0, 1, 2], NAMES),  # the class numbers
                                              ("voc", [1, 2, 3], sorted(NAMES))])  # 1..N of the sorted names
def test_the_checkpoint_label_map_keeps_the_yolo_class_numbers_and_the_voc_ids(three_formats, fmt, ids, names):
    module = data_module(*three_formats[fmt])
    model = ObjectDetector(backbone="resnet18", num_classes=module.num_classes, categories=module.categories,
                           min_size=32, max_size=32)
    checkpoint = {}
    model.on_save_checkpoint(checkpoint)
    assert checkpoint["label_map"]["category_ids"] == ids
    assert checkpoint["label_map"]["names"] == names
