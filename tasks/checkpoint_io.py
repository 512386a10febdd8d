"""Checkpoints that a kill cannot corrupt."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any, Dict, Optional

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, made atomic on local disks: the checkpoint is written to a temporary file next
    to its target, flushed to the disk and renamed over the target, so a kill at any moment leaves either the old
    ``last.ckpt`` or the new one, whole. (Lightning's own writer stages the file in the system temp folder and then
    moves it; where that folder is on another filesystem, the move is a copy that a kill can cut short.)

    The file gets the permissions any new file gets (``0o666`` less the umask: ``0o644`` under the usual ``022``), as
    with Lightning's writer, so that a teammate or a serving process running as another user can read it.

    The ``lightning`` command installs it; with a ``Trainer`` of your own, pass ``plugins=[AtomicCheckpointIO()]``.
    Remote paths (``s3://``, ...) go to Lightning's writer.
    """

    def save_checkpoint(self, checkpoint: Dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        fs, local_path = fsspec.core.url_to_fs(str(path))
        if storage_options is not None or not isinstance(fs, LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)
        target = Path(local_path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = _create_beside(target)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temp, target)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise
        if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable
            directory = os.open(target.parent, os.O_DIRECTORY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)


def _create_beside(target: Path) -> tuple:
    """A new, uniquely named file next to ``target``, open for writing. Unlike ``tempfile.mkstemp`` (always
    ``0o600``), it is created with mode ``0o666`` and the kernel applies the process's umask."""
    while True:
        temp = target.parent / f".{target.name}.{secrets.token_hex(8)}.part"
        try:
            return os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), temp
        except FileExistsError:
            continue
