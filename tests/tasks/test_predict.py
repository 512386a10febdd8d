"""Using a trained model on new images: which classes the model is built with (the data's or the checkpoint's), and
the writer callbacks that put results on disk as batches finish."""

import csv
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import randomize_norm_stats
from lightning.pytorch import Callback, Trainer
from PIL import Image
from pycocotools.coco import COCO

from tasks import ClassificationResultsWriter, CocoResultsWriter, ImageClassifier, ObjectDetector
from tasks.classes import ClassesError, classes_for_model
from tasks.data import CocoDetectionDataModule, ImageFolderDataModule, LabelMap
from tasks.writers import merged_parts

SHAPES = {3: "square", 5: "disk", 9: "triangle"}
PETS = {1: "cat", 7: "dog"}


def checkpoint_of(tmp_path, categories, offset=1, **extra):
    path = tmp_path / "model.ckpt"
    torch.save({"label_map": LabelMap.from_categories(categories).with_offset(offset).to_dict(), **extra}, path)
    return str(path)


def data(categories, unlabeled=False):
    return SimpleNamespace(categories=categories, predicts_unlabeled=unlabeled, label_source="data.val_annotations (x)")


def test_predicting_unlabeled_images_takes_the_checkpoints_classes_whatever_the_data_lists(tmp_path):
    ckpt = checkpoint_of(tmp_path, PETS)
    assert classes_for_model(data(SHAPES, unlabeled=True), "predict", ckpt) == PETS  # other training data
    assert classes_for_model(data(None, unlabeled=True), "predict", ckpt) == PETS  # none
    assert classes_for_model(data(SHAPES, unlabeled=True), "predict", None) == SHAPES  # no checkpoint: the data's


@pytest.mark.parametrize("stage, unlabeled", [("validate", False), ("test", False), ("fit", False),
                                              ("predict", False), ("validate", True)])
def test_a_stage_that_compares_with_labels_refuses_a_checkpoint_of_other_classes(tmp_path, stage, unlabeled):
    ckpt = checkpoint_of(tmp_path, PETS)
    expected = (rf"the checkpoint .*model.ckpt was trained on \{{1: 'cat', 7: 'dog'\}} \(2 categories\), but "
                rf"data.val_annotations \(x\) lists \{{3: 'square', 5: 'disk', 9: 'triangle'\}} \(3 categories\); "
                rf"{stage} compares the model's classes with those labels, so they must be the same.*predict_images")
    with pytest.raises(ClassesError, match=expected):
        classes_for_model(data(SHAPES, unlabeled), stage, ckpt)
    assert classes_for_model(data(PETS, unlabeled), stage, ckpt) == PETS  # the same classes: no conflict


def test_no_classes_anywhere_is_an_error_and_old_checkpoints_give_theirs_through_hyperparameters(tmp_path):
    with pytest.raises(ClassesError, match="has no labelled data to take the classes from, and no --ckpt_path was "
                                           "given; give --ckpt_path of a trained model"):
        classes_for_model(data(None, unlabeled=True), "predict", None)
    with pytest.raises(ClassesError, match=r"and --ckpt_path '.*gone.ckpt' is not a file here, so its classes cannot"):
        classes_for_model(data(None, unlabeled=True), "predict", str(tmp_path / "gone.ckpt"))
    old = tmp_path / "old.ckpt"
    torch.save({"hyper_parameters": {"num_classes": 2, "categories": PETS}}, old)
    assert classes_for_model(data(None, unlabeled=True), "predict", str(old)) == PETS


def test_loading_a_checkpoint_into_a_model_of_other_classes_fails_saying_so(tmp_path):
    model = ObjectDetector(backbone="resnet18", num_classes=3, categories=SHAPES, min_size=32, max_size=32)
    with pytest.raises(ClassesError, match=r"the checkpoint holds a model of \{1: 'cat', 7: 'dog'\} \(2 categories\), "
                                           r"but this model was built for \{3: 'square'"):
        model.on_load_checkpoint(torch.load(checkpoint_of(tmp_path, PETS), weights_only=True))
    model.on_load_checkpoint(torch.load(checkpoint_of(tmp_path, SHAPES), weights_only=True))  # the same: fine


# -- the writers


def test_the_parts_of_several_processes_merge_in_image_order(tmp_path):
    """Each process reads an ascending share of the images (0, 2, 4, ... and 1, 3, 5, ...)."""
    parts = [tmp_path / "part0", tmp_path / "part1"]
    for part, ids in zip(parts, ([1, 3, 5, 7], [2, 4, 6]), strict=True):
        part.write_text("".join(json.dumps({"image_id": i, "rank": str(part)[-1]}) + "\n" for i in ids))
    assert [row["image_id"] for row in merged_parts(parts)] == [1, 2, 3, 4, 5, 6, 7]


