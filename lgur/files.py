"""Files: atomic writes, hashing, and the one image decoder.

Training, indexing, uploads and the app all read images through `read_image` /
`open_rgb`, so a picture is decoded the same way wherever it is seen (no
training/serving skew), and every write that others may read goes through
`atomic_output`, so a reader sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"}
IMAGE_FORMATS = {"JPEG", "PNG", "WEBP", "BMP", "GIF"}  # what the bytes must be, whatever the name says
# A person photo needs a few hundred pixels a side (the model reads 192x64). A JPEG is decoded at a
# reduced scale (DCT scaling, nearly free), so a large camera photo costs little; other formats are
# decoded in full, so they are held to less: a one-colour 6300x6300 PNG is 131 KB but ~3 s of CPU.
MAX_PIXELS = 40_000_000  # JPEG; larger images are refused (decompression bombs)
MAX_PIXELS_FULL_DECODE = 12_000_000  # PNG, WebP, BMP, GIF
DECODE_SIDE = 512  # a JPEG is decoded at the smallest scale that keeps this many pixels a side
MIN_SIDE = 8
MAX_FILE_BYTES = 20 * 1024 * 1024
# What one decode may allocate: its pixels (after a JPEG's reduced scale) in the file's mode, plus the
# RGB copy a conversion makes. A 12 MP RGB PNG fits; a 40 MP JPEG too narrow to decode reduced does not.
MAX_DECODED_BYTES = 64 * 2**20
MAX_ASPECT = 8  # a person photo is at most this much taller than wide (or wider than tall)
BYTES_PER_PIXEL = {
    "1": 1, "L": 1, "P": 1, "LA": 2, "PA": 2, "La": 2, "I;16": 2, "I;16B": 2, "I;16L": 2, "RGB": 3, "YCbCr": 3,
    "LAB": 3, "HSV": 3, "RGBA": 4, "RGBa": 4, "RGBX": 4, "CMYK": 4, "I": 4, "F": 4,
}  # fmt: skip
DECODE_CACHE_BYTES = 96 * 2**20  # decoded images kept for serving (open_rgb_cached), all together
TEMPORARY_SUFFIX = ".tmp"  # an `atomic_output` that never finished: safe to delete


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary path next to `path`; on success it replaces `path` in one rename.

    The temporary name is unique per write (not per process), so concurrent writers never
    share one; on any error it is removed and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; these files are meant to be shared
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)


def remove_temporaries(folder: Path) -> list[Path]:
    """Delete what interrupted atomic writes left in `folder` (not recursive)."""
    removed = []
    for stale in folder.glob(f".*{TEMPORARY_SUFFIX}") if folder.is_dir() else []:
        stale.unlink(missing_ok=True)
        removed.append(stale)
    return removed


# -- images ----------------------------------------------------------------------------------


def check_image(path: Path) -> str | None:
    """None if the file is an image we serve, else the reason it is not (for the user).

    Reads the header first (size limits, the real format), then decodes once to catch
    truncated files; the file name's suffix is not trusted.
    """
    return read_checked_image(path)[1]


def read_checked_image(path: Path, size: tuple[int, int] | None = None) -> tuple[np.ndarray | None, str | None]:
    """check_image, and with `size` read_image from the same decode: (pixels or None, None) for an
    image we serve, (None, the reason) for any other file."""
    try:
        file_size = path.stat().st_size
    except FileNotFoundError:
        return None, "the file did not arrive; send it again"
    except OSError as error:
        return None, f"cannot read file: {error.strerror}"
    if file_size == 0:
        return None, "empty file"
    if file_size > MAX_FILE_BYTES:
        return None, f"file too large ({file_size / 1e6:.1f} MB > {MAX_FILE_BYTES / 1e6:.0f} MB)"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path, formats=sorted(IMAGE_FORMATS)) as image:  # reads the header only
                w, h = image.size
                limit = MAX_PIXELS if image.format == "JPEG" else MAX_PIXELS_FULL_DECODE
                if w * h > limit:
                    return (
                        None,
                        f"image too large for a person photo ({w}x{h} pixels; a {image.format} may have {limit:,})",
                    )
                if min(w, h) < MIN_SIDE:
                    return None, f"image too small ({w}x{h} pixels)"
                problem = decode_problem(reduced(image))
                if problem:
                    return None, problem
                image.load()  # decodes (as open_rgb does): catches truncated files
                return (None if size is None else model_pixels(rgb(image), size)), None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return None, "image too large (decompression bomb)"
    except UnidentifiedImageError:
        return None, "not a JPEG, PNG, WebP, BMP or GIF image"
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        return None, f"corrupt image ({error})"


def reduced(image: Image.Image) -> Image.Image:
    """A JPEG set to decode at the smallest DCT scale (1/2, 1/4, 1/8) that keeps DECODE_SIDE pixels
    on its shorter side; other formats as they are."""
    if image.format == "JPEG" and min(image.size) > 2 * DECODE_SIDE:
        w, h = image.size
        scale = DECODE_SIDE / min(w, h)
        image.draft("RGB", (max(1, round(w * scale)), max(1, round(h * scale))))
    return image


def decode_problem(image: Image.Image) -> str | None:
    """Why decoding an opened image (header read, `reduced` applied) would cost too much, or None: its
    mode, its shape, the bytes its first frame and its RGB copy take (MAX_DECODED_BYTES)."""
    w, h = image.size
    if image.mode not in BYTES_PER_PIXEL:
        return f"unsupported colour mode ({image.mode})"
    if max(w, h) > MAX_ASPECT * min(w, h):
        return f"not the shape of a person photo ({w}x{h} pixels)"
    cost = w * h * (BYTES_PER_PIXEL[image.mode] + (0 if image.mode == "RGB" else 3))
    if cost > MAX_DECODED_BYTES:
        return f"image too large to decode ({w}x{h} pixels in mode {image.mode})"
    return None


def open_rgb(path: str | Path) -> Image.Image:
    """The image as 8-bit RGB: first frame only (a large JPEG at a reduced scale, `reduced`); 16-bit and
    32-bit grey scaled by their maximum (a plain convert would clip them to white); CMYK, palette and
    alpha converted. Raises ValueError for an image whose decode would cost too much (decode_problem)."""
    with Image.open(path) as image:
        problem = decode_problem(reduced(image))
        if problem:
            raise ValueError(f"{path}: {problem}")
        return rgb(image)


def rgb(image: Image.Image) -> Image.Image:
    """An opened image's first frame as 8-bit RGB (see open_rgb)."""
    image.seek(0)
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float32)
        return Image.fromarray((array / max(float(array.max()), 1.0) * 255).astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


class DecodedImages:
    """Decoded images by (path, modification time, size), bounded in bytes, the least recently used
    dropped first; an image over a quarter of the bound is decoded each time, never kept."""

    def __init__(self, max_bytes: int = DECODE_CACHE_BYTES) -> None:
        self.max_bytes, self.bytes = max_bytes, 0
        self._images: OrderedDict[tuple[str, int, int], Image.Image] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def size_of(image: Image.Image) -> int:
        return image.width * image.height * len(image.getbands())

    def get(self, path: str | Path) -> Image.Image:
        stat = os.stat(path)
        key = (str(path), stat.st_mtime_ns, stat.st_size)
        with self._lock:
            if key in self._images:
                self._images.move_to_end(key)
                return self._images[key]
        image = open_rgb(path)
        size = self.size_of(image)
        if size <= self.max_bytes // 4:
            with self._lock:
                if key not in self._images:
                    self._images[key] = image
                    self.bytes += size
                while self.bytes > self.max_bytes:
                    _, dropped = self._images.popitem(last=False)
                    self.bytes -= self.size_of(dropped)
        return image

    def clear(self) -> None:
        with self._lock:
            self._images.clear()
            self.bytes = 0

    def forget(self, folder: str | Path) -> int:
        """Drop every image decoded from a file under `folder` (deleted files): -> how many."""
        inside = str(Path(folder)) + os.sep
        with self._lock:
            gone = [key for key in self._images if key[0].startswith(inside)]
            for key in gone:
                self.bytes -= self.size_of(self._images.pop(key))
        return len(gone)


DECODED = DecodedImages()


def open_rgb_cached(path: str | Path) -> Image.Image:
    """open_rgb for serving: a selected result's image is drawn in several panels and read by the
    model, in several requests; it is decoded once (DECODED, bounded in bytes). Callers must not
    modify the image in place."""
    return DECODED.get(path)


def read_image(path: str | Path, size: tuple[int, int], cached: bool = False) -> np.ndarray:
    """-> uint8 (3, H, W), resized to size=(H, W): what the model reads, in training and in serving
    (cached=True: decoded through open_rgb_cached)."""
    return model_pixels((open_rgb_cached if cached else open_rgb)(path), size)


def model_pixels(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """RGB image -> uint8 (3, H, W) at size=(H, W)."""
    resized = image.resize((size[1], size[0]), Image.Resampling.BICUBIC)
    return np.asarray(resized).transpose(2, 0, 1).copy()


def _shipped(relative: str) -> Path:
    """A file the repository ships: next to the package in a checkout, else under the current folder."""
    checkout = Path(__file__).resolve().parents[1] / relative
    return checkout if checkout.exists() else Path(relative)


# The shipped model and gallery: the defaults of the app and of every command.
DEFAULT_CHECKPOINT = _shipped("assets/lgur_cpu.safetensors")
DEFAULT_GALLERY = _shipped("gallery")
