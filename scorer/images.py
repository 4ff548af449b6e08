"""Decoding images and masks into the one form the scorer accepts.

Factory datasets are often grayscale or 16-bit; those are converted, never
refused. Only data that cannot be decoded is an error, and the error names the
file (or frame) it came from. Every opener checks the size the header states
against one limit (``inspection_core.names``) before a pixel is decoded: a small
file can claim a huge image (a decompression bomb).
"""

from __future__ import annotations

import io
import re
import time
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

from inspection_core.errors import ImageError
from inspection_core.names import MAX_PIXELS, MAX_SIDE

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def to_rgb_uint8(img: Image.Image | np.ndarray, *, name: str = "image") -> np.ndarray:
    """Any PIL image or array -> H x W x 3 uint8 RGB; 16-bit is scaled, alpha dropped."""
    if isinstance(img, Image.Image):
        if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            arr = np.asarray(img)
        else:
            if img.mode == "P":
                img = img.convert("RGBA")
            if img.mode in ("RGBA", "LA", "PA"):
                img = img.convert("RGBA")
                arr = np.asarray(img)[..., :3]
            else:
                arr = np.asarray(img.convert("RGB"))
    else:
        arr = np.asarray(img)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageError(f"{name}: unsupported image shape {arr.shape}")
    if arr.shape[2] == 4:
        arr = arr[..., :3]
    elif arr.shape[2] == 2:
        arr = arr[..., :1]
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    if arr.shape[2] != 3:
        raise ImageError(f"{name}: unsupported channel count {arr.shape[2]}")
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if arr.dtype == np.bool_:
        return np.ascontiguousarray(arr.astype(np.uint8) * 255)
    if np.issubdtype(arr.dtype, np.integer):
        # 16-bit (or wider) integer data: scale the type's full range to 8 bits.
        # Only non-negative data takes the 16-bit path: negatives would wrap around in uint32.
        in_16bit = 0 <= arr.min(initial=0) and arr.max(initial=0) <= 65535
        if arr.dtype in (np.uint16, np.int32, np.uint32, np.int64) and in_16bit:
            return np.ascontiguousarray((arr.astype(np.uint32) // 257).astype(np.uint8))
        info = np.iinfo(arr.dtype)
        scaled = (arr.astype(np.float64) - info.min) / (info.max - info.min)
        return np.ascontiguousarray(np.clip(scaled * 255 + 0.5, 0, 255).astype(np.uint8))
    if np.issubdtype(arr.dtype, np.floating):
        f = np.nan_to_num(arr.astype(np.float64))
        if f.max(initial=0) > 1.0:
            f = f / 255.0
        return np.ascontiguousarray(np.clip(f * 255 + 0.5, 0, 255).astype(np.uint8))
    raise ImageError(f"{name}: unsupported pixel type {arr.dtype}")


def check_size(width: int, height: int, *, name: str, max_pixels: int = MAX_PIXELS, max_side: int = MAX_SIDE) -> None:
    """ImageError unless the image is non-empty and within the pixel and side limits (checked from the header)."""
    if width <= 0 or height <= 0:
        raise ImageError(f"{name}: image size {width}x{height} is empty")
    if width * height > max_pixels or max(width, height) > max_side:
        raise ImageError(
            f"{name}: image size {width}x{height} ({width * height} pixels) exceeds the limit of "
            f"{max_pixels} pixels and {max_side} px a side; refused from its header, before decoding"
        )


def open_checked(
    source: BinaryIO | Path,
    *,
    name: str,
    max_pixels: int = MAX_PIXELS,
    max_side: int = MAX_SIDE,
    formats: tuple[str, ...] | None = None,
) -> Image.Image:
    """``Image.open`` whose stated size passed :func:`check_size`; nothing is decoded yet (the caller closes it).

    PIL's own bomb guard fires inside ``Image.open``, before the size is known here: its error (past ~179 Mpx), and
    its warning (past ~89 Mpx) where warnings are errors, become the same ImageError. Our limit is the lower one, so
    an image PIL only warns about is refused below all the same. ``formats`` (PIL plugin names) keeps every other
    parser away from the bytes.
    """
    try:
        im = Image.open(source, formats=list(formats) if formats is not None else None)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        stated = re.search(r"\((\d+) pixels\)", str(exc))  # PIL names the count, not the sides
        size = f"image of {stated[1]} pixels" if stated else f"image too large ({exc})"
        raise ImageError(
            f"{name}: {size} exceeds the limit of {max_pixels} pixels and {max_side} px a side; "
            "refused from its header, before decoding"
        ) from None
    except UnidentifiedImageError:  # PIL's own text names the BytesIO object (<_io.BytesIO object at 0x...>)
        raise ImageError(f"{name}: {_unreadable(source, formats)}") from None
    try:
        check_size(*im.size, name=name, max_pixels=max_pixels, max_side=max_side)
    except ImageError:
        im.close()
        raise
    return im


def _unreadable(source: BinaryIO | Path, formats: tuple[str, ...] | None) -> str:
    """Why PIL could not identify ``source``: the format it was taken for and its first bytes, never an object repr."""
    try:
        if isinstance(source, Path):
            with source.open("rb") as f:
                head = f.read(8)
        else:
            source.seek(0)
            head = source.read(8)
    except (OSError, ValueError):
        head = b""
    if formats:
        what = f"not a readable {' or '.join(formats)} image"
    else:
        what = f"not an image in a format this reads ({', '.join(s.lstrip('.') for s in IMAGE_SUFFIXES)})"
    return f"{what}; first bytes {head.hex() or 'none'}"


def decode_failure(exc: Exception, name: str, data: bytes) -> Exception:
    """What a failed decode of ``data`` raises: an ImageError naming ``name`` (PIL's own text for an unknown
    format names the BytesIO object, not the file), or ``exc`` itself when it is not a decoding failure."""
    if isinstance(exc, ImageError):
        return exc
    if isinstance(exc, UnidentifiedImageError):
        return ImageError(
            f"{name}: not an image in a format this reads ({', '.join(s.lstrip('.') for s in IMAGE_SUFFIXES)}); "
            f"first bytes {data[:8].hex()}"
        )
    if isinstance(exc, (OSError, ValueError, SyntaxError)):
        return ImageError(f"{name}: cannot decode image ({exc})")
    return exc


def decode_image(
    data: bytes, *, name: str = "frame", max_pixels: int = MAX_PIXELS, max_side: int = MAX_SIDE
) -> np.ndarray:
    """Encoded bytes (PNG, JPEG, ...) -> RGB uint8; raises ImageError naming ``name``, also for too large images."""
    if not data:
        raise ImageError(f"{name}: empty image data")
    try:
        with open_checked(io.BytesIO(data), name=name, max_pixels=max_pixels, max_side=max_side) as im:
            im.load()
            return to_rgb_uint8(im, name=name)
    except Exception as exc:  # noqa: BLE001 - mapped to one ImageError, or re-raised, by decode_failure
        raise decode_failure(exc, name, data) from None


class DecodeLimitError(ImageError):
    """An image whose header is within the size limits but whose decode would cost too much (scans, time)."""


# A marker in entropy-coded data: 0xFF not followed by a stuffed 0x00, a restart marker or a fill byte.
_JPEG_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
# Input PIL hands its decoder at a time under a decode budget: the budget is checked between blocks.
BUDGET_BLOCK = 4096


def jpeg_scans(data: bytes) -> int:
    """How many scans (SOS segments) a JPEG holds, from its markers alone.

    Each scan costs the decoder a pass over every block of its components however few bytes it has, so thousands
    of tiny scans make a small file take seconds (a scan bomb); progressive JPEGs normally have about 10.
    Segments are skipped by their length, so bytes inside an APP or COM segment are never counted.
    """
    n, i, size = 0, 2, len(data)
    while i + 4 <= size:
        if data[i] != 0xFF or data[i + 1] in (0x00, 0xFF) or 0xD0 <= data[i + 1] <= 0xD7:
            m = _JPEG_MARKER.search(data, i)  # entropy-coded data after a scan header: on to the next marker
            if m is None:
                break
            i = m.start()
            continue
        marker = data[i + 1]
        if marker == 0xD9:  # EOI
            break
        if marker in (0x01, 0xD8):  # standalone markers
            i += 2
            continue
        n += marker == 0xDA
        i += 2 + ((data[i + 2] << 8) | data[i + 3])
    return n


_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"II+\x00", "TIFF"),
    (b"BM", "BMP"),
    (b"GIF8", "GIF"),
    (b"qoif", "QOI"),
    (b"\x00\x00\x01\x00", "ICO"),
)


