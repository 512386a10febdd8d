"""Weight files as bytes: reading them without running code, and proving they are the bytes you expect.

The bottom of the weights stack (the formats, the loader and a future registry of downloads build on it):

- :func:`read_file` opens safetensors, torch checkpoints (``torch.load(weights_only=True)``) and plain pickles
  (detectron2's ``.pkl``, through an unpickler that admits only containers and numpy arrays). What the content
  means -- which ecosystem's layout it is -- is :mod:`resnext_backbones.formats`' business.
- :func:`file_sha256` / :func:`check_sha256`: the sha256 of a file's bytes, and the check of a digest the
  caller pinned. A matching digest proves the file is the one whose digest you were given (integrity); it says
  nothing about who made it, unless the digest itself came from someone you trust.
- :func:`atomic_write`: a file or folder that appears whole or not at all (downloads, checkpoints, results).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import secrets
import shutil
import string
import zipfile
from pathlib import Path
from typing import Dict, Iterator, Mapping, Optional, Tuple, Union

import torch

__all__ = ["WeightsError", "UnverifiedWeightsWarning", "PathLike", "read_file", "file_sha256", "check_sha256",
           "checked_sha256", "atomic_write"]

PathLike = Union[str, Path]

MIN_DIGEST_PREFIX = 8  # hex characters: shorter prefixes match too many files to mean anything


class WeightsError(ValueError):
    """A weight file that cannot be read, whose bytes are not the expected ones, or whose tensors do not fit."""


class UnverifiedWeightsWarning(UserWarning):
    """A file that could carry a digest of its tensors has none, and the caller pinned no ``expected_sha256``.
    ``warnings.filterwarnings("error", category=UnverifiedWeightsWarning)`` turns it into a refusal."""


# ------------------------------------------------------------------------------------------------- digests

def file_sha256(path: PathLike) -> str:
    """The sha256 of the file's bytes, as 64 lowercase hex characters (what ``sha256sum`` prints)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def checked_sha256(expected: str, what: str = "expected_sha256") -> str:
    """``expected`` as a sha256 to compare with: lowercase hex, the full 64 characters or a prefix of at least 8.
    Raises ``ValueError`` naming ``what`` otherwise."""
    want = expected.strip().lower() if isinstance(expected, str) else ""
    if not MIN_DIGEST_PREFIX <= len(want) <= 64 or any(c not in string.hexdigits for c in want):
        raise ValueError(f"{what}={expected!r} must be the file's sha256: 64 hex characters, or a prefix of at least "
                         f"{MIN_DIGEST_PREFIX} (sha256sum FILE prints it)")
    return want


def check_sha256(path: PathLike, expected: str, *, source: Optional[str] = None) -> str:
    """Check that ``path``'s bytes have the sha256 ``expected`` (the full 64-hex digest, or a prefix of at least
    8 hex characters, any case). Returns the full digest; raises :class:`WeightsError` naming the file (or
    ``source``, e.g. the URL it came from), the expected and the actual digest on a mismatch, and ``ValueError``
    if ``expected`` is not a digest."""
    want = checked_sha256(expected)
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {str(path)!r} does not exist")
    actual = file_sha256(path)
    if not actual.startswith(want):
        raise WeightsError(f"{source or repr(str(path))} is not the file you pinned: expected sha256 {want}"
                           f"{'...' if len(want) < 64 else ''}, got {actual}. It is corrupt, truncated or another "
                           "file; fetch it again, or fix expected_sha256 if the file is the one you meant.")
    return actual


# ------------------------------------------------------------------------------------------------- writing

