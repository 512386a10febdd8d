"""Images of any channel count read as ``(C, H, W)``: PNG through torchvision.io, multi-band TIFF through tifffile,
uint8 kept, deeper ones scaled by ``max_value``; compared with PIL's and tifffile's own reading of the file."""

import numpy as np
import pytest
import torch
from PIL import Image

from tasks.data.images import image_size, read_image

tifffile = pytest.importorskip("tifffile")


def test_gray_and_rgba_png_keep_their_channels_and_bytes(tmp_path):
    rng = np.random.default_rng(0)
    gray, rgba = rng.integers(0, 256, (9, 7), dtype=np.uint8), rng.integers(0, 256, (9, 7, 4), dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / "gray.png")
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    one = read_image(str(tmp_path / "gray.png"), channels=1)
    assert one.dtype == torch.uint8 and torch.equal(one, torch.from_numpy(gray)[None])
    four = read_image(str(tmp_path / "rgba.png"), channels=4)
    assert torch.equal(four, torch.from_numpy(rgba).permute(2, 0, 1))
    with pytest.raises(ValueError, match=r"rgba.png: an image of 4 channels, but data.channels is 1; set"):
        read_image(str(tmp_path / "rgba.png"), channels=1)


def test_a_16_bit_png_is_scaled_by_max_value(tmp_path):
    values = np.random.default_rng(1).integers(0, 4096, (6, 5), dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "depth.png")  # 16-bit gray
    assert np.asarray(Image.open(tmp_path / "depth.png")).max() > 255
    image = read_image(str(tmp_path / "depth.png"), channels=1, max_value=4095)
    assert image.dtype == torch.float32 and image.shape == (1, 6, 5)
    torch.testing.assert_close(image[0], torch.from_numpy(values.astype(np.float32) / 4095))
    default = read_image(str(tmp_path / "depth.png"), channels=1)
    torch.testing.assert_close(default[0], torch.from_numpy(values.astype(np.float32) / 65535))


@pytest.mark.parametrize("layout", ["bands last", "bands first"])
def test_a_13_band_tiff_reads_as_bands_height_width_in_either_layout(tmp_path, layout):
    bands = np.random.default_rng(2).integers(0, 10000, (13, 11, 8), dtype=np.uint16)
    path = tmp_path / "s2.tif"
    if layout == "bands last":
        tifffile.imwrite(path, bands.transpose(1, 2, 0), photometric="minisblack", planarconfig="contig")
    else:
        tifffile.imwrite(path, bands, photometric="minisblack", planarconfig="separate")
    assert image_size(path) == (11, 8)
    image = read_image(str(path), channels=13, max_value=10000)
    torch.testing.assert_close(image, torch.from_numpy(bands.astype(np.float32) / 10000))
    with pytest.raises(ValueError, match="an image of 13 channels, but data.channels is 4"):
        read_image(str(path), channels=4)


def test_an_rgb_tiff_of_bytes_stays_uint8(tmp_path):
    rgb = np.random.default_rng(3).integers(0, 256, (5, 6, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "rgb.tiff", rgb, photometric="rgb")
    image = read_image(str(tmp_path / "rgb.tiff"))
    assert image.dtype == torch.uint8 and torch.equal(image, torch.from_numpy(rgb).permute(2, 0, 1))
