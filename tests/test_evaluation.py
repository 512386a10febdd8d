"""The logged mAP is exactly what raw pycocotools computes on the same predictions."""

import copy
import json
import shutil

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from tasks import ObjectDetector
from tasks.data import CocoDetection, CocoIndex
from tasks.detection import coco_map


@pytest.fixture
def hard_val_set(tiny_coco, tmp_path):
    """The tiny val set plus a crowd box and an image without objects (its ids stay sparse: 3, 5, 9)."""
    data = json.loads(open(tiny_coco["val_annotations"]).read())
    images = tmp_path / "images"
    shutil.copytree(tiny_coco["val_images"], images)
    first = data["images"][0]
    shutil.copy(images / first["file_name"], images / "empty.jpg")
    data["images"].append({**first, "id": 1000, "file_name": "empty.jpg"})
    crowd = copy.deepcopy(data["annotations"][0])
    crowd.update(id=9999, iscrowd=1, bbox=[0, 0, 60, 60], area=3000.0)
    data["annotations"].append(crowd)
    (tmp_path / "val.json").write_text(json.dumps(data))
    return str(tmp_path / "val.json"), str(images)


def synthetic_predictions(gt: COCO, seed: int = 0):
    """Jittered true boxes with random scores and labels, plus false positives, on every image."""
    rng = np.random.default_rng(seed)
    results = []
    for image_id in gt.getImgIds():
        for ann in gt.loadAnns(gt.getAnnIds(imgIds=image_id)):
            x, y, w, h = ann["bbox"]
            box = [x + rng.normal(0, 3), y + rng.normal(0, 3), w * rng.uniform(0.8, 1.2), h * rng.uniform(0.8, 1.2)]
            category = ann["category_id"] if rng.random() < 0.8 else int(rng.choice([3, 5, 9]))
            results.append({"image_id": image_id, "category_id": category, "bbox": box, "score": rng.random()})
        for _ in range(3):
            box = [*rng.uniform(0, 80, 2), *rng.uniform(5, 40, 2)]
            results.append({"image_id": image_id, "category_id": int(rng.choice([3, 5, 9])), "bbox": box,
                            "score": rng.random() * 0.5})
    return results


def detections_coco(gt: COCO, results) -> COCO:
    """The results as pycocotools' own results object (``loadRes`` cannot take an empty list)."""
    if results:
        return gt.loadRes(copy.deepcopy(results))
    empty = COCO()
    empty.dataset = {"images": gt.dataset["images"], "categories": gt.dataset["categories"], "annotations": []}
    empty.createIndex()
    return empty


def as_prediction(results) -> dict:
    """COCO results of one image as the detector gives them (xyxy boxes)."""
    boxes = torch.tensor([r["bbox"] for r in results], dtype=torch.float64).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    return {"boxes": boxes.float(), "scores": torch.tensor([r["score"] for r in results]),
            "labels": torch.tensor([r["category_id"] for r in results], dtype=torch.long)}


def evaluate_through_the_task(annotations: str, images: str, results, backend: str):
    """``(model, targets, mAP result)``: ``results`` (COCO results) scored by the detector's own metric, with the
    targets its data and label map make of the annotation file."""
    model = ObjectDetector(backbone="resnet18", num_classes=3, categories={3: "square", 5: "disk", 9: "triangle"},
                           map_backend=backend)
    dataset = CocoDetection(CocoIndex.from_file(annotations), images, keep_crowd=True)
    preds, targets = [], []
    for i in range(len(dataset)):
        _, target = dataset[i]
        targets.append(model._metric_target(target))
        preds.append(as_prediction([r for r in results if r["image_id"] == target["image_id"]]))
    return model, targets, coco_map(model.metrics["val"], preds, targets)


@pytest.mark.parametrize("backend", ["pycocotools", "faster_coco_eval"])
@pytest.mark.parametrize("detections", ["some", "none at all"])
def test_logged_map_equals_raw_pycocotools(hard_val_set, backend, detections):
    annotations, images = hard_val_set
    gt = COCO(annotations)
    results = synthetic_predictions(gt) if detections == "some" else []
    evaluation = COCOeval(gt, detections_coco(gt, results), "bbox")
    evaluation.evaluate(), evaluation.accumulate(), evaluation.summarize()

    _, targets, result = evaluate_through_the_task(annotations, images, results, backend)
    assert sum(int(t["iscrowd"].sum()) for t in targets) == 1 and any(len(t["boxes"]) == 0 for t in targets)
    if results:
        assert 0.05 < evaluation.stats[0] < 0.95  # a non-trivial case
    assert float(result["map"]) == pytest.approx(evaluation.stats[0], abs=1e-4)
    assert float(result["map_50"]) == pytest.approx(evaluation.stats[1], abs=1e-4)
    assert float(result["map_75"]) == pytest.approx(evaluation.stats[2], abs=1e-4)


@pytest.mark.parametrize("backend", ["pycocotools", "faster_coco_eval"])
def test_ap_per_category_equals_raw_pycocotools_restricted_to_the_category(hard_val_set, backend):
    """AP and AP50 per category from the one evaluation equal pycocotools' summary of an evaluation of that category
    alone; a category with detections but no ground truth (here 9: its boxes removed) has none."""
    from tasks.per_class import per_category_ap

    annotations, images = hard_val_set
    data = json.loads(open(annotations).read())
    data["annotations"] = [a for a in data["annotations"] if a["category_id"] != 9]
    open(annotations, "w").write(json.dumps(data))
    gt = COCO(annotations)
    results = synthetic_predictions(gt, seed=3)
    results += [{"image_id": image_id, "category_id": 9, "bbox": [10.0, 10.0, 20.0, 20.0], "score": 0.9}
                for image_id in gt.getImgIds()[:2]]  # detections of a category with no ground truth
    expected = {}
    for category in (3, 5):
        evaluation = COCOeval(gt, detections_coco(gt, results), "bbox")
        evaluation.params.catIds = [category]
        evaluation.evaluate(), evaluation.accumulate(), evaluation.summarize()
        expected[category] = tuple(evaluation.stats[:2].tolist())

    model, _, result = evaluate_through_the_task(annotations, images, results, backend)
    per_category = per_category_ap(result, model.metrics["val"].iou_thresholds)
    assert sorted(per_category) == [3, 5]
    for category in (3, 5):
        assert 0.05 < expected[category][0] < 0.95  # a non-trivial case
        assert per_category[category] == pytest.approx(expected[category], abs=1e-6)
