"""Measure the per-image mode rule: the blind noise estimate of each image beside the PSNR of every mode.

For each image of each set it records :func:`rddm_infer.restore.noise_estimate.estimate_noise` and the PSNR of the
restored image in each candidate mode (pixel-shuffle 1 / 2, steps), so the rule in ``rddm_infer/restore/mode.py``
can be read off (and re-checked) from data rather than assumed. Sets: real camera pairs (``--pairs``), clean photos
restored against themselves and with white Gaussian noise (``--data``, ``--sigma``, colour and ``--gray``).

    python -m benchmarks.noise_mode --pairs ../shared/data/val/polyu_real/noisy ../shared/data/val/polyu_real/clean \\
        --data ../shared/data/val/kodak24 ../shared/data/val/mcmaster --sigma 0 5 15 25 50 --gray --limit 8 \\
        --out benchmarks/results/noise_mode.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import cv2
import numpy as np

from benchmarks.eval_denoise import _chw, _images, add_noise, held_out_scenes, matched_pairs, stamp_facts
from rddm_infer.io.images import read_image
from rddm_infer.metrics import psnr
from rddm_infer.restore.local import Restorer
from rddm_infer.restore.mode import MODES, choose_mode, correlated_mode, rule_text
from rddm_infer.restore.noise_estimate import estimate_noise


def _cases(a) -> list[tuple[str, str, np.ndarray, np.ndarray]]:
    """(set, image, input, clean) for every image measured."""
    cases = []
    if a.pairs:
        scenes = held_out_scenes(a.held_out) if a.held_out else None
        for p, q in matched_pairs(Path(a.pairs[0]), Path(a.pairs[1]), a.limit_pairs, scenes):
            cases.append(("real pairs", p.name, read_image(p).pixels, read_image(q).pixels))
    for folder in map(Path, a.data):
        files = _images(folder)[:a.limit] if a.limit else _images(folder)
        for gray in (False, True) if a.gray else (False,):
            for sigma in a.sigma:
                for i, f in enumerate(files):
                    clean = read_image(f).pixels
                    if gray and clean.ndim == 3:
                        clean = cv2.cvtColor(clean[..., :3], cv2.COLOR_BGR2GRAY)
                    noisy = add_noise(clean, sigma, seed=1000 * int(sigma) + i) if sigma else clean
                    cases.append((f"{folder.name}{' gray' if gray else ''} σ={sigma:g}", f.name, noisy, clean))
    return cases


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--pairs", nargs=2, default=None, metavar=("NOISY", "CLEAN"))
    ap.add_argument("--data", nargs="*", default=[])
    ap.add_argument("--sigma", nargs="*", type=float, default=[0, 15])
    ap.add_argument("--gray", action="store_true")
    ap.add_argument("--limit", type=int, default=None, help="images per --data folder")
    ap.add_argument("--limit-pairs", type=int, default=None)
    ap.add_argument("--held-out", default=None, metavar="CONFIG",
                    help="only the --pairs of this training config's real.held_out scenes (never trained on)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/noise_mode.json"))
    ap.add_argument("--reanalyse", action="store_true",
                    help="re-read --out: estimate and decide again on the same inputs, keep the measured PSNRs "
                         "(a changed estimator or rule, without restoring anything)")
    ap.add_argument("--write-mode", type=Path, default=None, metavar="MODEL",
                    help="stamp the best mode on the real pairs into MODEL (ONNX or .safetensors) as its "
                         "correlated_noise_mode: the mode restore's auto picks for correlated noise")
    a = ap.parse_args(argv)
    if a.write_mode and not a.pairs:
        ap.error("--write-mode measures on real pairs: give --pairs")
    if a.reanalyse:
        old = json.loads(a.out.read_text())
        r_mode = correlated_mode(old.get("correlated_noise_mode"))
        measured = {(r["data"], r["image"]): r for r in old["per_image"]}
        rows = []
        for data, name, noisy, _ in _cases(a):
            est = estimate_noise(noisy)
            rows.append({**measured[(data, name)], **est.to_dict(), "auto": choose_mode(est, r_mode).label})
        summary = _summarise(rows, a.out, old["machine"], old["engine"], r_mode)
    else:
        summary = _measure(a)
    if a.write_mode:
        best = best_real_mode(summary["real pairs"]["gain_db"])
        stamp_facts(a.write_mode, correlated_noise_mode=best)
        print(f"{a.write_mode}: correlated_noise_mode = {best} written ({MODES[best].describe_how()})")


def _measure(a) -> dict:
    """Restore every case in every mode, print a line per image, write and return the summary."""
    rows = []
    opts = {"threads": a.threads} if a.threads else {}
    with Restorer(a.model, "onnxruntime", **opts) as r:
        r_mode = r.correlated_mode
        for data, name, noisy, clean in _cases(a):
            est = estimate_noise(noisy)
            row = {"data": data, "image": name, **est.to_dict(), "auto": choose_mode(est, r_mode).label,
                   "psnr_in": psnr(_chw(noisy), _chw(clean))}
            for mode in MODES.values():
                r.pixel_shuffle, r.plan = mode.pixel_shuffle, r.sampler.plan(mode.steps)
                t0 = time.perf_counter()
                out = r.restore_array(noisy)
                row[mode.label] = psnr(_chw(out), _chw(clean))
                row[mode.label + " s"] = time.perf_counter() - t0
            rows.append(row)
            print(f"{data:22s} {name[:28]:28s} σ̂ {est.sigma:5.2f} ρ̂ {est.correlation:6.3f} -> {row['auto']:8s} "
                  + " ".join(f"{m}: {row[m] - row['psnr_in']:+6.2f}" for m in MODES), flush=True)
        engine = r.engine
    return _summarise(rows, a.out, platform.processor() or platform.machine(), engine, r_mode)


def best_real_mode(gain_db: dict, tolerance: float = 0.05) -> str:
    """The mode with the best mean gain on real pairs; within ``tolerance`` dB of it, one that runs 1 step."""
    gains = {m: gain_db[m] for m in MODES}
    best = max(gains.values())
    near = [m for m, g in gains.items() if g >= best - tolerance]
    return max(near, key=lambda m: (MODES[m].steps == 1, gains[m]))


def _gain(row: dict, mode: str) -> float:
    """PSNR gain of a mode; for a clean input (infinite input PSNR) the output's PSNR against itself."""
    return row[mode] if math.isinf(row["psnr_in"]) else row[mode] - row["psnr_in"]