def write_images(folder, count, size=(24, 32)):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(folder / f"{i}.png")


class PartFileProbe(Callback):
    """After each predict batch (and after the writer, listed before it): how many rows the writer's part holds, and
    how many batch predictions Lightning's loop holds."""

    def __init__(self, writer):
        self.writer, self.rows, self.held = writer, [], []

    def on_predict_batch_end(self, trainer, *args) -> None:
        self.rows.append(len(self.writer.part_path(0).read_text().splitlines()))
        self.held.append(len(trainer.predict_loop.predictions))


def predict(model, dm, writer, tmp_path):
    """Predict with ``writer``; the rows its part held after each batch."""
    probe = PartFileProbe(writer)
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[writer, probe], default_root_dir=tmp_path)
    assert trainer.predict(model, dm, return_predictions=False) is None
    assert set(probe.held) == {0}  # nothing held in memory by Lightning either, at any time
    return probe.rows


def test_detections_reach_disk_as_batches_finish_and_become_a_coco_dataset(tmp_path):
    write_images(tmp_path / "new", 5)
    torch.manual_seed(0)
    model = ObjectDetector(backbone="resnet18", num_classes=2, categories=PETS, min_size=32, max_size=32,
                           detections_per_image=3, detector_kwargs={"box_score_thresh": 0.0}).eval()
    dm = CocoDetectionDataModule(predict_images=str(tmp_path / "new"), batch_size=2, num_workers=0)
    writer = CocoResultsWriter(output=str(tmp_path / "out" / "p.json"))
    assert predict(model, dm, writer, tmp_path) == [2, 4, 5]  # one row per image, on disk after each batch
    assert not writer.part_path(0).exists()
    results = json.loads((tmp_path / "out" / "p.json").read_text())
    images = json.loads((tmp_path / "out" / "p_images.json").read_text())
    assert images["images"] == [{"id": i + 1, "file_name": f"{i}.png", "width": 32, "height": 24} for i in range(5)]
    assert images["categories"] == [{"id": 1, "name": "cat"}, {"id": 7, "name": "dog"}]
    assert len(results) == 15 and {r["category_id"] for r in results} <= {1, 7}
    assert all(r["file_name"] == f"{r['image_id'] - 1}.png" for r in results)
    dataset = COCO(str(tmp_path / "out" / "p_images.json")).loadRes(str(tmp_path / "out" / "p.json"))
    assert len(dataset.getAnnIds()) == 15 and dataset.loadCats(7)[0]["name"] == "dog"
    for r in results:  # xywh inside the 32x24 image it came from (to float32's precision)
        x, y, w, h = r["bbox"]
        assert 0 <= x <= x + w <= 32 + 1e-5 and 0 <= y <= y + h <= 24 + 1e-5


def test_class_probabilities_reach_disk_as_batches_finish_as_top_k_names(tmp_path):
    write_images(tmp_path / "new", 3, size=(16, 16))
    model = ImageClassifier(backbone="resnet18", num_classes=3, categories={0: "a", 1: "b", 2: "c"}).eval()
    dm = ImageFolderDataModule(predict_dir=str(tmp_path / "new"), image_size=16, batch_size=2, num_workers=0)
    writer = ClassificationResultsWriter(output=str(tmp_path / "p.csv"), top_k=2)
    assert predict(model, dm, writer, tmp_path) == [2, 3]
    rows = list(csv.reader(open(tmp_path / "p.csv")))
    assert rows[0] == ["path", "class_1", "probability_1", "class_2", "probability_2"]
    with torch.no_grad():
        probabilities = model(next(iter(dm.predict_dataloader()))[0]).softmax(-1)
    for row, expected in zip(rows[1:3], probabilities, strict=True):
        top = expected.topk(2)
        assert row[1::2] == [["a", "b", "c"][i] for i in top.indices.tolist()]
        assert [float(p) for p in row[2::2]] == pytest.approx(top.values.tolist(), abs=1e-6)
    assert [row[0] for row in rows[1:]] == [str(tmp_path / "new" / f"{i}.png") for i in range(3)]