@contextlib.contextmanager
def atomic_write(target: PathLike, *, folder: bool = False) -> Iterator[Path]:
    """A new, empty temporary file (or, with ``folder=True``, folder) beside ``target``, for the caller to fill;
    when the ``with`` block ends normally it becomes ``target``, whole, and a reader never sees a part of it.

    The guarantees: the temporary lies in ``target``'s own folder (so the rename is atomic: never a copy across
    filesystems) under a unique hidden name (``.<name>.<random>.part``: writers never share one); once the block
    ends its bytes are flushed to the disk (``fsync`` of the file, or of every file and folder in the folder), it
    gets the permissions any new file or folder gets (``0o666``/``0o777`` less the umask, whatever made it: a
    ``mkstemp`` file would be ``0o600``), it is renamed over ``target`` with ``os.replace``, and the rename itself is
    flushed (``fsync`` of the parent folder, where the OS has one). So a kill or power loss at any moment leaves
    either the old ``target`` or the new one. On an exception in the block or in those steps the temporary is
    removed, ``target`` is left as it was, and the exception propagates (with ``folder=True``, ``os.replace`` fails
    with ``OSError`` where ``target`` is a folder that is not empty).

    The caller may replace the temporary by a file of its own (e.g. a download moved onto it)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = _create_beside(target, folder)
    try:
        yield temp
        _fsync_tree(temp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temp, (0o777 if temp.is_dir() else 0o666) & ~umask)
        os.replace(temp, target)
    except BaseException:
        if temp.is_dir() and not temp.is_symlink():
            shutil.rmtree(temp, ignore_errors=True)
        else:
            temp.unlink(missing_ok=True)
        raise
    _fsync_folder(target.parent)


def _create_beside(target: Path, folder: bool) -> Path:
    while True:
        temp = target.parent / f".{target.name}.{secrets.token_hex(8)}.part"
        try:
            if folder:
                temp.mkdir()
            else:
                os.close(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666))
            return temp
        except FileExistsError:
            continue


def _fsync_tree(path: Path) -> None:
    if not path.is_dir():
        fd = os.open(path, os.O_RDWR if os.name == "nt" else os.O_RDONLY)  # Windows flushes only writable handles
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return
    for root, _, files in os.walk(path, topdown=False):
        for name in files:
            _fsync_tree(Path(root) / name)
        _fsync_folder(Path(root))


def _fsync_folder(path: Path) -> None:
    """Flush a folder's entries (new names, renames) where the OS lets a folder be opened (not Windows)."""
    if hasattr(os, "O_DIRECTORY"):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ------------------------------------------------------------------------------------------------- reading

class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists and numpy arrays; refuses every other global (no code execution)."""

    _ALLOWED = {("collections", "OrderedDict"), ("numpy", "ndarray"), ("numpy", "dtype"),
                ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed")
        return super().find_class(module.replace("numpy.core.", "numpy._core."), name)


def _is_safetensors(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size


_REFUSED = ("it holds Python objects other than tensors and plain containers, and loading them could run code. "
            "Re-save just the state dict (torch.save(model.state_dict(), path)) or convert it to safetensors")


def _torch_load(path: Path) -> Dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise WeightsError(f"refusing to load {str(path)!r}: {_REFUSED}. ({str(e).splitlines()[0]})") from None


def read_file(path: PathLike) -> Tuple[Dict, Dict[str, str]]:
    """Read a weight file without running code from it: ``(content, safetensors metadata or {})``.

    Raises :class:`WeightsError` for a missing file, a pickle that would need other globals than tensors,
    containers and numpy arrays, or a file that is none of safetensors, torch checkpoint or plain pickle.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {str(path)!r} does not exist")
    if _is_safetensors(path):
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    if zipfile.is_zipfile(path):
        content: object = _torch_load(path)
    else:
        with open(path, "rb") as f:
            try:
                content = _NumpyOnlyUnpickler(f, encoding="latin1").load()
            except pickle.UnpicklingError as e:
                raise WeightsError(f"refusing to load {str(path)!r}: {_REFUSED}. ({e})") from None
            except Exception as e:  # noqa: BLE001 - any other failure means it is not a pickle we know
                raise WeightsError(f"{str(path)!r} is not a weight file this library reads (safetensors, torch "
                                   f"checkpoint or detectron2 pickle): {type(e).__name__}: {e}") from None
        if isinstance(content, int):  # torch's legacy (non-zip) format starts with a pickled magic number
            content = _torch_load(path)
    if not isinstance(content, Mapping):
        raise WeightsError(f"{str(path)!r} holds a {type(content).__name__}, not a dict of weights")
    return dict(content), {}

