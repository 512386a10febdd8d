"""Checkpoints that a kill cannot corrupt."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

from resnext_backbones.files import atomic_write


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, made atomic on local disks (:func:`resnext_backbones.files.atomic_write`): the
    checkpoint is written to a temporary file next to its target, flushed to the disk and renamed over the target,
    so a kill at any moment leaves either the old ``last.ckpt`` or the new one, whole. (Lightning's own writer
    stages the file in the system temp folder and then moves it; where that folder is on another filesystem, the
    move is a copy that a kill can cut short.)

    The file gets the permissions any new file gets (``0o666`` less the umask: ``0o644`` under the usual ``022``), as
    with Lightning's writer, so that a teammate or a serving process running as another user can read it.

    The ``lightning`` command installs it; with a ``Trainer`` of your own, pass ``plugins=[AtomicCheckpointIO()]``.
    Remote paths (``s3://``, ...) go to Lightning's writer.
    """

    def save_checkpoint(self, checkpoint: Dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        fs, local_path = fsspec.core.url_to_fs(str(path))
        if storage_options is not None or not isinstance(fs, LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)
        with atomic_write(Path(local_path)) as temp, open(temp, "wb") as f:
            torch.save(checkpoint, f)
