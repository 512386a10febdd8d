"""Reading image files: decoding with torchvision.io, sizes from headers, one error type for files that fail."""

from __future__ import annotations

from pathlib import Path

import torch
from torchvision.io import ImageReadMode, decode_image, read_file
from torchvision.transforms import v2


class CorruptImageError(RuntimeError):
    """An image file that cannot be read or decoded (truncated, corrupt, not an image); the message names it."""


def image_size(path: Path) -> tuple:
    """(height, width) as decoded, EXIF rotation included, read from the header only."""
    from PIL import Image, UnidentifiedImageError

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
