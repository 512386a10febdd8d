import os
import signal

import pytest
import torch
from lightning.pytorch import Callback
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

torch.set_num_threads(2)


def randomize_norm_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm / FrozenBatchNorm non-trivial statistics and affine parameters, so that equality
    tests exercise them (the identity init would hide a misplaced or missing norm)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)):
                n = m.running_mean.numel()
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
    return model


@pytest.fixture
def images():
    return torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_coco(tmp_path_factory):
    """A tiny COCO set from the shapes generator: 8 train / 5 val images (sparse category ids 3, 5, 9)."""
    from tasks.data.shapes import _generate_detection

    root = tmp_path_factory.mktemp("coco")
    _generate_detection(root, "train", 8, seed=10)
    _generate_detection(root, "val", 5, seed=11)
    return {"train_annotations": str(root / "train.json"), "train_images": str(root / "train"),
            "val_annotations": str(root / "val.json"), "val_images": str(root / "val")}


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    from tasks.data.shapes import _generate_classification

    root = tmp_path_factory.mktemp("folder")
    _generate_classification(root, "train", 6, seed=12)
    _generate_classification(root, "val", 3, seed=13)
    return {"train_dir": str(root / "train"), "val_dir": str(root / "val")}


def classification_args(tmp_path, folder, *extra, backbone="resnet18", image_size=32):
    return ["fit", "--model", "tasks.ImageClassifier", "--model.backbone", backbone,
            "--data", "tasks.data.ImageFolderDataModule", "--data.train_dir", folder["train_dir"],
            "--data.val_dir", folder["val_dir"], "--data.image_size", str(image_size), "--data.batch_size", "6",
            "--data.num_workers", "0", "--trainer.default_root_dir", str(tmp_path),
            "--trainer.enable_progress_bar", "false", *extra]



class KillAtStep(Callback):
    """SIGKILL this process when the training batch that makes ``global_step == step`` ends: no cleanup and no
    checkpoint of that step, as when a machine is lost. (``conftest.KillAtStep`` with ``tests/`` on the path.)"""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
