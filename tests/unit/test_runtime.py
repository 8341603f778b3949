"""Runners and the shared sampler loop on real exported graphs (ONNX Runtime CPU) and the torch reference."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import models
from rddm_infer.backends import EngineSampler, Noise, choose_backend, load_runner, read_artifact_meta
from rddm_infer.backends.onnxruntime import OnnxRuntimeRunner, available_providers, resolve_providers
from rddm_infer.errors import BackendUnavailable, CheckpointError, RDDMError
from rddm_infer.diffusion.schedule import DiffusionConfig, SamplingPlan

X = np.random.default_rng(1).uniform(-1, 1, (2, 3, 16, 24)).astype(np.float32)


def test_runtime_never_imports_torch():
    code = ("import sys, rddm_infer, rddm_infer.cli, rddm_infer.restore.local, rddm_infer.backends.onnxruntime, "
            "rddm_infer.backends.tensorrt, rddm_infer.backends.openvino, rddm_infer.backends.registry, "
            "rddm_infer.diffusion.graph_kinds, rddm_infer.backends.timings, rddm_infer.io.images, rddm_infer.restore.tiling, "
            "rddm_infer.metrics, rddm_infer.report, rddm_infer.restore.ray_executor; "
            "rddm_infer.backends.installed_modules(); "
            "assert not {'torch', 'openvino', 'tensorrt', 'ray'} & set(sys.modules), 'torch/openvino/tensorrt/ray was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.fixture(scope="module")
def torch_reference():
    """The loop as the torch reference runs it (TorchRDDM), seed 3."""
    from rddm_infer.model import TorchRDDM

    m = models.loaded_model()
    plan = SamplingPlan.create(m.diffusion, 5, 0.0)
    return TorchRDDM(m.net, m.diffusion).sample_model_space(X, plan, seed=3)


def test_torch_runner_matches_reference_sampler(torch_reference):
    from rddm_infer.backends.torch import TorchRunner

    runner = TorchRunner(models.loaded_model(), device="cpu")
    assert runner.meta.graph == "unet" and runner.meta.size_multiple == 2
    out = EngineSampler(runner)(X, seed=3)
    assert out.shape == X.shape and out.dtype == np.float32
    np.testing.assert_allclose(out, torch_reference, atol=1e-5)


@pytest.mark.parametrize("kind", ["unet", "step", "fused"])
def test_onnxruntime_agrees_with_torch_on_the_same_noise(kind, torch_reference):
    runner = OnnxRuntimeRunner(models.onnx_model(kind), providers="cpu", threads=1)
    assert runner.meta.graph == kind
    sampler = EngineSampler(runner)
    out = sampler(X, seed=3)
    np.testing.assert_allclose(out, torch_reference, atol=2e-4)
    other = sampler(X, seed=4)
    assert np.abs(other - out).max() > 1e-3  # the seed matters: the comparison is not vacuous


def test_fp16_graph_runs_with_float32_io_close_to_fp32():
    runner = OnnxRuntimeRunner(models.onnx_fp16_step(), providers="cpu")
    assert runner.meta.precision == "fp16"
    out = EngineSampler(runner)(X, seed=3)
    assert out.dtype == np.float32
    ref = EngineSampler(OnnxRuntimeRunner(models.onnx_model("step"), providers="cpu"))(X, seed=3)
    np.testing.assert_allclose(out, ref, atol=2e-2)


def test_step_graph_takes_steps_at_run_time_fused_refuses():
    from rddm_infer.backends.torch import TorchRunner

    step = EngineSampler(OnnxRuntimeRunner(models.onnx_model("step"), providers="cpu"))
    ref = EngineSampler(TorchRunner(models.loaded_model(), device="cpu"))
    np.testing.assert_allclose(step(X, steps=2, seed=0), ref(X, steps=2, seed=0), atol=2e-4)
    assert np.abs(step(X, steps=2, seed=0) - step(X, steps=5, seed=0)).max() > 1e-3
    fused = EngineSampler(OnnxRuntimeRunner(models.onnx_model("fused"), providers="cpu"))
    with pytest.raises(RDDMError, match="steps=5 .* built in"):
        fused(X, steps=2)


def test_stochastic_unet_loop_matches_torch_reference():
    """Generation model with η > 0: z per step, drawn in the reference sampler's order."""
    import torch
    from rddm_infer.backends.torch import TorchRunner
    from rddm_infer.model import LoadedModel, TorchRDDM, UNetConfig, UnetRes

    torch.manual_seed(1)
    cfg = UNetConfig(dim=8, dim_mults=(1, 2), heads=1, dim_head=8, condition=False)
    diff = DiffusionConfig(condition=False, sum_scale=1.0)
    m = LoadedModel(UnetRes(cfg).eval(), cfg, diff, "gen")
    zeros = np.zeros((1, 3, 8, 8), np.float32)
    plan = SamplingPlan.create(diff, 4, 0.7)
    assert plan.stochastic
    ref = TorchRDDM(m.net, diff).sample_model_space(zeros, plan, seed=5)
    out = EngineSampler(TorchRunner(m, device="cpu"))(zeros, steps=4, eta=0.7, seed=5)
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_noise_draw_order_and_cropping():
    plan = SamplingPlan.create(DiffusionConfig(condition=False), 3, 1.0)
    n = Noise.draw(plan, (1, 2, 4, 4), seed=9)
    rng = np.random.default_rng(9)
    np.testing.assert_array_equal(n.eps, rng.standard_normal((1, 2, 4, 4), dtype=np.float32))
    assert [z is None for z in n.steps] == [False, False, True]  # the last step adds no noise
    np.testing.assert_array_equal(n.steps[0], rng.standard_normal((1, 2, 4, 4), dtype=np.float32))
    c = n.crop((slice(None), slice(None), slice(1, 3), slice(0, 2)))
    np.testing.assert_array_equal(c.eps, n.eps[:, :, 1:3, 0:2])
    s = Noise.stack([c, c])
    assert s.eps.shape == (2, 1, 2, 2, 2) and s.steps[2] is None


