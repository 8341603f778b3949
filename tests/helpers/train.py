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


def pair_pattern(h: int, w: int) -> np.ndarray:
    """The known 'noise' of :func:`write_real_pairs`: noisy = clean + this (int, -3..3, varies with x, y, channel)."""
    y, x, c = np.mgrid[0:h, 0:w, 0:3]
    return (3 * x + 5 * y + c) % 7 - 3


def write_real_pairs(folder: Path, scenes: dict[str, int], size: tuple[int, int] = (40, 48),
                     strength: dict[str, int] | None = None) -> list[str]:
    """``folder/noisy`` and ``folder/clean`` PNG pairs named ``SCENE_N.png``, N = 1.. per scene. The clean image
    encodes where each pixel is (R = 10 + 4x, G = 10 + 5y) and which pair it is (B = 20 + 3·pair); the noisy one adds
    :func:`pair_pattern` (× the scene's ``strength``, 1 by default), so any crop tells where it came from and whether
    noisy and clean stayed aligned."""
    h, w = size
    assert w <= 48 and h <= 48 and sum(scenes.values()) <= 70 and max((strength or {0: 1}).values()) <= 2, \
        "the encoding must stay within 8 bits"
    y, x = np.mgrid[0:h, 0:w]
    names, pair = [], 0
    for scene, n in scenes.items():
        for j in range(1, n + 1):
            clean = np.stack([10 + 4 * x, 10 + 5 * y, np.full_like(x, 20 + 3 * pair)], -1)
            noisy = clean + (strength or {}).get(scene, 1) * pair_pattern(h, w)
            for sub, img in (("clean", clean), ("noisy", noisy)):
                (folder / sub).mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(folder / sub / f"{scene}_{j}.png"), img[..., ::-1].astype(np.uint8))
            names.append(f"{scene}_{j}.png")
            pair += 1
    return names
