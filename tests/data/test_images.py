"""read_image / image_size: every image mode decodes to the same RGB uint8 CHW tensor."""

import numpy as np
import pytest
import torch
from PIL import Image

from detkd.data.images import image_size, read_image
from detkd.errors import DataError


def _pixel(t, y, x):
    return t[:, y, x].tolist()


def test_rgb_is_decoded_exactly(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (4, 6, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "x.png")
    t = read_image(tmp_path / "x.png")
    assert t.dtype == torch.uint8 and t.shape == (3, 4, 6) and t.is_contiguous()
    assert torch.equal(t, torch.from_numpy(arr).permute(2, 0, 1))


def test_grayscale_repeats_the_channel(tmp_path):
    arr = np.array([[0, 200, 37], [255, 1, 90]], np.uint8)
    Image.fromarray(arr, mode="L").save(tmp_path / "g.png")
    t = read_image(tmp_path / "g.png")
    assert t.shape == (3, 2, 3) and torch.equal(t, torch.from_numpy(arr).expand(3, 2, 3))


def test_palette_maps_indices_to_colours(tmp_path):
    im = Image.new("P", (3, 2), 0)
    im.putpalette([0, 0, 0, 10, 20, 30, 250, 128, 3] + [0] * (768 - 9))
    im.putpixel((2, 1), 1)
    im.putpixel((0, 1), 2)
    im.save(tmp_path / "p.png")
    t = read_image(tmp_path / "p.png")
    assert _pixel(t, 1, 2) == [10, 20, 30] and _pixel(t, 1, 0) == [250, 128, 3] and _pixel(t, 0, 0) == [0, 0, 0]


def test_cmyk_converts_to_rgb(tmp_path):
    Image.new("CMYK", (2, 2), (0, 255, 255, 0)).save(tmp_path / "c.tif")  # lossless: exact red
    assert _pixel(read_image(tmp_path / "c.tif"), 1, 1) == [255, 0, 0]
    Image.new("CMYK", (8, 8), (255, 0, 255, 0)).save(tmp_path / "c.jpg", quality=95)  # Adobe CMYK JPEG: green
    r, g, b = _pixel(read_image(tmp_path / "c.jpg"), 4, 4)
    assert r < 10 and g > 245 and b < 10


def test_alpha_is_dropped_keeping_the_colour(tmp_path):
    im = Image.new("RGBA", (3, 2), (10, 20, 30, 0))  # fully transparent
    im.putpixel((1, 0), (200, 100, 50, 255))
    im.save(tmp_path / "a.png")
    t = read_image(tmp_path / "a.png")
    assert t.shape == (3, 2, 3) and _pixel(t, 0, 0) == [10, 20, 30] and _pixel(t, 0, 1) == [200, 100, 50]
    Image.new("LA", (3, 2), (90, 0)).save(tmp_path / "la.png")
    assert _pixel(read_image(tmp_path / "la.png"), 1, 2) == [90, 90, 90]


def test_sixteen_bit_scales_to_eight(tmp_path):
    arr = np.array([[0, 257 * 100], [65535, 257 * 7]], np.uint16)  # v * 257 is exactly v in 8 bits
    Image.fromarray(arr).save(tmp_path / "d.png")
    assert Image.open(tmp_path / "d.png").mode.startswith("I")
    t = read_image(tmp_path / "d.png")
    assert t.dtype == torch.uint8 and t[0].tolist() == [[0, 100], [255, 7]] and torch.equal(t[0], t[2])


def test_exif_orientation_six_rotates_clockwise(tmp_path):
    im = Image.new("RGB", (6, 4), (0, 0, 255))  # stored 6 wide, 4 high
    im.putpixel((0, 0), (255, 0, 0))  # stored top-left
    exif = im.getexif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    im.save(tmp_path / "r.png", exif=exif)
    t = read_image(tmp_path / "r.png")
    assert t.shape == (3, 6, 4) and image_size(tmp_path / "r.png") == (6, 4)
    assert _pixel(t, 0, 3) == [255, 0, 0] and _pixel(t, 0, 0) == [0, 0, 255]  # top-left went top-right


def test_unreadable_files_raise_naming_the_file(tmp_path):
    with pytest.raises(DataError, match="nope.png: image file not found"):
        read_image(tmp_path / "nope.png")
    with pytest.raises(DataError, match="nope.png: image file not found"):
        image_size(tmp_path / "nope.png")
    (tmp_path / "junk.jpg").write_bytes(np.random.default_rng(1).bytes(256))
    with pytest.raises(DataError, match="junk.jpg: cannot decode image"):
        read_image(tmp_path / "junk.jpg")
    with pytest.raises(DataError, match="junk.jpg: cannot decode image"):
        image_size(tmp_path / "junk.jpg")
    noise = np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)  # big pixel data, small header
    Image.fromarray(noise).save(tmp_path / "cut.jpg")
    data = (tmp_path / "cut.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])  # header intact, pixels cut off
    assert image_size(tmp_path / "cut.jpg") == (64, 64)
    with pytest.raises(DataError, match="cut.jpg: cannot decode image"):
        read_image(tmp_path / "cut.jpg")