def sniff_format(data: bytes) -> str | None:
    """The image format ``data`` starts like (PNG, JPEG, TIFF, PPM, BMP, GIF, WEBP, ...), None when unknown."""
    for magic, fmt in _MAGIC:
        if data.startswith(magic):
            return fmt
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if len(data) > 2 and data[0:1] == b"P" and data[1:2] in b"1234567" and data[2:3].isspace():
        return "PPM"
    return None


class _OverBudget(Exception):
    pass


class _Budgeted:
    """A file whose reads fail once ``deadline`` passed: PIL decodes between reads, so this bounds the decode."""

    def __init__(self, raw: BinaryIO, deadline: float) -> None:
        self._raw, self._deadline = raw, deadline

    def read(self, n: int = -1) -> bytes:
        if time.perf_counter() > self._deadline:
            raise _OverBudget
        return self._raw.read(n)

    def __getattr__(self, attr: str) -> object:
        return getattr(self._raw, attr)


def load_within(im: Image.Image, budget_s: float, *, name: str) -> None:
    """``im.load()``, stopped with DecodeLimitError once it took over ``budget_s`` seconds.

    The decoder is fed ``BUDGET_BLOCK`` bytes at a time and the clock is read between blocks, so the overrun is at
    most one block's decode. Bounds what the header cannot show (a slow codec path, a scan count under the limit
    on a huge image), so one frame cannot hold a worker past its consumer group's poll interval.
    """
    im.decodermaxblock = BUDGET_BLOCK
    t0 = time.perf_counter()
    raw = im.fp
    im.fp = _Budgeted(raw, t0 + budget_s)  # type: ignore[assignment]  # read/seek/tell as the file's
    try:
        im.load()
    except _OverBudget:
        raise DecodeLimitError(
            f"{name}: decoding took over {budget_s:g} s (the decode time budget) and was stopped after "
            f"{time.perf_counter() - t0:.2f} s"
        ) from None
    finally:
        im.fp = raw


