"""Issue 26, cases 8-11 and 12b: a model, option or cache the tools cannot honour is one line and the right exit
status before any image, never a silently wrong run. Real checkpoints and ONNX files, real CLI subprocesses."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from helpers import models
from helpers.cli import cli
from helpers.cli import run as run_tool
from helpers.export import TINY, tiny_checkpoint

DEFAULT_ONNX = Path(__file__).resolve().parents[2] / "rddm_infer" / "weights" / "default.onnx"


def one_line(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    assert "Traceback" not in stderr and len(lines) == 1, stderr
    return lines[0]


def images(folder: Path, n: int = 2) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(26)
    for i in range(n):
        cv2.imwrite(str(folder / f"im{i}.png"), rng.integers(0, 256, (24, 40, 3), dtype=np.uint8))
    return folder


def restored(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob("*.png")) if out.is_dir() else []


def rewritten(src: Path, dst: Path, change) -> Path:
    """A copy of the checkpoint ``src`` with every tensor passed through ``change`` (its settings kept)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), "pt") as f:
        meta, sd = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file({k: change(v).contiguous() for k, v in sd.items()}, str(dst), metadata=meta)
    return dst


# -- case 8: integer weights are refused at load; a degenerate model fails export validation


def test_an_int32_checkpoint_is_refused_by_export_and_the_torch_backend(tmp_path):
    import torch

    ckpt = rewritten(tiny_checkpoint(tmp_path), tmp_path / "int.safetensors", lambda v: v.to(torch.int32))
    out = tmp_path / "int_onnx"
    r = run_tool("rddm-export", ckpt, "-o", out, "-g", "step", timeout=120)
    line = one_line(r.stderr)
    assert r.returncode == 2 and str(ckpt) in line and "dtype int32" in line and "floating point" in line, r.stderr
    assert not out.exists()  # nothing exported, no folder made

    res = tmp_path / "res"
    r = cli("restore", images(tmp_path / "in"), "-o", res, "--backend", "torch", "--model", ckpt, timeout=120)
    assert r.returncode == 2 and "dtype int32" in one_line(r.stderr) and str(ckpt) in r.stderr, r.stderr
    assert restored(res) == []


def test_a_bool_tensor_in_a_reference_checkpoint_is_refused(tmp_path):
    import torch
    from helpers.export import reference_checkpoint

    from rddm_infer.errors import CheckpointError
    from rddm_infer.model import load_checkpoint

    path = reference_checkpoint(tmp_path)
    obj = torch.load(path, weights_only=True)
    name = next(k for k in obj["ema"] if k.startswith("ema_model.model.") and k.endswith(".weight"))
    obj["ema"][name] = obj["ema"][name] > 0
    torch.save(obj, path)
    with pytest.raises(CheckpointError, match=r"model-3\.pt: tensor .* has dtype bool"):
        load_checkpoint(path)


@pytest.mark.parametrize("share_encoder, objective, why", [
    (1, "pred_res_noise", "leaves the starting noise unchanged"),  # zero residual and noise: x_T comes back
    (-1, "pred_res", "restores every image as its input"),  # zero residual: x₀ = x_input, an identity model
])
def test_a_degenerate_checkpoint_fails_export_validation(tmp_path, share_encoder, objective, why):
    import dataclasses

    import torch

    from rddm_infer.diffusion.schedule import DiffusionConfig

    cfg = dataclasses.replace(TINY, share_encoder=share_encoder)
    src = tiny_checkpoint(tmp_path, cfg, DiffusionConfig(sum_scale=0.01, objective=objective))
    ckpt = rewritten(src, tmp_path / "zero.safetensors", torch.zeros_like)
    out = tmp_path / "zero_onnx"
    r = run_tool("rddm-export", ckpt, "-o", out, "-g", "step", timeout=180)
    line = one_line(r.stderr)  # refused before any trace: no "exporting ..." lines either
    assert r.returncode == 2 and str(ckpt) in line and "degenerate" in line and why in line, line
    assert not out.exists() and not list(tmp_path.rglob("*.onnx"))


# -- case 9: a graph that breaks its kind's contract is a model error at load, before any image


