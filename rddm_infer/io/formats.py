"""Output formats that lose detail, and their quality setting: light (no OpenCV), so the CLI can state defaults."""

from __future__ import annotations

import numbers

from ..errors import ImageError

DEFAULT_JPEG_QUALITY = 95  # OpenCV's own JPEG default; WebP stays lossless unless a quality is asked for
QUALITY_HELP = (f"JPEG / WebP output quality, 1-100 (default: JPEG {DEFAULT_JPEG_QUALITY}, WebP lossless); "
                "PSNR/SSIM are measured on the files as saved.")
JPEG_EXTS, WEBP_EXTS = (".jpg", ".jpeg", ".jpe"), (".webp",)


def _ext(ext: str) -> str:
    return ("." + ext.lstrip(".")).lower()


def is_lossy(ext: str, quality: int | None = None) -> bool:
    """Whether a file of this extension is saved with loss (then metrics are those of the decoded file)."""
    return _ext(ext) in JPEG_EXTS or (_ext(ext) in WEBP_EXTS and quality is not None)


def check_quality(quality: int | None) -> int | None:
    if quality is None:
        return None
    if isinstance(quality, bool) or not isinstance(quality, numbers.Integral) or not 1 <= quality <= 100:
        raise ImageError(f"--quality {quality}: must be an integer from 1 to 100")
    return int(quality)


def encode_params(ext: str, quality: int | None, flags) -> list[int]:
    """OpenCV ``imencode`` parameters for ``quality`` (``flags``: the cv2 module, which holds the constants)."""
    if _ext(ext) in JPEG_EXTS:
        return [flags.IMWRITE_JPEG_QUALITY, check_quality(quality) or DEFAULT_JPEG_QUALITY]
    if _ext(ext) in WEBP_EXTS and quality is not None:
        return [flags.IMWRITE_WEBP_QUALITY, check_quality(quality)]
    return []
