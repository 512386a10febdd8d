"""Segmenter training step and predict: our SemanticSegmenter (DeepLabV3 head, through Lightning) vs torchvision's
``deeplabv3``-style model on the same trunk, weights and batch, in one process.

    python -m benchmarks.segmentation [--backbone resnext50_32x4d] [--size 256] [--batch 4] [--steps 5] [--repeats 5]

The peer is what a user would write instead: torchvision's ``DeepLabV3`` (``IntermediateLayerGetter`` over the
dilated trunk, ``DeepLabHead`` and the auxiliary ``FCNHead``), built on our trunk's weights and trained by a bare loop
(cross-entropy, SGD). Ours is timed inside ``Trainer.fit`` (every hook, the logging) from the second step; predict
is ``torch.no_grad`` logits + argmax of one batch: ours through the inference copy that validate/predict run (fused
trunk, packed head), the peer eager. Rounds alternate (ABBA); medians are reported, ratio = peer / ours (> 1: ours
faster).
"""

from __future__ import annotations

import statistics
import time
from functools import partial

import torch
import torch.nn.functional as F
from torchvision.models import resnet as tv_resnet
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.segmentation.deeplabv3 import DeepLabHead, DeepLabV3
from torchvision.models.segmentation.fcn import FCNHead

from tasks import SemanticSegmenter

from .common import benchmark_parser, machine, median_seconds_alternating, publish
from .detector import lightning_step_seconds

CLASSES = 21


def peer(ours: SemanticSegmenter) -> DeepLabV3:
    """torchvision's DeepLabV3 with aux FCN head on torchvision's dilated ResNet/ResNeXt class, with our weights."""
    spec = ours.trunk_module().spec
    block = tv_resnet.Bottleneck
    trunk = tv_resnet.ResNet(block, list(spec.blocks), groups=spec.cardinality, width_per_group=spec.base_width,
                             replace_stride_with_dilation=[False, True, True])
    model = DeepLabV3(IntermediateLayerGetter(trunk, {"layer4": "out", "layer3": "aux"}),
                      DeepLabHead(2048, CLASSES), FCNHead(1024, CLASSES))
    state = {k.replace("model.backbone.", "backbone.").replace("model.decode_head.", "classifier.")
             .replace("model.aux_head.", "aux_classifier."): v for k, v in ours.state_dict().items()}
    model.load_state_dict(state)
    return model


def bare_step_seconds(model: DeepLabV3, batch, steps: int, mean, std) -> float:
    images, masks = batch
    x, target = (images.float() / 255 - mean) / std, masks.long()
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    for step in range(steps):
        if step == 1:
            start = time.perf_counter()
        out = model(x)
        loss = F.cross_entropy(out["out"], target, ignore_index=255) + \
            0.4 * F.cross_entropy(out["aux"], target, ignore_index=255)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - start) / (steps - 1)


def main(argv=None) -> str:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--backbone", default="resnext50_32x4d")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    batch = (torch.randint(0, 256, (args.batch, 3, args.size, args.size), generator=g, dtype=torch.uint8),
             torch.randint(0, CLASSES, (args.batch, args.size, args.size), generator=g, dtype=torch.uint8))

    def ours() -> SemanticSegmenter:
        return SemanticSegmenter(head="deeplabv3", backbone=args.backbone, num_classes=CLASSES, aux_loss=0.4,
                                 lr_schedule="constant", warmup_steps=0,
                                 optimizer=lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9, weight_decay=5e-4))

    reference = ours()
    mean, std = reference.mean.clone(), reference.std.clone()
    train = {"ours": [], "peer": []}
    for r in range(args.repeats):
        model = ours()
        model.load_state_dict(reference.state_dict())
        runs = [("peer", partial(bare_step_seconds, peer(reference), batch, args.steps, mean, std)),
                ("ours", partial(lightning_step_seconds, model, batch, args.steps))]
        for name, run in runs if r % 2 == 0 else runs[::-1]:
            train[name].append(run())
    train = {k: statistics.median(v) for k, v in train.items()}

    evaluated, theirs = reference.eval(), peer(reference).eval()
    x = (batch[0].float() / 255 - mean) / std

    def predict_ours():
        with torch.no_grad(), evaluated.inference():
            return evaluated(batch[0]).argmax(1)

    def predict_peer():
        with torch.no_grad():
            return theirs(x)["out"].argmax(1)

    assert (predict_ours() == predict_peer()).float().mean() > 0.99  # the same model
    predict = median_seconds_alternating({"ours": predict_ours, "peer": predict_peer}, args.repeats)
    rows = ["| | ours s | torchvision DeepLabV3 s | ratio |", "|---|---|---|---|",
            f"| training step (Lightning vs bare loop) | {train['ours']:.3f} | {train['peer']:.3f} | "
            f"{train['peer'] / train['ours']:.3f} |",
            f"| predict, float32 (inference copy vs eager) | {predict['ours']:.3f} | {predict['peer']:.3f} | "
            f"{predict['peer'] / predict['ours']:.3f} |"]
    print("\n".join(rows), flush=True)
    body = (f"## Segmenter: `SemanticSegmenter(head=deeplabv3)` vs torchvision `DeepLabV3` on the same trunk\n\n"
            f"`python -m benchmarks.segmentation --backbone {args.backbone} --size {args.size} --batch {args.batch} "
            f"--steps {args.steps} --repeats {args.repeats}`: output stride 8, aux FCN head, {args.batch} images of "
            f"{args.size}x{args.size}, {CLASSES} classes; medians of alternating rounds; ratio = torchvision / ours "
            f"(> 1: ours faster).\nMachine: {machine()}.\n\n" + "\n".join(rows))
    return publish("segmentation", body, args)


if __name__ == "__main__":
    main()
