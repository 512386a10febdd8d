"""Tiled prediction: the grid against hand arithmetic, the merges against hand-computed results, objects cut by tile
edges (a stub detector that boxes the bright pixels it sees), and a torchvision detector on an image of one tile."""

import pytest
import torch
from helpers import bare_detector, randomize_norm_stats
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead

import resnext_backbones as rb
from resnext_backbones.deployment import Tiling, merge_detections, tile_grid, tiled_detections
from resnext_backbones.deployment.tiling import tile_starts, union_boxes


def test_the_grid_steps_by_size_less_overlap_and_its_last_tile_ends_at_the_edge():
    # 1000 wide, tiles of 512 sharing 64: starts 0, 448 (= 512 - 64), and 1000 - 512 = 488 for the last (896 would
    # reach past the edge); 700 high: 0, then 700 - 512 = 188
    assert tile_starts(1000, 512, 64) == [0, 448, 488]
    assert tile_starts(700, 512, 64) == [0, 188]
    assert tile_starts(960, 512, 64) == [0, 448]  # 448 + 512 = 960: the second tile ends at the edge, no third
    assert tile_starts(512, 512, 64) == [0] and tile_starts(300, 512, 64) == [0]
    grid = tile_grid(700, 1000, 512, 64)
    assert grid.tolist() == [[0, 0, 512, 512], [448, 0, 960, 512], [488, 0, 1000, 512],
                             [0, 188, 512, 700], [448, 188, 960, 700], [488, 188, 1000, 700]]
    covered = torch.zeros(700, 1000, dtype=torch.int64)
    for x0, y0, x1, y1 in grid.tolist():
        covered[y0:y1, x0:x1] += 1
    # every pixel; columns 488..512 lie in all three columns of tiles, rows 188..512 in both rows: six tiles there
    assert int(covered.min()) == 1 and int(covered.max()) == 6 and int((covered == 6).sum()) == 24 * 324
    # neighbours share at least the overlap: exactly it between the first two columns, more for the moved last one
    assert [a[2] - b[0] for a, b in zip(grid[:2].tolist(), grid[1:3].tolist(), strict=True)] == [64, 472]
    assert tile_grid(100, 200, 512, 64).tolist() == [[0, 0, 200, 100]]  # smaller than a tile: the image itself


@pytest.mark.parametrize("config, message", [
    ({"size": 512, "overlap": 512}, r"model.tile.overlap=512 must be below model.tile.size=512"),
    ({"size": 512, "overlap": -1}, r"model.tile.overlap=-1 must be a non-negative number of pixels"),
    ({"size": 0}, r"model.tile.size=0 must be a positive number of pixels"),
    ({"merge": "soft_nms"}, r"model.tile.merge='soft_nms' is not supported; choose one of \['nms', 'nmm'\]"),
    ({"match": "giou"}, r"model.tile.match='giou' is not supported; choose one of \['iou', 'ios'\]"),
    ({"iou": 1.5}, r"model.tile.iou=1.5 must be a number in \[0, 1\)"),
    ({"batch": 0}, r"model.tile.batch=0 must be a positive number of tiles"),
    ({"full_image": "yes"}, r"model.tile.full_image='yes' must be true or false"),
    ({"overlap_ratio": 0.2}, r"model.tile has unknown entries \['overlap_ratio'\]; the entries are \['size', "),
])
def test_bad_tile_settings_fail_naming_the_key_and_value(config, message):
    with pytest.raises(ValueError, match=message):
        Tiling.from_config(config, key="model.tile")


def test_without_a_size_the_tiles_are_the_detectors_own_input_size():
    assert Tiling().tile_size(bare_detector("fcos", min_size=160, max_size=224)) == 160
    with pytest.raises(ValueError, match=r"tile.size is unset and the model \(Identity\) has no transform.min_size"):
        Tiling().tile_size(torch.nn.Identity())


def detections(boxes, scores, labels, sources):
    return (torch.tensor(boxes, dtype=torch.float32), torch.tensor(scores), torch.tensor(labels),
            torch.tensor(sources))


# Hand-made detections from two tiles (sources 0 and 1). By score: E (alone), A, B (another tile than A; IoU with A
# 80/120 = 0.67), C (A's tile; IoU 0.68 with A and with B), F (inside A: IoU 0.4, IoS 1), D (A's place, another class)
BOXES = [[0, 0, 10, 10], [2, 0, 12, 10], [1, 1, 11, 11], [0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 4, 10]]
CASE = detections(BOXES, [0.9, 0.8, 0.7, 0.5, 0.95, 0.6], [1, 1, 1, 2, 1, 1], [0, 1, 0, 1, 1, 1])
A, B, C, D, E, F = range(6)


def test_nms_drops_matches_from_other_tiles_only_class_by_class():
    keepers, keeper_of = merge_detections(*CASE, threshold=0.5, match="iou")
    # B goes for A; C is in A's own tile and B was dropped before it could take C; F's IoU with A is 0.4
    assert keepers.tolist() == [E, A, C, F, D]
    assert keeper_of.tolist() == [A, A, C, D, E, F]
    keepers, keeper_of = merge_detections(*CASE, threshold=0.5, match="ios")
    assert keepers.tolist() == [E, A, C, D] and keeper_of[F] == A  # by IoS, F lies inside A


