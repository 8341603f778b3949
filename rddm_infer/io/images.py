"""Faithful image I/O: what comes in (depth, gray, alpha, orientation) goes back out.

OpenCV reads and writes the bytes (``np.fromfile`` + ``imdecode`` so non-ASCII paths
work on every OS). ``IMREAD_UNCHANGED`` keeps 16-bit data, gray and alpha, but skips
EXIF orientation, so we read that one tag ourselves. Writes go to a temporary file
in the destination folder and are renamed into place, so a crash never leaves a
half-written output.
"""

from __future__ import annotations

import contextlib
import os
import stat
import struct
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from .atomic import write_bytes_atomic
from ..errors import ImageError
from .formats import check_quality, encode_params, is_lossy  # noqa: F401 (re-exported)
from .headers import Header, read_header
from .storage import Uri, location, read_bytes, write_bytes

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
_NO_ALPHA = (".jpg", ".jpeg")  # formats that cannot store alpha or 16-bit samples
_8BIT_ONLY = (".jpg", ".jpeg", ".bmp", ".webp")
_MAX = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}
DEFAULT_MAX_PIXELS = 100_000_000  # a 100 MP image needs ~4 GB of float buffers; --max-pixels raises it
_GRAY_W = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # RGB weights, as cv2's BGR2GRAY

if hasattr(cv2, "utils") and hasattr(cv2.utils, "logging"):  # bad files are reported by us, once
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)


@dataclass
class Image:
    """Decoded pixels as stored (H×W gray, H×W×3 BGR or H×W×4 BGRA; uint8/uint16/float32)."""

    pixels: np.ndarray
    path: str = ""

    @property
    def gray(self) -> bool:
        return self.pixels.ndim == 2

    @property
    def alpha(self) -> np.ndarray | None:
        return self.pixels[..., 3] if self.pixels.ndim == 3 and self.pixels.shape[2] == 4 else None

    @property
    def size(self) -> tuple[int, int]:
        return self.pixels.shape[:2]


# ---------------------------------------------------------------------------------------------- reading

def read_image(path: str | os.PathLike, max_pixels: int | None = DEFAULT_MAX_PIXELS,
               before_decode: Callable[[int | None], None] | None = None) -> Image:
    """Read any supported file; raises ImageError naming the file and the cause.

    Refused before decoding: special files (a FIFO would block forever), images whose header
    claims more than ``max_pixels`` pixels, and animated or multi-page files (only the first
    frame would be decoded: refusing says so instead of silently dropping the rest).
    ``before_decode(pixels)`` is called with the header's pixel count (None when the header
    is not read) just before decoding: the overlapped executor waits there for memory.
    """
    path = location(path)
    data = np.frombuffer(read_bytes(path), dtype=np.uint8) if isinstance(path, Uri) else _read_local(path)
    if data.size == 0:
        raise ImageError(f"{path}: empty file (0 bytes)")
    raw = data.tobytes()
    head = _check_header(path, raw, max_pixels)
    _check_complete(path, raw)
    if before_decode is not None:
        before_decode(head.pixels if head is not None else None)
    with quiet_stderr():
        pix = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if pix is None or pix.size == 0:
        raise ImageError(f"{path}: not a readable image (unknown format or corrupt data)")
    if pix.ndim == 3 and pix.shape[2] == 1:
        pix = pix[..., 0]
    if pix.ndim == 3 and pix.shape[2] not in (3, 4):
        raise ImageError(f"{path}: unsupported channel count {pix.shape[2]}")
    if pix.dtype not in (np.uint8, np.uint16, np.float32):
        raise ImageError(f"{path}: unsupported sample type {pix.dtype}")
    check_float_range(pix, str(path))
    return Image(np.ascontiguousarray(apply_orientation(pix, exif_orientation(raw))), str(path))


def decode_image_bytes(data: bytes, name: str | os.PathLike = "image") -> np.ndarray:
    """Pixels of bytes we just encoded (a saved output read back, e.g. to measure the JPEG as written)."""
    with quiet_stderr():
        pix = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if pix is None:
        raise ImageError(f"{name}: the encoded output does not decode")
    return pix


