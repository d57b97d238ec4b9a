"""The one place that opens, validates, orients, converts and resizes images.

`artscale pack` and `artscale generate` both decode through `load_image`, so a file that packs
also generates, and every bad file is skipped with the same reason in both.
"""

from __future__ import annotations

import io
import os
import stat
import struct
import warnings
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Extensions Pillow decodes that are worth trying as images (compared lower-cased).
IMAGE_EXTENSIONS = frozenset(
    {
        ".jpg",
        ".jpeg",
        ".jpe",
        ".jfif",
        ".png",
        ".bmp",
        ".gif",
        ".tif",
        ".tiff",
        ".webp",
        ".ppm",
        ".pgm",
        ".pbm",
        ".pnm",
        ".tga",
    }
)
# Files that are never images and never worth a skip line: OS junk and sidecar text.
JUNK_NAMES = frozenset({".ds_store", "thumbs.db", "desktop.ini", "ehthumbs.db", "icon\r"})
JUNK_EXTENSIONS = frozenset(
    {".txt", ".md", ".json", ".csv", ".xml", ".xmp", ".ini", ".log", ".db", ".html", ".pdf.txt"}
)
# Formats people keep in art collections that Pillow cannot decode: named, not "not an image".
UNSUPPORTED_EXTENSIONS = frozenset(
    {
        ".heic",
        ".heif",
        ".svg",
        ".svgz",
        ".pdf",
        ".cr2",
        ".cr3",
        ".nef",
        ".arw",
        ".dng",
        ".raw",
        ".orf",
        ".rw2",
        ".jxl",
        ".kra",
        ".xcf",
    }
)
DEFAULT_MAX_PIXELS = 178_956_970  # Pillow's decompression-bomb limit (2 x MAX_IMAGE_PIXELS)

Resize = Literal["stretch", "center-crop", "fit"]  # fit: within the size, aspect kept, never enlarged


class SkipImage(Exception):
    """A file that cannot become a training or input image; str() is the reason, one line."""


def is_ignored(path: Path) -> bool:
    """Hidden files and known junk are ignored (counted, not reported as skipped)."""
    name = path.name
    return name.startswith(".") or name.lower() in JUNK_NAMES or path.suffix.lower() in JUNK_EXTENSIONS