def test_nmm_merges_into_the_highest_score_the_union_box():
    keepers, keeper_of = merge_detections(*CASE, threshold=0.5, match="ios")
    merged = union_boxes(CASE[0], keeper_of)[keepers]
    # E alone; A with B and F: x from min(0, 2, 0) to max(10, 12, 4), y 0..10; C (A's own tile) and D stay
    assert merged.tolist() == [[20, 20, 30, 30], [0, 0, 12, 10], [1, 1, 11, 11], [0, 0, 10, 10]]
    assert CASE[1][keepers].tolist() == pytest.approx([0.95, 0.9, 0.7, 0.5])  # each keeper's own score
    assert CASE[2][keepers].tolist() == [1, 1, 1, 2]


class BrightBoxes:
    """A detector stub: in each image, one detection boxing the pixels above 0.5 (label 1, score the share of the image
    they cover), and their mask with ``masks``. It records the number of images of each call."""

    def __init__(self, masks=False):
        self.masks, self.calls = masks, []

    def __call__(self, images):
        self.calls.append(len(images))
        results = []
        for image in images:
            bright = image[0] > 0.5
            ys, xs = bright.nonzero(as_tuple=True)
            found = len(xs) > 0
            box = [[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]] if found else []
            result = {"boxes": torch.tensor(box, dtype=torch.float32).reshape(-1, 4),
                      "scores": torch.tensor([bright.float().mean()] if found else []),
                      "labels": torch.ones(int(found), dtype=torch.int64)}
            if self.masks:
                result["masks"] = bright[None, None].float()[:int(found)]
            results.append(result)
        return results


def image_with(box, height=100, width=200):
    image = torch.zeros(3, height, width)
    x0, y0, x1, y1 = box
    image[:, y0:y1, x0:x1] = 1
    return image


@pytest.mark.parametrize("merge", ["nms", "nmm"])
def test_an_object_cut_by_a_tile_edge_comes_back_once_whole(merge):
    # tiles of 128 sharing 48 over 200 columns: 0..128 and 72..200. The first sees 18 of the object's 40 columns
    # (IoU with the whole 0.45, IoS 1); the second sees it whole
    obj = [110, 30, 150, 70]
    model = BrightBoxes(masks=True)
    (found,) = tiled_detections(model, [image_with(obj)], Tiling(size=128, overlap=48, merge=merge))
    assert model.calls == [2]  # both tiles in one forward
    assert found["boxes"].tolist() == [obj]
    assert torch.equal(found["masks"][0, 0] > 0.5, image_with(obj)[0] > 0.5)  # in the image's pixels, whole
    # matched by IoU instead, the part is another object: why IoS is the default
    (by_iou,) = tiled_detections(BrightBoxes(), [image_with(obj)], Tiling(size=128, overlap=48, match="iou"))
    assert sorted(by_iou["boxes"].tolist()) == [[110, 30, 128, 70], obj]
    # inside the overlap, both tiles see it whole: once, by IoU too
    (shared,) = tiled_detections(BrightBoxes(), [image_with([80, 30, 120, 70])], Tiling(size=128, overlap=48,
                                                                                        match="iou"))
    assert shared["boxes"].tolist() == [[80, 30, 120, 70]]


def test_nmm_masks_are_the_union_of_the_tiles_parts():
    # an object wider than the overlap: no tile sees it whole; merged, its box and mask are whole again
    obj = [30, 30, 160, 70]  # the first tile sees 98 columns of it, the second 88, and they share 56
    (found,) = tiled_detections(BrightBoxes(masks=True), [image_with(obj)], Tiling(size=128, overlap=48, merge="nmm"))
    assert found["boxes"].tolist() == [obj]
    assert torch.equal(found["masks"][0, 0] > 0.5, image_with(obj)[0] > 0.5)
    (kept,) = tiled_detections(BrightBoxes(masks=True), [image_with(obj)], Tiling(size=128, overlap=48))
    assert kept["boxes"].tolist() == [[30, 30, 128, 70]]  # NMS keeps the larger part (the higher score)


def test_tiles_of_all_images_go_through_the_model_a_batch_at_a_time_with_the_whole_images_after():
    images = [image_with([10, 10, 30, 30]), image_with([150, 60, 190, 90])]
    model = BrightBoxes()
    found = tiled_detections(model, images, Tiling(size=128, overlap=48, batch=3, full_image=True))
    assert model.calls == [3, 1, 2]  # 4 tiles by 3, then the two whole images together
    assert [f["boxes"].tolist() for f in found] == [[[10, 10, 30, 30]], [[150, 60, 190, 90]]]


def test_an_image_that_is_one_tile_gives_exactly_the_untiled_detections():
    torch.manual_seed(0)  # random weights and norm statistics, every score kept; narrow heads, for 64-px images
    model = randomize_norm_stats(FasterRCNN(
        rb.resnext_fpn("resnet18", norm="bn", out_channels=32), min_size=64, max_size=64, rpn_pre_nms_top_n_test=100,
        rpn_post_nms_top_n_test=50, box_score_thresh=0.0, box_detections_per_img=20,
        box_head=TwoMLPHead(32 * 7 * 7, 64), box_predictor=FastRCNNPredictor(64, 4))).eval()
    generator = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 48, 60, generator=generator), torch.rand(3, 64, 40, generator=generator)]
    with torch.no_grad():
        untiled = model(images)
        tiled = tiled_detections(model, images, Tiling(overlap=16, full_image=True))  # tiles of 64: one each
    for mine, truth in zip(tiled, untiled, strict=True):
        assert len(truth["boxes"]) == 20 and mine.keys() == truth.keys()
        for key in truth:
            assert torch.equal(mine[key], truth[key]), key