def renamed_input(tmp_path: Path, old: str = "x_t", new: str = "xt_renamed") -> Path:
    import onnx

    m = onnx.load(str(models.onnx_model("step")))
    next(i for i in m.graph.input if i.name == old).name = new
    for node in m.graph.node:
        node.input[:] = [new if x == old else x for x in node.input]
    path = tmp_path / "renamed.onnx"
    onnx.save(m, str(path))
    return path


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_an_onnx_model_with_a_renamed_input_is_refused_at_load(tmp_path, backend):
    if backend == "openvino":
        pytest.importorskip("openvino")
    model = renamed_input(tmp_path)
    out = tmp_path / "out"
    r = cli("restore", images(tmp_path / "in"), "-o", out, "--backend", backend, "--model", model, timeout=120)
    line = one_line(r.stderr)
    assert r.returncode == 2 and str(model) in line, r.stderr
    assert "missing input x_t" in line and "unexpected input xt_renamed" in line, line
    assert "inference failed" not in r.stderr and restored(out) == []
    r = cli("info", model, timeout=60)
    assert r.returncode == 2 and "missing input x_t" in one_line(r.stderr)


def test_the_contract_check_names_ranks_and_dtypes():
    from rddm_infer.diffusion.graph_kinds import graph_kind

    step = graph_kind("step")
    good = {"x_t": (4, "float32"), "x_input": (4, "float32"), "coef": (1, "float32"), "noise": (4, "float32")}
    outs = {"x_next": (4, "float32"), "x0": (4, "float32")}
    assert step.contract_problem(good, outs) == ""
    bad = step.contract_problem({**good, "coef": (2, "float32"), "noise": (4, "float16")}, {"x0": (4, "float32")})
    assert "input coef has rank 2, expected 1" in bad and "input noise is float16, expected float32" in bad
    assert "missing output x_next" in bad
    unet = graph_kind("unet")
    ins = {"x_t": (4, "float32"), "x_input": (4, "float32"), "t": (1, "float32")}
    assert unet.contract_problem(ins, {"out0": (4, "float32")}, num_outputs=1) == ""
    assert "input t has rank 1, expected 2" in unet.contract_problem(ins, {"out0": (4, "float32")}, num_outputs=1,
                                                                      time_input="scaled")


# -- case 10: --eta a model does not honour, or out of range, is an option error


@pytest.mark.parametrize("eta, why", [("nan", "finite number in [0, 1]"), ("inf", "finite number in [0, 1]"),
                                      ("5", "finite number in [0, 1]"), ("-1", "finite number in [0, 1]"),
                                      ("0.5", "does not apply: this restoration model")])
def test_info_refuses_an_eta_the_model_does_not_honour(eta, why):
    r = cli("info", DEFAULT_ONNX, "--eta", eta, timeout=60)
    line = one_line(r.stderr)
    assert r.returncode == 2 and "--eta" in line and why in line, r.stderr


def test_restore_and_bench_refuse_eta_on_a_restoration_model(tmp_path):
    out = tmp_path / "out"
    model = models.onnx_model("step")
    r = cli("restore", images(tmp_path / "in"), "-o", out, "--model", model, "--eta", "0.5", timeout=120)
    assert r.returncode == 2 and "--eta 0.5 does not apply" in one_line(r.stderr) and restored(out) == []
    r = cli("bench", model, "--eta", "0.5", "--size", "16", timeout=120)
    assert r.returncode == 2 and "--eta 0.5 does not apply" in one_line(r.stderr)
    r = cli("info", model, "--eta", "0", timeout=60)  # the value the model samples with is no contradiction
    assert r.returncode == 0 and "eta" in r.stdout, r.stderr


def test_rddm_export_refuses_eta_on_a_restoration_checkpoint(tmp_path):
    ckpt = tiny_checkpoint(tmp_path)
    r = run_tool("rddm-export", ckpt, "-o", tmp_path / "o", "--eta", "0.5", timeout=120)
    line = one_line(r.stderr)
    assert r.returncode == 2 and str(ckpt) in line and "--eta 0.5 does not apply" in line
    assert not (tmp_path / "o").exists()


