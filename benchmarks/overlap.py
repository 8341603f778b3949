"""The file pipeline, sequential vs overlapped, on generated JPEGs: images/s, the I/O-only ceiling, peak memory.

Runs ``Restorer.restore_paths`` on the same folder of generated 1-4 MP JPEGs three ways, each in its own process
(so each peak RSS is its own), in one run so the ratios are measured side by side:

* ``io``: overlapped, with an engine that takes no time: the rate decode and encode threads alone reach;
* ``sequential``: ``--io-workers 0``, with the stand-in engine of fixed latency (a GPU-like call that sleeps,
  :mod:`benchmarks.standin_engine`);
* ``overlapped``: the default ``--io-workers``, with the same stand-in engine.

``--real`` adds the built-in model on CPU (sequential vs overlapped on a few small images): there the network
dominates, and the overlapped path must be no slower.

    python -m benchmarks.overlap --images 100 --out benchmarks/results/overlap_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from rddm_infer.backends.timings import cpu_model
from rddm_infer.restore.overlapped import local_cpus


def make_jpegs(folder: Path, n: int, min_mp: float, max_mp: float, seed: int = 0) -> int:
    """``n`` JPEGs of random sizes (photo-like: smooth colour fields, edges and grain); returns their bytes."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    total = 0
    for i in range(n):
        mp = rng.uniform(min_mp, max_mp) * 1e6
        aspect = rng.choice([4 / 3, 3 / 2, 1.0, 3 / 4])
        h = int((mp / aspect) ** 0.5)
        w = int(h * aspect)
        base = cv2.resize(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8), (w, h), interpolation=cv2.INTER_CUBIC)
        img = np.clip(base + rng.normal(0, 8, (h, w, 1)), 0, 255).astype(np.uint8)
        data = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
        (folder / f"img{i:04d}.jpg").write_bytes(data)
        total += len(data)
    return total


def _cpu_flags() -> str:
    """The CPU flags that decide which engine path wins (the same lever can win on one CPU and lose on another)."""
    try:
        flags = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")).split()
    except (OSError, StopIteration):
        return ""
    return " ".join(f for f in flags if f.startswith(("avx512", "amx", "avx2", "avx_vnni")))


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(a) -> dict:
    """One way of running, in this process: rate, peak RSS over the RSS before the run."""
    from benchmarks.standin_engine import StandInRunner
    from rddm_infer.restore.local import Restorer

    real = a.way == "real"
    model = StandInRunner.like(latency_s=a.latency_ms / 1e3) if not real else None
    io = 0 if a.flow == "sequential" else a.io_workers
    io = io if io in ("auto", 0) else int(io)
    device = {"device": a.real_device} if real and a.real_device else {}
    with Restorer(model, a.real_backend if real else "auto", batch=a.real_batch if real else a.batch, io_workers=io,
                  in_flight_mb=a.in_flight_mb, pixel_shuffle=1, **device) as r:
        before = _rss_mb("VmRSS")
        gpu = GpuSampler() if str(a.real_device or "").startswith("cuda") and real else None
        cpu0, t = os.times(), time.perf_counter()
        s = r.restore_paths([a.input], a.output)
        wall = time.perf_counter() - t
        cpu1 = os.times()
        busy = gpu.stop() if gpu else None
        calls = list(getattr(r.runner, "calls", []))
    return {"way": a.way, "flow": r.flow.describe(), "engine": r.engine, "images": s.count("restored"),
            "failed": s.count("failed"), "seconds": round(wall, 3), "images_per_s": round(s.count("restored") / wall, 3),
            "rss_before_mb": round(before, 1), "peak_rss_mb": round(_rss_mb("VmHWM"), 1),
            "peak_over_start_mb": round(_rss_mb("VmHWM") - before, 1),
            "engine_calls": len(calls) // max(1, r.plan.k), "mean_batch": round(float(np.mean(calls)), 2) if calls else None,
            "host_cpu_cores_busy": round((cpu1.user + cpu1.system - cpu0.user - cpu0.system) / wall, 2),
            "gpu_busy_share": busy}


class GpuSampler:
    """The GPU's busy share over a run: nvidia-smi's utilization.gpu sampled every 100 ms (None without it)."""

    def __init__(self):
        try:
            self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                          "-lms", "100"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError:
            self.proc = None

    def stop(self) -> float | None:
        if self.proc is None:
            return None
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=10)
        values = [float(v) for v in out.split() if v.replace(".", "", 1).isdigit()]
        return round(sum(values) / len(values) / 100, 3) if values else None


