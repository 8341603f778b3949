"""Tiny synthetic photos and configs for the trainer tests (dim 8, 32×32 crops, 1 CPU thread)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

TINY_TRAIN = ["model.dim=8", "model.dim_mults=[1, 2]", "data.crop=32", "val.crop=32", "val.count=2",
              "run.device='cpu'", "run.threads=1", "data.num_workers=0", "run.progress=false", "run.batch_size=4",
              "optim.ema_start=2", "optim.ema_every=2", "run.log_every=1"]


def write_photos(folder: Path, n: int = 6, size: tuple[int, int] = (40, 48), seed: int = 0, ext: str = ".png"):
    """Smooth gradients with a few flat rectangles: structure a denoiser can learn in a few steps."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    h, w = size
    paths = []
    for i in range(n):
        y, x = np.mgrid[0:h, 0:w] / max(h, w)
        img = np.stack([a + b * x + c * y for a, b, c in rng.uniform(0.1, 0.5, (3, 3))], -1)
        for _ in range(3):
            y0, x0 = rng.integers(0, h - 8), rng.integers(0, w - 8)
            img[y0:y0 + rng.integers(4, 16), x0:x0 + rng.integers(4, 16)] = rng.uniform(0, 1, 3)
        p = folder / f"img{i:02d}{ext}"
        cv2.imwrite(str(p), (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8))
        paths.append(p)
    return paths


def tiny_config(out: Path, data: Path, *extra: str, **flags):
    from rddm_train import config

    return config.load(None, [*TINY_TRAIN, f"run.out='{out}'", f"data.clean='{data}'", *extra], **flags)