def test_a_generation_model_keeps_a_valid_eta_and_refuses_a_bad_one(tmp_path):
    import dataclasses

    from rddm_infer.diffusion.schedule import DiffusionConfig

    cfg = dataclasses.replace(TINY, condition=False)
    ckpt = tiny_checkpoint(tmp_path, cfg, DiffusionConfig(condition=False, sum_scale=1.0), name="gen.safetensors")
    r = cli("info", ckpt, "--eta", "0.5", timeout=120)
    assert r.returncode == 0 and "0.5" in next(ln for ln in r.stdout.splitlines() if "eta" in ln), r.stdout + r.stderr
    r = cli("info", ckpt, "--eta", "nan", timeout=120)
    assert r.returncode == 2 and "--eta must be a finite number" in one_line(r.stderr)


# -- case 11: an unwritable cache is a stated fallback, never a crash


def _cache_variants(tmp_path: Path) -> list[tuple[str, Path]]:
    as_file = tmp_path / "cache_is_a_file"
    as_file.write_text("not a folder")
    variants = [("file", as_file)]
    if os.geteuid() != 0:  # root ignores permissions: a 0o500 folder is writable for it
        ro = tmp_path / "readonly_cache"
        ro.mkdir()
        ro.chmod(0o500)
        variants.append(("readonly", ro))
    return variants


def test_openvino_with_an_unwritable_cache_runs_and_says_so(tmp_path):
    pytest.importorskip("openvino")
    model = models.onnx_model("step")
    src = images(tmp_path / "in", 1)
    try:
        for name, cache in _cache_variants(tmp_path):
            out = tmp_path / f"out_{name}"
            r = cli("restore", src, "-o", out, "--backend", "openvino", "--model", model, timeout=180,
                    env={"XDG_CACHE_HOME": str(cache)})
            assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
            assert f"OpenVINO model cache off: {cache / 'rddm-infer' / 'openvino'}: " in r.stderr, r.stderr
            assert restored(out) == ["im0.png"]
        cache = tmp_path / "cache_is_a_file"
        r = cli("bench", model, "--calibrate", "--size", "16", timeout=300, env={"XDG_CACHE_HOME": str(cache)})
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
        assert "OpenVINO model cache off:" in r.stderr and "timing table not saved" in r.stderr, r.stderr
        assert "openvino fp32" in r.stdout + r.stderr
    finally:
        for p in tmp_path.glob("readonly_cache"):
            p.chmod(0o700)


def test_an_unusable_explicit_cache_dir_is_an_option_error(tmp_path):
    pytest.importorskip("openvino")
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    out = tmp_path / "out"
    r = cli("restore", images(tmp_path / "in", 1), "-o", out, "--backend", "openvino", "--model",
            models.onnx_model("step"), "--cache-dir", blocker, timeout=120)
    line = one_line(r.stderr)
    assert r.returncode == 2 and f"--cache-dir {blocker}" in line and "in the way" in line
    assert restored(out) == [] and blocker.read_text() == "x"


# -- case 12b: every numeric training setting is range-checked before any training


@pytest.mark.parametrize("override, key", [
    ("data.crop=0", "data.crop"), ("data.crop=-8", "data.crop"), ("run.batch_size=0", "run.batch_size"),
    ("optim.lr=nan", "optim.lr"), ("optim.lr=-1e-4", "optim.lr"), ("optim.ema_decay=1.0", "optim.ema_decay"),
    ("run.steps=-1", "run.steps"), ("model.resnet_block_groups=0", "model.resnet_block_groups"),
    ("optim.betas=[0.9, 1.5]", "optim.betas"), ("val.steps=5000", "val.steps"),
])
def test_rddm_train_refuses_an_out_of_range_setting(tmp_path, override, key):
    out = tmp_path / "run"
    r = run_tool("rddm-train", "--set", override, "--data", images(tmp_path / "data", 1), "--out", out,
                 "--device", "cpu", timeout=60)
    line = one_line(r.stderr)
    assert r.returncode == 2 and key in line and "must be" in line, r.stderr
    assert not out.exists()  # failed before the run folder, the data or any training
