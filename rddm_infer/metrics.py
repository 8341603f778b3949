"""PSNR and SSIM on float images in [0, 1] (C, H, W or H, W), numpy + opencv only.

SSIM is Wang et al. (2004): 11×11 Gaussian window, σ = 1.5, K1 = 0.01, K2 = 0.03,
computed per channel on the valid region and averaged (what skimage does with
``gaussian_weights=True, use_sample_covariance=False``).
"""

from __future__ import annotations

import cv2
import numpy as np


def _planes(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    return a[None] if a.ndim == 2 else a


def _same(a, b):
    a, b = _planes(a), _planes(b)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {a.shape} vs {b.shape}")
    return a, b


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> float:
    a, b = _same(a, b)
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else float(10.0 * np.log10(data_range ** 2 / mse))


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> float:
    a, b = _same(a, b)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    win = cv2.getGaussianKernel(11, 1.5)
    window = win @ win.T

    def filt(p):  # valid-region filtering, as the reference implementations crop the border
        return cv2.filter2D(p, -1, window, borderType=cv2.BORDER_REFLECT)[5:-5, 5:-5]

    vals = []
    for x, y in zip(a, b):
        if min(x.shape) < 11:
            raise ValueError("SSIM needs images of at least 11×11 pixels")
        mx, my = filt(x), filt(y)
        sxx, syy, sxy = filt(x * x) - mx * mx, filt(y * y) - my * my, filt(x * y) - mx * my
        m = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
        vals.append(float(m.mean()))
    return float(np.mean(vals))
