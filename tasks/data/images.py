"""Reading image files: decoding with torchvision.io (multi-band TIFF with tifffile), sizes from headers, one error
type for files that fail."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_image, read_file
from torchvision.transforms import v2


class CorruptImageError(RuntimeError):
    """An image file that cannot be read or decoded (truncated, corrupt, not an image); the message names it."""


TIFF_SUFFIXES = (".tif", ".tiff")


def _tifffile():
    try:
        import tifffile
    except ImportError:
        raise ImportError("reading TIFF images needs tifffile: pip install tifffile") from None
    return tifffile


def _tiff_series(path: Path, read: bool):
    """``(array or shape, axes)`` of a TIFF's first series (``axes`` as tifffile names them: Y, X and S/C/Q/I...)."""
    try:
        with _tifffile().TiffFile(path) as tiff:
            series = tiff.series[0]
            return (series.asarray() if read else series.shape), series.axes
    except (OSError, ValueError, IndexError, KeyError) as e:
        raise CorruptImageError(f"cannot read TIFF image {str(path)!r}: {e}") from None


def _channel_axis(axes: str, path: Path) -> Optional[int]:
    others = [i for i, a in enumerate(axes) if a not in "YX"]
    if len(others) > 1 or "Y" not in axes or "X" not in axes:
        raise CorruptImageError(f"TIFF image {str(path)!r} has axes {axes!r}; images here are Y, X and at most one "
                                "channel axis")
    return others[0] if others else None


def image_size(path: Path) -> tuple:
    """(height, width) as decoded, EXIF rotation included, read from the header only."""
    from PIL import Image, UnidentifiedImageError

    if Path(path).suffix.lower() in TIFF_SUFFIXES:
        shape, axes = _tiff_series(Path(path), read=False)
        _channel_axis(axes, Path(path))
        return shape[axes.index("Y")], shape[axes.index("X")]

    try:
        with Image.open(path) as image:
            width, height = image.size
            if image.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # rotated by 90 degrees on display
                width, height = height, width
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise CorruptImageError(f"cannot read image header of {str(path)!r}: {e}") from None
    return height, width


def read_rgb(path: str) -> torch.Tensor:
    """uint8 RGB CHW from any file torchvision decodes (gray, RGBA, CMYK JPEG, 16-bit PNG), EXIF-rotated."""
    try:
        image = decode_image(read_file(path), mode=ImageReadMode.RGB, apply_exif_orientation=True)
    except RuntimeError as e:
        raise CorruptImageError(f"cannot decode image {path!r}: {e}") from None
    if image.dtype != torch.uint8:  # 16-bit PNG: keep the 8 most significant bits
        image = v2.functional.to_dtype(image, torch.uint8, scale=True)
    return image


def read_image(path: str, channels: int = 3, max_value: Optional[float] = None) -> torch.Tensor:
    """An image with ``channels`` channels, ``(C, H, W)``: uint8 as the file has it, or, for a file of another
    depth (16-bit PNG or TIFF, float TIFF) or with ``max_value`` set, float32 ``value / max_value`` (default
    ``max_value``: the largest value of the file's type, 1 for float). PNG, JPEG and the other formats of
    torchvision.io of any channel count; TIFF (multi-band too, bands in any axis order tifffile names) with
    ``tifffile``. ``channels=3`` without ``max_value`` is :func:`read_rgb` for what torchvision decodes (any file
    becomes RGB); other counts must match the file's, else an error naming it."""
    suffix = Path(path).suffix.lower()
    if channels == 3 and max_value is None and suffix not in TIFF_SUFFIXES:
        return read_rgb(path)
    if suffix in TIFF_SUFFIXES:
        array, axes = _tiff_series(Path(path), read=True)
        axis = _channel_axis(axes, Path(path))
        array = array[None] if axis is None else np.moveaxis(array, axis, 0)
        array = np.ascontiguousarray(array)
    else:
        try:
            image = decode_image(read_file(path), mode=ImageReadMode.UNCHANGED, apply_exif_orientation=True)
        except RuntimeError as e:
            raise CorruptImageError(f"cannot decode image {path!r}: {e}") from None
        array = image.numpy()
    if array.shape[0] != channels:
        raise ValueError(f"{path}: an image of {array.shape[0]} channels, but data.channels is {channels}; set "
                         "data.channels (and model.in_channels) to the images' channel count")
    if array.dtype == np.uint8 and max_value is None:
        return torch.from_numpy(array)
    if max_value is None:
        max_value = float(np.iinfo(array.dtype).max) if np.issubdtype(array.dtype, np.integer) else 1.0
    if not max_value > 0:
        raise ValueError(f"data.max_value={max_value!r} must be positive: the value that becomes 1.0")
    return torch.from_numpy(array.astype(np.float32) / np.float32(max_value))


def image_reader(channels: int, max_value: Optional[float]):
    """The reader of a data module's ``channels`` and ``max_value`` (checked here, when the module is built): a
    picklable callable for the loader's workers."""
    if not isinstance(channels, int) or channels < 1:
        raise ValueError(f"data.channels={channels!r} must be a positive integer (3 for RGB)")
    if max_value is not None and not max_value > 0:
        raise ValueError(f"data.max_value={max_value!r} must be positive: the value that becomes 1.0")
    if channels == 3 and max_value is None:
        return read_rgb
    return functools.partial(read_image, channels=channels, max_value=max_value)
