"""The backend table and the one set of options every entry point accepts (real models, real CLI)."""

import json

import cv2
import numpy as np
import pytest

from helpers import models
from rddm_infer.backends import EngineSampler, choose_backend, load_runner, read_artifact_meta
from rddm_infer.backends.registry import BACKENDS, BY_NAME, NAMES, artifact_kind, backend_help, parse_device
from rddm_infer.errors import BackendUnavailable, OptionError
from rddm_infer.diffusion.graph_kinds import KINDS, dynamic_axes
from helpers.cli import cli

X = np.random.default_rng(2).uniform(-1, 1, (1, 3, 16, 16)).astype(np.float32)


def test_every_row_is_complete_and_named_in_the_cli_help():
    assert NAMES[0] == "auto" and set(NAMES[1:]) == {"tensorrt", "onnxruntime", "torch", "openvino"}
    for b in BACKENDS:
        assert b.artifacts and b.requires and b.options and b.devices, b.name
        assert b.option("device") is not None, f"{b.name} must take --device"
        if b.available():
            assert b.runner_class().name == b.name  # the factory path points at the right class
        assert b.name in backend_help() and b.description in backend_help()
    r = cli("restore", "--help")
    assert all(b.name in r.stdout for b in BACKENDS) and "--device" in r.stdout and "--objective" in r.stdout


@pytest.mark.slow  # over 2 s on 2 cores
def test_graph_kinds_match_the_exported_graphs():
    import onnxruntime as ort

    for kind in ("unet", "step", "fused"):
        s = ort.InferenceSession(str(models.onnx_model(kind)), providers=["CPUExecutionProvider"])
        assert tuple(i.name for i in s.get_inputs()) == KINDS[kind].input_names(False)
        assert tuple(o.name for o in s.get_outputs()) == KINDS[kind].output_names(2)
        for i in s.get_inputs():
            named = {ax: d for ax, d in enumerate(i.shape) if isinstance(d, str)}
            assert set(named) == set(dynamic_axes(i.name)), (kind, i.name, i.shape)


def test_parse_device_and_artifact_kinds():
    assert parse_device(None) == ("auto", None) and parse_device("cuda:1") == ("cuda", 1)
    assert parse_device("CPU") == ("cpu", None)
    for bad in ("tpu", "cpu:1", "cuda:x"):
        with pytest.raises(OptionError, match="--device"):
            parse_device(bad)
    assert artifact_kind("a.ONNX") == "onnx" and artifact_kind("a.plan") == "engine"
    assert artifact_kind("a.pth") == "checkpoint" and artifact_kind("a.bin") is None


def test_device_steers_the_choice(tmp_path):
    onnx_path = tmp_path / "m.onnx"
    (tmp_path / "m.engine").write_bytes(b"x")
    mods = {"tensorrt", "cuda.bindings", "onnxruntime", "torch"}
    gpu = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_backend(onnx_path, modules=mods, providers=gpu).backend == "tensorrt"
    c = choose_backend(onnx_path, modules=mods, providers=gpu, device="cpu")
    assert c.backend == "onnxruntime" and "CPUExecutionProvider" in c.reason
    assert "CUDAExecutionProvider" in choose_backend(onnx_path, "onnxruntime", modules=mods, providers=gpu,
                                                      device="cuda:0").reason
    with pytest.raises(OptionError, match="the tensorrt backend runs on cuda"):
        choose_backend(onnx_path, "tensorrt", modules=mods, providers=gpu, device="cpu")
    with pytest.raises(OptionError, match="no backend runs a engine artifact on --device cpu"):
        choose_backend(tmp_path / "m.engine", modules=mods, providers=gpu, device="cpu")


