"""The backend benchmark (a real smoke run on a tiny model) and the int8 graph option."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from helpers.models import loaded_model, onnx_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    from rddm_infer.model.checkpoint import save_checkpoint

    tmp = tmp_path_factory.mktemp("bench")
    lm = loaded_model()
    ckpt = save_checkpoint(tmp / "tiny.safetensors", lm.net, lm.unet, lm.diffusion)
    out = tmp / "out"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.backends", "--checkpoint", str(ckpt), "--sizes", "32",
                           "--graphs", "step", "--runs", "3", "--warmup", "1", "--threads", "1", "--int8",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out, json.loads((out / "results.json").read_text())


def test_bench_writes_consistent_json_markdown_png(bench_run):
    out, result = bench_run
    (size,) = result["sizes"]
    rows = {r["variant"]: r for r in size["rows"]}
    assert list(rows)[0] == result["baseline"] == "torch eager fp32 (reference)"
    assert {"onnxruntime CPU step fp32", "onnxruntime CPU step int8", "torch fp32, every lever",
            "torch bf16 autocast, every lever"} <= set(rows)
    base = rows[result["baseline"]]
    assert base["speedup_vs_baseline"] == pytest.approx(1.0)
    assert base["psnr_vs_baseline_db"] == math.inf  # the baseline against itself
    for r in rows.values():
        assert r["error"] is None and r["runs"] == 3
        assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"]
        assert r["images_per_s"] == pytest.approx(1000 * result["batch"] / r["p50_ms"])
        assert r["speedup_vs_baseline"] == pytest.approx(base["p50_ms"] / r["p50_ms"])
        assert r["peak_rss_mb"] > 50 and 0 <= r["rss_growth_mb"] <= r["peak_rss_mb"]
        assert r["tflops"] == pytest.approx(size["gflop_per_image"] * 1e9 * result["batch"] / (r["p50_ms"] / 1e3)
                                            / 1e12)
    # the exported fp32 graph computes what torch computes; lower precisions stay recognisably the same image
    assert rows["onnxruntime CPU step fp32"]["psnr_vs_baseline_db"] > 60
    assert 20 < rows["onnxruntime CPU step int8"]["psnr_vs_baseline_db"] < math.inf
    assert 25 < rows["torch bf16 autocast, every lever"]["psnr_vs_baseline_db"] < math.inf
    assert rows["torch fp32, every lever"]["psnr_vs_baseline_db"] > 90  # channels_last, folded WS, SDPA: same math
    assert size["gflop_per_image"] > 0 and result["environment"]["onnxruntime"]
    if result["environment"]["openvino"]:  # registry rows: every installed ONNX backend at each precision
        assert rows["openvino step fp32"]["psnr_vs_baseline_db"] > 60
        assert rows["openvino step int8"]["psnr_vs_baseline_db"] > 20
        bf16 = rows.get("openvino step fp32 (bf16 inference)")
        assert bf16 is None or 25 < bf16["psnr_vs_baseline_db"] < math.inf
        if bf16 is not None:  # the int8 graph in bf16, and bf16 with each lever off (dynamic shapes, norms as
            for lever in ("dynamic shapes", "norms as exported"):  # exported): same math, another speed
                off = rows[f"openvino step fp32 (bf16 inference), {lever}"]
                assert 25 < off["psnr_vs_baseline_db"] < math.inf and off["precision"] == "bf16"
            assert rows["openvino step int8 (bf16 inference)"]["precision"] == "int8+bf16"
    md = (out / "results.md").read_text()
    assert all(f"| {name} |" in md for name in rows) and "onnxruntime 1." in md
    png = cv2.imread(str(out / "results.png"))
    assert png is not None and png.shape[1] == 900 and png.shape[0] > 40 + 22 * len(rows)
    assert (png < 250).any(axis=2).sum() > 1000  # bars and labels were drawn
    from test_report import Page  # the same rows and the plot on one page

    page = Page(out / "report.html").check()
    assert set(rows) <= set(page.texts("td")) and page.all("img", src="results.png")


def test_peak_rss_sees_an_allocation():
    from benchmarks.backends import PeakRSS

    with PeakRSS(every=0.001) as mem:
        a = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
        a.sum()
    assert mem.peak - mem.start > 40 * 2**20
    del a


def test_int8_graph_is_a_loadable_artifact_close_to_fp32(tmp_path):
    from rddm_export.int8 import quantize_int8, synthetic_calibration
    from rddm_infer.backends import EngineSampler, Noise
    from rddm_infer.backends.onnxruntime import OnnxRuntimeRunner
    from rddm_infer.metrics import psnr

    src = onnx_model("step")
    dst = quantize_int8(src, tmp_path / "step_int8.onnx", synthetic_calibration((1, 3, 32, 32), count=1))
    q = OnnxRuntimeRunner(dst)
    assert q.meta.precision == "int8" and q.meta.graph == "step" and q.meta.steps == 5
    import onnx

    ops = {n.op_type for n in onnx.load(str(dst)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    x = synthetic_calibration((1, 3, 32, 32), count=1, seed=5)[0]
    fp = EngineSampler(OnnxRuntimeRunner(src))
    plan = fp.plan()
    noise = Noise.draw(plan, x.shape, 0)
    a, b = fp.run(x, plan, noise), EngineSampler(q).run(x, plan, noise)
    assert 20 < psnr((a + 1) / 2, (b + 1) / 2) < math.inf


def test_int8_refuses_a_graph_that_is_not_rddm_fp32(tmp_path):
    import onnx

    from rddm_export.int8 import quantize_int8
    from rddm_infer.errors import RDDMError

    m = onnx.load(str(onnx_model("step")))
    del m.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(m, str(bare))
    with pytest.raises(RDDMError, match="bare.onnx: int8 quantisation starts from an fp32 graph"):
        quantize_int8(bare, tmp_path / "q.onnx")
    assert not (tmp_path / "q.onnx").exists()


def test_int8_command_calibrates_on_a_folder_and_reports_bad_input(tmp_path):
    import onnx

    imgs = tmp_path / "calib"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    cv2.imwrite(str(imgs / "a.png"), rng.integers(0, 256, (40, 56, 3), dtype=np.uint8))
    cv2.imwrite(str(imgs / "b.png"), rng.integers(0, 256, (48, 48), dtype=np.uint8))  # gray
    out = tmp_path / "q.onnx"
    proc = subprocess.run([sys.executable, "-m", "rddm_export.int8", str(onnx_model("step")), str(out),
                           "--images", str(imgs)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads({p.key: p.value for p in onnx.load(str(out)).metadata_props}["rddm"])["precision"] == "int8"
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    proc = subprocess.run([sys.executable, "-m", "rddm_export.int8", str(junk), str(tmp_path / "j.onnx")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert "junk.onnx: not a readable ONNX model" in proc.stderr


def test_reference_size_model_is_the_official_experiment_2_size():
    from benchmarks.backends import parse, reference_size_model

    m = reference_size_model()
    assert m.unet.dim == 64 and m.unet.dim_mults == (1, 2, 4, 8) and m.unet.num_outputs == 2
    assert m.diffusion.objective == "pred_res_noise"
    assert sum(p.numel() for p in m.net.parameters()) / 1e6 == pytest.approx(72.5, abs=0.5)
    assert parse(["--sizes", "256"]).checkpoint is None  # no checkpoint: the reference-size model


def test_bench_levers_times_eager_fp32_against_each_lever(tmp_path):
    """`rddm-infer bench --levers` on the CPU: eager fp32 first, then the levers the CPU takes, each with its accuracy
    against eager fp32 (the CUDA-only ones are not offered here: they are refused on the CPU)."""
    from helpers.cli import run
    from helpers.models import checkpoint

    r = run("rddm-infer", "bench", checkpoint(), "--levers", "--size", "32", "--runs", "1", "--warmup", "0",
            "--json", timeout=300)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert len(rows) >= 2 and "eager" in json.dumps(rows[0]).lower()
    bad = run("rddm-infer", "bench", "--levers", "--backend", "onnxruntime")
    assert bad.returncode == 2 and "--levers times the torch backend's levers" in bad.stderr
