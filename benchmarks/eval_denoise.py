"""Denoising quality of a model on clean validation folders, the way the literature measures it.

Gaussian noise of σ (0-255 scale) with a fixed seed per image, clipped and rounded to 8 bits;
PSNR / SSIM of the restored 8-bit output against the clean image (RGB, full image). ``--gray`` adds the
gray versions of the sets (one noise field: a gray file, as the runtime reads it), ``--pairs`` real noisy/clean
pairs, ``--pixel-shuffle 1 2`` restore's pixel-shuffle mode next to the plain restore. With several ``--steps`` it
reports PSNR per step count and the recommended steps (the fewest within 0.05 dB of the best, averaged over
everything measured); ``--write-recommended`` stamps them into an ONNX model.
``--anchor nlm bm3d`` scores classical denoisers on the very same noisy files next to the model (OpenCV non-local
means; BM3D / CBM3D from the ``bm3d`` package, extra ``eval``, evaluation only). They are given the true noise level,
an advantage the blind model does not get: σ of synthetic noise, and on real pairs the standard deviation of
noisy − clean of each pair (robust noise estimators fail on JPEG'd camera images: near 0).

    python -m benchmarks.eval_denoise --model rddm_infer/weights/default.onnx \\
        --data ../shared/data/val/kodak24 ../shared/data/val/mcmaster --sigma 15 25 50 --out eval.json
    python -m benchmarks.eval_denoise --data ../shared/data/val/kodak24 --gray --steps 1 2 3 5 \\
        --pairs ../shared/data/val/polyu_real/noisy ../shared/data/val/polyu_real/clean --write-recommended m.onnx
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import cv2

from rddm_infer import Restorer, psnr, read_image, ssim
from rddm_infer.io.images import Image
from rddm_infer.diffusion.metadata import META_KEY, ArtifactMeta
from rddm_infer.io.atomic import atomic_path
from rddm_infer.errors import RDDMError
from rddm_infer.restore.mode import AUTO
from rddm_infer.restore.tiling import DEFAULT_TILE, ENSEMBLE_SIZES, MAX_PIXEL_SHUFFLE

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif")
TOLERANCE_DB = 0.05  # steps within this of the best PSNR count as "as good"


def add_noise(clean: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0.0, sigma, clean.shape)
    return np.clip(np.round(clean.astype(np.float64) + noise), 0, 255).astype(np.uint8)


def _chw(img: np.ndarray) -> np.ndarray:
    """H×W×C (or H×W gray) 8-bit, as cv2 reads -> C×H×W in [0, 1], what rddm_infer.metrics takes."""
    return (img[None] if img.ndim == 2 else np.moveaxis(img, -1, 0)).astype(np.float64) / 255.0


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def nlm(noisy: np.ndarray, sigma: float) -> np.ndarray:
    """OpenCV non-local means, 7² patches, 21² search; filter strength h = 0.8·σ (gray) or 0.6·σ (colour, the
    same for the chroma): the best of 0.3-1.0·σ on three kodak24 images at σ = 25."""
    if noisy.ndim == 2:
        return cv2.fastNlMeansDenoising(noisy, None, 0.8 * sigma, 7, 21)
    return cv2.fastNlMeansDenoisingColored(noisy, None, 0.6 * sigma, 0.6 * sigma, 7, 21)


def bm3d_anchor(noisy: np.ndarray, sigma: float) -> np.ndarray:
    """BM3D (gray) / CBM3D (colour, opponent colour space) of the ``bm3d`` package at the given σ."""
    try:
        import bm3d
    except ImportError:
        raise RDDMError("--anchor bm3d needs the bm3d package: pip install 'rddm-infer[eval]'") from None
    x = noisy.astype(np.float64) / 255.0
    if noisy.ndim == 2:
        y = bm3d.bm3d(x, sigma / 255.0)
    else:
        y = bm3d.bm3d_rgb(x[..., ::-1], sigma / 255.0)[..., ::-1]  # cv2's BGR -> the package's RGB and back
    return np.clip(np.round(y * 255.0), 0, 255).astype(np.uint8)


def nlm_at(h: float):
    """Non-local means at a fixed filter strength ``h`` (luma and chroma alike), whatever the noise level: what a user
    tuning it by eye on a set does; ``--nlm-h`` sweeps it and the best ``h`` of a set is its fair score."""
    def fn(noisy: np.ndarray, sigma: float) -> np.ndarray:
        if noisy.ndim == 2:
            return cv2.fastNlMeansDenoising(noisy, None, h, 7, 21)
        return cv2.fastNlMeansDenoisingColored(noisy, None, h, h, 7, 21)
    return fn


ANCHORS = {"nlm": nlm, "bm3d": bm3d_anchor}


class Anchor:
    """A classical denoiser with ``restore_array``'s shape, run at the noise level it was told (``sigma``)."""

    def __init__(self, name: str, fn=None):
        self.name, self.fn, self.sigma = name, fn or ANCHORS[name], 0.0

    def restore_array(self, noisy: np.ndarray) -> np.ndarray:
        return self.fn(noisy, self.sigma)


