"""Is the trainer's synthetic noise shaped like a camera's? Spatial and cross-channel statistics of noise.

A denoiser removes the noise it was trained on. A camera's JPEG noise (demosaicked, reduced in camera, compressed)
is correlated between neighbouring pixels and across R, G and B, and noise the trainer synthesises for real photos
should be too. For each image this measures noisy − clean: its standard deviation (0-255 scale), the correlation of
a pixel's noise with its neighbour's 1 and 2 pixels away (mean of horizontal and vertical) and 1 diagonal step away,
and the mean correlation between channels; it prints the median and the 10th / 90th percentiles over images.

``--pairs`` measures real pairs (one shot vs the mean of many); ``--degradation`` a trainer degradation (a TOML
inline table, as in ``data.degradations``) drawn on centre crops of ``--data`` clean photos with a fixed seed per
image and rounded to 8 bits, as training sees it (a ``jpeg`` step's compression error counts as noise, as in a
real pair). Each ``--degradation`` is one row.

    python -m benchmarks.noise_stats --pairs ../shared/data/val/polyu_real/noisy ../shared/data/val/polyu_real/clean
    python -m benchmarks.noise_stats --data ../shared/data/train --limit 24 \\
        --degradation '{name = "camera_noise", shot = [1e-4, 1e-3], chroma_blur = 3, luma_blur = 0.5}'
"""

from __future__ import annotations

import argparse
import json
import tomllib
from pathlib import Path

import numpy as np

from rddm_infer import read_image
from rddm_infer.io.atomic import write_bytes_atomic
from rddm_infer.errors import RDDMError

from .eval_denoise import _images, matched_pairs

FIELDS = ("std", "lag1", "lag2", "diag1", "cross_channel")


def noise_stats(noise: np.ndarray) -> dict[str, float]:
    """H×W×C noise (any scale) -> std and correlations (``FIELDS``); per-channel mean removed, channels averaged."""
    n = np.asarray(noise, np.float64)
    n = (n[..., None] if n.ndim == 2 else n) - n.mean(axis=(0, 1))
    var = np.maximum((n ** 2).mean(axis=(0, 1)), 1e-12)

    def corr(a: np.ndarray, b: np.ndarray) -> float:
        return float(((a * b).mean(axis=(0, 1)) / var).mean())

    c = n.shape[-1]
    cross = np.corrcoef(n.reshape(-1, c).T)[np.triu_indices(c, 1)].mean() if c > 1 else float("nan")
    return {"std": float(np.sqrt(var.mean())),
            "lag1": (corr(n[:, 1:], n[:, :-1]) + corr(n[1:], n[:-1])) / 2,
            "lag2": (corr(n[:, 2:], n[:, :-2]) + corr(n[2:], n[:-2])) / 2,
            "diag1": corr(n[1:, 1:], n[:-1, :-1]), "cross_channel": float(cross)}


def summarize(name: str, rows: list[dict[str, float]]) -> dict:
    a = np.array([[r[f] for f in FIELDS] for r in rows])
    return {"data": name, "images": len(rows),
            **{q: dict(zip(FIELDS, np.percentile(a, p, axis=0).round(4).tolist()))
               for q, p in (("median", 50), ("p10", 10), ("p90", 90))}}


def pair_stats(noisy_dir: Path, clean_dir: Path, limit: int | None) -> dict:
    rows = []
    for p, q in matched_pairs(noisy_dir, clean_dir, limit):
        n, c = read_image(p).pixels, read_image(q).pixels
        if n.shape != c.shape:
            raise RDDMError(f"{p}: {n.shape} pixels, but its clean image {q} has {c.shape}")
        rows.append(noise_stats(n.astype(np.float64) - c))
    return summarize(f"{noisy_dir.parent.name}/{noisy_dir.name}", rows)


def parse_degradation(text: str):
    """``'{name = "camera_noise", luma_blur = 0.5}'`` -> (spec, the trainer's 8-bit ``Pipeline`` of it); the trainer's
    parser gives unknown names and bad parameters their one-line errors."""
    try:
        spec = tomllib.loads(f"d = {text}")["d"]
    except tomllib.TOMLDecodeError as e:
        raise RDDMError(f"--degradation {text!r}: not a TOML inline table ({e})") from None
    from rddm_train.degradations import Pipeline

    return spec, Pipeline.from_specs([spec], source="--degradation", bits=8)


def synthetic_stats(spec: dict, pipe, folder: Path, limit: int | None, crop: int, seed: int = 0) -> dict:
    """``pipe`` on centre crops of ``folder``'s photos, read and cropped by the trainer's own loaders."""
    from rddm_train.data import center_crop, read_rgb

    files = _images(folder)[:limit] if limit else _images(folder)
    if not files:
        raise RDDMError(f"{folder}: no images")
    rows = []
    for i, f in enumerate(files):
        img = center_crop(read_rgb(f), crop).astype(np.float32) / 255.0
        degraded, clean = pipe.apply(img, np.random.default_rng(seed + i))
        rows.append(noise_stats((degraded.astype(np.float64) - clean) * 255.0))
    return summarize(json.dumps(spec, separators=(",", ":")), rows)


def _print(res: dict) -> None:
    m, lo, hi = res["median"], res["p10"], res["p90"]
    print(f"{res['data']} ({res['images']} images): " + ", ".join(
        f"{f} {m[f]:.3f} [{lo[f]:.3f}, {hi[f]:.3f}]" for f in FIELDS))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", nargs=2, type=Path, metavar=("NOISY", "CLEAN"), help="real pairs, matched by name")
    ap.add_argument("--data", type=Path, help="clean photos for --degradation")
    ap.add_argument("--degradation", action="append", default=[], metavar="TOML",
                    help="a trainer degradation as a TOML inline table (repeatable: one row each)")
    ap.add_argument("--limit", type=int, default=None, help="first N images")
    ap.add_argument("--crop", type=int, default=256, help="centre crop of --data photos (default 256)")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    a = ap.parse_args(argv)
    if not a.pairs and not a.degradation:
        ap.error("nothing to measure: give --pairs NOISY CLEAN and/or --degradation with --data")
    if a.degradation and a.data is None:
        ap.error("--degradation needs --data (clean photos to degrade)")
    missing = [f for f in [*(a.pairs or []), *([a.data] if a.degradation else [])] if not f.is_dir()]
    if missing:
        ap.error(f"{missing[0]}: no such folder")
    results = []
    try:
        specs = [parse_degradation(t) for t in a.degradation]
        if a.pairs:
            results.append(pair_stats(*a.pairs, a.limit))
            _print(results[-1])
        for spec, pipe in specs:
            results.append(synthetic_stats(spec, pipe, a.data, a.limit, a.crop))
            _print(results[-1])
    except RDDMError as e:
        raise SystemExit(f"error: {e}") from None
    if a.out:
        write_bytes_atomic(a.out, (json.dumps(results, indent=2) + "\n").encode())


if __name__ == "__main__":
    main()