def test_segmentation_labels_reach_disk_as_index_pngs_as_batches_finish(tmp_path):
    """SegmentationWriter streams as the other writers: each batch's PNGs written before the next batch, nothing held
    by Lightning; each PNG the argmax of the model's logits for the image alone, at its own size, whatever the size
    of the image it was batched with (padding must not change a prediction)."""
    from tasks import SegmentationWriter, SemanticSegmenter
    from tasks.data import SegmentationDataModule

    write_images(tmp_path / "new", 3, size=(64, 72))  # sides from twice the coarsest stride (docs)
    write_images(tmp_path / "new2", 2, size=(80, 66))  # another size: batches padded, PNGs cut back to each image
    for i, name in enumerate(sorted((tmp_path / "new2").iterdir())):
        name.rename(tmp_path / "new" / f"{3 + i}.png")
    torch.manual_seed(0)
    model = randomize_norm_stats(SemanticSegmenter(head="fpn", backbone="resnet18", num_classes=3, fpn_channels=32,
                                                   head_channels=32, categories={0: "a", 1: "b", 2: "c"})).eval()
    dm = SegmentationDataModule(predict_images=str(tmp_path / "new"), batch_size=2, num_workers=0)
    writer = SegmentationWriter(output=str(tmp_path / "out"))
    written = []

    class PngProbe(Callback):
        def on_predict_batch_end(self, *args) -> None:
            written.append(len(list((tmp_path / "out").glob("*.png"))))

    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[writer, PngProbe()], default_root_dir=tmp_path)
    assert trainer.predict(model, dm, return_predictions=False) is None
    assert written == [2, 4, 5] and len(trainer.predict_loop.predictions) == 0
    model.eval()
    assert json.loads((tmp_path / "out" / "classes.json").read_text()) == ["a", "b", "c"]
    for i in range(5):
        image = torch.from_numpy(np.asarray(Image.open(tmp_path / "new" / f"{i}.png"))).permute(2, 0, 1)
        with torch.no_grad():
            want = model(image[None]).argmax(1)[0].numpy()  # the image alone, unpadded
        got = np.asarray(Image.open(tmp_path / "out" / f"{i}.png"))
        assert got.shape == image.shape[1:] and got.dtype == np.uint8 and len(np.unique(want)) > 1
        assert (got == want).mean() >= 0.999  # the fused copy's rounding may move a pixel near a tie


def test_a_writer_refuses_the_other_tasks_model_naming_the_right_writer(tmp_path):
    model = ImageClassifier(backbone="resnet18", num_classes=3)
    with pytest.raises(TypeError, match="CocoResultsWriter writes the predictions of ObjectDetector models, but the "
                                        "model is ImageClassifier; .*tasks.ClassificationResultsWriter for"):
        CocoResultsWriter().setup(None, model, "predict")
    CocoResultsWriter().setup(None, model, "fit")  # the shipped configs carry it while training


def test_mask_rcnn_results_carry_each_mask_as_rle_that_pycocotools_reads_back_on_unlabeled_images(tmp_path):
    """The same writer, for a model that predicts masks: each detection's ``segmentation`` is a compressed RLE of its
    mask in the original image's pixels; ``loadRes`` takes the file, and the masks it decodes are the model's."""
    from pycocotools import mask as mask_utils

    from tasks.data.images import read_rgb

    write_images(tmp_path / "new", 3)
    torch.manual_seed(0)
    model = ObjectDetector(architecture="mask_rcnn", backbone="resnet18", num_classes=2, categories=PETS,
                           min_size=32, max_size=32, detections_per_image=4,
                           detector_kwargs={"box_score_thresh": 0.0}).eval()
    dm = CocoDetectionDataModule(predict_images=str(tmp_path / "new"), batch_size=2, num_workers=0)
    writer = CocoResultsWriter(output=str(tmp_path / "out" / "p.json"), draw_dir=str(tmp_path / "drawn"),
                               draw_threshold=0.0)
    predict(model, dm, writer, tmp_path)
    results = json.loads((tmp_path / "out" / "p.json").read_text())
    dataset = COCO(str(tmp_path / "out" / "p_images.json")).loadRes(str(tmp_path / "out" / "p.json"))
    assert len(dataset.getAnnIds()) == len(results) == 12
    for image_id in (1, 2, 3):
        with torch.no_grad():
            (expected,) = model([read_rgb(str(tmp_path / "new" / f"{image_id - 1}.png"))])
        order = expected["scores"].argsort(descending=True, stable=True)
        written = [r for r in results if r["image_id"] == image_id]
        assert all(r["segmentation"]["size"] == [24, 32] and isinstance(r["segmentation"]["counts"], str)
                   for r in written)
        decoded = mask_utils.decode([r["segmentation"] for r in written]).transpose(2, 0, 1).astype(bool)
        assert np.array_equal(decoded, expected["masks"][order].numpy())
        assert [r["category_id"] for r in written] == expected["labels"][order].tolist()
    assert 0 < np.mean([mask_utils.area(r["segmentation"]) for r in results]) < 24 * 32  # masks, not empty or full
    assert sorted(p.name for p in (tmp_path / "drawn").iterdir()) == ["0.png.png", "1.png.png", "2.png.png"]