def test_onnxruntime_device_maps_onto_providers():
    runner, _ = load_runner(models.onnx_model("step"), "onnxruntime", device="cpu")
    assert runner.session.get_providers() == ["CPUExecutionProvider"]
    from rddm_infer.backends.onnxruntime import available_providers

    if "CUDAExecutionProvider" not in available_providers():
        with pytest.raises(BackendUnavailable, match="--device cuda:1: onnxruntime has no GPU provider"):
            load_runner(models.onnx_model("step"), "onnxruntime", device="cuda:1")
    with pytest.raises(OptionError, match="contradicts"):
        load_runner(models.onnx_model("step"), "onnxruntime", device="cpu", providers="cuda")


# ------------------------------------------------------------------------- unknown / inapplicable options

def test_load_runner_refuses_unknown_and_inapplicable_options():
    step, ckpt = models.onnx_model("step"), models.checkpoint()
    with pytest.raises(OptionError, match="unknown option 'bogus'"):
        load_runner(step, bogus=1)
    with pytest.raises(OptionError, match="option 'compile' does not apply to the onnxruntime backend"):
        load_runner(step, compile=True)
    with pytest.raises(OptionError, match="option 'providers' does not apply to the torch backend"):
        load_runner(ckpt, providers="cpu")
    with pytest.raises(OptionError, match="'precision' does not apply to the onnxruntime backend"):
        load_runner(step, precision="bf16")
    with pytest.raises(OptionError, match="option 'threads' must be int"):
        load_runner(step, threads="2")
    with pytest.raises(OptionError, match="'precision' must be one of fp32, bf16"):
        load_runner(ckpt, precision="fp8")
    runner, _ = load_runner(step, compile=None, precision=None)  # None = not given: fine
    assert runner.meta.graph == "step"


def test_every_python_entry_point_refuses_an_unknown_option(tmp_path):
    from rddm_infer import load_model, restore_folder
    from rddm_infer.restore.local import Restorer

    step = models.onnx_model("step")
    for call in (lambda: Restorer(step, bogus=1), lambda: load_model(step, bogus=1),
                 lambda: restore_folder(tmp_path, tmp_path / "o", step, bogus=1),
                 lambda: read_artifact_meta(step, bogus=1), lambda: load_runner(step, bogus=1)):
        with pytest.raises(OptionError, match="'bogus'"):
            call()
    runner, _ = load_runner(step)
    with pytest.raises(OptionError, match="'threads' does not apply to an already loaded runner"):
        Restorer(runner, threads=2)


def test_every_cli_command_refuses_unknown_and_inapplicable_options(tmp_path):
    img = tmp_path / "a.png"
    cv2.imwrite(str(img), np.full((8, 8, 3), 99, np.uint8))
    step = models.onnx_model("step")
    for args in (("restore", img, "--model", step), ("info", step), ("bench", step)):
        r = cli(*args, "--bogus")
        assert r.returncode == 2 and "--bogus" in r.stderr, r.stderr
    r = cli("restore", img, "--model", step, "-o", tmp_path / "o", "--compile")
    assert r.returncode == 2 and "'compile' does not apply to the onnxruntime backend" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "o" / "a.png").exists()
    r = cli("bench", step, "--precision", "bf16", "--runs", 1)
    assert r.returncode == 2 and "'precision' does not apply to the onnxruntime backend" in r.stderr
    r = cli("restore", img, "--model", step, "--device", "tpu")
    assert r.returncode == 2 and "--device 'tpu'" in r.stderr


# --------------------------------------------------------------------------------- model options

def test_baked_model_options_must_match_the_artifact(tmp_path):
    step = models.onnx_model("step")
    with pytest.raises(OptionError, match="objective pred_res does not apply: the artifact was exported with "
                                          "objective pred_res_noise"):
        load_runner(step, objective="pred_res")
    with pytest.raises(OptionError, match="sum_scale 0.5 does not apply"):
        read_artifact_meta(step, sum_scale=0.5)
    runner, _ = load_runner(step, objective="pred_res_noise", sum_scale=runner_sum_scale(step))  # same: fine
    assert runner.meta.config.objective == "pred_res_noise"
    for args in (("info", step, "--objective", "pred_noise"), ("bench", step, "--sum-scale", "0.5", "--runs", 1)):
        r = cli(*args)
        assert r.returncode == 2 and "does not apply: the artifact was exported with" in r.stderr, r.stderr
    img = tmp_path / "a.png"
    cv2.imwrite(str(img), np.full((8, 8, 3), 99, np.uint8))
    r = cli("restore", img, "--model", step, "-o", tmp_path / "o", "--objective", "pred_noise")
    assert r.returncode == 2 and "objective pred_noise does not apply" in r.stderr


