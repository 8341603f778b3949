"""Make the README's sample inputs: synthetic scenes with Gaussian noise (σ = 25, fixed seed).

    python examples/make_examples.py      # writes examples/noisy/*.png and examples/clean/*.png

Synthetic, so the repository ships no third-party photos; real photos belong in ../shared/data.
"""

from pathlib import Path

import cv2
import numpy as np


def scene(seed: int, h: int = 256, w: int = 320) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([40 + 150 * xx / w, 60 + 120 * yy / h, 200 - 120 * (xx + yy) / (h + w)], -1).astype(np.uint8)
    for _ in range(12):
        color = [int(c) for c in rng.integers(0, 256, 3)]
        c = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        if rng.random() < 0.5:
            cv2.circle(img, c, int(rng.integers(8, 60)), color, -1, cv2.LINE_AA)
        else:
            cv2.rectangle(img, c, (c[0] + int(rng.integers(10, 80)), c[1] + int(rng.integers(10, 80))), color, -1)
    cv2.putText(img, "RDDM", (20, h - 30), cv2.FONT_HERSHEY_SIMPLEX, 2.0, (250, 250, 250), 4, cv2.LINE_AA)
    img[::16] = (img[::16] * 0.6).astype(np.uint8)  # fine stripes: detail a denoiser must keep
    return img


def main():
    root = Path(__file__).parent
    for d in ("noisy", "clean"):
        (root / d).mkdir(exist_ok=True)
    for i in range(3):
        clean = scene(i)
        noise = np.random.default_rng(100 + i).normal(0, 25, clean.shape)
        noisy = np.clip(np.round(clean + noise), 0, 255).astype(np.uint8)
        cv2.imwrite(str(root / "clean" / f"scene{i}.png"), clean)
        cv2.imwrite(str(root / "noisy" / f"scene{i}.png"), noisy)


if __name__ == "__main__":
    main()
