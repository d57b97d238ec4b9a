"""artscale.data.images: every odd-but-valid image decodes right, every bad file is skipped with its reason."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from artscale.data.images import SkipImage, decode_bytes, encode_image, is_ignored, load_image, resize_image

RED_PIXEL = (200, 10, 10)


def _rgb(im: Image.Image, xy: tuple[int, int]) -> np.ndarray:
    return np.asarray(im, dtype=np.int32)[xy[1], xy[0]]


@pytest.fixture(scope="module")
def odd(tmp_path_factory, write_odd_images) -> dict[str, tuple[Path, tuple[int, int], tuple[int, int, int]]]:
    return write_odd_images(tmp_path_factory.mktemp("odd"))


@pytest.mark.parametrize(
    "name",
    [
        "grey",
        "palette",
        "palette_transparent",
        "rgba",
        "la",
        "cmyk",
        "sixteen_bit",
        "bilevel",
        "exif_rotated",
        "animated",
        "upper_ext",
        "spaces dots.v2.final",
        "non_ascii",
        "big_jpeg",
        "tiff",
        "webp",
    ],
)
def test_odd_but_valid_images_decode_oriented_and_in_colour(odd, name):
    path, original, centre = odd[name]
    im, size = load_image(path, (16, 16))
    assert im.mode == "RGB" and im.size == (16, 16)
    assert size == original
    if centre is not None:
        assert np.abs(_rgb(im, (8, 8)) - centre).max() <= 12, (name, _rgb(im, (8, 8)))


def test_exif_orientation_turns_the_picture_not_only_the_size(odd):
    path, _, _ = odd["exif_rotated"]
    im, size = load_image(path, (16, 16))
    assert size == (128, 256)  # stored 256x128, EXIF orientation 6 (turn 90 degrees clockwise)
    top, bottom = _rgb(im, (8, 2)), _rgb(im, (8, 13))
    assert top[0] > 200 and top[2] < 60  # the stored left half (red) is on top once turned
    assert bottom[2] > 200 and bottom[0] < 60


def test_center_crop_keeps_the_middle(odd):
    path, _, _ = odd["big_jpeg"]  # 1800x600: left third red, middle green, right third blue
    stretched, _ = load_image(path, (24, 24), "stretch")
    cropped, _ = load_image(path, (24, 24), "center-crop")
    assert _rgb(stretched, (1, 12))[0] > 200  # stretch keeps the red left edge
    assert _rgb(cropped, (1, 12))[1] > 200  # the crop's left edge is already the green middle


def test_bad_files_are_skipped_with_their_reason(tmp_path, write_bad_files):
    bad = write_bad_files(tmp_path)
    for name, (path, reason) in bad.items():
        with pytest.raises(SkipImage) as e:
            load_image(path, (16, 16), max_pixels=2_000_000, min_side=8)
        assert str(e.value).startswith(reason), (name, str(e.value))
        assert "\n" not in str(e.value)


def test_max_pixels_above_pillows_own_limit_is_honoured(tmp_path):
    path = tmp_path / "wide.png"
    Image.new("L", (20, 10)).save(path)
    with pytest.raises(SkipImage, match="too many pixels"):
        load_image(path, (16, 16), max_pixels=199)
    im, size = load_image(path, (16, 16), max_pixels=200)
    assert size == (20, 10)
    old = Image.MAX_IMAGE_PIXELS
    try:
        load_image(path, None, max_pixels=10 * old)
        assert Image.MAX_IMAGE_PIXELS >= 5 * old  # raised so Pillow's hard limit does not overrule ours
    finally:
        Image.MAX_IMAGE_PIXELS = old


def test_encode_decode_round_trip_is_lossless_for_png():
    arr = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    im = Image.fromarray(arr, "RGB")
    assert np.array_equal(np.asarray(decode_bytes(encode_image(im, "png"))), arr)
    jpg = np.asarray(decode_bytes(encode_image(im, "jpg", 95)), dtype=np.int32)
    assert jpg.shape == (16, 16, 3)


def test_ignored_names():
    for name in (".DS_Store", "Thumbs.db", "notes.txt", ".hidden.jpg", "README.md", "desktop.ini"):
        assert is_ignored(Path(name)), name
    for name in ("a.jpg", "B.PNG", "x.tiff", "scan"):
        assert not is_ignored(Path(name)), name


def test_resize_image_stretches_to_width_height():
    im = Image.new("RGB", (40, 10), RED_PIXEL)
    out = resize_image(im, (8, 24))
    assert out.size == (8, 24) and out.getpixel((4, 12)) == RED_PIXEL


def test_a_fifo_is_skipped_not_waited_on(tmp_path):
    """open() on a FIFO blocks until a writer comes: the check must happen before it."""
    import os

    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    with pytest.raises(SkipImage, match="not a regular file"):
        load_image(fifo, (16, 16))
    (tmp_path / "zero.jpg").write_bytes(b"")
    with pytest.raises(SkipImage, match="empty file"):
        load_image(tmp_path / "zero.jpg", (16, 16))


def test_fit_keeps_the_aspect_and_never_enlarges(tmp_path):
    """resize="fit" (the report's thumbnails): within the box, aspect kept, small images as they are."""
    wide = tmp_path / "wide.jpg"
    Image.new("RGB", (1000, 250), (30, 120, 200)).save(wide, quality=90)
    im, original = load_image(wide, (128, 128), resize="fit")
    assert im.size == (128, 32) and original == (1000, 250)
    assert np.abs(np.asarray(im, dtype=np.int32) - (30, 120, 200)).max() <= 3
    small = tmp_path / "small.png"
    Image.new("RGB", (20, 12), RED_PIXEL).save(small)
    im, original = load_image(small, (128, 128), resize="fit")
    assert im.size == (20, 12) == original
