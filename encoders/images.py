"""Robust image opening: every file becomes an RGB PIL image or a clear ImageLoadError."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageLoadError

#: Images with more pixels than this are refused as decompression bombs (Pillow's own default).
MAX_IMAGE_PIXELS = 89_478_485

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


@dataclass(frozen=True)
class ImageItem:
    """An image on disk, optionally rotated by a multiple of 90 degrees (Omniglot's extra classes)."""

    path: str
    rotation: int = 0

    def __post_init__(self) -> None:
        if self.rotation % 90:
            raise ValueError(f"rotation must be a multiple of 90 degrees, got {self.rotation}")

    @property
    def key(self) -> str:
        """A string that names this image uniquely (used by the embedding cache)."""
        return self.path if self.rotation == 0 else f"{self.path}#rot{self.rotation:03d}"


def as_item(source: str | os.PathLike[str] | ImageItem) -> ImageItem:
    """Turn a path or ImageItem into an ImageItem with a string path."""
    if isinstance(source, ImageItem):
        return source
    return ImageItem(os.fspath(source))


def is_image_file(path: str | os.PathLike[str]) -> bool:
    """True when the file name has a known image extension (case-insensitive)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode (1, L, P, RGBA, LA, CMYK, I;16, I, F, ...) to 8-bit RGB."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16"):
            arr = arr / 257.0
        else:  # 32-bit int or float: stretch the used range to 0..255
            lo, hi = float(arr.min()), float(arr.max())
            arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def open_image(source: str | os.PathLike[str] | ImageItem | Image.Image) -> Image.Image:
    """Open an image as RGB with EXIF orientation applied; raise ImageLoadError naming the file.

    Decompression bombs (more than MAX_IMAGE_PIXELS pixels) are refused before decoding.
    """
    if isinstance(source, Image.Image):
        return _to_rgb(ImageOps.exif_transpose(source))
    item = as_item(source)
    path = item.path
    if not os.path.isfile(path):
        raise ImageLoadError(f"{path}: no such image file")
    if os.path.getsize(path) == 0:
        raise ImageLoadError(f"{path}: the file is empty (0 bytes); replace or remove it")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise ImageLoadError(
                        f"{path}: refused, {width}x{height} pixels is over the limit of "
                        f"{MAX_IMAGE_PIXELS} (possible decompression bomb); resize the image"
                    )
                img.load()
                img = ImageOps.exif_transpose(img)
                rgb = _to_rgb(img)
    except ImageLoadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageLoadError(f"{path}: refused as a possible decompression bomb ({exc})") from None
    except UnidentifiedImageError:
        raise ImageLoadError(f"{path}: not a readable image (unknown or corrupt format)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageLoadError(f"{path}: cannot decode the image ({exc}); is it truncated?") from None
    if item.rotation % 360:
        # counter-clockwise, as Pillow and the Prototypical Networks code rotate Omniglot
        rgb = rgb.rotate(item.rotation % 360, expand=True)
    return rgb


def list_images(folder: str | os.PathLike[str]) -> list[str]:
    """The image files directly inside a folder, sorted by name (hidden files left out)."""
    folder = os.fspath(folder)
    return sorted(
        os.path.join(folder, name)
        for name in os.listdir(folder)
        if not name.startswith(".") and is_image_file(name) and os.path.isfile(os.path.join(folder, name))
    )


def walk_images(folder: str | os.PathLike[str]) -> tuple[list[str], list[str]]:
    """Image files under a folder, searched recursively (sorted per folder, hidden names left
    out, symlinked folders followed), and the problems met: broken symlinks, symlink loops and
    unreadable folders, one sentence each naming the path."""
    images: list[str] = []
    problems: list[str] = []

    def visit(path: str, ancestors: frozenset[str]) -> None:
        real = os.path.realpath(path)
        if real in ancestors:
            problems.append(f"'{path}' is a symlink loop (it leads back to '{real}')")
            return
        try:
            names = sorted(os.listdir(path))
        except OSError as exc:
            problems.append(f"folder '{path}' cannot be read ({exc.strerror})")
            return
        for name in names:
            if name.startswith("."):
                continue
            child = os.path.join(path, name)
            if os.path.isdir(child):
                visit(child, ancestors | {real})
            elif os.path.isfile(child):
                if is_image_file(name):
                    images.append(child)
            elif os.path.islink(child):
                problems.append(f"'{child}' is a broken symlink or a symlink loop")

    visit(os.fspath(folder), frozenset())
    return images, problems