def _score(restorer: Restorer, name: str, noisy: np.ndarray, clean: np.ndarray) -> dict:
    out = restorer.restore_array(noisy)
    c, n, o = _chw(clean), _chw(noisy), _chw(out)
    row = {"image": name, "psnr_in": psnr(n, c), "psnr": psnr(o, c), "ssim": ssim(o, c)}
    if getattr(restorer, "pixel_shuffle", None) == AUTO:  # the mode restore chose for this image, and why
        mode = restorer.arrays.mode_for(Image(noisy))
        row["mode"] = mode.describe(restorer.arrays.plan_for(mode).steps)
    return row


def _summary(data: str, sigma: float | None, rows: list[dict], seconds: float, **extra) -> dict:
    n = max(len(rows), 1)
    return {"data": data, "sigma": sigma, **extra, "images": len(rows),
            "psnr_in": sum(r["psnr_in"] for r in rows) / n, "psnr": sum(r["psnr"] for r in rows) / n,
            "ssim": sum(r["ssim"] for r in rows) / n, "seconds_per_image": seconds / n, "per_image": rows}


def evaluate(restorer: Restorer, folder: Path, sigma: float, limit: int | None = None, gray: bool = False) -> dict:
    """Synthetic Gaussian noise on clean images; ``gray``: on their gray (luma) versions, one noise field."""
    files = _images(folder)[:limit] if limit else _images(folder)
    if isinstance(restorer, Anchor):
        restorer.sigma = sigma
    rows, t0 = [], time.perf_counter()
    for i, f in enumerate(files):
        clean = read_image(f).pixels
        if gray and clean.ndim == 3:
            clean = cv2.cvtColor(clean[..., :3], cv2.COLOR_BGR2GRAY)
        rows.append(_score(restorer, f.name, add_noise(clean, sigma, seed=1000 * int(sigma) + i), clean))
    return _summary(folder.name + (" gray" if gray else ""), sigma, rows, time.perf_counter() - t0)


def held_out_scenes(config: str) -> list[str]:
    """The ``real.held_out`` scenes of a training config (a file or a packaged name such as real_pairs_denoiser)."""
    from rddm_train.config import read_file

    scenes = (read_file(config).get("real") or {}).get("held_out") or []
    if not scenes:
        raise RDDMError(f"{config}: no real.held_out scenes to evaluate on")
    return list(scenes)


def matched_pairs(noisy_dir: Path, clean_dir: Path, limit: int | None = None,
                  scenes: list[str] | None = None) -> list[tuple[Path, Path]]:
    """(noisy, clean) files matched by name, only those of ``scenes`` when given (a scene: the file name without its
    trailing ``_N``); an error names the first noisy file without its clean one, or a scene with no pair."""
    from rddm_train.scenes import scene_of

    clean = {p.name: p for p in _images(clean_dir)}
    noisy = _images(noisy_dir)
    if scenes is not None:
        missing = sorted(set(scenes) - {scene_of(p) for p in noisy})
        if missing:
            raise RDDMError(f"{noisy_dir}: no pair of scene {missing[0]}")
        noisy = [p for p in noisy if scene_of(p) in scenes]
    noisy = noisy[:limit] if limit else noisy
    missing = [p.name for p in noisy if p.name not in clean]
    if missing or not noisy:
        raise RDDMError(f"{noisy_dir}: {len(missing)} image(s) without a clean image of the same name in {clean_dir}"
                        + (f", e.g. {missing[0]}" if missing else " (no images)"))
    return [(p, clean[p.name]) for p in noisy]


def evaluate_pairs(restorer: Restorer, noisy_dir: Path, clean_dir: Path, limit: int | None = None,
                   scenes: list[str] | None = None) -> dict:
    """Real noisy/clean pairs matched by file name (e.g. one shot vs the mean of many of a static scene)."""
    rows, t0 = [], time.perf_counter()
    for p, q in matched_pairs(noisy_dir, clean_dir, limit, scenes):
        n, c = read_image(p).pixels, read_image(q).pixels
        if isinstance(restorer, Anchor):  # the true noise level of this pair
            restorer.sigma = float(np.std(n.astype(np.float64) - c))
        rows.append(_score(restorer, p.name, n, c))
    name = f"{noisy_dir.parent.name}/{noisy_dir.name}" + (" held-out" if scenes is not None else "")
    return _summary(name, None, rows, time.perf_counter() - t0)


