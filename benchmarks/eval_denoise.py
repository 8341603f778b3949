"""Denoising quality of a model on clean validation folders, the way the literature measures it.

Gaussian noise of σ (0-255 scale) with a fixed seed per image, clipped and rounded to 8 bits;
PSNR / SSIM of the restored 8-bit output against the clean image (RGB, full image).

    python -m benchmarks.eval_denoise --model rddm_infer/weights/default.onnx \\
        --data ../shared/data/val/kodak24 ../shared/data/val/mcmaster --sigma 15 25 50 --out eval.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from rddm_infer import Restorer, psnr, read_image, ssim
from rddm_infer.tiling import DEFAULT_TILE


def add_noise(clean: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0.0, sigma, clean.shape)
    return np.clip(np.round(clean.astype(np.float64) + noise), 0, 255).astype(np.uint8)


def _chw(img: np.ndarray) -> np.ndarray:
    """H×W×C 8-bit (as cv2 reads) -> C×H×W in [0, 1], what rddm_infer.metrics takes."""
    return np.moveaxis(img, -1, 0).astype(np.float64) / 255.0


def evaluate(restorer: Restorer, folder: Path, sigma: float, limit: int | None = None) -> dict:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".tif"))
    files = files[:limit] if limit else files
    rows, t0 = [], time.perf_counter()
    for i, f in enumerate(files):
        clean = read_image(f).pixels
        noisy = add_noise(clean, sigma, seed=1000 * int(sigma) + i)
        out = restorer.restore_array(noisy)
        c, n, o = _chw(clean), _chw(noisy), _chw(out)
        rows.append({"image": f.name, "psnr_in": psnr(n, c), "psnr": psnr(o, c), "ssim": ssim(o, c)})
    n = max(len(rows), 1)
    return {"data": folder.name, "sigma": sigma, "images": len(rows),
            "psnr_in": sum(r["psnr_in"] for r in rows) / n, "psnr": sum(r["psnr"] for r in rows) / n,
            "ssim": sum(r["ssim"] for r in rows) / n, "seconds_per_image": (time.perf_counter() - t0) / n,
            "per_image": rows}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="ONNX / engine / checkpoint (default: the built-in model)")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--data", nargs="+", required=True, type=Path)
    ap.add_argument("--sigma", nargs="+", type=float, default=[25.0])
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--limit", type=int, default=None, help="first N images of each folder")
    ap.add_argument("--threads", type=int, default=None, help="backend intra-op threads (default: all cores)")
    ap.add_argument("--tile", type=int, default=DEFAULT_TILE, help="tile size (the runtime's default unless given)")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    results = []
    opts = {"threads": a.threads} if a.threads else {}
    with Restorer(a.model, a.backend, steps=a.steps, tile=a.tile, **opts) as r:
        print(f"model {a.model or 'built-in'} on {r.backend}, {r.plan.steps} steps, tile {a.tile}")
        for folder in a.data:
            for s in a.sigma:
                res = evaluate(r, folder, s, a.limit)
                results.append(res)
                print(f"{res['data']:10s} σ={s:4.0f}: PSNR {res['psnr']:.2f} dB (input {res['psnr_in']:.2f}), "
                      f"SSIM {res['ssim']:.4f}, {res['seconds_per_image']:.2f} s/image", flush=True)
    if a.out:
        a.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
