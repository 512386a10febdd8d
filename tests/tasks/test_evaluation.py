"""The logged mAP (boxes, and masks for Mask R-CNN) is exactly what raw pycocotools computes on the same
predictions."""

import copy
import json
import shutil

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
from helpers import uncompressed_rle
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from tasks import ObjectDetector
from tasks.data import CocoDetection, CocoIndex
from tasks.detection import coco_map


@pytest.fixture
def hard_val_set(tiny_coco, tmp_path):
    """The tiny val set plus a crowd region (a box, and a mask as COCO stores crowds: an uncompressed RLE) and an
    image without objects (its ids stay sparse: 3, 5, 9). The other instances have polygons or compressed RLE."""
    data = json.loads(open(tiny_coco["val_annotations"]).read())
    images = tmp_path / "images"
    shutil.copytree(tiny_coco["val_images"], images)
    first = data["images"][0]
    shutil.copy(images / first["file_name"], images / "empty.jpg")
    data["images"].append({**first, "id": 1000, "file_name": "empty.jpg"})
    crowd = copy.deepcopy(data["annotations"][0])
    (under,) = [image for image in data["images"] if image["id"] == crowd["image_id"]]
    crowd_mask = np.zeros((under["height"], under["width"]), dtype=np.uint8)
    crowd_mask[5:55, 0:60] = 1
    crowd.update(id=9999, iscrowd=1, bbox=[0, 0, 60, 60], area=3000.0, segmentation=uncompressed_rle(crowd_mask))
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


def as_prediction(results, size=None) -> dict:
    """COCO results of one image as the detector gives them (xyxy boxes; with the image's ``size``, the masks decoded
    from their RLE ``segmentation``, N x H x W bool)."""
    boxes = torch.tensor([r["bbox"] for r in results], dtype=torch.float64).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    prediction = {"boxes": boxes.float(), "scores": torch.tensor([r["score"] for r in results]),
                  "labels": torch.tensor([r["category_id"] for r in results], dtype=torch.long)}
    if size is not None:
        prediction["masks"] = torch.zeros((0, *size), dtype=torch.bool) if not results else torch.from_numpy(
            mask_utils.decode([r["segmentation"] for r in results]).transpose(2, 0, 1).astype(bool))
    return prediction


def evaluate_through_the_task(annotations: str, images: str, results, backend: str, architecture="faster_rcnn"):
    """``(model, targets, mAP result)``: ``results`` (COCO results) scored by the detector's own metric, with the
    targets its data and label map make of the annotation file (Mask R-CNN: with their masks, and the predicted
    masks kept as the task keeps them until the end of an epoch)."""
    model = ObjectDetector(architecture=architecture, backbone="resnet18", num_classes=3,
                           categories={3: "square", 5: "disk", 9: "triangle"}, map_backend=backend)
    masks = model.predicts_masks
    dataset = CocoDetection(CocoIndex.from_file(annotations, masks=masks), images, keep_crowd=True, masks=masks)
    preds, targets = [], []
    for i in range(len(dataset)):
        image, target = dataset[i]
        targets.append(model._metric_target(target))
        prediction = as_prediction([r for r in results if r["image_id"] == target["image_id"]],
                                   image.shape[-2:] if masks else None)
        preds.append(model._metric_prediction(prediction))
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


def synthetic_mask_predictions(gt: COCO, seed: int = 0):
    """Each true mask shifted by a few pixels, cut or grown, with random scores and labels, plus false positives
    (rectangles) on every image; each as a COCO segm result (compressed RLE) with its box."""
    rng = np.random.default_rng(seed)
    results = []

    def result(image_id, category, mask, score):
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        rle["counts"] = rle["counts"].decode("ascii")
        return {"image_id": image_id, "category_id": category, "segmentation": rle,
                "bbox": mask_utils.toBbox(rle).tolist(), "score": score}

    for image_id in gt.getImgIds():
        image = gt.loadImgs(image_id)[0]
        for ann in gt.loadAnns(gt.getAnnIds(imgIds=image_id, iscrowd=False)):
            mask = np.roll(gt.annToMask(ann), tuple(rng.integers(-4, 5, 2)), axis=(0, 1))
            if rng.random() < 0.3:
                mask[: rng.integers(0, mask.shape[0])] = 0  # cut off the top part
            category = ann["category_id"] if rng.random() < 0.8 else int(rng.choice([3, 5, 9]))
            results.append(result(image_id, category, mask, rng.random()))
        for _ in range(3):
            mask = np.zeros((image["height"], image["width"]), dtype=np.uint8)
            x, y = rng.integers(0, 70, 2)
            mask[y:y + rng.integers(5, 40), x:x + rng.integers(5, 40)] = 1
            results.append(result(image_id, int(rng.choice([3, 5, 9])), mask, rng.random() * 0.5))
    return results


def raw_segm_cocoeval(gt: COCO, results, categories=None):
    """pycocotools' own segm evaluation. The results go in without their boxes, as detectron2 does: with a ``bbox``,
    ``loadRes`` gives each result the box's area instead of the mask's (the mAP over all areas is the same)."""
    masks_only = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
    evaluation = COCOeval(gt, detections_coco(gt, masks_only), "segm")
    if categories is not None:
        evaluation.params.catIds = categories
    evaluation.evaluate(), evaluation.accumulate(), evaluation.summarize()
    return evaluation.stats


@pytest.mark.parametrize("backend", ["pycocotools", "faster_coco_eval"])
@pytest.mark.parametrize("detections", ["some", "none at all"])
def test_logged_segm_map_equals_raw_pycocotools(hard_val_set, backend, detections):
    """Mask R-CNN's segm mAP (and its box mAP, from the same evaluation) against raw COCOeval on the same masks: the
    ground truth as pycocotools decodes it from polygons, compressed RLE and the crowd's uncompressed RLE; an image
    without objects."""
    annotations, images = hard_val_set
    gt = COCO(annotations)
    results = synthetic_mask_predictions(gt) if detections == "some" else []
    expected = raw_segm_cocoeval(gt, results)
    boxes = COCOeval(gt, detections_coco(gt, copy.deepcopy(results)), "bbox")
    boxes.evaluate(), boxes.accumulate(), boxes.summarize()

    model, targets, result = evaluate_through_the_task(annotations, images, results, backend, "mask_rcnn")
    crowd = [t for t in targets if int(t["iscrowd"].sum())]
    assert len(crowd) == 1 and int(crowd[0]["masks"].decode()[crowd[0]["iscrowd"].bool()].sum()) == 50 * 60
    assert any(len(t["boxes"]) == 0 for t in targets)
    if results:
        assert 0.05 < expected[0] < 0.95 and 0.05 < boxes.stats[0] < 0.95  # non-trivial cases
        assert abs(expected[0] - boxes.stats[0]) > 0.01  # masks and boxes are scored apart
    assert float(result["segm_map"]) == pytest.approx(expected[0], abs=1e-4)
    assert float(result["segm_map_50"]) == pytest.approx(expected[1], abs=1e-4)
    assert float(result["segm_map_75"]) == pytest.approx(expected[2], abs=1e-4)
    assert float(result["bbox_map"]) == pytest.approx(boxes.stats[0], abs=1e-4)

    from tasks.per_class import per_category_ap

    per_category = per_category_ap(result, model.metrics["val"].iou_thresholds, "segm_")
    for category in (3, 5, 9) if results else ():
        ap, ap50 = raw_segm_cocoeval(gt, results, [category])[:2]
        assert per_category[category] == pytest.approx((ap, ap50), abs=1e-6)
