"""Every backend, side by side: latency, throughput, memory and accuracy on this machine.

    python -m benchmarks.backends --checkpoint runs/gpu1/ema.safetensors --sizes 256 512 1024 \\
        --batch 1 --steps 5 --threads 1 --int8 --calib TRAIN_DIR --image IMG --out bench_out

One checkpoint is exported once per graph kind (``step`` / ``fused``, fp32, and optionally
mixed fp16 and int8); then the same images and the same noise go through every variant:
the torch eager fp32 sampler with every lever off (the reference's unfolded weight standardisation: the
baseline), the torch runner with its levers (channels_last, folded WS, SDPA, and on a GPU CUDA graphs and
pinned copies) at fp32 and bf16 (and fp16 on a GPU), each lever alone too (``--each-lever``, always on a GPU),
torch.compile (``--compile``), ONNX Runtime ``step`` / ``fused`` graphs, and on a GPU the CUDA / TensorRT
providers. Sizes above ``--tile``
are restored in overlapping tiles. Variants run round-robin (one restore each per round)
so load drift on a shared machine hits all of them alike; each variant's speedup is over
the baseline of the same run, and its accuracy is the PSNR of its restored image against
the baseline's (inf = identical). Writes ``results.json``, ``results.md``, ``results.png`` and
``report.html`` (the table and the plot on one page).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np

from rddm_infer.io.atomic import atomic_path
from rddm_infer.backends import EngineSampler, Noise
from rddm_infer.backends.torch import BASELINE as TORCH_BASELINE
from rddm_infer.metrics import psnr
from rddm_infer.report import write_bench_report
from rddm_infer.diffusion.graph_kinds import GRAPH_KINDS
from rddm_infer.diffusion.schedule import SamplingPlan
from rddm_infer.restore.tiling import run_tiled

BASELINE = "torch " + TORCH_BASELINE  # every torch lever off: the reference's math


class PeakRSS:
    """Peak resident memory of this process while the block runs (polled: /proc or getrusage)."""

    def __init__(self, every: float = 0.005):
        self.every, self.peak, self._stop = every, 0, threading.Event()

    @staticmethod
    def now() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            import resource
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _poll(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            self._stop.wait(self.every)

    def __enter__(self):
        self.start = self.peak = self.now()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


@dataclass
class Variant:
    """One way to restore a batch: ``restore(x, noise) -> y`` (model space)."""

    name: str
    restore: Callable[[np.ndarray, Noise], np.ndarray]
    kind: str = "unet"
    precision: str = "fp32"
    device: str = "cpu"
    times: list[float] = field(default_factory=list)
    peak_rss: int = 0
    rss_growth: int = 0  # peak minus resident size before the call: what this variant itself allocates
    peak_device: int | None = None
    output: np.ndarray | None = None
    error: str | None = None


def _engine(runner, plan) -> Callable:
    sampler = EngineSampler(runner)
    return lambda x, noise: sampler.run(x, plan, noise)


def torch_variants(loaded, plan, device: str, compile: bool, each: bool = False) -> list[Variant]:
    """The torch runner's levers against eager fp32 with every lever off (the reference's math, the baseline):
    every lever together at each precision, each lever alone with ``each`` (always on CUDA), compiled with
    ``compile`` (:func:`rddm_infer.backends.torch.lever_variants`, the list ``bench`` and gpu_torch time too)."""
    from rddm_infer.backends.torch import TorchRunner, lever_variants

    out = []
    for label, opts in lever_variants(device, compile, each or device == "cuda"):
        try:
            runner = TorchRunner(loaded, device=device, **opts)
        except Exception as e:  # e.g. a precision this machine lacks: reported, not fatal
            print(f"torch {label}: not run ({e})", flush=True)
            continue
        out.append(Variant(f"torch {label}", _engine(runner, plan), precision=opts["precision"], device=device))
    return out


def export_graphs(loaded, workdir: Path, kinds, steps: int, fp16: bool, int8: bool, calibration) -> dict[str, Path]:
    """``{"step_fp32": path, ...}``: the graphs the ONNX Runtime variants load."""
    from rddm_export import export_onnx

    paths = {}
    for kind in kinds:
        for prec in ("fp32", "fp16") if fp16 else ("fp32",):
            p = workdir / f"{kind}_{prec}.onnx"
            paths[f"{kind}_{prec}"] = export_onnx(loaded, p, kind, steps=steps, fp16=prec == "fp16")
    if int8:
        from rddm_export.int8 import quantize_int8

        for kind in kinds:
            paths[f"{kind}_int8"] = quantize_int8(paths[f"{kind}_fp32"], workdir / f"{kind}_int8.onnx", calibration)
    return paths


def onnx_backend():
    """The registry's first row that runs ONNX graphs (the one ``auto`` prefers for them: ONNX Runtime), whose
    execution providers :func:`onnx_variants` sweeps; :func:`registry_variants` runs the other ONNX rows."""
    from rddm_infer.backends.registry import backends_for

    return backends_for("onnx")[0]


def onnx_variants(paths: dict[str, Path], plan, threads: int | None, providers: list[str]) -> list[Variant]:
    spec = onnx_backend()
    runner_class = spec.runner_class()
    out = []
    for prov in providers:
        short = prov.replace("ExecutionProvider", "")
        for key, path in paths.items():
            kind, prec = key.split("_")
            if prec == "int8" and prov != "CPUExecutionProvider":
                continue  # QDQ int8 is a CPU (VNNI) variant
            runner = runner_class(path, providers=[prov], threads=threads)
            out.append(Variant(f"{spec.name} {short} {kind} {prec}", _engine(runner, plan), kind, prec,
                               "cpu" if prov == "CPUExecutionProvider" else "cuda"))
    return out


LEVERS = {"static_shapes": "dynamic shapes", "rewrite_norms": "norms as exported"}  # option -> label when off


def registry_variants(paths: dict[str, Path], plan, threads: int | None) -> list[Variant]:
    """Every other installed CPU backend of the registry that runs ONNX graphs (OpenVINO today), at each
    precision it offers, on the fp32 and int8 graphs (bf16 then runs what int8 leaves in float), plus the
    reduced precision once more with each of its on-by-default levers turned off (``LEVERS``: dynamic instead of
    static shapes, the norms as exported) so each lever's effect is measured in the same run; options go through
    ``load_runner``."""
    from rddm_infer.backends import BACKENDS, load_runner

    out = []
    swept = onnx_backend().name  # onnx_variants runs that one
    for spec in BACKENDS:
        if spec.name == swept or "onnx" not in spec.artifacts or "cpu" not in spec.devices \
                or not spec.available():
            continue
        prec = spec.option("precision")
        for key, path in paths.items():
            kind, graph_prec = key.split("_")
            precs = list(prec.choices) if prec else [None]
            combos = [(p, None) for p in precs] + \
                ([(precs[-1], lever) for lever in LEVERS if spec.option(lever)] if graph_prec == "fp32" else [])
            for p, lever in combos:
                opts = ({"precision": p} if p is not None else {}) | ({lever: False} if lever else {})
                try:
                    runner, _ = load_runner(path, spec.name, device="cpu", threads=threads, **opts)
                except Exception as e:  # e.g. bf16 on a CPU without it: reported, not fatal
                    print(f"{spec.name} {key} {p}: not run ({e})", flush=True)
                    continue
                reduced = p not in (None, "fp32")
                label = f"{spec.name} {kind} {graph_prec}" + (f" ({p} inference)" if reduced else "") + \
                    (f", {LEVERS[lever]}" if lever else "")
                prec_label = (p if graph_prec == "fp32" else f"{graph_prec}+{p}") if reduced else graph_prec
                out.append(Variant(label, _engine(runner, plan), kind, prec_label))
    return out


def tiled(fn: Callable, tile: int, overlap: int, multiple: int) -> Callable:
    """Restore each image of the batch in overlapping tiles, each tile seeing the full image's noise."""
    def restore(x, noise):
        outs = []
        for i in range(x.shape[0]):
            n_i = noise.crop(np.s_[i])
            outs.append(run_tiled(lambda xb, ts: fn(xb, Noise.stack([n_i.crop((slice(None), *t.slices)) for t in ts])),
                                  x[i], tile=tile, overlap=overlap, multiple=multiple))
        return np.stack(outs)
    return restore


