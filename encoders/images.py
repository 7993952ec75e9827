"""Robust image opening: every file becomes an RGB PIL image or a clear ImageLoadError."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import ImageLoadError

if TYPE_CHECKING:  # Pillow and numpy are imported on first use: listing folders needs neither
    from PIL import Image

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


#: folders that archive tools add beside the data (macOS zips: `__MACOSX/._name`), skipped as
#: hidden names are
ARCHIVE_CLUTTER = frozenset({"__MACOSX"})


def is_hidden(name: str) -> bool:
    """A name the folder walks leave out: hidden (.name) or archive clutter."""
    return name.startswith(".") or name in ARCHIVE_CLUTTER


def loose_images_hint(folder: str | os.PathLike[str]) -> str:
    """For a folder that should hold class sub-folders: "; it holds N images directly: put each
    class's images in a sub-folder named after the class (FOLDER/CLASS/IMAGE)", or ""."""
    try:
        loose = [n for n in os.listdir(folder) if not is_hidden(n) and is_image_file(n)]
    except OSError:
        return ""
    if not loose:
        return ""
    return (
        f"; it holds {len(loose)} image(s) directly: put each class's images in a sub-folder "
        f"named after the class ({os.fspath(folder)}/CLASS/IMAGE)"
    )


def file_signature(st: os.stat_result) -> list[int]:
    """What says a file is unchanged since it was last read: size, mtime, ctime and inode. The
    ctime catches a file rewritten with its old size and mtime put back (`cp -p`, `rsync -t`,
    unpacking an archive), which size and mtime alone miss; a needless change (chmod, a move)
    costs a recomputation, never a stale answer."""
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def as_item(source: str | os.PathLike[str] | ImageItem) -> ImageItem:
    """Turn a path or ImageItem into an ImageItem with a string path."""
    if isinstance(source, ImageItem):
        return source
    return ImageItem(os.fspath(source))


def is_image_file(path: str | os.PathLike[str]) -> bool:
    """True when the file name has a known image extension (case-insensitive)."""
    return os.path.splitext(os.fspath(path))[1].lower() in IMAGE_EXTENSIONS


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode (1, L, P, RGBA, LA, CMYK, I;16, I, F, ...) to 8-bit RGB."""
    import numpy as np
    from PIL import Image

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
    from PIL import Image, ImageOps, UnidentifiedImageError

    if isinstance(source, Image.Image):
        return _to_rgb(ImageOps.exif_transpose(source))
    item = as_item(source)
    path = item.path
    _check_file(path)
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
    except PermissionError:
        raise ImageLoadError(_denied(path)) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageLoadError(f"{path}: cannot decode the image ({exc}); is it truncated?") from None
    if item.rotation % 360:
        # counter-clockwise, as Pillow and the Prototypical Networks code rotate Omniglot
        rgb = rgb.rotate(item.rotation % 360, expand=True)
    return rgb


def _denied(path: str) -> str:
    return f"{path}: permission denied; make the file readable (chmod a+r) or remove it"


def _check_file(path: str) -> None:
    """A file that exists, is not empty and may be read; else ImageLoadError naming the fault."""
    try:
        size = os.stat(path).st_size
    except PermissionError:
        raise ImageLoadError(f"{path}: permission denied (its folder cannot be searched)") from None
    except OSError:
        raise ImageLoadError(f"{path}: no such image file") from None
    if not os.path.isfile(path):
        raise ImageLoadError(f"{path}: not a file")
    if size == 0:
        raise ImageLoadError(f"{path}: the file is empty (0 bytes); replace or remove it")
    if not os.access(path, os.R_OK):
        raise ImageLoadError(_denied(path))


def check_image(source: str | os.PathLike[str] | ImageItem | Image.Image) -> str | None:
    """A cheap check of an image file before any embedding starts: it exists, is not empty, may
    be read, and its header names a known format of acceptable size (no pixels are decoded).
    Returns the problem (one sentence naming the file), or None when the file looks fine."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, Image.Image):
        return None
    path = as_item(source).path
    try:
        _check_file(path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:  # reads the header only
                width, height = img.size
        if width * height > MAX_IMAGE_PIXELS:
            return (
                f"{path}: refused, {width}x{height} pixels is over the limit of {MAX_IMAGE_PIXELS} "
                "(possible decompression bomb); resize the image"
            )
    except ImageLoadError as exc:
        return str(exc)
    except PermissionError:
        return _denied(path)
    except Image.DecompressionBombError:
        return f"{path}: refused as a possible decompression bomb; resize the image"
    except UnidentifiedImageError:
        return f"{path}: not a readable image (unknown or corrupt format)"
    except (OSError, SyntaxError, ValueError) as exc:
        return f"{path}: cannot read the image header ({exc})"
    return None


def check_images(sources: list, skip_bad: bool = False) -> list[int]:
    """Header-check every image (see `check_image`) before long work starts. The first problem is
    an ImageLoadError unless `skip_bad`; returns the indices of the images that failed."""
    bad = []
    for i, source in enumerate(sources):
        problem = check_image(source)
        if problem is not None:
            if not skip_bad:
                raise ImageLoadError(problem)
            bad.append(i)
    return bad


def list_images(folder: str | os.PathLike[str]) -> list[str]:
    """The image files directly inside a folder, sorted by name (hidden files left out)."""
    folder = os.fspath(folder)
    with os.scandir(folder) as entries:  # the directory entry's type: no stat per file
        names = [
            e.name for e in entries if not e.name.startswith(".") and is_image_file(e.name) and e.is_file()
        ]
    return [os.path.join(folder, name) for name in sorted(names)]


def walk_images(
    folder: str | os.PathLike[str], within: str | os.PathLike[str] | None = None
) -> tuple[list[str], list[str]]:
    """Image files under a folder, searched recursively (sorted per folder, hidden names left
    out, symlinked folders followed), and the problems met: broken symlinks, symlink loops and
    unreadable folders, one sentence each naming the path. `within`: a folder above `folder`
    (a support folder above its class folder) that a symlink leading back to is a loop too."""
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
            if is_hidden(name):
                continue
            child = os.path.join(path, name)
            if os.path.isdir(child):
                visit(child, ancestors | {real})
            elif os.path.isfile(child):
                if is_image_file(name):
                    images.append(child)
            elif os.path.islink(child):
                problems.append(f"'{child}' is a broken symlink or a symlink loop")

    visit(os.fspath(folder), frozenset() if within is None else frozenset({os.path.realpath(within)}))
    return images, problems
