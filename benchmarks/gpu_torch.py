"""GPU benchmark of the torch sampler on the reference's model size (dim 64, mults 1-2-4-8, two UNets).

Compares, side by side in one run on one card: the reference-style eager fp32 sampler (the
baseline), bf16 autocast + channels_last + folded weight standardisation, the same captured
whole in one CUDA graph (all K steps), bf16 and fp16 with fused SDPA attention in NCHW (CUDA
graph), and torch.compile (+ CUDA graph). Reports p50/p90
latency, images/s, speedup over eager fp32, peak device memory, achieved TFLOP/s against the
card's bf16 dense peak, and PSNR against the fp32 output.

    python -m benchmarks.gpu_torch --out results.json [--sizes 256 512] [--batch 8]
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import numpy as np
import torch

from rddm_infer.metrics import psnr
from rddm_infer.model import UNetConfig, UnetRes, fold_weight_standardization
from rddm_infer.model.unet import use_sdpa
from rddm_infer.diffusion.sampler import sample
from rddm_infer.diffusion.schedule import DiffusionConfig, SamplingPlan

# Dense bf16 tensor-core peaks (NVIDIA datasheets, SXM parts), TFLOP/s.
BF16_PEAK = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "B200": 2250.0}


def card_peak(name: str) -> float | None:
    return next((v for k, v in BF16_PEAK.items() if k in name), None)


def model_flops(net, x, t) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        net(x, t)
    return fc.get_total_flops()


class Variant:
    """One way to run the K-step loop; ``run()`` restores the static input batch."""

    def __init__(self, name, net, plan, x_in, eps, dtype=None, graph=False, channels_last=False, half=False):
        self.name, self.net, self.plan, self.dtype, self.half = name, net, plan, dtype, half
        self.channels_last = channels_last
        self.x_in, self.eps = x_in, eps
        b = x_in.shape[0]
        self.times = {t: torch.full((b,), t, device=x_in.device, dtype=torch.long) for t in plan.times}
        self.graph = None
        if graph:
            self._capture()

    def model(self, x_t, x_in, t):
        x = torch.cat((x_t, x_in), 1)
        if self.half:  # fp16 weights and activations, no autocast casts (norms accumulate in fp32 inside)
            x = x.half()
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            return tuple(o.float() for o in self.net(x, self.times[t]))

    def _loop(self):
        x_t = self.x_in + self.plan.init_scale() * self.eps
        return sample(self.model, self.plan, self.x_in, x_t)

    def _capture(self):
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s), torch.no_grad():
            for _ in range(2):  # warm up cuDNN autotuning / compiled kernels outside the capture
                self._loop()
        torch.cuda.current_stream().wait_stream(s)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.no_grad():
            self.static_out = self._loop()

    @torch.no_grad()
    def run(self):
        if self.graph is not None:
            self.graph.replay()
            return self.static_out
        return self._loop()


def time_variant(v: Variant, repeats: int) -> dict:
    v.run()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = v.run()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"times": times, "out": out.float().cpu().numpy(), "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--compile-mode", default="max-autotune-no-cudagraphs",
                    help="torch.compile mode (the variant captures its own CUDA graph of the whole loop)")
    ap.add_argument("--budget-s", type=float, default=240, help="skip remaining variants past this wall time")
    ap.add_argument("--out", default="gpu_torch.json")
    a = ap.parse_args(argv)

    start = time.perf_counter()
    dev = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name(0)
    peak = card_peak(name)
    torch.manual_seed(0)
    cfg = UNetConfig(dim=a.dim, dim_mults=(1, 2, 4, 8), share_encoder=0)
    ref_net = UnetRes(cfg).eval().to(dev)
    with torch.no_grad():  # non-trivial norms/biases so bf16 error is measured on realistic activations
        for p in ref_net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    fast_net = fold_weight_standardization(copy.deepcopy(ref_net)).to(memory_format=torch.channels_last)
    sdpa_net = use_sdpa(fold_weight_standardization(copy.deepcopy(ref_net)))  # NCHW: no GroupNorm layout copies
    half_net = use_sdpa(fold_weight_standardization(copy.deepcopy(ref_net))).half()
    plan = SamplingPlan.create(DiffusionConfig(), a.steps)
    report = {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda, "bf16_peak_tflops": peak,
              "model": cfg.to_dict(), "params_m": sum(p.numel() for p in ref_net.parameters()) / 1e6,
              "batch": a.batch, "steps": a.steps, "results": []}
    for size in a.sizes:
        g = torch.Generator(device=dev).manual_seed(size)
        x_in = torch.rand(a.batch, 3, size, size, device=dev, generator=g) * 2 - 1
        eps = torch.randn(a.batch, 3, size, size, device=dev, generator=g)
        flops = model_flops(ref_net, torch.cat((x_in, x_in), 1), torch.full((a.batch,), 999, device=dev)) * a.steps
        variants = [
            lambda: Variant("eager fp32 (reference)", ref_net, plan, x_in, eps),
            lambda: Variant("eager bf16 + channels_last + folded WS", fast_net, plan, x_in, eps, torch.bfloat16,
                            channels_last=True),
            lambda: Variant("bf16 + CUDA graph (whole K-step loop)", fast_net, plan, x_in, eps, torch.bfloat16,
                            graph=True, channels_last=True),
        ]
        variants += [
            lambda: Variant("bf16 + SDPA, NCHW + CUDA graph", sdpa_net, plan, x_in, eps, torch.bfloat16, graph=True),
            lambda: Variant("fp16 weights + SDPA, NCHW + CUDA graph", half_net, plan, x_in, eps, graph=True, half=True),
        ]
        if not a.no_compile and a.budget_s - (time.perf_counter() - start) > 150:
            compiled = torch.compile(sdpa_net, mode=a.compile_mode, dynamic=False)
            variants.append(lambda: Variant(f"torch.compile({a.compile_mode}) bf16 + SDPA + CUDA graph", compiled,
                                            plan, x_in, eps, torch.bfloat16, graph=True))
        base = None
        for make in variants:
            if time.perf_counter() - start > a.budget_s:
                print(f"[{size}] budget reached, skipping the remaining variants", flush=True)
                break
            t_build = time.perf_counter()
            try:
                v = make()
                r = time_variant(v, a.repeats)
            except Exception as e:  # a variant that cannot run here is reported, not hidden
                print(f"[{size}] variant failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
                continue
            ts = np.array(r.pop("times"))
            out = r.pop("out")
            if base is None:
                base = {"p50": float(np.median(ts)), "out": out}
            p50 = float(np.median(ts))
            row = {"size": size, "variant": v.name, "p50_s": p50, "p90_s": float(np.percentile(ts, 90)),
                   "images_s": a.batch / p50, "speedup_vs_eager_fp32": base["p50"] / p50,
                   "gflop_per_image": flops / a.batch / 1e9, "tflops": flops / p50 / 1e12, "pct_bf16_peak": (100 * flops / p50 / 1e12 / peak) if peak else None,
                   "psnr_vs_fp32_db": psnr(out, base["out"], data_range=2.0), "peak_mem_gb": r["peak_mem_gb"],
                   "setup_s": time.perf_counter() - t_build - ts.sum()}
            report["results"].append(row)
            print(f"[{size}² ×{a.batch}] {v.name:42s} p50 {p50 * 1e3:8.1f} ms  {row['images_s']:7.1f} img/s  "
                  f"×{row['speedup_vs_eager_fp32']:5.2f}  {row['tflops']:6.1f} TFLOP/s "
                  f"({row['pct_bf16_peak'] or 0:4.1f}% peak)  PSNR {row['psnr_vs_fp32_db']:.1f} dB  "
                  f"mem {row['peak_mem_gb']:.1f} GB", flush=True)
            del v
            torch.cuda.empty_cache()
    with open(a.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {a.out} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
