"""Interrupted runs: a kill mid-epoch loses nothing, and the resumed run ends exactly where the uninterrupted one
does; a kill while saving leaves the previous checkpoint whole."""

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import REPO, detection_config

from tasks.checkpoint_io import AtomicCheckpointIO


def run_cli(*args: str) -> subprocess.CompletedProcess:
    path = [str(REPO / "tests"), str(REPO), os.environ.get("PYTHONPATH", "")]  # helpers.KillAtStep, the packages
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    return subprocess.run([sys.executable, "-m", "tasks", *args], env=env, capture_output=True, text=True,
                          timeout=600)


def resumable_config(tmp_path, data, kill_at=None, every_step=True) -> str:
    tmp_path.mkdir(exist_ok=True)
    path = detection_config(tmp_path, data)
    config = yaml.safe_load(Path(path).read_text())
    config["data"]["init_args"]["num_workers"] = 2  # workers load in any order: augmentations must not care
    # training only (resumption is what is tested), in all three runs alike; last.ckpt after every step (the
    # uninterrupted run needs only its last)
    config["trainer"].update(max_epochs=2, deterministic=True, num_sanity_val_steps=0, limit_val_batches=0)
    config["trainer"]["callbacks"] = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {
        "dirpath": str(tmp_path / "ckpt"), "every_n_train_steps": 1 if every_step else 4, "save_top_k": 0,
        "save_last": True}}]
    if kill_at is not None:
        config["trainer"]["callbacks"].append({"class_path": "helpers.KillAtStep", "init_args": {"step": kill_at}})
    Path(path).write_text(yaml.safe_dump(config))
    return path


def final_state(tmp_path) -> dict:
    return torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)


def test_a_run_killed_mid_epoch_resumes_from_last_to_the_same_weights(tmp_path, tiny_coco):
    """8 images, batch 2: 4 steps per epoch. The kill comes at step 6, in the middle of the second epoch."""
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    done = run_cli("fit", "--config", resumable_config(whole, tiny_coco, every_step=False))
    assert done.returncode == 0, done.stderr[-3000:]

    config = resumable_config(killed, tiny_coco, kill_at=6)
    interrupted = run_cli("fit", "--config", config)
    assert interrupted.returncode == -signal.SIGKILL, interrupted.stderr[-3000:]
    assert final_state(killed)["global_step"] == 5  # the step the kill interrupted was never saved
    config = resumable_config(killed, tiny_coco)  # the same run, without the kill
    resumed = run_cli("fit", "--config", config, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "not resumable" not in resumed.stderr

    expected, actual = final_state(whole), final_state(killed)
    assert actual["global_step"] == expected["global_step"] == 8
    assert expected["state_dict"].keys() == actual["state_dict"].keys()
    for key, value in expected["state_dict"].items():
        assert torch.equal(value, actual["state_dict"][key]), key
    assert torch.equal(expected["optimizer_states"][0]["state"][0]["momentum_buffer"],
                       actual["optimizer_states"][0]["state"][0]["momentum_buffer"])


def test_a_failure_while_saving_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1, "weights": torch.ones(1000)}, path)

    def save_half_then_fail(obj, f):
        f.write(b"\x00" * 4096)
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", save_half_then_fail)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2, "weights": torch.zeros(1000)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left behind


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_checkpoints_get_the_permissions_of_any_new_file_under_the_umask(tmp_path, umask):
    """0o644 under the usual umask, as Lightning's own writer gives, so that other users can read last.ckpt."""
    previous = os.umask(umask)
    try:
        AtomicCheckpointIO().save_checkpoint({"step": 1}, tmp_path / "last.ckpt")
        AtomicCheckpointIO().save_checkpoint({"step": 2}, tmp_path / "last.ckpt")  # replacing one too
        with open(tmp_path / "plain", "w"):  # what the system gives a new file
            pass
    finally:
        os.umask(previous)
    mode = stat.S_IMODE((tmp_path / "last.ckpt").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "plain").stat().st_mode) == 0o666 & ~umask
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "plain"]


