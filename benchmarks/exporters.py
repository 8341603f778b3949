"""Legacy vs dynamo ONNX exporter, and the effect of our graph cleanup, timed in ONNX Runtime (CPU).

    python -m benchmarks.exporters [--dim 32] [--size 128] [--runs 10]

Exports the ``unet`` graph of one randomly initialised UNetRes three ways (legacy raw,
legacy + onnxslim + static reshapes, dynamo + the same cleanup) and reports export
time, node count and the median ONNX Runtime latency of one network call.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from rddm_infer.model import UNetConfig, UnetRes, fold_weight_standardization
from rddm_infer.diffusion.schedule import DiffusionConfig
from rddm_export.graph_cleanup import static_reshapes
from rddm_export.graphs import build_graph
from rddm_export.onnx_export import save_model, simplify, trace


def _time(paths: list[Path], shape, runs: int, threads: int) -> list[float]:
    """Median latency (ms) of each model, timed round-robin so load drift hits all of them alike."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sessions = [ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"]) for p in paths]
    rng = np.random.default_rng(0)
    feeds = {"x_t": rng.standard_normal(shape, dtype=np.float32),
             "x_input": rng.standard_normal(shape, dtype=np.float32),
             "t": np.full(shape[0], 999.0, dtype=np.float32)}
    times = [[] for _ in sessions]
    for sess in sessions:
        sess.run(None, feeds)
    for _ in range(runs):
        for sess, ts in zip(sessions, times):
            t0 = time.perf_counter()
            sess.run(None, feeds)
            ts.append(time.perf_counter() - t0)
    return [float(np.median(ts)) * 1e3 for ts in times]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.manual_seed(0)
    cfg = UNetConfig(dim=a.dim)
    net = fold_weight_standardization(copy.deepcopy(UnetRes(cfg).eval()))
    graph = build_graph(net, DiffusionConfig(), "unet", cfg.num_outputs)
    shape = (1, cfg.channels, a.size, a.size)
    print(f"UNetRes dim {a.dim} {cfg.dim_mults}, unet graph, ONNX Runtime CPU {ort.__version__}, "
          f"{a.threads} threads, {'x'.join(map(str, shape))}, median of {a.runs}")
    rows, paths = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name, exporter, clean in (("legacy raw", "legacy", False), ("legacy + cleanup", "legacy", True),
                                      ("dynamo + cleanup", "dynamo", True)):
            t0 = time.perf_counter()
            model = trace(graph, cfg.channels, cfg.size_multiple, exporter)
            if clean:
                model = simplify(model)
                static_reshapes(model)
            export_s = time.perf_counter() - t0
            path = Path(tmp) / f"{name.replace(' ', '_')}.onnx"
            save_model(model, path)
            paths.append(path)
            rows.append(f"| {name} | {model.opset_import[0].version} | {len(model.graph.node)} | {export_s:.1f} s")
        print("| graph | opset | nodes | export | ORT median |\n|---|---|---|---|---|")
        for row, ms in zip(rows, _time(paths, shape, a.runs, a.threads)):
            print(f"{row} | {ms:.1f} ms |")


if __name__ == "__main__":
    main()
