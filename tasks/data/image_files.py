"""Images without annotations: a folder, a glob or a list file resolved to files, and the dataset that reads them."""

from __future__ import annotations

import glob
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from torch.utils.data import Dataset

from .images import read_rgb

log = logging.getLogger("tasks")

# what torchvision.io decodes (read_rgb), and TIFF (tifffile: read_image); a folder is searched for these,
# case-insensitively
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".tif", ".tiff")
_GLOB_CHARACTERS = "*?["


@dataclass(frozen=True)
class ImageList:
    """Image files as ``root / file_name``, in a stable (sorted) order. ``file_name`` is relative to ``root`` when the
    file lies under it (as a COCO ``file_name`` is relative to its image folder), else absolute."""

    root: Path
    file_names: List[str]

    def __len__(self) -> int:
        return len(self.file_names)


def list_images(spec: str, key: str) -> ImageList:
    """The images ``spec`` names: a folder (searched recursively for :data:`IMAGE_SUFFIXES`), a glob (``**`` reaches
    into sub-folders; every matching file is taken), one image file, or a text file of paths (one a line; blank lines
    and lines starting with ``#`` are skipped; relative paths are relative to the list file's folder). ``key`` names
    the setting in errors (``data.predict_images``)."""
    path = Path(spec).expanduser()
    if any(c in spec for c in _GLOB_CHARACTERS) and not path.exists():
        root = _glob_root(str(path))
        names = sorted(str(Path(p)) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        images = ImageList(root, [_relative(Path(n), root) for n in names])
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        kept = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
        if len(kept) < len(files):
            log.info("%s: %d files under %s are not images (%s) and are left out", key, len(files) - len(kept), path,
                     ", ".join(IMAGE_SUFFIXES))
        images = ImageList(path, [_relative(p, path) for p in kept])
    elif path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
        images = ImageList(path.parent, [path.name])
    elif path.is_file():
        lines = [line.strip() for line in path.read_text().splitlines()]
        listed = [Path(line).expanduser() for line in lines if line and not line.startswith("#")]
        root = path.parent
        images = ImageList(root, [_relative(p if p.is_absolute() else root / p, root) for p in listed])
    else:
        raise FileNotFoundError(f"{key}: {spec!r} is neither a folder, a glob that matches files, an image nor a "
                                "list file; give one of those")
    if not images.file_names:
        raise ValueError(f"{key}: {spec!r} holds no images (a folder is searched recursively for "
                         f"{', '.join(IMAGE_SUFFIXES)}; a glob takes every file it matches; a list file names one "
                         "path a line)")
    return images


def _glob_root(pattern: str) -> Path:
    """The folder of a glob's leading part without wildcards: ``data/new/**/*.jpg`` -> ``data/new``."""
    parts = Path(pattern).parts
    fixed = [p for p in parts[: next(i for i, p in enumerate(parts) if any(c in p for c in _GLOB_CHARACTERS))]]
    return Path(*fixed) if fixed else Path(".")


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path.resolve())


class ImageFiles(Dataset):
    """``(image, info)`` for each file of an :class:`ImageList`: the image as ``read`` decodes it for training
    (default :func:`read_rgb`: uint8 RGB, EXIF-rotated; then ``transform``, if any), and ``info`` with ``image_id``,
    ``file_name``, ``path`` (root and file name, as given) and the decoded image's ``height`` and ``width`` (before
    ``transform``). An unreadable file raises :class:`~tasks.data.images.CorruptImageError` naming it (the predict
    loaders skip such files)."""

    def __init__(self, images: ImageList, image_ids: Optional[Sequence[int]] = None,
                 transform: Optional[Callable] = None, read: Callable = read_rgb) -> None:
        self.images, self.transform, self.read = images, transform, read
        self.image_ids = list(range(1, len(images) + 1)) if image_ids is None else [int(i) for i in image_ids]
        if len(self.image_ids) != len(images):
            raise ValueError(f"{len(self.image_ids)} image ids for {len(images)} images")

    def __len__(self) -> int:
        return len(self.images)

    def path(self, i: int) -> Path:
        return self.images.root / self.images.file_names[i]

    def __getitem__(self, i: int):
        image = self.read(str(self.path(i)))
        height, width = image.shape[-2:]
        info = {"image_id": self.image_ids[i], "file_name": self.images.file_names[i], "path": str(self.path(i)),
                "height": int(height), "width": int(width)}
        return (image if self.transform is None else self.transform(image)), info