def recommend_steps(results: list[dict], tolerance: float = TOLERANCE_DB) -> tuple[int, dict[int, float]]:
    """The fewest steps whose PSNR, averaged over every (set, σ) measured, is within ``tolerance`` of the best."""
    by_steps: dict[int, list[float]] = {}
    for r in results:
        if r.get("method", "model") == "model":  # anchors have no steps
            by_steps.setdefault(r["steps"], []).append(r["psnr"])
    means = {k: float(np.mean(v)) for k, v in sorted(by_steps.items())}
    best = max(means.values())
    return min(k for k, m in means.items() if m >= best - tolerance), means


def write_recommended(model: Path, steps: int) -> None:
    """Stamp ``recommended_steps`` into a model (:func:`stamp_facts`)."""
    stamp_facts(model, recommended_steps=int(steps))


def stamp_facts(model: Path, **facts) -> None:
    """Stamp measured facts (``recommended_steps``, ``correlated_noise_mode``) into an ONNX model's ``rddm``
    metadata (other keys kept as they are), atomically; into one of our ``.safetensors`` checkpoints too, so every
    graph exported from it keeps them."""
    import json

    if model.suffix == ".safetensors":
        from rddm_infer.model.checkpoint import stamp_checkpoint

        stamp_checkpoint(model, **facts)
        return
    import onnx

    m = onnx.load(str(model))
    prop = next((p for p in m.metadata_props if p.key == META_KEY), None)
    if prop is None:
        raise RDDMError(f"{model}: no '{META_KEY}' metadata (not exported by rddm-export)")
    meta = ArtifactMeta.from_json(prop.value, where=str(model))
    if "recommended_steps" in facts and meta.kind.bakes_plan:
        raise RDDMError(f"{model}: a {meta.graph} graph has its {meta.steps} steps built in; stamp a 'step' or "
                        "'unet' graph")
    raw = json.loads(prop.value)
    raw.update(facts)
    prop.value = json.dumps(raw, sort_keys=True)
    ArtifactMeta.from_json(prop.value, where=str(model))  # still a valid description
    with atomic_path(model) as tmp:
        onnx.save(m, str(tmp))


def _runs(restorer, a) -> list:
    """One evaluation per (folder, gray or not, σ), then the real pairs: what ``restorer`` is scored on."""
    runs = [lambda f=f, s=s, g=g: evaluate(restorer, f, s, a.limit, g)
            for f in a.data for g in ((False, True) if a.gray else (False,)) for s in a.sigma]
    return runs + ([lambda: evaluate_pairs(restorer, *a.pairs, a.limit, a.scenes)] if a.pairs else [])


def _pixel_shuffle(text: str) -> int | str:
    if text == AUTO:
        return text
    if not text.isdigit() or not 1 <= int(text) <= MAX_PIXEL_SHUFFLE:
        raise argparse.ArgumentTypeError(f"{text!r}: auto or an integer from 1 to {MAX_PIXEL_SHUFFLE}")
    return int(text)


def best_nlm(results: list[dict]) -> list[tuple[str, float | None, dict]]:
    """For each (set, σ) that ``--nlm-h`` swept: the row of the h with the best mean PSNR."""
    best: dict[tuple, dict] = {}
    for r in results:
        if r.get("method") == "nlm" and "h" in r:
            key = (r["data"], r["sigma"])
            if key not in best or r["psnr"] > best[key]["psnr"]:
                best[key] = r
    return [(d, s, r) for (d, s), r in best.items()]