def run_child(way: str, flow: str, a, folder: Path, out: Path, latency_ms: float) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.overlap", "--child", way, "--flow", flow, "--input", str(folder),
           "--output", str(out), "--latency-ms", str(latency_ms), "--batch", str(a.batch),
           "--io-workers", str(a.io_workers), "--in-flight-mb", str(a.in_flight_mb), "--real-backend", a.real_backend,
           "--real-batch", str(a.real_batch)] + (["--real-device", a.real_device] if a.real_device else [])
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(Path.cwd())})
    if r.returncode:
        raise SystemExit(f"{way}/{flow} failed:\n{r.stderr[-2000:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"{way:>10} {flow:>10}: {res['images_per_s']:.2f} images/s ({res['seconds']:.1f} s), peak RSS "
          f"+{res['peak_over_start_mb']:.0f} MB, {res['flow']}", flush=True)
    return res


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--min-mp", type=float, default=1.0)
    ap.add_argument("--max-mp", type=float, default=4.0)
    ap.add_argument("--latency-ms", type=float, default=15.0,
                    help="stand-in engine: ms per call (the built-in step graph makes 2 calls per batch)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--io-workers", default="auto")
    ap.add_argument("--in-flight-mb", type=float, default=1500.0, help="the stated bound the peak RSS is held to")
    ap.add_argument("--real", type=int, default=0, metavar="N", help="also the built-in model on N JPEGs (--real-mp)")
    ap.add_argument("--real-mp", type=float, nargs=2, default=[0.2, 0.3], metavar=("MIN", "MAX"))
    ap.add_argument("--real-backend", default="auto")
    ap.add_argument("--real-device", default=None, help="e.g. cuda (then the GPU's busy share is sampled)")
    ap.add_argument("--real-batch", type=int, default=1)
    ap.add_argument("--dir", default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--out", default=None, help="results JSON")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--flow", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--input", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--output", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        a.way = a.child
        print(json.dumps(child(a)))
        return
    work = Path(a.dir or tempfile.mkdtemp(prefix="rddm-overlap-"))
    folder = work / "in"
    t = time.perf_counter()
    nbytes = make_jpegs(folder, a.images, a.min_mp, a.max_mp)
    print(f"{a.images} JPEGs, {a.min_mp:g}-{a.max_mp:g} MP, {nbytes / 1e6:.0f} MB, made in "
          f"{time.perf_counter() - t:.1f} s; CPU: {cpu_model()}, {local_cpus()} usable", flush=True)
    res = {"machine": {"cpu": cpu_model(), "cpus": local_cpus(), "python": platform.python_version(),
                       "flags": _cpu_flags()},
           "images": a.images, "mp": [a.min_mp, a.max_mp], "latency_ms": a.latency_ms, "batch": a.batch,
           "in_flight_mb": a.in_flight_mb, "runs": {}}
    runs = res["runs"]
    if a.images:
        runs["io"] = run_child("io", "overlapped", a, folder, work / "out_io", 0.0)
        runs["sequential"] = run_child("standin", "sequential", a, folder, work / "out_seq", a.latency_ms)
        runs["overlapped"] = run_child("standin", "overlapped", a, folder, work / "out_ovl", a.latency_ms)
        same = all((work / "out_seq" / p.name).read_bytes() == p.read_bytes() for p in (work / "out_ovl").iterdir())
        ovl, seq, io = (runs[k]["images_per_s"] for k in ("overlapped", "sequential", "io"))
        res["ratios"] = {"overlapped_over_sequential": round(ovl / seq, 3),
                         "overlapped_over_io_only": round(ovl / io, 3), "outputs_identical": same,
                         "peak_within_bound": max(r["peak_over_start_mb"] for r in runs.values()) <= a.in_flight_mb}
    if a.real:
        real = work / "real"
        make_jpegs(real, a.real, *a.real_mp, seed=1)
        runs["real_sequential"] = run_child("real", "sequential", a, real, work / "out_rseq", 0)
        runs["real_overlapped"] = run_child("real", "overlapped", a, real, work / "out_rovl", 0)
        res.setdefault("ratios", {})["real_overlapped_over_sequential"] = round(
            runs["real_overlapped"]["images_per_s"] / runs["real_sequential"]["images_per_s"], 3)
    print(json.dumps(res.get("ratios", {})))
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
