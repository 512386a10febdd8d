"""Rare classes: LVIS repeat factors on the detection data module, inverse-frequency sampling and class weights for
classification; the sampler's epochs sharded across processes and resumed mid-epoch."""

import json
import math
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

import tasks.data.base as base
from tasks.data import CocoDetectionDataModule
from tasks.data.samplers import RepeatFactorSampler, balanced_repeat_factors

# classes per image of an imbalanced set: class 0 nearly everywhere, class 1 in 4 of 20 images, class 2 in one
IMAGE_CLASSES = [[0]] * 14 + [[0, 1], [1], [0, 1], [1, 1], [0, 2], []]


def imbalanced_coco(root, crowd_of_class_2=False):
    root.mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i, classes in enumerate(IMAGE_CLASSES):
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "height": 16, "width": 16})
        for j, c in enumerate(classes):
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": 10 + c, "bbox": [j, j, 5, 5],
                         "area": 25, "iscrowd": int(crowd_of_class_2 and c == 2)})
    path = root / "labels.json"
    path.write_text(json.dumps({"images": images, "annotations": anns,
                                "categories": [{"id": 10 + c, "name": f"c{c}"} for c in range(3)]}))
    return str(path), str(root)


def lvis_formula(image_classes, t):
    """The LVIS paper's r(c) = max(1, sqrt(t / f(c))), r(I) = max over the image's classes, written out."""
    n = len(image_classes)
    fraction = {c: sum(c in classes for classes in image_classes) / n for c in {c for cs in image_classes for c in cs}}
    per_class = {c: max(1.0, math.sqrt(t / f)) for c, f in fraction.items()}
    return [max((per_class[c] for c in classes), default=1.0) for classes in image_classes]


def test_repeat_factors_follow_the_lvis_formula(tmp_path):
    annotations, images = imbalanced_coco(tmp_path)
    module = CocoDetectionDataModule(annotations, images, annotations, images, num_workers=0, repeat_threshold=0.3)
    want = lvis_formula(IMAGE_CLASSES, 0.3)
    assert module.repeat_factors() == pytest.approx(want)
    assert max(want) == pytest.approx(math.sqrt(0.3 / 0.05)) and min(want) == 1.0  # the rare image, the common ones
    assert want[15] > 1 and want[15] == pytest.approx(math.sqrt(0.3 / 0.2))
    plain = CocoDetectionDataModule(annotations, images, annotations, images, num_workers=0)
    assert plain.repeat_factors().tolist() == [1.0] * len(IMAGE_CLASSES)


def test_crowd_boxes_do_not_count_for_the_repeat_factors(tmp_path):
    annotations, images = imbalanced_coco(tmp_path, crowd_of_class_2=True)
    module = CocoDetectionDataModule(annotations, images, annotations, images, num_workers=0, repeat_threshold=0.3)
    without = [[c for c in classes if c != 2] for classes in IMAGE_CLASSES]
    assert module.repeat_factors() == pytest.approx(lvis_formula(without, 0.3))


def test_a_threshold_that_is_not_a_positive_fraction_is_refused(tmp_path):
    annotations, images = imbalanced_coco(tmp_path)
    with pytest.raises(ValueError, match="data.repeat_threshold=0 must be a positive fraction"):
        CocoDetectionDataModule(annotations, images, annotations, images, repeat_threshold=0)


def test_the_training_loader_draws_each_image_by_its_repeat_factor_with_new_coins_each_epoch(tmp_path):
    annotations, images = imbalanced_coco(tmp_path)
    module = CocoDetectionDataModule(annotations, images, annotations, images, num_workers=0, repeat_threshold=0.3)
    module.setup("fit")
    sampler = module.train_dataloader().sampler
    assert isinstance(sampler, RepeatFactorSampler)
    factors = np.asarray(lvis_formula(IMAGE_CLASSES, 0.3))
    assert len(sampler) == int(factors.sum())
    counts, draws = np.zeros(len(factors)), []
    for epoch in range(400):
        sampler.set_epoch(epoch)
        draw = sampler.epoch_draw()
        draws.append(draw)
        counts += np.bincount(draw, minlength=len(factors))
    assert draws[0] != draws[1]  # reseeded each epoch
    sampler.set_epoch(1)
    assert sampler.epoch_draw() == draws[1]  # and the same again for that epoch
    # stochastic rounding: each image floor(r) + Bernoulli(frac r) times, r on average (within 4 standard errors)
    spread = np.sqrt(np.maximum((factors - np.floor(factors)) * (np.ceil(factors) - factors), 1e-3) / 400)
    assert np.all(np.abs(counts / 400 - factors) < 4 * spread + 0.03), (counts / 400, factors)