def test_a_kill_while_saving_leaves_the_previous_checkpoint_whole(tmp_path):
    """A real SIGKILL half-way through writing the second checkpoint."""
    path = tmp_path / "last.ckpt"
    script = f"""
import os, signal, torch
from tasks.checkpoint_io import AtomicCheckpointIO
io = AtomicCheckpointIO()
io.save_checkpoint({{"step": 1, "weights": torch.ones(1000)}}, {str(path)!r})
def save_half_then_die(obj, f):
    f.write(b"\\x00" * 4096)
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = save_half_then_die
io.save_checkpoint({{"step": 2, "weights": torch.zeros(1000)}}, {str(path)!r})
"""
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert torch.load(path, weights_only=True)["step"] == 1


def test_the_lightning_command_saves_atomically(tmp_path, tiny_coco):
    from tasks.cli import cli

    built = cli(["--config", detection_config(tmp_path, tiny_coco)], run=False)  # no subcommand without run
    assert isinstance(built.trainer.strategy.checkpoint_io, AtomicCheckpointIO)


SHIPPED_CONFIGS = sorted(p for p in (REPO / "configs").rglob("*.yaml")
                         if "ModelCheckpoint" in p.read_text())


def test_every_trainer_config_keeps_checkpoints():
    """Every shipped training config is among those the test below checks (it finds them by their checkpoint
    callbacks: a config that lost its callbacks would drop out of it silently)."""
    names = {p.name for p in SHIPPED_CONFIGS}
    assert {"detection.yaml", "classification.yaml", "instance_segmentation.yaml", "base_1x.yaml",
            "resnext50_32x4d.yaml", "mask_rcnn_X_50_32x4d_FPN.yaml", "mask_rcnn_X_101_32x8d_FPN.yaml"} <= names


@pytest.mark.parametrize("config", SHIPPED_CONFIGS, ids=lambda p: p.name)
def test_the_shipped_checkpoint_callbacks_keep_the_last_epoch_in_last_ckpt_and_the_best_beside_it(config, tmp_path):
    """last.ckpt is what --ckpt_path last resumes from: the weights after the latest epoch, also when the monitored
    metric got worse (Lightning 2.6's save_last writes it only when a top-k checkpoint is saved at the same step,
    which made it a copy of the best and lost the epochs after it)."""
    from lightning.pytorch import LightningModule, Trainer
    from lightning.pytorch.callbacks import ModelCheckpoint

    callbacks = [ModelCheckpoint(**{**c.get("init_args", {}), "dirpath": tmp_path})
                 for c in yaml.safe_load(config.read_text())["trainer"]["callbacks"]
                 if c["class_path"].endswith("ModelCheckpoint")]
    monitors = {c.monitor for c in callbacks if c.monitor}
    assert monitors, "a callback keeps the best checkpoint by a validation metric"
    curve = [0.2, 0.9, 0.5]  # the best after epoch 1 of 0..2 (mode max)

    class Model(LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def training_step(self, batch, batch_idx):
            return (self.w - 1).pow(2).sum()

        def validation_step(self, batch, batch_idx):
            for name in monitors:
                self.log(name, curve[self.current_epoch])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.DataLoader(torch.zeros(2, 1), batch_size=1)
    trainer = Trainer(max_epochs=3, callbacks=callbacks, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, accelerator="cpu")
    trainer.fit(Model(), data, data)
    last = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=False)
    assert (last["epoch"], last["global_step"]) == (2, 6)  # after the third epoch of 2 steps
    # --ckpt_path best (and trainer.checkpoint_callback) take the first ModelCheckpoint: the monitored one
    best = trainer.checkpoint_callback.best_model_path
    assert trainer.checkpoint_callback.monitor in monitors
    assert torch.load(best, map_location="cpu", weights_only=False)["global_step"] == 4  # the best epoch's, kept
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["last.ckpt", Path(best).name])
