"""The OpenVINO backend on the tiny exported graphs, against ONNX Runtime on the same inputs and noise."""

import numpy as np
import pytest

from helpers import models
from rddm_infer.backends import EngineSampler, Noise, load_runner
from rddm_infer.errors import BackendUnavailable, CheckpointError, OptionError
from rddm_infer.metrics import psnr

pytest.importorskip("openvino", reason="OpenVINO not installed (pip install 'rddm-infer[openvino]')")
from rddm_infer.backends.openvino import OpenVINORunner  # noqa: E402

X = np.random.default_rng(7).uniform(-1, 1, (2, 3, 16, 24)).astype(np.float32)


def _pair(path, tmp_path, **ov):
    """(ONNX Runtime output, OpenVINO output, OpenVINO runner) for the same input and noise."""
    ort_sampler = EngineSampler(load_runner(path, "onnxruntime", threads=1)[0])
    runner = OpenVINORunner(path, threads=1, cache_dir=tmp_path / "ov", **ov)
    plan = ort_sampler.plan()
    noise = Noise.draw(plan, X.shape, 3)
    return ort_sampler.run(X, plan, noise), EngineSampler(runner).run(X, plan, noise), runner


@pytest.mark.parametrize("kind", ["unet", "step", "fused"])
@pytest.mark.slow  # over 2 s on 2 cores
def test_fp32_matches_onnxruntime(kind, tmp_path):
    a, b, runner = _pair(models.onnx_model(kind), tmp_path, precision="fp32")
    assert runner.compiled_precision == "fp32" and "fp32 exact" in runner.description
    np.testing.assert_allclose(b, a, atol=1e-5)
    assert np.abs(a).max() > 0.1  # a real image, not zeros


@pytest.mark.slow  # over 2 s on 2 cores
def test_norm_rewrites_and_static_shapes_keep_the_math(tmp_path, monkeypatch):
    """Each channel LayerNorm becomes one MVN over the channel axis and each GroupNorm reshape-free ops;
    static and dynamic compiles agree with ONNX Runtime."""
    import onnx

    import rddm_infer.backends.openvino as ov_backend

    path = models.onnx_model("step")
    ops = [n.op_type for n in onnx.load(path).graph.node]
    a, b, runner = _pair(path, tmp_path, precision="fp32")
    assert runner.rewrites == {"channel_layernorm": ops.count("LayerNormalization"),
                               "group_norm": ops.count("InstanceNormalization")}  # torch's GroupNorm export
    assert min(runner.rewrites.values()) > 0
    _, c, dynamic = _pair(path, tmp_path, precision="fp32", static_shapes=False)
    _, d, plain = _pair(path, tmp_path, precision="fp32", rewrite_norms=False)  # the escape hatch: as exported
    assert plain.rewrites == {} and plain.description.endswith(", norms as exported)")
    np.testing.assert_allclose(d, a, atol=1e-5)
    assert list(runner._compiled) == [tuple(x.shape for x in (X, X, np.zeros(8), X))] and list(dynamic._compiled) == [None]
    np.testing.assert_allclose(b, a, atol=1e-5)
    np.testing.assert_allclose(c, a, atol=1e-5)
    other = X[:1, :, :8, :16]  # another size compiles another static model
    EngineSampler(runner)(other)
    assert len(runner._compiled) == 2
    monkeypatch.setattr(ov_backend, "MAX_STATIC_SIZES", 2)  # past the cap: one shared dynamic model
    c2 = EngineSampler(runner)(X[:1])
    assert list(runner._compiled)[2:] == [None]
    np.testing.assert_allclose(c2, EngineSampler(dynamic)(X[:1]), atol=1e-5)


@pytest.mark.parametrize("groups", [1, 4, 8])
def test_group_norm_rewrite_matches_torch(groups, tmp_path):
    """Any group count (one group, several channels per group, one channel per group), a batch of two, and
    an input whose mean is far from zero (where a one-pass variance would lose digits)."""
    import openvino as ov
    import torch

    from rddm_infer.backends.openvino_rewrites import rewrite

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.GroupNorm(groups, 8), torch.nn.SiLU())
    torch.nn.init.uniform_(net[1].weight, 0.5, 1.5), torch.nn.init.uniform_(net[1].bias, -0.5, 0.5)
    x = torch.from_numpy(X) * 3 + 20
    torch.onnx.export(net, (x,), tmp_path / "gn.onnx", input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}}, dynamo=False)
    model = ov.Core().read_model(tmp_path / "gn.onnx")
    assert rewrite(model) == {"channel_layernorm": 0, "group_norm": 1}
    assert "MVN" not in {op.get_type_name() for op in model.get_ordered_ops()}  # the old subgraph is gone
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": 1})
    with torch.no_grad():
        want = net(x).numpy()
    np.testing.assert_allclose(compiled({"x": x.numpy()})[0], want, atol=2e-5, rtol=1e-5)