@pytest.mark.parametrize("world", [2, 3])
def test_processes_share_each_epoch_with_no_index_repeated_or_lost(tmp_path, monkeypatch, world):
    annotations, images = imbalanced_coco(tmp_path)
    module = CocoDetectionDataModule(annotations, images, annotations, images, num_workers=0, repeat_threshold=0.3)
    factors = module.repeat_factors()
    dataset = list(range(len(factors)))
    per_rank = []
    for rank in range(world):
        monkeypatch.setattr(base, "_world", lambda rank=rank: (world, rank))
        sampler = RepeatFactorSampler(dataset, seed=7, repeat_factors=factors)
        sampler.set_epoch(3)
        per_rank.append([index for index, _ in sampler])
        whole = sampler.epoch_draw()
    assert len({len(p) for p in per_rank}) == 1 and len(per_rank[0]) == int(factors.sum()) // world
    assert Counter(i for p in per_rank for i in p) == Counter(whole)  # together: the epoch's draw, exactly
    assert len(whole) == world * len(per_rank[0]) > len(factors)


def test_a_resumed_epoch_goes_on_with_the_next_sample_and_its_augmentation_seed(tmp_path):
    annotations, images = imbalanced_coco(tmp_path)
    module = CocoDetectionDataModule(annotations, images, annotations, images, num_workers=0, repeat_threshold=0.3)
    factors = module.repeat_factors()
    sampler = RepeatFactorSampler(list(range(len(factors))), seed=5, repeat_factors=factors)
    sampler.set_epoch(2)
    whole = list(sampler)
    repeated = [key for key in whole if [k[0] for k in whole].count(key[0]) > 1]
    assert repeated and len({seed for _, seed in whole}) == len(whole)  # copies of an image augment differently
    resumed = RepeatFactorSampler(list(range(len(factors))), seed=5, repeat_factors=factors)
    resumed.resume_at = (2, 9)
    resumed.set_epoch(2)
    assert list(resumed) == whole[9:]


def test_class_balanced_sampling_draws_every_class_equally_often(tmp_path):
    from tasks.data import ImageFolderDataModule

    for split in ("train", "val"):
        for name, count in (("a", 6), ("b", 2), ("c", 1)):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(count):
                Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / split / name / f"{i}.png")

    labels = [0] * 12 + [1] * 3 + [2]
    factors = balanced_repeat_factors(labels, 3)
    want = [len(labels) / (3 * labels.count(c)) for c in labels]  # N / (K n(c))
    assert factors == pytest.approx(want)
    per_class = [sum(f for f, c in zip(factors, labels, strict=True) if c == k) for k in range(3)]
    assert per_class == pytest.approx([16 / 3] * 3)
    module = ImageFolderDataModule(str(tmp_path / "train"), str(tmp_path / "val"), num_workers=0,
                                   class_balanced=True, image_size=8)
    sampler = module.train_dataloader().sampler
    assert isinstance(sampler, RepeatFactorSampler)
    assert sampler.dataset.targets == [0] * 6 + [1] * 2 + [2]
    assert sampler.repeat_factors == pytest.approx([9 / 18] * 6 + [9 / 6] * 2 + [3.0])
    assert len(sampler) == 9


def test_class_weights_weigh_the_classification_loss(tmp_path):
    from tasks import ImageClassifier

    weights = [0.2, 1.0, 3.0]
    model = ImageClassifier(backbone="resnet18", num_classes=3, class_weights=weights, label_smoothing=0.0)
    images, labels = torch.rand(4, 3, 32, 32), torch.tensor([0, 0, 1, 2])
    with torch.no_grad():
        logits = model(images)
        loss = model.training_loss((images, labels), 0)
    nll = -logits.log_softmax(-1)[torch.arange(4), labels]
    w = torch.tensor(weights)[labels]
    assert float(loss) == pytest.approx(float((w * nll).sum() / w.sum()), rel=1e-5)
    assert abs(float(loss) - float(nll.mean())) > 1e-3
    with pytest.raises(ValueError, match="model.class_weights has 2 entries"):
        ImageClassifier(backbone="resnet18", num_classes=3, class_weights=[1.0, 2.0])