def load_image(path: str | Path, *, max_pixels: int = MAX_PIXELS, max_side: int = MAX_SIDE) -> np.ndarray:
    """Read an image file as RGB uint8; truncated, unreadable or too large files raise ImageError."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ImageError(f"{p}: cannot read file ({exc.strerror or exc})") from None
    return decode_image(data, name=str(p), max_pixels=max_pixels, max_side=max_side)


def load_mask(
    path: str | Path,
    size_hw: tuple[int, int] | None = None,
    *,
    max_pixels: int = MAX_PIXELS,
    max_side: int = MAX_SIDE,
) -> np.ndarray:
    """Binary mask (H x W bool, > 127 is defect); its size must equal the image's, within the same limits."""
    p = Path(path)
    try:
        with open_checked(p, name=str(p), max_pixels=max_pixels, max_side=max_side) as im:
            im.load()
            arr = np.asarray(im.convert("L") if im.mode not in ("I;16", "I", "F") else im)
    except ImageError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"{p}: cannot read mask ({exc})") from None
    if arr.ndim == 3:
        arr = arr[..., 0]
    if size_hw is not None and tuple(arr.shape[:2]) != tuple(size_hw):
        raise ImageError(f"{p}: mask is {arr.shape[1]}x{arr.shape[0]} (WxH) but its image is {size_hw[1]}x{size_hw[0]}")
    thresh = 127 if arr.dtype == np.uint8 else arr.max(initial=0) / 2
    return arr > thresh


def list_images(folder: str | Path) -> list[Path]:
    """Image files of a folder, sorted by name (deterministic reference draws)."""
    d = Path(folder)
    return sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def decode_reduced(
    data: bytes, *, name: str, min_side: int, max_pixels: int = MAX_PIXELS, max_side: int = MAX_SIDE
) -> np.ndarray:
    """:func:`decode_image`, reduced by a whole factor that keeps both sides at least ``min_side`` (if they were).

    For images that are resized to a small input anyway (fit references): a JPEG decodes straight at 1/2 to 1/8
    scale (``draft``), anything else is box-reduced right after decoding, so a 40 Mpx reference costs its full
    size only once, while decoding, and its reduced size from then on.
    """
    if not data:
        raise ImageError(f"{name}: empty image data")
    try:
        with open_checked(io.BytesIO(data), name=name, max_pixels=max_pixels, max_side=max_side) as im:
            factor = min(im.size) // max(1, min_side)
            if factor > 1 and im.format == "JPEG":
                im.draft(im.mode, (im.size[0] // factor, im.size[1] // factor))  # a scale no smaller than asked
            im.load()
            factor = min(im.size) // max(1, min_side)
            if factor <= 1:
                return to_rgb_uint8(im, name=name)
            wider = {"1": "L", "P": "RGBA", "I;16": "I", "I;16B": "I", "I;16L": "I"}  # modes reduce() refuses
            return to_rgb_uint8((im.convert(wider[im.mode]) if im.mode in wider else im).reduce(factor), name=name)
    except Exception as exc:  # noqa: BLE001 - mapped to one ImageError, or re-raised, by decode_failure
        raise decode_failure(exc, name, data) from None