def _read_local(path: Path) -> np.ndarray:
    """A regular file's bytes (a FIFO or device is refused before it can block)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except OSError as e:
        raise ImageError(f"{path}: cannot read ({e.strerror or e})") from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageError(f"{path}: is a directory")
    if not stat.S_ISREG(st.st_mode):
        raise ImageError(f"{path}: not a regular file (a FIFO, socket or device); only image files are read")
    try:
        data = np.fromfile(str(path), dtype=np.uint8)
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except OSError as e:
        raise ImageError(f"{path}: cannot read ({e.strerror or e})") from None
    return data


def check_float_range(pix: np.ndarray, where: str) -> None:
    """Float images must hold finite values in [0, 1]: clipping HDR or NaN data would lose it silently."""
    if pix.dtype.kind != "f" or pix.size == 0:
        return
    if not np.isfinite(pix).all():
        raise ImageError(f"{where}: float image holds NaN or infinite values")
    lo, hi = float(pix.min()), float(pix.max())
    if lo < 0.0 or hi > 1.0:
        raise ImageError(f"{where}: float samples span [{lo:.4g}, {hi:.4g}], outside [0, 1]; rddm-infer does not "
                         f"clip them (that would lose data): scale the image to [0, 1] first")


def _check_header(path: Path, raw: bytes, max_pixels: int | None) -> Header | None:
    head = read_header(raw)
    if head is None:
        return None
    if max_pixels is not None and head.pixels > max_pixels:
        raise ImageError(f"{path}: {head.kind} header claims {head.width}×{head.height} = {head.pixels / 1e6:.0f} MP, "
                         f"over the {max_pixels / 1e6:g} MP limit (raise it with --max-pixels)")
    if head.frames > 1:
        what = "multi-page TIFF" if head.kind == "TIFF" else f"animated {head.kind}"
        unit = "pages" if head.kind == "TIFF" else "frames"
        raise ImageError(f"{path}: {what} with {head.frames} {unit}; only single images are restored "
                         f"(split it into one file per {unit[:-1]} first)")
    if head.kind == "TIFF" and head.channels == 2:
        raise ImageError(f"{path}: 2-channel (gray + alpha) TIFF is not supported; save it as gray or RGBA")
    return head


_stderr_lock = threading.Lock()
_quiet_users = 0  # threads decoding now: fd 2 stays silenced until the last one is done
_saved_fd2: int | None = None


def _python_stderr_off_fd2() -> None:
    """Python's own stderr (our one-line errors, warnings, the progress bar) gets a duplicate of fd 2, so that
    silencing the C libraries while other threads decode never hides it. Done once; a captured or replaced
    ``sys.stderr`` (not fd 2) is left alone."""
    try:
        if sys.stderr is None or sys.stderr.fileno() != 2:
            return
        sys.stderr.flush()
        sys.stderr = open(os.dup(2), "w", buffering=1, encoding=sys.stderr.encoding or "utf-8",
                          errors="backslashreplace")
    except (AttributeError, OSError, ValueError):  # no real stderr
        pass


@contextlib.contextmanager
def quiet_stderr():
    """Silence the C libraries (libpng, libjpeg, libtiff) that print straight to file descriptor 2:
    we report a bad file ourselves, in one line. Threads may decode at once: the first one in silences fd 2,
    the last one out restores it (a lock held over the decode would make parallel readers take turns)."""
    global _quiet_users, _saved_fd2
    with _stderr_lock:
        if _quiet_users == 0:
            _python_stderr_off_fd2()
            try:
                _saved_fd2 = os.dup(2)
                with open(os.devnull, "wb") as null:
                    os.dup2(null.fileno(), 2)
            except OSError:  # no stderr at all
                _saved_fd2 = None
        _quiet_users += 1
    try:
        yield
    finally:
        with _stderr_lock:
            _quiet_users -= 1
            if _quiet_users == 0 and _saved_fd2 is not None:
                os.dup2(_saved_fd2, 2)
                os.close(_saved_fd2)
                _saved_fd2 = None


def is_complete_image(path: str | os.PathLike) -> bool:
    """True when ``path`` holds a whole, decodable image (what ``--skip-existing`` trusts as done)."""
    try:
        read_image(path, max_pixels=None)
        return True
    except ImageError:
        return False


def _check_complete(path: Path, raw: bytes) -> None:
    """Catch truncation that decoders would silently pad with gray (JPEG) or half-read (PNG)."""
    if raw[:8] == b"\x89PNG\r\n\x1a\n" and b"IEND" not in raw[-64:]:
        raise ImageError(f"{path}: truncated PNG (no IEND chunk)")
    if raw[:2] == b"\xff\xd8":
        sos = raw.rfind(b"\xff\xda")
        if sos < 0 or raw.find(b"\xff\xd9", sos) < 0:
            raise ImageError(f"{path}: truncated JPEG (no end-of-image marker)")


def _tiff_orientation(tiff: bytes) -> int:
    """Orientation tag (0x0112) of IFD0 in a TIFF/EXIF block; 1 when absent or malformed."""
    if len(tiff) < 8 or tiff[:2] not in (b"II", b"MM"):
        return 1
    e = "<" if tiff[:2] == b"II" else ">"
    try:
        ifd = struct.unpack_from(e + "I", tiff, 4)[0]
        (n,) = struct.unpack_from(e + "H", tiff, ifd)
        for i in range(n):
            tag, typ, _, value = struct.unpack_from(e + "HHI4s", tiff, ifd + 2 + 12 * i)
            if tag == 0x0112:
                v = struct.unpack_from(e + "H", value)[0]
                return v if 1 <= v <= 8 else 1
    except struct.error:
        pass
    return 1


def exif_orientation(raw: bytes) -> int:
    """EXIF orientation still to apply after ``IMREAD_UNCHANGED`` (JPEG APP1, PNG eXIf, WebP EXIF chunk)."""
    if raw[:2] == b"\xff\xd8":  # JPEG: walk the marker segments up to the image data
        i = 2
        while i + 4 <= len(raw) and raw[i] == 0xFF:
            marker, seg_len = raw[i + 1], struct.unpack_from(">H", raw, i + 2)[0]
            if marker == 0xE1 and raw[i + 4:i + 10] == b"Exif\0\0":
                return _tiff_orientation(raw[i + 10:i + 2 + seg_len])
            if marker == 0xDA:
                break
            i += 2 + seg_len
        return 1
    if raw[:8] == b"\x89PNG\r\n\x1a\n":
        i = 8
        while i + 8 <= len(raw):
            n, kind = struct.unpack_from(">I4s", raw, i)
            if kind == b"eXIf":
                return _tiff_orientation(raw[i + 8:i + 8 + n])
            if kind in (b"IDAT", b"IEND"):
                break
            i += 12 + n
        return 1
    if raw[:4] == b"RIFF" and raw[8:12] == b"WEBP":
        i = 12
        while i + 8 <= len(raw):
            kind, n = struct.unpack_from("<4sI", raw, i)
            if kind == b"EXIF":
                block = raw[i + 8:i + 8 + n]
                return _tiff_orientation(block[6:] if block.startswith(b"Exif\0\0") else block)
            i += 8 + n + (n & 1)
        return 1
    return 1  # TIFF: OpenCV's decoder applies the Orientation tag itself, even with IMREAD_UNCHANGED


def apply_orientation(pix: np.ndarray, orientation: int) -> np.ndarray:
    """Rotate/flip stored pixels so they display upright (EXIF orientations 1-8)."""
    ops = {2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
           5: lambda a: a.swapaxes(0, 1), 6: lambda a: a.swapaxes(0, 1)[:, ::-1],
           7: lambda a: a.swapaxes(0, 1)[::-1, ::-1], 8: lambda a: a.swapaxes(0, 1)[::-1]}
    return ops[orientation](pix) if orientation in ops else pix


# ------------------------------------------------------------------------------------ model space

def to_model(img: Image, channels: int = 3) -> np.ndarray:
    """Stored pixels -> (C, H, W) float32 RGB in [-1, 1] (alpha is carried separately)."""
    pix = img.pixels
    scale = _MAX.get(pix.dtype)
    x = pix.astype(np.float32) / scale if scale else np.clip(pix.astype(np.float32), 0.0, 1.0)
    if x.ndim == 2:
        x = np.repeat(x[None], channels, axis=0)
    else:
        x = x[..., 2::-1].transpose(2, 0, 1)  # BGR(A) -> RGB, CHW
        if channels == 1:
            x = np.tensordot(_GRAY_W, x, axes=1)[None]
    return np.ascontiguousarray(x * 2.0 - 1.0, dtype=np.float32)


def from_model(x: np.ndarray, like: Image, ext: str | None = None) -> np.ndarray:
    """(C, H, W) model output -> pixels with the input's depth, gray-ness and alpha (bit-identical).

    ``ext`` (the output format) drops what the format cannot hold: alpha and 16-bit in JPEG.
    """
    ext = (ext or Path(like.path).suffix).lower()
    y = np.clip((np.asarray(x, dtype=np.float32) + 1.0) * 0.5, 0.0, 1.0)
    if like.gray:
        y = y[0] if y.shape[0] == 1 else np.tensordot(_GRAY_W, y, axes=1)
    else:
        y = np.repeat(y, 3, axis=0) if y.shape[0] == 1 else y
        y = y[::-1].transpose(1, 2, 0)  # RGB -> BGR, HWC
    dtype = like.pixels.dtype
    if ext in _8BIT_ONLY and dtype != np.uint8:
        dtype = np.dtype(np.uint8)
    scale = _MAX.get(np.dtype(dtype))
    out = np.round(y * scale).astype(dtype) if scale else y.astype(dtype)
    alpha = like.alpha
    if alpha is not None and ext not in _NO_ALPHA:
        if alpha.dtype != out.dtype:  # depth reduced for the format: scale alpha the same way
            alpha = np.round(alpha.astype(np.float32) / (_MAX.get(alpha.dtype) or 1.0) * scale).astype(out.dtype)
        out = np.dstack([out, alpha])
    return np.ascontiguousarray(out)


# ------------------------------------------------------------------------------------------ writing

def encode_image(pixels: np.ndarray, ext: str, quality: int | None = None) -> bytes:
    """Encoded file bytes by extension (any case); ``quality`` 1-100 for JPEG / WebP (None: JPEG 95, WebP lossless)."""
    ext = ext if ext.startswith(".") else "." + ext
    params = encode_params(ext, quality, cv2)
    try:
        ok, buf = cv2.imencode(ext.lower(), pixels, params)
    except cv2.error as e:
        raise ImageError(f"cannot encode {pixels.dtype} {pixels.shape} as {ext} ({str(e).strip().splitlines()[-1]})") \
            from None
    if not ok:
        raise ImageError(f"cannot encode {pixels.dtype} {pixels.shape} as {ext}")
    return buf.tobytes()


def write_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write bytes to a temp file beside ``path`` and rename it into place (all or nothing); a URI is
    uploaded as one object, which the store shows only once complete."""
    path = location(path)
    if isinstance(path, Uri):
        return write_bytes(path, data)
    try:
        return write_bytes_atomic(path, data)
    except OSError as e:
        raise ImageError(f"{path}: cannot write ({e.strerror or e})") from None


def write_image(path: str | os.PathLike, pixels: np.ndarray) -> Path:
    """Encode by the file's extension and write atomically."""
    path = location(path)
    try:
        data = encode_image(pixels, path.suffix or ".png")
    except ImageError as e:
        raise ImageError(f"{path}: {e}") from None
    return write_atomic(path, data)
