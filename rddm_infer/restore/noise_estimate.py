"""Blind noise estimate of one image: its level, its spatial correlation, whether it is effectively clean.

Why: camera noise, after demosaicking and in-camera processing, is correlated over 1-2 pixels and the model takes
it for texture unless the image is restored as pixel-shuffled sub-images; synthetic white noise is restored best
whole. Measuring this per image lets a plain ``restore`` pick the mode (``restore/mode.py``) instead of the user.

How: the brightness is cut into 8×8 blocks and a plane is fitted to each; in the flattest blocks (leaving out those
with nothing left at all, as JPEG makes flat areas) what is left is noise.
Its level is the blocks' residual spread (corrected for choosing the flattest, by simulation of white noise), its
correlation the lag-1 autocorrelation of the same residuals, across and down. Pure numpy, a few ms per image
(a centred crop of at most ``MAX_SIDE``² pixels is analysed: the noise of a photo does not vary that much).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

BLOCK = 8
FLAT_SHARE = 0.1  # the flattest tenth of the blocks is taken as noise (more lets texture in: benchmarks/noise_mode.py)
VAR_FLOOR = 0.25  # blocks flatter than this (8-bit², e.g. JPEG-quantised or clipped) hold no noise to measure
NOISY_SHARE = 0.5  # fewer blocks than this with any noise at all: the image is clean (camera JPEGs: >= 64 %)
MAX_SIDE = 1024
MIN_BLOCKS = 16


@dataclass(frozen=True)
class NoiseEstimate:
    sigma: float  # noise standard deviation of the brightness in flat areas, 0-255 scale
    correlation: float  # lag-1 autocorrelation of the noise (0: white; camera noise ~0.3-0.7)
    blocks: int  # how many flat blocks it rests on

    def to_dict(self) -> dict:
        return {"sigma": round(self.sigma, 3), "correlation": round(self.correlation, 3)}


def _plane_residual(blocks: np.ndarray) -> np.ndarray:
    """(N, B, B) blocks minus their least-squares plane a + b·x + c·y."""
    c = np.arange(BLOCK, dtype=np.float64) - (BLOCK - 1) / 2
    xs, ys = np.meshgrid(c, c)
    norm = float((xs * xs).sum())
    mean = blocks.mean(axis=(1, 2), keepdims=True)
    gx = (blocks * xs).sum(axis=(1, 2), keepdims=True) / norm
    gy = (blocks * ys).sum(axis=(1, 2), keepdims=True) / norm
    return blocks - mean - gx * xs - gy * ys


def _luma(image: np.ndarray) -> np.ndarray:
    """0-255 brightness (the mean of the colour channels, so RGB and BGR read alike; alpha ignored) of an
    (H, W) or (H, W, C) image of any integer type, or float in [0, 1]."""
    a = np.asarray(image)
    scale = 255.0 / np.iinfo(a.dtype).max if a.dtype.kind in "ui" else 255.0
    if a.ndim == 3:
        a = a[..., :3].mean(axis=2, dtype=np.float64) if a.shape[2] >= 3 else a[..., 0]
    return a.astype(np.float64) * scale


def _flat_residuals(luma: np.ndarray) -> np.ndarray:
    h, w = (s - s % BLOCK for s in luma.shape)
    n = (h // BLOCK) * (w // BLOCK)
    if n < MIN_BLOCKS:
        return np.zeros((0, BLOCK, BLOCK))
    blocks = luma[:h, :w].reshape(h // BLOCK, BLOCK, w // BLOCK, BLOCK).swapaxes(1, 2).reshape(-1, BLOCK, BLOCK)
    res = _plane_residual(blocks)
    var = (res * res).mean(axis=(1, 2))
    noisy = var > VAR_FLOOR
    if noisy.mean() < NOISY_SHARE:  # mostly noiseless (graphics, renders, a clean synthetic image): nothing to read
        return np.zeros((0, BLOCK, BLOCK))
    res, var = res[noisy], var[noisy]
    if len(var) < MIN_BLOCKS:
        return np.zeros((0, BLOCK, BLOCK))
    keep = max(MIN_BLOCKS, int(len(var) * FLAT_SHARE))
    return res[np.argpartition(var, keep - 1)[:keep]]


@functools.cache
def _flat_bias() -> float:
    """How much choosing the flattest blocks under-reads white noise: the ratio, measured once by simulation."""
    rng = np.random.default_rng(0)
    res = _flat_residuals(rng.standard_normal((512, 512)))
    return float(np.sqrt((res * res).mean()))


def estimate_noise(image: np.ndarray) -> NoiseEstimate:
    """The image's :class:`NoiseEstimate` (sigma 0 and correlation 0 where it is too small to tell)."""
    luma = _luma(image)
    h, w = luma.shape
    top, left = max(0, (h - MAX_SIDE) // 2), max(0, (w - MAX_SIDE) // 2)
    res = _flat_residuals(luma[top:top + MAX_SIDE, left:left + MAX_SIDE])
    if not len(res):
        return NoiseEstimate(0.0, 0.0, 0)
    power = float((res * res).mean())
    if power <= 1e-12:
        return NoiseEstimate(0.0, 0.0, len(res))
    across = float((res[:, :, 1:] * res[:, :, :-1]).mean()) * BLOCK / (BLOCK - 1)
    down = float((res[:, 1:, :] * res[:, :-1, :]).mean()) * BLOCK / (BLOCK - 1)
    return NoiseEstimate(float(np.sqrt(power) / _flat_bias()), (across + down) / (2 * power), len(res))
