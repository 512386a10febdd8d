"""The product as users run it: the CLI's fit/validate/test/predict on tiny configs, in-process."""

import csv
import json
import logging
import math
import subprocess
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from helpers import (
    REPO,
    SMALL_HEADS,
    classification_args,
    detection_config,
    last_metrics,
    run_cli,
    run_on_two_processes,
)
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import resnext_backbones as rb
from resnext_backbones.deployment import Tiling, native_support
from tasks import ImageClassifier, ObjectDetector
from tasks.classes import ClassesError
from tasks.cli import cli as lightning_cli
from tasks.data import LabelMap


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, tiny_coco):
    tmp = tmp_path_factory.mktemp("fit")
    config = detection_config(tmp, tiny_coco)
    cli = lightning_cli(["fit", "--config", config])
    return cli, config, tmp


def test_fit_trains_logs_finite_metrics_and_writes_a_checkpoint(fitted):
    cli, _, tmp = fitted
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    for key in ["train/loss", "val/map", "val/map_50", "val/map_75"]:
        assert key in metrics and math.isfinite(metrics[key])
    assert (tmp / "ckpt" / "last.ckpt").is_file()
    assert cli.model.hparams.num_classes == 3  # from the data module, never written in the config
    assert cli.model.categories == {3: "square", 5: "disk", 9: "triangle"}
    checkpoint = torch.load(tmp / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["label_map"] == {"category_ids": [3, 5, 9], "names": ["square", "disk", "triangle"],
                                       "offset": 1}  # Faster R-CNN's class 0 is the background
    assert checkpoint["hyper_parameters"]["gamma"] == 0.1  # base arguments (through **kwargs) are recorded too


def raw_cocoeval(annotations: str, results: str, categories=None):
    """pycocotools' own box mAP of a results file, the reference the logged metrics must equal; with ``categories``,
    its (AP, AP50) over those categories only."""
    ground_truth = COCO(annotations)
    evaluation = COCOeval(ground_truth, ground_truth.loadRes(results), "bbox")
    if categories is not None:
        evaluation.params.catIds = categories
    evaluation.evaluate(), evaluation.accumulate(), evaluation.summarize()
    if categories is not None:
        return evaluation.stats[0], evaluation.stats[1]
    return dict(zip(["map", "map_50", "map_75"], evaluation.stats[:3].tolist(), strict=True))


def test_validate_and_predict_of_one_checkpoint_equal_raw_cocoeval_of_the_written_predictions(
        fitted, large_object_coco, tmp_path):
    """The logged mAP, and predictions.json as pycocotools reads it (xywh boxes, dataset category ids), agree."""
    ckpt = str(fitted[2] / "ckpt" / "last.ckpt")
    config = detection_config(tmp_path, large_object_coco)
    validated = lightning_cli(["validate", "--config", config, "--ckpt_path", ckpt])
    logged = {k: float(validated.trainer.callback_metrics[f"val/{k}"]) for k in ("map", "map_50", "map_75")}
    lightning_cli(["predict", "--config", config, "--ckpt_path", ckpt])
    reference = raw_cocoeval(large_object_coco["val_annotations"], str(tmp_path / "predictions.json"))
    assert reference["map"] > 0 and reference["map_50"] > 0, reference
    assert logged == pytest.approx(reference, abs=1e-6)
    for category, name in {3: "square", 5: "disk", 9: "triangle"}.items():  # each has ground truth in this set
        ap, ap50 = raw_cocoeval(large_object_coco["val_annotations"], str(tmp_path / "predictions.json"),
                                [category])
        assert float(validated.trainer.callback_metrics[f"val/ap/{name}"]) == pytest.approx(ap, abs=1e-6)
        assert float(validated.trainer.callback_metrics[f"val/ap50/{name}"]) == pytest.approx(ap50, abs=1e-6)


def test_validate_prints_the_per_category_table_worst_first(fitted, caplog):
    _, config, tmp = fitted
    with caplog.at_level("INFO", logger="tasks"):
        validated = lightning_cli(["validate", "--config", config, "--ckpt_path", str(tmp / "ckpt" / "last.ckpt")])
    metrics = validated.trainer.callback_metrics
    (table,) = [r.getMessage() for r in caplog.records if "box AP per category" in r.getMessage()]
    title, header, rule, *rows = table.splitlines()
    assert title == "val: box AP per category over 5 images, worst first ('-': no ground truth)"
    assert header.split() == ["|", "category", "|", "AP", "|", "AP50", "|"]
    cells = [[cell.strip() for cell in row.strip("|").split("|")] for row in rows]
    with_truth = [c for c in cells if c[1] != "-"]
    assert [float(c[1]) for c in with_truth] == sorted(float(c[1]) for c in with_truth)  # worst first
    for name, ap, ap50 in with_truth:
        assert float(ap) == pytest.approx(float(metrics[f"val/ap/{name}"]), abs=5e-4)
        assert float(ap50) == pytest.approx(float(metrics[f"val/ap50/{name}"]), abs=5e-4)
    assert {c[0] for c in cells} == {"square", "disk", "triangle"}


def test_validate_and_test_from_the_checkpoint_agree_and_are_coco_map(fitted, large_object_coco, tmp_path):
    """``test`` runs on the validation annotations (CocoDetectionDataModule's test set): the same images and weights
    give the same numbers in both. Each number is a COCO mAP: in [0, 1], above zero on this set of large objects,
    AP50 >= AP and AP50 >= AP75 (a looser IoU matches more), and the mean over categories of the per-category AP."""
    ckpt = str(fitted[2] / "ckpt" / "last.ckpt")
    config = detection_config(tmp_path, large_object_coco)
    validated = lightning_cli(["validate", "--config", config, "--ckpt_path", ckpt]).trainer.callback_metrics
    tested = lightning_cli(["test", "--config", config, "--ckpt_path", ckpt]).trainer.callback_metrics
    val = {k: float(validated[f"val/{k}"]) for k in ("map", "map_50", "map_75")}
    assert all(0 <= v <= 1 for v in val.values()) and val["map_50"] > 0, val
    assert val["map_50"] >= val["map"] and val["map_50"] >= val["map_75"], val
    assert {k: float(tested[f"test/{k}"]) for k in val} == pytest.approx(val, abs=1e-6)
    per_category = [float(validated[f"val/ap/{name}"]) for name in ("square", "disk", "triangle")]
    assert val["map"] == pytest.approx(sum(per_category) / 3, abs=1e-4), per_category


def test_predict_writes_coco_results_in_dataset_category_ids_and_drawings(fitted, tiny_coco):
    _, config, tmp = fitted
    lightning_cli(["predict", "--config", config, "--ckpt_path", str(tmp / "ckpt" / "last.ckpt")])
    results = json.loads((tmp / "predictions.json").read_text())
    val_ids = {img["id"] for img in json.loads(Path(tiny_coco["val_annotations"]).read_text())["images"]}
    assert results and {r["image_id"] for r in results} <= val_ids
    assert {r["category_id"] for r in results} <= {3, 5, 9}
    assert all(len(r["bbox"]) == 4 and r["bbox"][2] >= 0 and 0 <= r["score"] <= 1 for r in results)
    assert len(list((tmp / "drawn").glob("*.png"))) == len(val_ids)
    from pycocotools.coco import COCO  # the results file is what pycocotools loads

    COCO(tiny_coco["val_annotations"]).loadRes(str(tmp / "predictions.json"))


def test_load_from_checkpoint_outside_the_cli_predicts(fitted, tiny_coco):
    _, _, tmp = fitted
    model = ObjectDetector.load_from_checkpoint(tmp / "ckpt" / "last.ckpt", map_location="cpu").eval()
    with torch.no_grad():
        (det,) = model([torch.rand(3, 70, 60)])
    assert det["boxes"].shape[1] == 4 and set(det["labels"].tolist()) <= {3, 5, 9}


def validate_at(task_class, checkpoint, datamodule, precision):
    """Validation metrics of ``checkpoint`` at ``inference_precision=precision``, with the warnings it raised."""
    from lightning.pytorch import Trainer

    model = task_class.load_from_checkpoint(checkpoint, map_location="cpu", inference_precision=precision,
                                            log_images=0)
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (metrics,) = trainer.validate(model, datamodule=datamodule, verbose=False)
    return metrics, [str(w.message) for w in caught if "inference_precision" in str(w.message)]


BF16_NATIVE = native_support(torch.bfloat16, torch.device("cpu"))
needs_native_bf16 = pytest.mark.skipif(not BF16_NATIVE, reason="this CPU has no native bf16 (AMX or AVX-512 BF16): "
                                       "inference_precision=bf16 falls back to float32 here, so bf16 and float32 "
                                       "would be the same computation")


def top_detections_have_partners(got, want, count=10, score_threshold=0.05):
    """Each of ``want``'s ``count`` best detections has one in ``got`` of its label, with IoU >= 0.95 and a score
    within 0.01 (bf16 moves the scores of this checkpoint by < 1e-3 and its boxes by < 0.5% of their size). Only
    detections that clear the detector's score threshold (torchvision's ``box_score_thresh``) by 0.01 are asked for:
    one just above it in one precision may be just below it, and so gone, in the other. Returns how many were."""
    from torchvision.ops import box_iou

    top = want["scores"].argsort(descending=True)[:count]
    top = top[want["scores"][top] >= score_threshold + 0.01]
    iou = box_iou(want["boxes"][top], got["boxes"].float())
    close = (want["labels"][top, None] == got["labels"][None]) & (iou >= 0.95) & \
        ((want["scores"][top, None] - got["scores"][None]).abs() <= 0.01)
    assert bool(close.any(1).all()), f"{int((~close.any(1)).sum())} of {len(top)} without a partner"
    return len(top)


@needs_native_bf16
def test_bf16_inference_gives_the_float32_detections_and_map(fitted, large_object_coco):
    """Where the CPU computes bf16 natively: validation at inference_precision=bf16 warns of no fallback, finds the
    float32 model's best detections (label, box, score) and its mAP, which is above zero (a set of large objects
    that this checkpoint of a few steps already finds now and then)."""
    from tasks.data import CocoDetectionDataModule

    checkpoint = str(fitted[2] / "ckpt" / "last.ckpt")
    data = dict(large_object_coco)
    fp32, _ = validate_at(ObjectDetector, checkpoint, CocoDetectionDataModule(**data, num_workers=0), "32")
    bf16, warned = validate_at(ObjectDetector, checkpoint, CocoDetectionDataModule(**data, num_workers=0), "bf16")
    assert warned == []
    assert fp32["val/map"] > 0.005 and bf16["val/map"] > 0.005  # something found in both: a difference can show
    for key in ("val/map", "val/map_50"):
        assert bf16[key] == pytest.approx(fp32[key], abs=0.002)  # equal to 1e-4 on AVX-512 BF16 EPYC
    datamodule = CocoDetectionDataModule(**data, num_workers=0)
    datamodule.setup("validate")
    images = [image for batch in datamodule.val_dataloader() for image in batch[0]]
    detections = {}
    for precision in ("32", "bf16"):
        model = ObjectDetector.load_from_checkpoint(checkpoint, map_location="cpu", inference_precision=precision,
                                                    log_images=0).eval()
        with torch.no_grad(), model.inference():
            detections[precision] = model(images)
    assert len(images) == 5 and all(len(d["boxes"]) >= 10 for d in detections["32"])
    moved = 0.0
    for low, full in zip(detections["bf16"], detections["32"], strict=True):
        assert low["boxes"].dtype == low["scores"].dtype == torch.float32
        assert top_detections_have_partners(low, full) >= 2 and top_detections_have_partners(full, low) >= 2
        moved = max(moved, float((low["scores"].sort(descending=True).values[:10]
                                  - full["scores"].sort(descending=True).values[:10]).abs().max()))
    assert moved > 1e-5  # bf16 was computed, not float32 again (scores moved by up to 1e-3 here)


@pytest.fixture(scope="module")
def colour_classifier(tmp_path_factory, colour_folder):
    """A classifier fitted through the CLI on the colour set, with the default logger (TensorBoard): the CLI, its
    folder, and the metrics of its last validation."""
    tmp = tmp_path_factory.mktemp("classify")
    args = classification_args(tmp, colour_folder, "--trainer.max_epochs", "3", "--trainer.accelerator", "cpu",
                               "--model.optimizer", "torch.optim.AdamW", "--model.optimizer.lr", "0.001",
                               "--model.log_images", "5")
    cli = lightning_cli(args)
    return cli, tmp, {k: float(v) for k, v in cli.trainer.callback_metrics.items()}


def test_classification_fit_through_the_cli_learns_a_separable_set(colour_classifier):
    """12 steps on images whose class is their bright channel: well above the 1/3 of chance, in validation and, with
    metric objects of its own, in test."""
    cli, _, metrics = colour_classifier
    assert cli.model.hparams.num_classes == 3
    validated = metrics["val/acc"]
    assert validated >= 0.75
    (tested,) = cli.trainer.test(cli.model, datamodule=cli.datamodule)
    assert tested["test/acc"] == validated  # the same images and weights
    assert cli.model.metrics["test"]["acc"] is not cli.model.metrics["val"]["acc"]


@needs_native_bf16
def test_bf16_inference_gives_the_float32_probabilities_and_accuracy(colour_classifier, colour_folder):
    """Where the CPU computes bf16 natively: no fallback warning, each of the 12 validation images' class
    probabilities within 0.01 of float32's (computed here by hand, unfused), so the same predicted classes, and the
    same accuracy in validation."""
    from tasks.data import ImageFolderDataModule
    from tasks.data.images import read_rgb

    (checkpoint,) = colour_classifier[1].rglob("*.ckpt")

    def data():
        return ImageFolderDataModule(**colour_folder, image_size=32, batch_size=6, num_workers=0)

    fp32, warned_fp32 = validate_at(ImageClassifier, checkpoint, data(), "32")
    bf16, warned = validate_at(ImageClassifier, checkpoint, data(), "bf16")
    assert warned == warned_fp32 == []
    assert fp32["val/acc"] >= 0.75
    assert bf16["val/acc"] == fp32["val/acc"]
    model = ImageClassifier.load_from_checkpoint(checkpoint, map_location="cpu", inference_precision="bf16")
    paths = sorted(Path(colour_folder["val_dir"]).rglob("*.png"))
    expected = probabilities_by_hand(model, paths)
    with torch.no_grad():
        images = torch.stack([by_hand(32)(read_rgb(str(p))) for p in paths])
        probabilities = model.eval().predict_batch((images, None))
    assert len(paths) == 12 and float(expected.amax(1).min()) < 0.99  # not all saturated: a difference can show
    torch.testing.assert_close(probabilities, expected, rtol=0, atol=0.01)
    assert torch.equal(probabilities.argmax(1), expected.argmax(1))
    # bf16 was computed, not float32 again (2e-3 here on AVX-512 BF16 EPYC; fused float32 differs by 5e-7)
    assert float((probabilities - expected).abs().max()) > 1e-4


def test_a_data_module_without_categories_validates_with_top1_and_top5_computed_by_hand(tmp_path):
    """Through the CLI: the model is built for the module's 8 classes named by their ids, and ``val/acc`` and
    ``val/acc_top5`` equal the share of images whose label is the top logit / among the 5 top logits of the model's
    own forward (16 images in batches of 6, 8 classes: top-5 is neither 0 nor 1)."""
    cli = lightning_cli(["validate", "--model", "tasks.ImageClassifier", "--model.backbone", "resnet18",
                         "--model.log_images", "0", "--data", "helpers.EightClassTensors", "--seed_everything", "4",
                         "--trainer.accelerator", "cpu", "--trainer.logger", "false",
                         "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path)])
    model, data = cli.model, cli.datamodule
    assert model.hparams.num_classes == 8 and model.categories == {i: str(i) for i in range(8)}
    with torch.no_grad():
        top = model.eval()(data.images).topk(5, dim=1).indices
    top1 = float((top[:, 0] == data.labels).float().mean())
    top5 = float((top == data.labels[:, None]).any(1).float().mean())
    assert 0 < top5 < 1 and top5 != top1, (top1, top5)
    metrics = cli.trainer.callback_metrics
    assert float(metrics["val/acc"]) == pytest.approx(top1, abs=1e-6)
    assert float(metrics["val/acc_top5"]) == pytest.approx(top5, abs=1e-6)


def by_hand(image_size):
    """The validation preprocessing, written out here: resize to image_size / 0.875, center crop, to [0, 1]."""
    from torchvision.transforms import v2

    return v2.Compose([v2.Resize(round(image_size / 0.875), antialias=True), v2.CenterCrop(image_size),
                       v2.ToDtype(torch.float32, scale=True)])


def probabilities_by_hand(model, paths, image_size=32):
    from tasks.data.images import read_rgb

    with torch.no_grad():
        return model.eval()(torch.stack([by_hand(image_size)(read_rgb(str(p))) for p in paths])).softmax(-1)


def test_classification_logs_accuracy_per_class_and_pictures_to_tensorboard(colour_classifier, colour_folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cli, tmp, metrics = colour_classifier
    val = Path(colour_folder["val_dir"])
    for name in ("red", "green", "blue"):
        paths = sorted((val / name).glob("*.png"))
        predicted = probabilities_by_hand(cli.model, paths).argmax(-1)
        expected = float((predicted == cli.model.label_map.names.index(name)).float().mean())
        assert metrics[f"val/acc/{name}"] == pytest.approx(expected), name
    tags = EventAccumulator(str(tmp / "lightning_logs" / "version_0")).Reload().Tags()["images"]
    assert {"val/confusion_matrix", "val/predictions_0"} <= set(tags), tags


def test_classification_predict_on_a_folder_writes_top_classes_and_probabilities(colour_classifier, colour_folder,
                                                                                  tmp_path, caplog):
    """The shipped config as is (a ResNeXt-26 on the shapes set): the checkpoint's model and classes are used."""
    import shutil

    ckpt = str(next((colour_classifier[1] / "lightning_logs").glob("version_0/checkpoints/*.ckpt")))
    shutil.copytree(colour_folder["val_dir"], tmp_path / "new")
    (tmp_path / "new" / "broken.png").write_bytes(b"not a png")
    with caplog.at_level("WARNING", logger="tasks"):
        lightning_cli(["predict", "--config", str(REPO / "configs/classification.yaml"), "--ckpt_path", ckpt,
                       "--data.init_args.predict_dir", str(tmp_path / "new"), "--data.init_args.image_size", "32",
                       "--data.init_args.num_workers", "0", "--trainer.logger", "false",
                       "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path)])
    assert f"cannot decode image '{tmp_path / 'new' / 'broken.png'}'" in caplog.text  # reported, then skipped
    header, *rows = list(csv.reader(open(tmp_path / "predictions.csv")))
    assert header == ["path", "class_1", "probability_1", "class_2", "probability_2", "class_3", "probability_3"]
    paths = sorted((tmp_path / "new").rglob("*/*.png"))
    assert [row[0] for row in rows] == [str(p) for p in paths]
    model = ImageClassifier.load_from_checkpoint(ckpt, map_location="cpu")
    for row, expected in zip(rows, probabilities_by_hand(model, paths), strict=True):
        top = expected.topk(3)
        assert row[1::2] == [model.label_map.names[i] for i in top.indices.tolist()]
        assert [float(p) for p in row[2::2]] == pytest.approx(top.values.tolist(), abs=1e-5)
    assert sum(row[1] == Path(row[0]).parent.name for row in rows) >= 9  # the colours, mostly right


def checkpoint_with_other_classes(source, target, categories):
    """The fitted Faster R-CNN checkpoint cut down to ``categories`` (its first classes' head rows, renamed), as if
    trained on another data set: another count of classes, other ids, other names."""
    checkpoint = torch.load(source, weights_only=True)
    state = checkpoint["state_dict"]
    for name, per_class in (("cls_score", 1), ("bbox_pred", 4)):
        for kind in ("weight", "bias"):
            key = f"model.roi_heads.box_predictor.{name}.{kind}"
            state[key] = state[key][: (len(categories) + 1) * per_class].clone()  # the background, then the classes
    checkpoint["label_map"] = LabelMap.from_categories(categories).with_offset(1).to_dict()
    checkpoint["hyper_parameters"].update(num_classes=len(categories), categories=categories)
    checkpoint.pop("optimizer_states")
    torch.save(checkpoint, target)
    return str(target)


PETS = {1: "cat", 7: "dog"}


def test_predict_on_a_folder_with_the_shipped_config_uses_the_checkpoints_classes(fitted, tiny_coco, tmp_path,
                                                                                  caplog, drawn_captions):
    """configs/detection.yaml as is (the shapes set, a ResNeXt-26): a checkpoint of two other classes predicts on a
    folder of images of every kind, with no annotations; results in the original pixels, as a COCO dataset."""
    import shutil

    from helpers import odd_images

    ckpt = checkpoint_with_other_classes(fitted[2] / "ckpt" / "last.ckpt", tmp_path / "pets.ckpt", PETS)
    shutil.copytree(tiny_coco["val_images"], tmp_path / "new" / "shapes")
    expected = odd_images(tmp_path / "new" / "odd")
    (tmp_path / "new" / "broken.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "new" / "notes.txt").write_text("not an image")
    with caplog.at_level("INFO", logger="tasks"):
        cli = lightning_cli(["predict", "--config", str(REPO / "configs/detection.yaml"), "--ckpt_path", ckpt,
                             "--data.init_args.predict_images", str(tmp_path / "new"),
                             "--data.init_args.num_workers", "0", "--trainer.logger", "false",
                             "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path),
                             "--trainer.callbacks.init_args.draw_dir", str(tmp_path / "drawn"),
                             "--trainer.callbacks.init_args.draw_threshold", "0.0"])
    assert cli.model.categories == PETS and not cli.trainer.predict_loop.return_predictions
    assert f"cannot decode image '{tmp_path / 'new' / 'broken.jpg'}'" in caplog.text  # reported, then skipped
    images = json.loads((tmp_path / "predictions_images.json").read_text())
    assert images["categories"] == [{"id": 1, "name": "cat"}, {"id": 7, "name": "dog"}]
    shapes = sorted(f"shapes/{p.name}" for p in Path(tiny_coco["val_images"]).iterdir())
    assert [i["file_name"] for i in images["images"]] == sorted([*(f"odd/{n}" for n in expected), *shapes])
    sizes = {i["file_name"]: (i["height"], i["width"]) for i in images["images"]}
    for name, decoded in expected.items():  # as displayed: the EXIF-rotated one is 40 high, 20 wide
        assert sizes[f"odd/{name}"] == decoded.shape[1:], name
    results = json.loads((tmp_path / "predictions.json").read_text())
    assert results and {r["category_id"] for r in results} <= set(PETS)
    for r in results:  # boxes in the pixels of the image they came from (to float32's precision)
        x, y, w, h = r["bbox"]
        height, width = sizes[r["file_name"]]
        assert -1e-3 <= x <= x + w <= width + 1e-3 and -1e-3 <= y <= y + h <= height + 1e-3, r
    dataset = COCO(str(tmp_path / "predictions_images.json")).loadRes(str(tmp_path / "predictions.json"))
    assert len(dataset.getAnnIds()) == len(results) and len(dataset.getImgIds()) == len(images["images"])
    assert sorted(str(p.relative_to(tmp_path / "drawn")) for p in (tmp_path / "drawn").rglob("*.png")) == \
        sorted(f"{name}.png" for name in sizes)
    drawn = [caption for captions in drawn_captions for caption in captions]
    assert drawn and all(c.split()[0] in ("cat", "dog") and 0 <= float(c.split()[1]) <= 1 for c in drawn), drawn


def test_the_checkpoints_classes_win_over_other_training_data_where_no_labels_are_compared(fitted, tiny_coco,
                                                                                           tmp_path):
    ckpt = checkpoint_with_other_classes(fitted[2] / "ckpt" / "last.ckpt", tmp_path / "pets.ckpt", PETS)
    config = detection_config(tmp_path, tiny_coco)  # three other categories
    cli = lightning_cli(["predict", "--config", config, "--ckpt_path", ckpt, "--data.init_args.predict_images",
                         tiny_coco["val_images"]])
    assert cli.model.categories == PETS
    assert {r["category_id"] for r in json.loads((tmp_path / "predictions.json").read_text())} <= set(PETS)
    with pytest.raises(ClassesError, match=r"the checkpoint .*pets.ckpt was trained on \{1: 'cat', 7: 'dog'\} \(2 "
                                           r"categories\), but data.val_annotations .* lists \{3: 'square', 5: 'disk', "
                                           r"9: 'triangle'\} \(3 categories\); validate compares"):
        lightning_cli(["validate", "--config", config, "--ckpt_path", ckpt])


def test_with_a_checkpoint_the_run_arguments_of_the_command_line_stand(fitted):
    """Lightning puts a --ckpt_path checkpoint's model arguments over the command line (Lightning issue #20801): for
    what the model is (its min_size here) that stays so; how the run uses it (precision, fusion, pictures, tiles) is
    the command line's."""
    _, config, tmp = fitted
    cli = lightning_cli(["validate", "--config", config, "--ckpt_path", str(tmp / "ckpt" / "last.ckpt"),
                         "--model.init_args.inference_precision", "bf16", "--model.init_args.fused_inference",
                         "false", "--model.init_args.log_images", "0", "--model.init_args.min_size", "96",
                         "--model.init_args.tile", "{size: 128, overlap: 16}"])
    runner = cli.model.inference_runner
    assert (runner.precision, runner.fused, cli.model.log_images) == ("bf16", False, 0)
    assert cli.model.tiling == Tiling(size=128, overlap=16) and "val/map" in cli.trainer.callback_metrics  # by tiles
    assert cli.model.hparams.min_size == 64  # the checkpoint's


@pytest.mark.parametrize("log_images, expected", [([], [f"val/detections_{i}" for i in range(4)]),  # default: 4
                                                   (["--model.init_args.log_images", "0"], [])])  # off
def test_validation_pictures_reach_tensorboard_without_extra_steps(fitted, tmp_path, log_images, expected):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, config, tmp = fitted
    lightning_cli(["validate", "--config", config, "--ckpt_path", str(tmp / "ckpt" / "last.ckpt"), *log_images,
                   "--trainer.logger", "lightning.pytorch.loggers.TensorBoardLogger",
                   "--trainer.logger.save_dir", str(tmp_path)])
    (version,) = tmp_path.glob("*/version_0")  # the config names the folder "logs"
    tags = EventAccumulator(str(version)).Reload().Tags()["images"]
    assert sorted(tags) == expected


@pytest.mark.parametrize("overlay, expected", [
    ("detection_no_flip.yaml", []),
    ("detection_photometric_iou_crop.yaml", ["RandomPhotometricDistort", "RandomZoomOut", "RandomIoUCrop",
                                             "RandomHorizontalFlip"])])
def test_augmentations_from_a_config_train_through_lightning_fit(tmp_path, tiny_coco, overlay, expected):
    cli = lightning_cli(["fit", "--config", detection_config(tmp_path, tiny_coco), "--config",
                         str(REPO / "configs" / "augment" / overlay), "--trainer.max_steps", "3",
                         "--trainer.limit_val_batches", "0"])
    assert [type(t).__name__ for t in cli.datamodule.train_transforms().transforms] == \
        expected + ["ConvertBoundingBoxFormat", "ClampBoundingBoxes", "SanitizeBoundingBoxes",
                    "DropEmptyMasks"]
    assert cli.trainer.global_step == 3 and math.isfinite(float(cli.trainer.callback_metrics["train/loss"]))


@pytest.mark.parametrize("config", sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*.yaml")
                                          if p.name not in ("base_1x.yaml", "base_ade20k.yaml")))
def test_every_shipped_config_parses(config, capsys):
    configs = ["--config", str(REPO / config)]
    if "coco/" in config:
        configs = ["--config", str(REPO / "configs/coco/base_1x.yaml")] + configs
    if "ade20k/" in config:
        configs = ["--config", str(REPO / "configs/ade20k/base_ade20k.yaml")] + configs
    if "augment/" in config:  # additions to the quick start
        configs = ["--config", str(REPO / "configs/detection.yaml")] + configs
    with pytest.raises(SystemExit) as exit_:
        lightning_cli(["fit", *configs, "--print_config"])
    assert exit_.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"].startswith("tasks.")
    assert BASE_ARGUMENTS <= set(printed["model"]["init_args"])  # the forwarded **kwargs among them
    if "ade20k/" in config:  # mmsegmentation's poly schedule; ADE20K's 150 names, read as the data module reads them
        from tasks.data.segmentation import read_classes

        model, data = printed["model"]["init_args"], printed["data"]["init_args"]
        assert model["lr_schedule"] == "poly" and model["warmup_steps"] == 0 and data["reduce_zero_label"] is True
        assert len(read_classes(str(REPO / data["classes"]))) == 150


BASE_ARGUMENTS = {"optimizer", "lr_schedule", "warmup_steps", "milestones", "gamma", "channels_last", "compile",
                  "skip_nonfinite_loss"}


@pytest.mark.parametrize("task", ["tasks.ObjectDetector", "tasks.ImageClassifier"])
def test_help_documents_the_base_arguments_from_the_base_docstring(task, capsys):
    with pytest.raises(SystemExit):
        lightning_cli(["fit", "--model.help", task])
    shown = " ".join(capsys.readouterr().out.split())
    for name in BASE_ARGUMENTS:
        assert f"--model.{name} " in shown, name
    assert "--model.gamma GAMMA lr factor at each milestone. (type: float, default: 0.1)" in shown
    assert "--model.skip_nonfinite_loss {true,false} on a NaN/inf loss, skip the step" in shown


@pytest.mark.parametrize("group, component, argument, documented", [
    ("data", "tasks.data.CocoDetectionDataModule", "predict_images", "images to predict on, with no annotations"),
    ("data", "tasks.data.CocoDetectionDataModule", "train_transforms", "training augmentation, a list of box-aware"),
    ("data", "tasks.data.CocoDetectionDataModule", "val_transforms", "the same for validation and test"),
    ("data", "tasks.data.CocoDetectionDataModule", "horizontal_flip", "in the default augmentation (default 0.5)"),
    ("data", "tasks.data.ImageFolderDataModule", "predict_dir", "images to predict on, with no labels"),
    ("data", "tasks.data.ImageFolderDataModule", "train_transforms", "it must end in ``image_size`` squares"),
    ("data", "tasks.data.ImageFolderDataModule", "val_transforms", "the same for validation, test and predict"),
    ("data", "tasks.data.ImageFolderDataModule", "crop_scale", "in the default training augmentation"),
    ("model", "tasks.ObjectDetector", "log_images", "ground truth and predictions side by side"),
    ("model", "tasks.ImageClassifier", "log_images", "captioned with the predicted class"),
    ("trainer.callbacks", "tasks.CocoResultsWriter", "images_output", "the images file; default beside ``output``"),
    ("trainer.callbacks", "tasks.CocoResultsWriter", "draw_dir", "labelled with category name and score"),
    ("trainer.callbacks", "tasks.ClassificationResultsWriter", "top_k", "classes per image"),
])
def test_help_documents_every_argument_of_prediction_and_augmentation(group, component, argument, documented,
                                                                       capsys):
    with pytest.raises(SystemExit):
        lightning_cli(["fit", f"--{group}.help", component])
    shown = " ".join(capsys.readouterr().out.split())
    option = f"--{group}.{argument}"
    own = shown.rsplit(f"{option} ", 1)[1].split(f"{option}+ {argument.upper()}")[-1]  # after the usage (and alias)
    assert documented in own.split(" --")[0]


@pytest.mark.parametrize("argument, named", [("--model.init_args.min_sizee=3", "min_sizee"),
                                             ("--model.init_args.max_size=big", "max_size"),
                                             ("--trainer.max_epochz=1", "max_epochz")])
def test_unknown_keys_and_wrong_types_fail_naming_them(argument, named, capsys):
    with pytest.raises(SystemExit) as exit_:
        lightning_cli(["fit", "--config", str(REPO / "configs/detection.yaml"), argument, "--print_config"])
    assert exit_.value.code != 0
    assert named in capsys.readouterr().err


def tiny_fit_args(tmp_path, data, precision):
    return ["fit", "--config", detection_config(tmp_path, data), "--trainer.precision", precision,
            "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1"]


def fit_recording_trunk_dtypes(args) -> tuple:
    """Run ``fit`` through the CLI as the command line does: the CLI, and the dtypes of every feature map a trunk
    gave in training."""
    dtypes = set()

    def hook(module, inputs, out):
        if isinstance(module, rb.ResNeXt) and module.training:
            dtypes.update(v.dtype for v in out.values())

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        return lightning_cli(args), dtypes
    finally:
        handle.remove()


def test_detection_trains_in_bf16_mixed_on_cpu(tmp_path, tiny_coco):
    cli, dtypes = fit_recording_trunk_dtypes(tiny_fit_args(tmp_path, tiny_coco, "bf16-mixed"))
    assert dtypes == {torch.bfloat16}
    assert math.isfinite(float(cli.trainer.callback_metrics["train/loss"]))


def test_classification_trains_in_bf16_mixed_on_cpu(tmp_path, tiny_folder, caplog):
    args = classification_args(tmp_path, tiny_folder, "--trainer.max_steps", "2", "--trainer.accelerator", "cpu",
                               "--trainer.precision", "bf16-mixed", "--trainer.limit_val_batches", "1")
    with caplog.at_level(logging.INFO, logger="tasks"):
        cli, dtypes = fit_recording_trunk_dtypes(args)  # the command line's fit: its start logs the precision
    assert dtypes == {torch.bfloat16}
    assert math.isfinite(float(cli.trainer.callback_metrics["train/loss"]))
    # fit says which precision trains, on which CPU (its flags), and warns where bf16 is emulated
    (line,) = [r for r in caplog.records if r.message.startswith("trainer.precision=bf16-mixed on cpu (CPU flags: ")]
    assert (line.levelno == logging.WARNING) == (not native_support(torch.bfloat16, torch.device("cpu")))


@pytest.mark.parametrize("precision, native, level, advice", [
    ("32-true", True, logging.INFO, "--trainer.precision bf16-mixed trains faster"),
    ("bf16-mixed", False, logging.WARNING, "use --trainer.precision 32-true here"),
    ("32-true", False, logging.INFO, None), ("bf16-mixed", True, logging.INFO, None)])
def test_fit_advises_the_precision_this_cpu_trains_fastest_in(precision, native, level, advice, monkeypatch):
    from resnext_backbones.deployment import device

    monkeypatch.setattr(device, "native_support", lambda dtype, where: dtype == torch.float32 or native)
    got_level, message = device.training_precision_advice(precision, torch.device("cpu"))
    assert got_level == level and message.startswith(f"trainer.precision={precision} on cpu")
    assert (advice in message) if advice else ("--trainer.precision" not in message)


def test_precision_auto_is_chosen_before_the_trainer_is_built_and_logged_and_an_explicit_one_kept(
        tmp_path, tiny_coco, caplog, monkeypatch):
    config = detection_config(tmp_path, tiny_coco)
    with caplog.at_level(logging.INFO, logger="tasks"):
        trainer = lightning_cli(["--config", config, "--trainer.precision", "auto"], run=False).trainer
    # this machine's answer by the rule: bf16-mixed only where bf16 is native (and measured faster: both kinds are)
    assert trainer.precision == ("bf16-mixed" if native_support(torch.bfloat16, torch.device("cpu")) else "32-true")
    (line,) = [r.message for r in caplog.records if r.message.startswith("trainer.precision=auto: ")]
    assert line.startswith(f"trainer.precision=auto: {trainer.precision}, as cpu (CPU flags: ")
    import tasks.cli

    monkeypatch.setattr(tasks.cli, "auto_training_precision", lambda device: ("bf16-mixed", f"{device} said so"))
    assert lightning_cli(["--config", config, "--trainer.precision", "auto"], run=False).trainer.precision == \
        "bf16-mixed"
    assert lightning_cli(["--config", config, "--trainer.precision", "32-true"], run=False).trainer.precision == \
        "32-true"


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_detection_trains_in_mixed_precision_on_cuda(tmp_path, tiny_coco, precision):
    cli = lightning_cli(tiny_fit_args(tmp_path, tiny_coco, precision) + ["--trainer.accelerator", "gpu"])
    assert math.isfinite(float(cli.trainer.callback_metrics["train/loss"]))


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_classification_trains_in_mixed_precision_on_cuda(tmp_path, tiny_folder, precision):
    args = classification_args(tmp_path, tiny_folder, "--model.channels_last", "true", "--trainer.max_steps", "2",
                               "--trainer.accelerator", "gpu", "--trainer.precision", precision,
                               backbone="resnext26_32x4d", image_size=64)
    cli = lightning_cli(args)
    assert math.isfinite(float(cli.trainer.callback_metrics["train/loss"]))


def test_ddp_on_two_processes_trains_with_frozen_stages(fitted, tmp_path):
    """DDP needs no find_unused_parameters with frozen stages. (That each image is evaluated once under DDP, its mAP
    the single process's, is test_ddp_on_two_processes_gives_the_single_process_segm_map's, for boxes and masks.)"""
    _, config, tmp = fitted
    ddp = tmp_path / "ddp"
    run_cli("fit", "--config", config, "--model.init_args.trainable_stages", "2", "--trainer.max_steps", "2",
            "--trainer.limit_val_batches", "1", "--trainer.devices", "2", "--trainer.strategy", "ddp",
            "--trainer.logger.init_args.save_dir", str(ddp), cwd=tmp_path)
    assert last_metrics(ddp)["train/loss"] > 0


def test_predict_on_two_processes_writes_what_one_process_writes(fitted, tiny_coco, tmp_path):
    """Each DDP process writes the rows of its share of the images to a part of its own; merged in image order, the
    files equal those of one process."""
    _, config, tmp = fitted
    written = {}
    for name, run in (("one", lightning_cli), ("two", run_on_two_processes)):  # the reference in this process
        output = tmp_path / name / "predictions.json"
        run(["predict", "--config", config, "--ckpt_path", str(tmp / "ckpt" / "last.ckpt"),
             "--data.init_args.predict_images", tiny_coco["val_images"], "--data.init_args.batch_size", "1",
             "--trainer.callbacks.init_args.output", str(output)])
        assert sorted(p.name for p in output.parent.iterdir()) == ["predictions.json", "predictions_images.json"]
        written[name] = (json.loads(output.read_text()), json.loads((output.parent / "predictions_images.json")
                                                                   .read_text()))
    (one, one_images), (two, two_images) = written["one"], written["two"]
    assert two_images == one_images and len(one_images["images"]) == 5
    assert [(r["image_id"], r["file_name"], r["category_id"]) for r in two] == \
        [(r["image_id"], r["file_name"], r["category_id"]) for r in one]
    flat = lambda results: [v for r in results for v in r["bbox"] + [r["score"]]]  # noqa: E731
    assert flat(two) == pytest.approx(flat(one), abs=1e-4)


def test_the_installed_lightning_command_exits_cleanly(tmp_path):
    import shutil

    script = shutil.which("lightning")
    if script is None:
        pytest.skip("the package is not installed (pip install -e .)")
    result = subprocess.run([script, "fit", "--config", str(REPO / "configs/detection.yaml"), "--print_config"],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "class_path: tasks.ObjectDetector" in result.stdout


# -- instance segmentation: configs/instance_segmentation.yaml made tiny


def instance_segmentation_args(tmp_path, data, *extra):
    """The shipped quick start (Mask R-CNN, data.masks unset: the data module follows the model) on tiny data: a
    resnet18 at 64 px with small heads, one epoch of 4 steps, a CSV logger."""
    overlay = {
        "model": {"init_args": {"backbone": "resnet18", "min_size": 64, "max_size": 64, "warmup_steps": 2,
                                "detector_kwargs": SMALL_HEADS, "log_images": 0}},
        "data": {"init_args": {**data, "batch_size": 2, "num_workers": 0}},
        "trainer": {"accelerator": "cpu", "max_epochs": 1, "default_root_dir": str(tmp_path),
                    "enable_model_summary": False, "enable_progress_bar": False, "log_every_n_steps": 1,
                    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                               "init_args": {"save_dir": str(tmp_path), "name": "logs"}}}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(overlay))
    return ["--config", str(REPO / "configs/instance_segmentation.yaml"), "--config", str(path), *extra]


@pytest.fixture(scope="module")
def mask_fitted(tmp_path_factory, tiny_coco):
    tmp = tmp_path_factory.mktemp("fit_masks")
    cli = lightning_cli(["fit", *instance_segmentation_args(tmp, tiny_coco)])
    return cli, tmp, next((tmp / "logs").glob("version_0/checkpoints/last.ckpt"))


def test_instance_segmentation_fits_with_masks_from_the_data_and_logs_segm_metrics(mask_fitted):
    cli, _, ckpt = mask_fitted
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    for key in ["train/loss_mask", "val/map", "val/map_50", "val/segm_map", "val/segm_map_50", "val/segm_map_75",
                "val/ap/disk", "val/segm_ap/disk", "val/segm_ap50/triangle"]:
        assert key in metrics and math.isfinite(metrics[key]), key
    assert cli.model.predicts_masks and cli.datamodule.masks is None and cli.datamodule.wants_masks()
    assert cli.trainer.checkpoint_callback.monitor == "val/segm_map"
    assert float(cli.trainer.checkpoint_callback.best_model_score) == metrics["val/segm_map"]
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert checkpoint["label_map"]["offset"] == 1 and checkpoint["hyper_parameters"]["architecture"] == "mask_rcnn"


def raw_segm_cocoeval(annotations: str, results: str) -> dict:
    """pycocotools' own segm mAP of a results file, its boxes left out as detectron2 does (with them, loadRes gives
    each result its box's area; the mAP over all areas is the same)."""
    ground_truth = COCO(annotations)
    masks_only = [{k: v for k, v in r.items() if k != "bbox"} for r in json.loads(Path(results).read_text())]
    evaluation = COCOeval(ground_truth, ground_truth.loadRes(masks_only), "segm")
    evaluation.evaluate(), evaluation.accumulate(), evaluation.summarize()
    return dict(zip(["segm_map", "segm_map_50", "segm_map_75"], evaluation.stats[:3].tolist(), strict=True))


@pytest.fixture(scope="module")
def box_filling_mask_checkpoint(fitted, tmp_path_factory):
    """The fitted Faster R-CNN checkpoint (whose boxes find the large shapes now and then) as a Mask R-CNN whose masks
    fill each detected box: its mask head added with a constant output (weights 0, bias +10). Four steps do not teach
    masks; what the evaluation path needs is masks that match some shapes (squares nearly exactly)."""
    checkpoint = torch.load(fitted[2] / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    init = fitted[0].config["fit"]["model"]["init_args"]
    mask_rcnn = ObjectDetector(architecture="mask_rcnn", backbone=init["backbone"], num_classes=3,
                               detector_kwargs=SMALL_HEADS, norm="bn", trainable_stages=5)
    heads = {k: v for k, v in mask_rcnn.state_dict().items() if k.startswith(("model.roi_heads.mask_head",
                                                                               "model.roi_heads.mask_predictor"))}
    heads["model.roi_heads.mask_predictor.mask_fcn_logits.weight"].zero_()
    heads["model.roi_heads.mask_predictor.mask_fcn_logits.bias"].fill_(10.0)
    checkpoint["state_dict"].update(heads)
    checkpoint["hyper_parameters"]["architecture"] = "mask_rcnn"
    path = tmp_path_factory.mktemp("masks") / "box_filling.ckpt"
    torch.save(checkpoint, path)
    return str(path)


def test_mask_validate_and_predict_of_one_checkpoint_equal_raw_segm_cocoeval_of_the_written_masks(
        box_filling_mask_checkpoint, large_object_coco, tmp_path):
    """The logged val/segm_map*, and predictions.json's RLE masks as pycocotools reads them, agree."""
    config = detection_config(tmp_path, large_object_coco, architecture="mask_rcnn")
    validated = lightning_cli(["validate", "--config", config, "--ckpt_path", box_filling_mask_checkpoint])
    logged = {k: float(validated.trainer.callback_metrics[f"val/{k}"])
              for k in ("segm_map", "segm_map_50", "segm_map_75")}
    lightning_cli(["predict", "--config", config, "--ckpt_path", box_filling_mask_checkpoint])
    reference = raw_segm_cocoeval(large_object_coco["val_annotations"], str(tmp_path / "predictions.json"))
    assert 0 < reference["segm_map"] < 0.95 and reference["segm_map_50"] > 0, reference
    assert logged == pytest.approx(reference, abs=1e-6)
    assert validated.datamodule.masks is None and validated.datamodule.wants_masks()  # followed the model


def test_instance_segmentation_predicts_rle_masks_that_pycocotools_loads_on_images_without_annotations(
        mask_fitted, large_object_coco, tmp_path):
    _, _, ckpt = mask_fitted
    args = instance_segmentation_args(tmp_path, large_object_coco)
    lightning_cli(["predict", *args, "--ckpt_path", str(ckpt), "--data.init_args.predict_images",
                   large_object_coco["val_images"], "--trainer.callbacks.init_args.output",
                   str(tmp_path / "new.json")])
    results = json.loads((tmp_path / "new.json").read_text())
    assert results and all(r["segmentation"]["size"] == [96, 96] for r in results)
    assert len(COCO(str(tmp_path / "new_images.json")).loadRes(str(tmp_path / "new.json")).getAnnIds()) == len(results)


@pytest.mark.parametrize("config", ["configs/instance_segmentation.yaml", "configs/coco/mask_rcnn_X_101_32x8d_FPN.yaml",
                                    "configs/coco/mask_rcnn_X_50_32x4d_FPN.yaml"])
def test_the_mask_configs_keep_the_best_checkpoint_by_mask_ap_and_the_writer_last(config, capsys):
    configs = ["--config", str(REPO / config)]
    if "coco/" in config:
        configs = ["--config", str(REPO / "configs/coco/base_1x.yaml")] + configs
    with pytest.raises(SystemExit):
        lightning_cli(["fit", *configs, "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["init_args"]["architecture"] == "mask_rcnn"
    callbacks = printed["trainer"]["callbacks"]
    checkpoints = [c["init_args"] for c in callbacks if c["class_path"].endswith("ModelCheckpoint")]
    assert checkpoints[0]["monitor"] == "val/segm_map"  # the first: --ckpt_path best
    assert [c["monitor"] for c in checkpoints[1:]] == [None]  # last.ckpt's own
    assert callbacks[-1]["class_path"] == "tasks.CocoResultsWriter"


def test_ddp_on_two_processes_gives_the_single_process_segm_map(box_filling_mask_checkpoint, large_object_coco,
                                                                 tmp_path):
    """Masks travel between the processes (as RLE) and each image is evaluated once."""
    config = detection_config(tmp_path, large_object_coco, architecture="mask_rcnn")
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    for run, log_dir in ((lightning_cli, single), (run_on_two_processes, ddp)):  # the reference in this process
        run(["validate", "--config", config, "--ckpt_path", box_filling_mask_checkpoint,
             "--trainer.logger.init_args.save_dir", str(log_dir)])
    one, two = last_metrics(single), last_metrics(ddp)
    assert one["val/segm_map"] > 0 and one["val/segm_map_50"] > 0, one
    for key in ("val/segm_map", "val/segm_map_50", "val/segm_map_75", "val/map", "val/segm_ap/square"):
        assert one[key] == pytest.approx(two[key], abs=1e-6), key


def test_fit_through_the_cli_with_weight_averaging_validates_and_checkpoints_the_average(tmp_path, tiny_coco):
    # the optimizer as the shipped configs give it: the command line makes it a closure over the LightningCLI
    optimizer = {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.01, "momentum": 0.9}}
    args = ["fit", "--config", detection_config(tmp_path, tiny_coco, optimizer=optimizer),
            "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
            "--trainer.callbacks+=lightning.pytorch.callbacks.EMAWeightAveraging", "--trainer.callbacks.decay", "0.5"]
    cli = lightning_cli(args)
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    trained, averaged = checkpoint["current_model_state"], checkpoint["state_dict"]
    differ = [k for k in averaged if averaged[k].is_floating_point() and not torch.equal(averaged[k], trained[k])]
    assert len(differ) > 10, "two steps at decay 0.5 leave the average apart from the trained weights"
    assert math.isfinite(float(cli.trainer.callback_metrics["val/map"]))