def _allow_pixels(max_pixels: int) -> None:
    """Raise Pillow's hard bomb limit when the caller allows more; it only ever grows, so
    threads racing here are harmless (the caller's own check is the one that counts)."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and max_pixels > 2 * limit:
        Image.MAX_IMAGE_PIXELS = max_pixels // 2 + 1


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB; transparency is composited on white."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if im.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        im = Image.fromarray(arr, "L")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if im.mode != "RGB":
        return im.convert("RGB")
    return im


def _fit(im: Image.Image, size: tuple[int, int], resize: Resize) -> Image.Image:
    width, height = size
    if im.size == (width, height):
        return im
    if resize == "center-crop":
        return ImageOps.fit(im, (width, height), Image.Resampling.BILINEAR)
    if resize == "fit":
        scale = min(width / im.width, height / im.height)
        if scale >= 1:
            return im
        size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
        return im.resize(size, Image.Resampling.BILINEAR)
    return im.resize((width, height), Image.Resampling.BILINEAR)


def load_image(
    path: str | Path,
    size: tuple[int, int] | None = None,
    resize: Resize = "stretch",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = 0,
) -> tuple[Image.Image, tuple[int, int]]:
    """Decode `path` to an oriented RGB image, resized to `size` (width, height) when given.

    Returns the image and the original oriented size. Raises SkipImage with the reason for any
    file that is not a whole, decodable image, has more than `max_pixels` pixels, or a shorter
    side below `min_side`. JPEGs are decoded at reduced scale with
    `draft()` when a smaller size is asked for (DCT scaling: less to decode).
    """
    path = Path(path)
    try:
        st = os.stat(path)  # follows symlinks; a FIFO or device would block or never end in open()
    except FileNotFoundError:
        raise SkipImage("unreadable: missing (a broken symlink?)") from None
    except OSError as e:
        raise SkipImage(f"unreadable: {e.strerror or e}") from None
    if stat.S_ISDIR(st.st_mode):
        raise SkipImage("unreadable: a folder, not a file")
    if not stat.S_ISREG(st.st_mode):
        raise SkipImage("unreadable: not a regular file")
    if st.st_size == 0:
        raise SkipImage("not an image: empty file")
    _allow_pixels(max_pixels)
    try:
        with warnings.catch_warnings():
            # Our own limit (max_pixels) decides below; Pillow's warning would fire at a fixed 89 Mpx.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
    except Image.DecompressionBombError:
        raise SkipImage(f"too many pixels (limit {max_pixels})") from None
    except UnidentifiedImageError:
        if path.suffix.lower() in UNSUPPORTED_EXTENSIONS:
            raise SkipImage(f"unsupported format ({path.suffix.lower()})") from None
        raise SkipImage("not an image") from None
    except IsADirectoryError:
        raise SkipImage("unreadable: a folder, not a file") from None
    except FileNotFoundError:
        raise SkipImage("unreadable: missing (a broken symlink?)") from None
    except OSError as e:
        if e.errno is not None:  # the file system said no
            raise SkipImage(f"unreadable: {e.strerror or e}") from None
        raise SkipImage(f"truncated or corrupt: {e}") from None  # Pillow's parser gave up on the header
    except (SyntaxError, ValueError, EOFError, struct.error) as e:
        raise SkipImage(f"truncated or corrupt: {e}") from None
    with im:
        if im.width * im.height > max_pixels:
            raise SkipImage(f"too many pixels: {im.width}x{im.height} (limit {max_pixels})")
        if min(im.size) < min_side:
            raise SkipImage(f"too small: {im.width}x{im.height} (min size {min_side})")
        full = im.size  # draft() below shrinks im.size; the manifest wants the real one
        if size is not None and im.format == "JPEG":
            # Orientation may swap the sides: ask for a scale that covers the larger side both ways.
            side = max(size)
            im.draft("RGB", (side, side))
        try:
            # Decode first: on a PNG, reading EXIF (getexif) would load a corrupt image and fail
            # in a place that swallowed the error, and the corrupt file would be packed.
            im.load()
        except (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError) as e:
            if "not available" in str(e):  # Pillow built without that codec (e.g. JPEG 2000)
                raise SkipImage(f"unsupported: {e}") from None
            raise SkipImage(f"truncated or corrupt: {e}") from None
        try:
            oriented = ImageOps.exif_transpose(im)
        except Exception as e:  # a broken EXIF block must not lose an otherwise good image
            warnings.warn(f"{path}: ignoring unreadable EXIF orientation ({e})", stacklevel=2)
            oriented = im
        turned = oriented.size != im.size  # a 90-degree EXIF rotation swaps the sides
        original = (full[1], full[0]) if turned else full
        rgb = _to_rgb(oriented)
        if rgb is im:
            rgb = im.copy()
    if size is not None:
        rgb = _fit(rgb, size, resize)
    return rgb, original


def encode_image(im: Image.Image, fmt: str = "png", quality: int = 95) -> bytes:
    """Encode an RGB image; PNG at compress_level 1 (4x faster than the default, a bit larger)."""
    buf = io.BytesIO()
    fmt = fmt.lower()
    if fmt in ("jpg", "jpeg"):
        im.save(buf, "JPEG", quality=quality)
    elif fmt == "png":
        im.save(buf, "PNG", compress_level=1)
    elif fmt == "webp":
        im.save(buf, "WEBP", quality=quality)
    else:
        raise ValueError(f"unknown image format {fmt}")
    return buf.getvalue()


def decode_bytes(data: bytes) -> Image.Image:
    """Decode an already-validated image (a shard sample) to RGB."""
    with Image.open(io.BytesIO(data)) as im:
        return _to_rgb(im) if im.mode != "RGB" else im.copy()


def resize_image(im: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Stretch an RGB image to `size` (width, height): generate's --native and --restore-size."""
    return _fit(im, size, "stretch")