def _summarise(rows: list[dict], out: Path, machine: str, engine: str, correlated) -> dict:
    summary = {}
    for data in dict.fromkeys(r["data"] for r in rows):
        sel = [r for r in rows if r["data"] == data]
        gain = {m: float(np.mean([_gain(r, m) for r in sel])) for m in MODES}
        gain["auto"] = float(np.mean([_gain(r, r["auto"]) for r in sel]))
        summary[data] = {"images": len(sel), "psnr_in": float(np.mean([r["psnr_in"] for r in sel])), "gain_db": gain,
                         "auto_modes": {m: sum(r["auto"] == m for r in sel) for m in MODES}}
        what = "PSNR vs itself" if math.isinf(summary[data]["psnr_in"]) else "gains"
        print(f"{data:22s} n={len(sel):3d} in {summary[data]['psnr_in']:6.2f} dB  {what}: "
              + "  ".join(f"{k} {v:+.3f}" for k, v in gain.items())
              + "   auto: " + ", ".join(f"{k} {v}" for k, v in summary[data]["auto_modes"].items() if v))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "engine": engine, "rule": rule_text(correlated),
                               "correlated_noise_mode": correlated.label, "summary": summary, "per_image": rows},
                              indent=1, default=str) + "\n")
    print(f"wrote {out}")
    return summary


if __name__ == "__main__":
    main()