@pytest.mark.slow  # over 2 s on 2 cores
def test_fp16_and_int8_graphs_run(tmp_path):
    from rddm_export.int8 import quantize_int8, synthetic_calibration

    a, b, runner = _pair(models.onnx_fp16_step(), tmp_path, precision="fp32")
    assert runner.meta.precision == "fp16" and "fp16 graph" in runner.description
    np.testing.assert_allclose(b, a, atol=2e-2)
    int8 = quantize_int8(models.onnx_model("step"), tmp_path / "step_int8.onnx",
                         synthetic_calibration((1, 3, 32, 32), count=1))
    a, b, runner = _pair(int8, tmp_path, precision="fp32")
    assert runner.meta.precision == "int8" and "int8 graph" in runner.description
    assert psnr((a + 1) / 2, (b + 1) / 2) > 30


def test_bf16_is_stated_and_close(tmp_path):
    try:
        a, b, runner = _pair(models.onnx_model("step"), tmp_path, precision="bf16")
    except BackendUnavailable as e:  # a CPU without AMX / avx512_bf16 refuses, by name, instead of falling back
        assert "bf16 was asked for" in str(e)
        pytest.skip(str(e))
    assert runner.compiled_precision == "bf16" and "bf16" in runner.description
    assert 30 < psnr((a + 1) / 2, (b + 1) / 2) < np.inf  # reduced precision: close, not identical


def test_compiled_model_is_cached_and_options_checked(tmp_path):
    cache = tmp_path / "cache"
    r, choice = load_runner(models.onnx_model("step"), "openvino", threads=1, cache_dir=str(cache))
    assert choice.backend == "openvino" and r.description == ("openvino (CPU, fp32 exact, 1 thread, "
                                                                  "compiled once per input size (up to 8))")
    EngineSampler(r)(X)  # static shapes: the first call of a size compiles it
    assert any(cache.iterdir()), "no compiled blob in the cache folder"
    with pytest.raises(OptionError, match="--device cuda: the openvino backend runs on cpu"):
        load_runner(models.onnx_model("step"), "openvino", device="cuda")
    with pytest.raises(BackendUnavailable, match="--device cuda: the openvino backend runs on the CPU"):
        OpenVINORunner(models.onnx_model("step"), device="cuda")
    with pytest.raises(CheckpointError, match="the openvino backend runs ONNX models"):
        load_runner(models.checkpoint(), "openvino")
    with pytest.raises(CheckpointError, match="no 'rddm' metadata"):
        import onnx
        from onnx import TensorProto, helper

        g = helper.make_graph([helper.make_node("Identity", ["a"], ["b"])], "g",
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("b", TensorProto.FLOAT, [1])])
        onnx.save(helper.make_model(g), tmp_path / "plain.onnx")
        OpenVINORunner(tmp_path / "plain.onnx", cache_dir="")


@pytest.mark.slow  # over 2 s on 2 cores
def test_cli_restore_with_openvino_matches_onnxruntime(tmp_path):
    import cv2

    from helpers.cli import cli

    img = tmp_path / "a.png"
    cv2.imwrite(str(img), np.random.default_rng(0).integers(0, 256, (16, 20, 3), dtype=np.uint8))
    step = models.onnx_model("step")
    r1 = cli("restore", img, "-o", tmp_path / "ort", "--model", step, "-q")
    r2 = cli("restore", img, "-o", tmp_path / "ov", "--model", step, "--backend", "openvino", "--precision", "fp32",
             "--threads", 1)
    assert r1.returncode == r2.returncode == 0, r1.stderr + r2.stderr
    assert "openvino (CPU, fp32 exact" in r2.stderr
    a = cv2.imread(str(tmp_path / "ort" / "a.png")).astype(int)
    b = cv2.imread(str(tmp_path / "ov" / "a.png")).astype(int)
    assert np.abs(a - b).max() <= 1
