"""The torch runner's levers on the reference's model size (dim 64, mults 1-2-4-8, two UNets), on one GPU.

Times the product's own path (``--backend torch``: :class:`rddm_infer.backends.torch.TorchRunner` driven by the
shared sampler) over the lever list that ``benchmarks.backends`` uses too
(:func:`rddm_infer.backends.torch.lever_variants`): eager fp32 with every lever off (the reference's math, the
baseline), each lever alone (channels_last, folded weight standardisation, SDPA, one CUDA graph of all K steps,
pinned copies), every lever together at fp32 / bf16 / fp16 autocast, and bf16 + torch.compile, at each batch size,
one after the other in one run on one card. Reports median latency, images/s, speedup over eager fp32, peak device
memory, achieved TFLOP/s against the card's bf16 dense peak and PSNR against the eager fp32 output, and names the
fastest variant at >= 45 dB (the issue's bar: >= 10× eager fp32 at batch 8).

    python -m benchmarks.gpu_torch --out gpu_torch.json [--sizes 512] [--batches 8 1] [--budget-s 210]
    python -m benchmarks.gpu_torch --device cpu --dim 8 --sizes 32 --batches 2 1 --steps 2 --repeats 1  # a smoke
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import contextmanager

import torch

from benchmarks.backends import model_flops, reference_size_model
from rddm_infer.backends.timings import cpu_model, json_safe, time_variants
from rddm_infer.backends.torch import TorchRunner, lever_variants

# Dense bf16 tensor-core peaks (NVIDIA datasheets, SXM parts), TFLOP/s.
BF16_PEAK = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "B200": 2250.0}
GOAL_DB = 45.0  # the accuracy a lever must keep against eager fp32 to count (issue #27)


def card_peak(name: str) -> float | None:
    return next((v for k, v in BF16_PEAK.items() if k in name), None)


@contextmanager
def peak_memory():
    """The device's peak allocated memory while the block runs, as ``peak_mem_gb`` (CUDA graph pools included)."""
    extra: dict = {}
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    yield extra
    extra["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30


def within(budget_s: float, start: float, variants, what: str):
    """The variants, until ``budget_s`` seconds have passed since ``start`` (the rest are named, not run)."""
    for i, v in enumerate(variants):
        if time.perf_counter() - start > budget_s:
            print(f"{what}: budget of {budget_s:.0f} s reached, not run: {', '.join(n for n, _ in variants[i:])}",
                  flush=True)
            return
        yield v


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (a smoke of the script itself)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[512])
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 1], help="batch sizes, timed in this order")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3, help="timed restores per variant (after --warmup)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed restores first (the runner captures its CUDA graph "
                                                         "at a shape's 2nd batch: keep >= 2)")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--compile-batches", type=int, nargs="*", default=[8],
                    help="batch sizes that also time bf16 + torch.compile (each compile takes minutes)")
    ap.add_argument("--cudnn-benchmark", action="store_true",
                    help="torch.backends.cudnn.benchmark = True for every variant (the product leaves it off)")
    ap.add_argument("--budget-s", type=float, default=240, help="variants not started past this wall time are skipped")
    ap.add_argument("--out", default="gpu_torch.json")
    a = ap.parse_args(argv)

    start = time.perf_counter()
    cuda = a.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        ap.error(f"--device {a.device}: torch {torch.__version__} sees no CUDA GPU (--device cpu: a smoke run)")
    torch.backends.cudnn.benchmark = a.cudnn_benchmark
    name = torch.cuda.get_device_name(torch.device(a.device)) if cuda else cpu_model()
    peak = card_peak(name) if cuda else None
    loaded = reference_size_model(dim=a.dim)
    loaded.net.to(a.device)  # the baseline runs the caller's network as it is; the levers work on copies
    report = {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda, "bf16_peak_tflops": peak,
              "cudnn_benchmark": a.cudnn_benchmark, "model": loaded.unet.to_dict(),
              "params_m": sum(p.numel() for p in loaded.net.parameters()) / 1e6, "steps": a.steps,
              "repeats": a.repeats, "warmup": a.warmup, "results": [], "best": []}
    print(f"{name}, torch {torch.__version__}; {loaded.source}, {report['params_m']:.1f} M parameters, "
          f"{a.steps} steps", flush=True)
    for size in a.sizes:
        flops = model_flops(loaded, size)  # one network call, one image
        baselines = {batch: {} for batch in a.batches}  # eager fp32 of each batch: what every later row is against
        # every batch's plain levers first, the minutes-long compiles last (the budget then cuts those, not a batch)
        jobs = [(batch, lever_variants(a.device)) for batch in a.batches]
        if not a.no_compile:
            jobs += [(batch, lever_variants(a.device, compile=True)[-1:]) for batch in a.batches
                     if batch in a.compile_batches]
        for batch, variants in jobs:
            what = f"[{size}² ×{batch}]"
            rows = time_variants(lambda o: TorchRunner(loaded, device=a.device, **o),
                                 within(a.budget_s, start, variants, what), size, batch, a.repeats, a.warmup,
                                 a.steps, log=lambda s: print(f"{what} {s}", flush=True),
                                 around=peak_memory if cuda else None, baseline=baselines[batch])
            for r in rows:
                r.update(size=size, batch=batch, gflop_per_image=flops * a.steps / 1e9 if flops else None)
                if flops and not r["error"]:
                    r["tflops"] = flops * a.steps * batch / (r["median_ms"] / 1e3) / 1e12
                    r["pct_bf16_peak"] = 100 * r["tflops"] / peak if peak else None
            report["results"] += rows
        for batch in a.batches:
            what = f"[{size}² ×{batch}]"
            ok = [r for r in report["results"] if (r["size"], r["batch"]) == (size, batch) and not r["error"]
                  and r["psnr_db"] >= GOAL_DB]
            if ok:
                best = max(ok, key=lambda r: r["speedup"])
                report["best"].append({k: best.get(k) for k in ("size", "batch", "variant", "speedup", "psnr_db",
                                                                   "images_per_s", "tflops", "pct_bf16_peak")})
                print(f"{what} fastest at >= {GOAL_DB:g} dB: {best['variant']}, ×{best['speedup']:.2f} eager fp32, "
                      f"{best['images_per_s']:.2f} images/s"
                      + (f", {best['tflops']:.3g} TFLOP/s" if best.get("tflops") else "")
                      + (f" ({best['pct_bf16_peak']:.1f} % of the bf16 peak)" if best.get("pct_bf16_peak") else ""),
                      flush=True)
    report["wall_s"] = time.perf_counter() - start
    with open(a.out, "w") as f:
        json.dump(json_safe(report), f, indent=2, default=str)
    print(f"wrote {a.out} in {report['wall_s']:.0f} s", flush=True)
    return report


if __name__ == "__main__":
    main()