def runner_sum_scale(path) -> float:
    return read_artifact_meta(path).diffusion["sum_scale"]


@pytest.fixture(scope="module")
def one_output_checkpoint(tmp_path_factory):
    """A share_encoder=-1 (one network output) checkpoint saved as pred_res, so pred_noise also loads."""
    import torch
    from rddm_infer.model import UNetConfig, UnetRes, save_checkpoint
    from rddm_infer.diffusion.schedule import DiffusionConfig

    torch.manual_seed(3)
    cfg = UNetConfig(dim=8, dim_mults=(1, 2), heads=1, dim_head=8, share_encoder=-1)
    net = UnetRes(cfg).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return save_checkpoint(tmp_path_factory.mktemp("ck") / "one.safetensors", net, cfg,
                           DiffusionConfig(objective="pred_res", sum_scale=0.01))


@pytest.mark.slow  # over 2 s on 2 cores
def test_checkpoint_model_options_reach_the_loader(one_output_checkpoint, tmp_path):
    from rddm_infer import load_model

    base, _ = load_runner(one_output_checkpoint, "torch", device="cpu")
    other, _ = load_runner(one_output_checkpoint, "torch", device="cpu", objective="pred_noise", sum_scale=0.5)
    assert base.meta.config.objective == "pred_res" and other.meta.config.objective == "pred_noise"
    assert other.meta.diffusion["sum_scale"] == 0.5
    a, b = EngineSampler(base)(X, seed=0), EngineSampler(other)(X, seed=0)
    assert np.abs(a - b).max() > 1e-2  # the options changed the sampling, not just the metadata
    with load_model(one_output_checkpoint, "torch", device="cpu", objective="pred_noise", sum_scale=0.5) as m:
        np.testing.assert_allclose(m.sampler.run(X, m.plan, __import__("rddm_infer").backends.Noise.draw(
            m.plan, X.shape, 0)), b, atol=1e-6)
    assert read_artifact_meta(one_output_checkpoint, objective="pred_noise").config.objective == "pred_noise"
    r = cli("info", one_output_checkpoint, "--objective", "pred_noise", "--sum-scale", "0.5")
    assert r.returncode == 0 and "pred_noise" in r.stdout and "0.5" in r.stdout, r.stderr
    assert "backends: torch" in r.stdout  # the rows of the table that run a checkpoint
    img = tmp_path / "a.png"
    cv2.imwrite(str(img), np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    outs = {}
    for tag, extra in (("base", ()), ("noise", ("--objective", "pred_noise", "--sum-scale", "0.5"))):
        r = cli("restore", img, "--model", one_output_checkpoint, "--backend", "torch", "--device", "cpu",
                "-o", tmp_path / tag, "-q", *extra)
        assert r.returncode == 0, r.stderr
        outs[tag] = cv2.imread(str(tmp_path / tag / "a.png")).astype(int)
    assert np.abs(outs["base"] - outs["noise"]).max() > 2


def test_sampling_options_mean_the_same_everywhere():
    runner, _ = load_runner(models.onnx_model("step"), steps=3, eta=0.0)
    assert runner.meta.steps == 3 and EngineSampler(runner).plan().steps == 3
    with pytest.raises(OptionError, match="steps=5 and eta=0.0 built in"):
        load_runner(models.onnx_model("fused"), steps=3)
    with pytest.raises(OptionError, match="'steps' must be >= 1"):
        load_runner(models.onnx_model("step"), steps=0)
    assert read_artifact_meta(models.onnx_model("step"), steps=2).plan().steps == 2
    # an asked-for step count beats the measured recommendation (the built-in model recommends 2)
    from rddm_infer.api import DEFAULT_MODEL

    stamped, _ = load_runner(DEFAULT_MODEL, steps=5)
    assert EngineSampler(stamped).plan().steps == 5 and read_artifact_meta(DEFAULT_MODEL, steps=5).plan().steps == 5
    meta = read_artifact_meta(DEFAULT_MODEL)
    assert meta.recommended_steps == 2 and meta.plan().steps == 2  # and without --steps, the recommendation


# ------------------------------------------------------------------------------------------ torch

def test_torch_precision_bf16_is_a_real_option():
    from rddm_infer.metrics import psnr

    fp32, _ = load_runner(models.checkpoint(), "torch", device="cpu")
    bf16, _ = load_runner(models.checkpoint(), "torch", device="cpu", precision="bf16")
    assert "fp32" in fp32.description and "bf16" in bf16.description and bf16.meta.precision == "bf16"
    a, b = EngineSampler(fp32)(X, seed=0), EngineSampler(bf16)(X, seed=0)
    assert 0 < np.abs(a - b).max() and psnr((a + 1) / 2, (b + 1) / 2) > 25


def test_torch_without_model_uses_the_builtin_checkpoint():
    from rddm_infer.backends.select import DEFAULT_CHECKPOINT, resolve_model

    if not DEFAULT_CHECKPOINT.is_file():
        pytest.skip(f"no built-in checkpoint at {DEFAULT_CHECKPOINT}")
    assert resolve_model(None, "torch") == DEFAULT_CHECKPOINT
    r = cli("bench", "--backend", "torch", "--device", "cpu", "--size", 16, "--runs", 1, "--warmup", 0,
            "--steps", 1, "--threads", 2, "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["backend"].startswith("torch (cpu, fp32") and res["graph"] == "unet"
    r = cli("bench", "--backend", "onnxruntime", "--size", 16, "--runs", 1, "--warmup", 0, "--steps", 1,
            "--threads", 1, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["graph"] == "step", r.stderr  # built-in ONNX model
    assert json.loads(r.stdout)["backend"] == "onnxruntime (CPUExecutionProvider, 1 thread)"  # stated like the others


# ------------------------------------------------------------------------------------ calibration

@pytest.mark.slow  # over 2 s on 2 cores
def test_calibrate_then_auto_picks_by_measurement(tmp_path, monkeypatch):
    """A real calibration run writes the table; auto then reads it (the timings are then edited so the
    expected pick does not depend on this shared machine's noise)."""
    from rddm_infer.backends.timings import load_table, table_path

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    step = models.onnx_model("step")
    r = cli("bench", step, "--runs", 1, "--size", 16)
    assert r.returncode == 0 and "timed now, first use" in r.stderr, r.stderr  # auto times the exact paths once
    r = cli("bench", step, "--calibrate", "--size", 16, "--threads", 1, "--runs", 1, "--json")
    assert r.returncode == 0, r.stderr
    table = json.loads(r.stdout)
    labels = [(e["backend"], e["options"].get("precision")) for e in table["entries"]]
    assert labels[0] == ("onnxruntime", None) and table["entries"][0]["psnr_db"] == "inf"  # the exact reference
    if BY_NAME["openvino"].available():
        assert ("openvino", "fp32") in labels and ("openvino", "bf16") in labels
    assert all(e["median_ms"] > 0 for e in table["entries"] if not e["error"])
    path = table_path(step)
    assert path.is_file() and load_table(step)[0].size == 16 and table["cpu"] in path.read_text()

    t = load_table(step)[0]
    speed = {("onnxruntime", None): 30.0, ("openvino", "fp32"): 20.0, ("openvino", "bf16"): 10.0}
    for e in t.entries:
        e.median_ms, e.error = speed[(e.backend, e.options.get("precision"))], None
        e.psnr_db = float("inf") if e.backend == "onnxruntime" else 120.0 if not e.reduced else 50.0
    t.entries.append(type(t.entries[0])("torch", {"precision": "bf16"}, 1.0, 20.0))  # fastest, inaccurate
    path.write_text(t.to_json())
    if not BY_NAME["openvino"].available():
        pytest.skip("openvino not installed: only one calibrated backend")
    runner, choice = load_runner(step)
    assert (choice.backend, runner.precision) == ("openvino", "fp32"), choice.reason
    assert "fastest exact path on this CPU" in choice.reason and "--precision auto allows reduced precision" in choice.reason
    runner, choice = load_runner(step, precision="auto")
    assert (choice.backend, runner.precision) == ("openvino", "bf16") and "reduced precision bf16" in choice.reason
    runner, choice = load_runner(step, providers="cpu")  # an onnxruntime option: only onnxruntime entries fit
    assert choice.backend == "onnxruntime"
    r = cli("bench", step, "--precision", "auto", "--runs", 1, "--size", 16)
    assert r.returncode == 0 and "openvino (CPU, bf16" in r.stderr and "--precision auto allows it" in r.stderr


TOY_RUNNER = '''
from rddm_infer.backends.onnxruntime import OnnxRuntimeRunner
from rddm_infer.backends.registry import DEVICE, BackendSpec, Option


class ToyRunner(OnnxRuntimeRunner):
    name = "toy"

    def __init__(self, path, device=None, toy_gain=None):
        super().__init__(path, providers=["CPUExecutionProvider"], device=device)
        self.toy_gain = toy_gain

    @property
    def description(self):
        return f"toy runner (gain {self.toy_gain})"


SPEC = BackendSpec("toy", "a backend added at test time", "", ("numpy",), ("onnx",), "toy_backend:ToyRunner",
                   (DEVICE, Option("toy_gain", float, None, "the toy's own option")))
'''


def _plugin(root, name, module_text, entry):
    """An installed package as importlib.metadata sees one: a module plus a dist-info with an entry point."""
    root.mkdir()
    if module_text:
        (root / f"{name}.py").write_text(module_text)
    info = root / f"{name}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[rddm_infer.backends]\n{entry}\n")
    return {"PYTHONPATH": str(root)}


def test_a_backend_added_at_test_time_is_one_module_and_one_row_with_its_flags_everywhere(tmp_path):
    env = _plugin(tmp_path / "site", "toy_backend", TOY_RUNNER, "toy = toy_backend:SPEC")
    for command in ("restore", "bench"):
        r = cli(command, "--help", env=env)
        assert r.returncode == 0 and "--toy-gain" in r.stdout and "toy: the toy's own option" in r.stdout, command
    assert "--toy-gain" not in cli("restore", "--help").stdout  # nothing leaks without the package
    src = tmp_path / "in"
    src.mkdir()
    cv2.imwrite(str(src / "a.png"), np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8))
    r = cli("restore", src, "-o", tmp_path / "out", "--backend", "toy", "--toy-gain", "2", env=env)
    assert r.returncode == 0, r.stderr
    assert "toy runner (gain 2.0)" in r.stderr and (tmp_path / "out" / "a.png").is_file()
    r = cli("restore", src, "-o", tmp_path / "out2", "--toy-gain", "2", "--backend", "onnxruntime", env=env)
    assert r.returncode == 2 and "does not apply to the onnxruntime backend (it is an option of toy)" in r.stderr
    assert not (tmp_path / "out2").exists()


def test_a_broken_backend_plugin_is_named_and_skipped(tmp_path):
    env = _plugin(tmp_path / "site", "broken_backend", "", "broken = no_such_module:SPEC")
    r = cli("restore", "--help", env=env)
    assert r.returncode == 0 and "--backend" in r.stdout
    assert "backend plugin 'broken' (no_such_module:SPEC) skipped" in r.stderr
