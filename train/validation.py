"""Validation during training: few-step restoration of a fixed set, PSNR/SSIM, an image grid.

PSNR/SSIM are the runtime's (:mod:`rddm_infer.metrics`), so training and evaluation agree.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from rddm_infer.io.atomic import atomic_path
from rddm_infer.metrics import psnr, ssim

from .degradations import to_uint8


def hwc(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x).transpose(1, 2, 0))


def scores(restored: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
    """Mean PSNR (dB) and SSIM over NCHW batches in [0, 1]."""
    pairs = [(np.clip(r, 0, 1), g) for r, g in zip(restored, gt)]
    return (float(np.mean([psnr(r, g) for r, g in pairs])), float(np.mean([ssim(r, g) for r, g in pairs])))


def write_grid(path: str | os.PathLike, columns: list[np.ndarray], gap: int = 4) -> Path:
    """A PNG with one row per image and one column per NCHW [0, 1] batch (input | restored | gt), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n, _, h, w = columns[0].shape
    k = len(columns)
    grid = np.full((n * h + (n - 1) * gap, k * w + (k - 1) * gap, 3), 255, np.uint8)
    for i in range(n):
        for j, col in enumerate(columns):
            grid[i * (h + gap):i * (h + gap) + h, j * (w + gap):j * (w + gap) + w] = to_uint8(hwc(col[i]))
    with atomic_path(path) as tmp:
        if not cv2.imwrite(str(tmp), grid[..., ::-1]):
            raise OSError(f"{path}: could not write the validation grid")
    return path