def model_flops(loaded, size: int) -> int | None:
    """FLOPs of one network call on one image of ``size``² (torch's flop counter: conv + matmul)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    net = loaded.net  # counted where it already lives (never moved: the runners share this module)
    dev = next(net.parameters()).device
    c = loaded.unet.channels * (2 if loaded.diffusion.condition else 1)
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            net(torch.zeros(1, c, size, size, device=dev), torch.zeros(1, dtype=torch.long, device=dev))
        return int(fc.get_total_flops())
    except Exception:  # a counter gap must not sink the benchmark
        return None


def bench_images(size: int, batch: int, image: Path | None, sigma: float, seed: int = 0) -> np.ndarray:
    """A noisy batch in model space: a real image (reflect-padded/cropped) or a smooth synthetic scene."""
    import cv2

    if image is None:
        from rddm_export.int8 import synthetic_calibration

        return synthetic_calibration((batch, 3, size, size), 1, sigma / 255.0, seed)[0]
    from rddm_infer import read_image

    img = read_image(image).pixels
    img = np.repeat(img[..., None], 3, -1) if img.ndim == 2 else img[..., :3]
    img = img.astype(np.float32) / (65535.0 if img.dtype == np.uint16 else 255.0)
    ph, pw = max(size - img.shape[0], 0), max(size - img.shape[1], 0)
    img = cv2.copyMakeBorder(img, 0, ph, 0, pw, cv2.BORDER_REFLECT_101)[:size, :size, ::-1]
    clean = np.repeat(img.transpose(2, 0, 1)[None], batch, 0)
    noisy = np.clip(clean + sigma / 255.0 * np.random.default_rng(seed).standard_normal(clean.shape), 0, 1)
    return np.ascontiguousarray(noisy * 2 - 1, dtype=np.float32)


def summarize(v: Variant, base: Variant, batch: int, flops: int | None, steps: int, peak_tflops: float | None) -> dict:
    t = np.asarray(v.times) if v.times else np.asarray([np.nan])
    p50 = float(np.percentile(t, 50))
    row = {"variant": v.name, "graph": v.kind, "precision": v.precision, "device": v.device, "runs": len(v.times),
           "p50_ms": p50 * 1e3, "p90_ms": float(np.percentile(t, 90)) * 1e3,
           "p99_ms": float(np.percentile(t, 99)) * 1e3, "images_per_s": batch / p50,
           "speedup_vs_baseline": float(np.percentile(base.times, 50)) / p50 if base.times else None,
           "psnr_vs_baseline_db": (psnr((v.output + 1) / 2, (base.output + 1) / 2)
                                   if v.output is not None and base.output is not None else None),
           "peak_rss_mb": v.peak_rss / 2**20, "rss_growth_mb": v.rss_growth / 2**20,
           "peak_device_mb": None if v.peak_device is None else v.peak_device / 2**20, "error": v.error}
    if flops:
        achieved = flops * steps * batch / p50
        row["tflops"] = achieved / 1e12
        row["pct_peak"] = 100 * achieved / (peak_tflops * 1e12) if peak_tflops else None
    return row


def run_size(variants: list[Variant], x: np.ndarray, noise: Noise, runs: int, warmup: int, tile_wrap) -> None:
    """Warm-up, then ``runs`` rounds of one restore per variant; records times, peak RSS, last output."""
    fns = {id(v): tile_wrap(v.restore) for v in variants}
    live = list(variants)
    for v in variants:
        v.times, v.output, v.error, v.peak_rss, v.rss_growth = [], None, None, 0, 0
    cuda = _cuda()
    for r in range(warmup + runs):
        for v in list(live):
            if cuda is not None:
                cuda.reset_peak_memory_stats()
            try:
                with PeakRSS() as mem:
                    t0 = time.perf_counter()
                    y = fns[id(v)](x, noise)
                    dt = time.perf_counter() - t0
            except Exception as e:  # one failing backend is a row, not the end of the benchmark
                v.error = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                live.remove(v)
                continue
            v.peak_rss = max(v.peak_rss, mem.peak)
            v.rss_growth = max(v.rss_growth, mem.peak - mem.start)
            if cuda is not None:  # torch's allocator only: ONNX Runtime's CUDA arena is not counted
                v.peak_device = max(v.peak_device or 0, cuda.max_memory_allocated())
            if r >= warmup:
                v.times.append(dt)
            v.output = y


def _cuda():
    import torch
    return torch.cuda if torch.cuda.is_available() else None


def environment(threads: int | None) -> dict:
    import onnxruntime
    import torch

    cpu = platform.processor() or platform.machine()
    flags = ""
    try:
        text = Path("/proc/cpuinfo").read_text()
        cpu = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), cpu)
        flags = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    except OSError:
        pass
    try:
        import openvino
        ov_version = openvino.__version__.split("-")[0]
    except ImportError:
        ov_version = None
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "cpu": cpu, "openvino": ov_version,
            "cores": os.cpu_count(), "threads": threads,
            "isa": [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if f" {f}" in flags],
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version(), "torch": torch.__version__, "onnxruntime": onnxruntime.__version__}


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [f"Machine: {env['cpu']} ({env['cores']} cores, {', '.join(env['isa']) or 'no AVX-512'})"
             f"{', GPU ' + env['gpu'] if env['gpu'] else ''}; threads {env['threads'] or 'default'}; "
             f"torch {env['torch']}, onnxruntime {env['onnxruntime']}"
             f"{', openvino ' + env['openvino'] if env.get('openvino') else ''}, "
             f"Python {env['python']}; {env['date']}.",
             f"Model: {result['model']} — {result['params_m']:.2f} M parameters; {result['steps']} steps, "
             f"batch {result['batch']}, {result['runs']} timed runs after {result['warmup']} warm-up, round-robin.",
             "", "| size | variant | p50 ms | p90 ms | p99 ms | img/s | × baseline | PSNR vs baseline | peak RSS MB "
             "(+ during call) | GFLOP/img | TFLOP/s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v, f: "—" if v is None or (isinstance(v, float) and np.isnan(v)) else f.format(v)  # noqa: E731
    for size in result["sizes"]:
        for r in size["rows"]:
            if r["error"]:
                lines.append(f"| {size['label']} | {r['variant']} | failed: {r['error']} |||||||||")
                continue
            ps = r["psnr_vs_baseline_db"]
            lines.append(f"| {size['label']} | {r['variant']} | {r['p50_ms']:.1f} | {r['p90_ms']:.1f} | "
                         f"{r['p99_ms']:.1f} | {r['images_per_s']:.3f} | {fmt(r['speedup_vs_baseline'], '{:.2f}')} | "
                         f"{'inf' if ps == float('inf') else fmt(ps, '{:.1f} dB')} | {r['peak_rss_mb']:.0f} (+{r['rss_growth_mb']:.0f}) | "
                         f"{fmt(size['gflop_per_image'], '{:.1f}')} | {fmt(r.get('tflops'), '{:.4f}')}"
                         f"{fmt(r.get('pct_peak'), ' ({:.1f} % of peak)') if r.get('pct_peak') else ''} |")
    if result.get("skipped"):
        lines += ["", "Not run here: " + "; ".join(result["skipped"]) + "."]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> Path:
    """Horizontal bars of images/s per variant, one panel per size (opencv: no plotting dependency)."""
    import cv2

    rows = [(s["label"], r) for s in result["sizes"] for r in s["rows"] if not r["error"]]
    bar, gap, left, width = 22, 30, 380, 900
    height = 40 + len(rows) * bar + len(result["sizes"]) * gap
    img = np.full((height, width, 3), 255, np.uint8)
    font = cv2.FONT_HERSHEY_SIMPLEX
    cv2.putText(img, "images/s per backend (longer is faster)", (10, 24), font, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
    y = 40
    for size in result["sizes"]:
        ok = [r for r in size["rows"] if not r["error"]]
        top = max([r["images_per_s"] for r in ok] + [1e-9])
        cv2.putText(img, size["label"], (10, y + 16), font, 0.5, (80, 0, 0), 1, cv2.LINE_AA)
        y += gap - 8
        for r in ok:
            w = int((width - left - 90) * r["images_per_s"] / top)
            color = (160, 160, 160) if r["variant"] == BASELINE else (200, 120, 40)
            cv2.rectangle(img, (left, y + 3), (left + max(w, 1), y + bar - 3), color, -1)
            cv2.putText(img, r["variant"][:48], (10, y + 15), font, 0.42, (0, 0, 0), 1, cv2.LINE_AA)
            cv2.putText(img, f"{r['images_per_s']:.3g}", (left + w + 6, y + 15), font, 0.42, (0, 0, 0), 1,
                        cv2.LINE_AA)
            y += bar
        y += 8
    return _write(path, lambda tmp: cv2.imwrite(str(tmp), img))


def _write(path: Path, writer) -> Path:
    with atomic_path(path) as tmp:
        if writer(tmp) is False:
            raise OSError(f"{path}: could not write")
    return path


def reference_size_model(seed: int = 0, dim: int = 64):
    """The official experiment-2 size (UnetRes dim 64, mults 1-2-4-8, two UNets, pred_res_noise; 72.5 M
    parameters) with seeded random weights, norms perturbed so every parameter matters: speed does not depend on
    the weights, and every variant is compared with the eager fp32 output of the same network. ``dim``: a smaller
    network of the same shape (smoke runs)."""
    import torch

    from rddm_infer.model import LoadedModel, UNetConfig, UnetRes
    from rddm_infer.diffusion.schedule import DiffusionConfig

    torch.manual_seed(seed)
    cfg = UNetConfig(dim=dim, dim_mults=(1, 2, 4, 8), share_encoder=0)
    net = UnetRes(cfg).eval()
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() == 1:
                p.add_(0.05 * torch.randn_like(p))
    return LoadedModel(net, cfg, DiffusionConfig(objective="pred_res_noise"), f"reference-size (dim {dim}, random)")


def run(args) -> dict:
    import torch

    from rddm_infer.backends.onnxruntime import available_providers
    from rddm_infer.model import load_checkpoint

    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    loaded = reference_size_model() if args.checkpoint is None else load_checkpoint(args.checkpoint)
    plan = SamplingPlan.create(loaded.diffusion, args.steps, 0.0)
    m = loaded.unet.size_multiple
    skipped = []
    providers = ["CPUExecutionProvider"] + [p for p in ("CUDAExecutionProvider",) if p in available_providers()]
    if "TensorrtExecutionProvider" in available_providers():
        providers.insert(0, "TensorrtExecutionProvider")
    else:
        skipped.append("TensorRT (no TensorRT execution provider here)")
    if device == "cpu":
        skipped.append("CUDA graphs and device memory (no CUDA GPU)")
    from rddm_infer.backends.registry import BY_NAME
    if not BY_NAME["openvino"].available():
        skipped.append("OpenVINO (" + BY_NAME["openvino"].install_hint + ")")
    with tempfile.TemporaryDirectory(prefix="rddm-bench-") as tmp:
        calib = None  # int8 ranges from images other than the benchmarked one: a folder, else synthetic scenes
        if args.int8 and args.calib:
            from rddm_export.int8 import calibration_images
            calib = calibration_images(args.calib, sigma=args.sigma)
        paths = export_graphs(loaded, Path(tmp), args.graphs, args.steps, args.fp16, args.int8, calib)
        variants = torch_variants(loaded, plan, device, args.compile, args.each_lever) + \
            onnx_variants(paths, plan, args.threads, providers)
        variants += registry_variants(paths, plan, args.threads)
        base = variants[0]
        sizes = []
        for size in args.sizes:
            side = -(-size // m) * m
            x = bench_images(side, args.batch, args.image, args.sigma)
            noise = Noise.draw(plan, x.shape, 0)
            tile = args.tile if side > args.tile else None
            wrap = (lambda f: tiled(f, tile, args.overlap, m)) if tile else (lambda f: f)
            run_size(variants, x, noise, args.runs, args.warmup, wrap)
            flops = model_flops(loaded, tile or side)
            if flops and tile:
                from rddm_infer.restore.tiling import tile_grid
                flops *= len(tile_grid(side, side, tile, args.overlap, m))
            label = f"{side}² tiled {tile}²" if tile else f"{side}²"
            rows = [summarize(v, base, args.batch, flops, plan.steps, args.peak_tflops) for v in variants]
            sizes.append({"size": side, "label": label, "tile": tile,
                          "gflop_per_image": flops * plan.steps / 1e9 if flops else None, "rows": rows})
            print(f"[{label}] " + "; ".join(f"{r['variant']}: {r['p50_ms']:.0f} ms ×{r['speedup_vs_baseline'] or 0:.2f}"
                                            for r in rows if not r["error"]), flush=True)
    params = sum(p.numel() for p in loaded.net.parameters()) / 1e6
    return {"environment": environment(args.threads), "model": str(args.checkpoint or loaded.source),
            "unet": loaded.unet.to_dict(),
            "params_m": params, "steps": plan.steps, "batch": args.batch, "runs": args.runs, "warmup": args.warmup,
            "sigma": args.sigma, "image": str(args.image) if args.image else "synthetic", "baseline": BASELINE,
            "skipped": skipped, "sizes": sizes}


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, default=None,
                    help="checkpoint (.safetensors / .pt) to benchmark (default: the reference-size model, dim 64 "
                         "two UNets, random weights: slow, minutes per restore on 2 cores)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch and onnxruntime intra-op threads")
    ap.add_argument("--tile", type=int, default=512, help="sizes above this are restored in tiles of this size")
    ap.add_argument("--overlap", type=int, default=32)
    ap.add_argument("--image", type=Path, default=None, help="a real image to restore (default: synthetic)")
    ap.add_argument("--sigma", type=float, default=25.0, help="Gaussian noise added to the input (0-255 scale)")
    ap.add_argument("--graphs", nargs="+", default=["step", "fused"], choices=GRAPH_KINDS,
                    help="ONNX graph kinds to run")
    ap.add_argument("--fp16", action="store_true", help="also mixed-fp16 ONNX graphs")
    ap.add_argument("--int8", action="store_true", help="also int8 (QDQ Conv) ONNX graphs")
    ap.add_argument("--calib", type=Path, default=None, help="clean images to calibrate int8 on (default: synthetic)")
    ap.add_argument("--compile", action="store_true", help="also torch.compile (minutes of compilation on CPU)")
    ap.add_argument("--each-lever", action="store_true",
                    help="also each torch lever alone against eager fp32 (always on CUDA; on the CPU: channels_last, "
                         "folded WS, SDPA)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's peak, for %% of peak")
    ap.add_argument("--out", type=Path, default=Path("bench_out"))
    a = ap.parse_args(argv)
    if min(a.sizes) < 1 or a.batch < 1 or a.runs < 1 or a.warmup < 0 or a.steps < 1:
        ap.error("--sizes, --batch, --runs and --steps must be >= 1 and --warmup >= 0")
    return a


def main(argv=None) -> dict:
    args = parse(argv)
    if args.peak_tflops is None:
        import torch
        if torch.cuda.is_available():
            from .gpu_torch import card_peak
            args.peak_tflops = card_peak(torch.cuda.get_device_name(0))
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=2)
    _write(args.out / "results.json", lambda t: t.write_text(text))
    md = markdown(result)
    _write(args.out / "results.md", lambda t: t.write_text(md))
    plot(result, args.out / "results.png")
    write_bench_report(result, args.out)
    print(md)
    return result


if __name__ == "__main__":
    main()