def _print(res: dict, what: str) -> None:
    sigma = "real " if res["sigma"] is None else f"σ={res['sigma']:4.0f}"
    print(f"{res['data']:16s} {sigma} {what:>8s}: PSNR {res['psnr']:.2f} dB (input {res['psnr_in']:.2f}), "
          f"SSIM {res['ssim']:.4f}, {res['seconds_per_image']:.2f} s/image", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="ONNX / engine / checkpoint (default: the built-in model)")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--data", nargs="*", default=[], type=Path, help="clean folders (synthetic Gaussian noise)")
    ap.add_argument("--gray", action="store_true", help="also the gray (luma) versions of --data, one noise field")
    ap.add_argument("--pairs", nargs=2, type=Path, metavar=("NOISY", "CLEAN"), help="real pairs, matched by name")
    ap.add_argument("--held-out", default=None, metavar="CONFIG",
                    help="only the --pairs of this training config's real.held_out scenes (e.g. real_pairs_denoiser)")
    ap.add_argument("--sigma", nargs="+", type=float, default=[25.0])
    ap.add_argument("--steps", nargs="+", type=int, default=None,
                    help="step counts to measure (default: the model's); several: PSNR per count + the recommended")
    ap.add_argument("--pixel-shuffle", nargs="+", type=_pixel_shuffle, default=[1], metavar="S",
                    help="restore's --pixel-shuffle values to measure: auto (restore's default, the mode chosen per "
                         f"image) or 1 (off) to {MAX_PIXEL_SHUFFLE} (default: 1)")
    ap.add_argument("--self-ensemble", type=int, default=1, choices=ENSEMBLE_SIZES,
                    help="restore's --self-ensemble (flipped / transposed views averaged; default 1: off)")
    ap.add_argument("--limit", type=int, default=None, help="first N images of each folder")
    ap.add_argument("--threads", type=int, default=None, help="backend intra-op threads (default: all cores)")
    ap.add_argument("--tile", type=int, default=None,
                    help=f"tile size (default: the runtime's: {DEFAULT_TILE}, or the largest that fits in memory)")
    ap.add_argument("--anchor", nargs="+", choices=sorted(ANCHORS), default=[],
                    help="also score these classical denoisers on the same noisy files")
    ap.add_argument("--only-anchors", action="store_true", help="score the --anchor denoisers, not the model")
    ap.add_argument("--nlm-h", nargs="+", type=float, default=[], metavar="H",
                    help="also non-local means at each of these fixed filter strengths; the best h of each set is "
                         "reported (its fair score: tuned on the very files it is scored on)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--write-recommended", type=Path, default=None, metavar="MODEL.onnx",
                    help="stamp the recommended steps into this ONNX model's metadata (needs 2+ --steps)")
    a = ap.parse_args(argv)
    if not a.data and not a.pairs:
        ap.error("nothing to measure: give --data folders and/or --pairs NOISY CLEAN")
    if a.only_anchors and not (a.anchor or a.nlm_h):
        ap.error("--only-anchors needs --anchor nlm and/or bm3d, or --nlm-h")
    if a.held_out and not a.pairs:
        ap.error("--held-out selects among --pairs: give --pairs NOISY CLEAN")
    if a.write_recommended and len(a.steps or []) < 2:
        ap.error("--write-recommended needs at least two --steps to compare")
    missing = [f for f in [*a.data, *(a.pairs or [])] if not f.is_dir()]
    if missing:
        ap.error(f"{missing[0]}: no such folder")
    results = []
    opts = {"threads": a.threads} if a.threads else {}
    try:
        a.scenes = held_out_scenes(a.held_out) if a.held_out else None
        if not a.only_anchors:
            with Restorer(a.model, a.backend, steps=(a.steps or [None])[0], tile=a.tile, self_ensemble=a.self_ensemble,
                          **opts) as r:
                print(f"model {a.model or 'built-in'} on {r.engine}, tile {r.tile}"
                      + (f" ({r.memory_note})" if r.memory_note else ""))
                for k in a.steps or [None]:
                    r.plan = r.sampler.plan(k)  # same session, another step count
                    for ps in a.pixel_shuffle:
                        r.pixel_shuffle = ps
                        for run in _runs(r, a):
                            res = {**run(), "steps": r.plan.steps, "pixel_shuffle": ps,
                                   "self_ensemble": a.self_ensemble, "method": "model"}
                            results.append(res)
                            _print(res, f"{res['steps']:2d} steps" + (f" ps{ps}" if ps != 1 else ""))
        for name in a.anchor:
            for run in _runs(Anchor(name), a):
                res = {**run(), "method": name}
                results.append(res)
                _print(res, name)
        for h in a.nlm_h:
            for run in _runs(Anchor("nlm", nlm_at(h)), a):
                res = {**run(), "method": "nlm", "h": h}
                results.append(res)
                _print(res, f"nlm h={h:g}")
        for data, sigma, best in best_nlm(results):
            print(f"{data} {'real' if sigma is None else f'σ={sigma:g}'}: best non-local means h = {best['h']:g}, "
                  f"PSNR {best['psnr']:.2f} dB (gain {best['psnr'] - best['psnr_in']:+.2f})")
    except RDDMError as e:
        raise SystemExit(f"error: {e}") from None
    report = {"results": results}
    if len(a.steps or []) > 1:
        best, means = recommend_steps(results)
        report.update(psnr_by_steps=means, recommended_steps=best)
        print("mean PSNR by steps: " + ", ".join(f"{k}: {m:.3f} dB" for k, m in means.items()))
        print(f"recommended steps: {best} (the fewest within {TOLERANCE_DB} dB of the best)")
        if a.write_recommended:
            try:
                write_recommended(a.write_recommended, best)
            except RDDMError as e:
                raise SystemExit(f"error: {e}") from None
            print(f"{a.write_recommended}: recommended_steps = {best} written")
    if a.out:
        # A plain list as before when one step count was measured (older readers), else the report.
        a.out.write_text(json.dumps(report if len(a.steps or []) > 1 else results, indent=2) + "\n")


if __name__ == "__main__":
    main()