def test_runner_lifecycle_and_metadata():
    path = models.onnx_model("step")
    meta = read_artifact_meta(path)
    assert meta.graph == "step" and meta.steps == 5 and meta.size_multiple == 2
    with OnnxRuntimeRunner(path, providers="cpu", threads=1) as r:
        assert r.active
        assert r.session.get_session_options().intra_op_num_threads == 1
    assert not r.active


def test_bad_model_files_are_one_line_errors(tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(CheckpointError, match="junk.onnx: not a loadable ONNX model"):
        OnnxRuntimeRunner(junk)
    import onnx
    from onnx import helper, TensorProto

    g = helper.make_graph([helper.make_node("Identity", ["a"], ["b"])], "g",
                          [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("b", TensorProto.FLOAT, [1])])
    plain = tmp_path / "plain.onnx"
    onnx.save(helper.make_model(g), plain)
    with pytest.raises(CheckpointError, match="no 'rddm' metadata"):
        OnnxRuntimeRunner(plain)
    with pytest.raises(CheckpointError, match="no such model file"):
        OnnxRuntimeRunner(tmp_path / "missing.onnx")


# ------------------------------------------------------------------------------ backend choice

ALL = {"tensorrt", "cuda.bindings", "torch", "onnxruntime", "openvino"}


def test_auto_picks_tensorrt_for_engines_and_explains(tmp_path):
    eng = tmp_path / "m.engine"
    eng.write_bytes(b"x")
    c = choose_backend(eng, "auto", modules=ALL, providers=["CPUExecutionProvider"])
    assert c.backend == "tensorrt" and "TensorRT" in c.reason
    with pytest.raises(BackendUnavailable, match="tensorrt and cuda-python"):
        choose_backend(eng, "auto", modules={"onnxruntime"}, providers=[])


def test_auto_prefers_a_tensorrt_engine_beside_the_onnx_model(tmp_path):
    onnx_path = tmp_path / "m.onnx"
    onnx_path.write_bytes(b"x")
    c = choose_backend(onnx_path, "auto", modules=ALL, providers=["CPUExecutionProvider"])
    assert c.backend == "onnxruntime"
    (tmp_path / "m.engine").write_bytes(b"x")
    c = choose_backend(onnx_path, "auto", modules=ALL, providers=["CPUExecutionProvider"])
    assert c.backend == "tensorrt" and c.model.name == "m.engine" and "m.engine" in c.reason
    c = choose_backend(onnx_path, "auto", modules={"onnxruntime"}, providers=["CPUExecutionProvider"])
    assert c.backend == "onnxruntime"  # engine present but no TensorRT here


def test_auto_names_the_fastest_onnxruntime_provider(tmp_path):
    p = tmp_path / "m.onnx"
    gpu = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert "TensorrtExecutionProvider" in choose_backend(p, modules=ALL, providers=gpu).reason
    assert "CUDAExecutionProvider" in choose_backend(p, modules=ALL, providers=gpu[1:]).reason
    assert "CPUExecutionProvider" in choose_backend(p, modules=ALL, providers=gpu[2:]).reason
    assert resolve_providers(None, gpu[1:]) == gpu[1:]
    assert resolve_providers("cuda", gpu) == ["CUDAExecutionProvider", "CPUExecutionProvider"]


def test_explicit_backend_mismatches_are_clear(tmp_path):
    p = tmp_path / "m.onnx"
    with pytest.raises(CheckpointError, match="torch backend loads checkpoints"):
        choose_backend(p, "torch", modules=ALL, providers=[])
    with pytest.raises(CheckpointError, match="rddm-export CHECKPOINT --tensorrt"):
        choose_backend(p, "tensorrt", modules=ALL, providers=[])
    with pytest.raises(CheckpointError, match="unknown model type"):
        choose_backend(tmp_path / "m.bin", modules=ALL, providers=[])
    with pytest.raises(BackendUnavailable, match="unknown backend 'nonsense'; choose one of auto, tensorrt"):
        choose_backend(p, "nonsense", modules=ALL, providers=[])
    assert choose_backend(tmp_path / "m.safetensors", modules=ALL, providers=[]).backend == "torch"
    with pytest.raises(BackendUnavailable, match="onnxruntime-gpu"):
        resolve_providers("cuda", ["CPUExecutionProvider"])


def test_engine_files_without_tensorrt(tmp_path):
    from rddm_infer.backends.engine_file import BuildTarget, write_engine

    meta = read_artifact_meta(models.onnx_model("step"))
    eng = write_engine(tmp_path / "m.engine", meta, b"plan-bytes", BuildTarget("10.9.0", (9, 0), "H100"))
    got = read_artifact_meta(eng)
    assert got.graph == "step" and got.extra["tensorrt"]["compute_capability"] == [9, 0]
    if _trt_missing():
        with pytest.raises(BackendUnavailable, match="tensorrt"):
            load_runner(eng, "auto")


def test_load_runner_torch_checkpoint():
    runner, choice = load_runner(models.checkpoint(), "auto", device="cpu", threads=2)  # torch.set_num_threads
    assert choice.backend == "torch" and runner.meta.graph == "unet"
    np.testing.assert_allclose(EngineSampler(runner)(X[:1], seed=0),
                               EngineSampler(OnnxRuntimeRunner(models.onnx_model("step")))(X[:1], seed=0), atol=2e-4)


# ----------------------------------------------------------------------------------------- GPU

needs_cuda_ep = pytest.mark.skipif("CUDAExecutionProvider" not in available_providers(),
                                   reason="onnxruntime CUDAExecutionProvider not available (needs onnxruntime-gpu "
                                          "and an NVIDIA GPU)")


@needs_cuda_ep
def test_onnxruntime_cuda_io_binding_keeps_state_on_device(torch_reference):
    runner = OnnxRuntimeRunner(models.onnx_model("step"), providers="cuda")
    assert runner.on_gpu
    h = runner.upload(X)
    assert h.device_name() == "cuda"
    out = EngineSampler(runner)(X, seed=3)
    np.testing.assert_allclose(out, torch_reference, atol=1e-3)


def _trt_missing() -> str:
    try:
        import tensorrt  # noqa: F401
        from cuda.bindings import runtime as cudart
    except ImportError as e:
        return f"TensorRT / cuda-python not installed ({e})"
    err, n = cudart.cudaGetDeviceCount()
    return "" if int(err) == 0 and n > 0 else "no CUDA GPU visible"


def _build_engine(onnx_path: Path, out: Path) -> Path:
    """A step-graph engine with a dynamic-shape profile, via the TensorRT API and our header."""
    import tensorrt as trt
    from cuda.bindings import runtime as cudart
    from rddm_infer.backends.engine_file import BuildTarget, write_engine

    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(onnx_path.read_bytes()), [str(parser.get_error(i)) for i in range(parser.num_errors)]
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    for name in ("x_t", "x_input", "noise"):
        profile.set_shape(name, (1, 3, 8, 8), (2, 3, 16, 24), (2, 3, 32, 32))
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    _, props = cudart.cudaGetDeviceProperties(0)
    return write_engine(out, read_artifact_meta(onnx_path), bytes(plan),
                        BuildTarget(trt.__version__, (props.major, props.minor)))


@pytest.mark.skipif(bool(_trt_missing()), reason=_trt_missing() or "ok")
def test_tensorrt_engine_with_cuda_graph_matches_torch(tmp_path, torch_reference):
    from rddm_infer.backends.tensorrt import TensorRTRunner

    eng = _build_engine(models.onnx_model("step"), tmp_path / "tiny.engine")
    with TensorRTRunner(eng, cuda_graph=True) as r:
        sampler = EngineSampler(r)
        first = sampler(X, seed=3)  # runs, then captures the K-step chain
        again = sampler(X, seed=3)  # replays the CUDA graph
        other = sampler(X, seed=4)  # same graph, new inputs
        assert len(r._graphs) == 1
    np.testing.assert_allclose(first, torch_reference, atol=1e-3)
    np.testing.assert_array_equal(first, again)
    assert np.abs(other - first).max() > 1e-3
    with TensorRTRunner(eng, cuda_graph=False) as r:
        np.testing.assert_allclose(EngineSampler(r)(X, seed=3), first, atol=1e-5)
