"""Fixtures of the images and pack tests: real odd-but-valid and bad image files, and a messy collection."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

RED, GREEN, BLUE = (230, 20, 20), (20, 230, 20), (20, 20, 230)


def _thirds(w: int, h: int) -> Image.Image:
    """Left third red, middle green, right third blue."""
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, : w // 3], arr[:, w // 3 : 2 * w // 3], arr[:, 2 * w // 3 :] = RED, GREEN, BLUE
    return Image.fromarray(arr, "RGB")


def write_odd_images(root: Path) -> dict[str, tuple[Path, tuple[int, int], tuple[int, int, int]]]:
    """name -> (path, original oriented size, expected RGB at the centre after a 16 px resize)."""
    root.mkdir(parents=True, exist_ok=True)
    out = {}

    def add(name, filename, im, centre, size=None, **save):
        path = root / filename
        im.save(path, **save)
        out[name] = (path, size or im.size, centre)

    add("grey", "grey.png", Image.new("L", (40, 30), 128), (128, 128, 128))
    pal = Image.new("P", (40, 30), 1)
    pal.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    add("palette", "palette.gif", pal, (200, 100, 50))
    tp = Image.new("P", (40, 30), 1)
    tp.putpalette([0, 0, 0, 10, 10, 10] + [0] * 762)
    add("palette_transparent", "palette_t.png", tp, (255, 255, 255), transparency=1)
    add("rgba", "rgba.png", Image.new("RGBA", (40, 30), (0, 0, 255, 0)), (255, 255, 255))  # clear -> white
    add("la", "la.png", Image.new("LA", (40, 30), (0, 255)), (0, 0, 0))
    add("cmyk", "cmyk.jpg", Image.new("CMYK", (40, 30), (0, 255, 255, 0)), (255, 0, 0), quality=95)
    sixteen = Image.fromarray(np.full((30, 40), 65535 // 2, np.uint16))
    add("sixteen_bit", "sixteen.png", sixteen, (128, 128, 128))
    add("bilevel", "bilevel.png", Image.new("1", (40, 30), 1), (255, 255, 255))
    stored = Image.new("RGB", (256, 128), BLUE)
    stored.paste(RED, (0, 0, 128, 128))
    exif = Image.Exif()
    exif[0x0112] = 6
    add("exif_rotated", "rotated.jpg", stored, (128, 128, 128), size=(128, 256), exif=exif.tobytes(), quality=95)
    out["exif_rotated"] = (out["exif_rotated"][0], (128, 256), None)  # the centre is the red/blue seam
    frames = [Image.new("RGB", (40, 30), GREEN), Image.new("RGB", (40, 30), RED)]
    frames[0].save(root / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    out["animated"] = (root / "animated.gif", (40, 30), GREEN)
    add("upper_ext", "UPPER.JPG", Image.new("RGB", (40, 30), BLUE), BLUE, format="JPEG", quality=95)
    add("spaces dots.v2.final", "my scan v2.final.PNG", Image.new("RGB", (33, 21), GREEN), GREEN, format="PNG")
    add("non_ascii", "Éléphant – 象.png", Image.new("RGB", (20, 50), RED), RED)
    add("big_jpeg", "big.jpg", _thirds(1800, 600), GREEN, quality=95)
    add("tiff", "scan.tif", Image.new("RGB", (40, 30), RED), RED)
    add("webp", "web.webp", Image.new("RGB", (40, 30), GREEN), GREEN, lossless=True)
    return out


def write_bad_files(root: Path) -> dict[str, tuple[Path, str]]:
    """name -> (path, the skip reason's start) for load_image(max_pixels=2_000_000, min_side=8)."""
    root.mkdir(parents=True, exist_ok=True)
    good = io.BytesIO()
    _thirds(300, 200).save(good, "JPEG", quality=95)
    png = io.BytesIO()
    Image.new("RGB", (300, 200), RED).save(png, "PNG")
    files = {
        "truncated_jpeg": ("truncated.jpg", good.getvalue()[: len(good.getvalue()) // 2], "truncated or corrupt"),
        "corrupt_png": (
            "corrupt.png",
            png.getvalue()[:60] + b"\x00" * 40 + png.getvalue()[100:],
            "truncated or corrupt",
        ),
        "header_only": ("header.jpg", b"\xff\xd8\xff\xe0 not really a jpeg", "truncated or corrupt"),
        "text_as_jpg": ("notes.jpg", b"this is not an image at all\n" * 10, "not an image"),
        "no_extension": ("README", b"plain words", "not an image"),
        "heic": ("phone.HEIC", b"\x00\x00\x00\x18ftypheic" + b"\x00" * 64, "unsupported"),
        "svg": ("vector.svg", b"<svg xmlns='http://www.w3.org/2000/svg'/>", "unsupported"),
    }
    out = {}
    for name, (filename, data, reason) in files.items():
        (root / filename).write_bytes(data)
        out[name] = (root / filename, reason)
    Image.new("L", (3000, 1000)).save(root / "bomb.png")
    out["bomb"] = (root / "bomb.png", "too many pixels")
    Image.new("RGB", (40, 4)).save(root / "thin.png")
    out["too_small"] = (root / "thin.png", "too small")
    (root / "gone.jpg").symlink_to(root / "does-not-exist.jpg")
    out["broken_symlink"] = (root / "gone.jpg", "unreadable")
    return out


def write_messy_collection(root: Path, outside: Path) -> dict:
    """A collection with every kind of file pack must account for; returns what to expect.

    a/: plain and odd-but-valid images, some nested; b/: bad files; c/: junk, hidden files and
    symlinks (inside SRC, leading out, to a folder, broken). `outside` holds what the links
    that lead out point at.
    """
    src = root
    odd = write_odd_images(src / "a" / "odd")
    for i in range(6):
        Image.new("RGB", (30 + i, 20 + i), (40 * i, 100, 200)).save(src / "a" / f"plain {i}.jpg", quality=95)
    Image.new("RGB", (20, 20), RED).save(src / "a" / ("long " * 40 + "name.v1.png"))  # > ustar's 100 chars
    Image.new("RGB", (20, 20), RED).save(os.fsencode(src / "a") + b"/latin1 caf\xe9.png", "PNG")  # not UTF-8
    (src / "a" / "sub" / "deeper").mkdir(parents=True)
    Image.new("RGB", (24, 24), GREEN).save(src / "a" / "sub" / "deeper" / "nested.png")
    bad = write_bad_files(src / "b")
    Image.new("RGB", (20, 20), RED).save(src / "b" / "fine.png")
    c = src / "c"
    (c / ".thumbs").mkdir(parents=True)
    for junk in (".DS_Store", "Thumbs.db", "notes.txt", ".hidden.png", ".thumbs/x.jpg"):
        (c / junk).write_bytes(b"junk")
    Image.new("RGB", (20, 20), BLUE).save(c / "real.png")
    outside.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 20), RED).save(outside / "elsewhere.png")
    (outside / "folder").mkdir(exist_ok=True)
    Image.new("RGB", (20, 20), RED).save(outside / "folder" / "inner.png")
    (c / "link-inside.png").symlink_to(src / "a" / "sub" / "deeper" / "nested.png")
    (c / "link-out.png").symlink_to(outside / "elsewhere.png")
    (c / "link-folder").symlink_to(outside / "folder")
    (c / "link-a-folder").symlink_to(src / "a" / "sub")
    (c / "link-broken.png").symlink_to(c / "nothing-here.png")
    (src / "stray.txt").write_text("not in a class folder")
    (src / ".git").mkdir()
    (src / ".git" / "HEAD").write_text("ref")
    return {
        "odd": {f"a/odd/{p.name}": (size, centre) for p, size, centre in odd.values()},
        "bad": {f"b/{p.name}": reason for p, reason in bad.values()},
        "links": {
            "c/link-out.png": "symlink leads outside SRC",
            "c/link-folder": "symlink leads outside SRC",
            "c/link-a-folder": "symlink to a folder",
            "c/link-broken.png": "unreadable",
        },
        "per_class": {
            "a": {"seen": len(odd) + 9, "packed": len(odd) + 9, "skipped": 0, "ignored": 0},
            "b": {"seen": len(bad) + 1, "packed": 1, "skipped": len(bad), "ignored": 0},
            "c": {"seen": 11, "packed": 2, "skipped": 4, "ignored": 5},
        },
    }


@pytest.fixture(name="write_odd_images", scope="session")
def write_odd_images_fixture():
    return write_odd_images


@pytest.fixture(name="write_bad_files", scope="session")
def write_bad_files_fixture():
    return write_bad_files


@pytest.fixture(name="write_messy_collection", scope="session")
def write_messy_collection_fixture():
    return write_messy_collection


@pytest.fixture(scope="session")
def big_collection(make_image, classes):
    """n art-sized JPEGs (300-540 px) in image_folder's class folders."""

    def make(root: Path, n: int) -> Path:
        for i in range(n):
            make_image(root / classes[i % 5] / f"img {i}.jpg", (300 + i % 7 * 40, 260 + i % 5 * 50), seed=i)
        return root

    return make
