"""ONNX export: every graph kind runs in ONNX Runtime and matches the PyTorch sampler."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from helpers.export import TINY, exported, run_fused_and_torch, tiny_checkpoint, tiny_loaded
from rddm_infer.diffusion.metadata import META_KEY
from rddm_infer.model import TorchRDDM, load_checkpoint
from rddm_infer.diffusion.schedule import SamplingPlan
from rddm_export.artifact import read_metadata
from rddm_export.onnx_export import export_onnx


@pytest.fixture(scope="module")
def tiny():
    return tiny_loaded()


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _images(shape, seed):
    rng = np.random.default_rng(seed)
    return rng.uniform(-1, 1, shape).astype(np.float32), rng.standard_normal(shape, dtype=np.float32)


SHAPES = [(1, 3, 16, 24), (2, 3, 32, 8)]


@pytest.mark.slow  # over 2 s on 2 cores
def test_unet_graph_matches_torch_network(tiny):
    path = exported("unet")
    sess = _session(path)
    assert [i.name for i in sess.get_inputs()] == ["x_t", "x_input", "t"]
    assert [o.name for o in sess.get_outputs()] == ["out0", "out1"]
    for i, shape in enumerate(SHAPES):
        x_in, x_t = _images(shape, i)
        t = np.array([999.0, 199.0][: shape[0]], dtype=np.float32)
        got = sess.run(None, {"x_t": x_t, "x_input": x_in, "t": t})
        with torch.no_grad():
            ref = tiny.net(torch.cat((torch.from_numpy(x_t), torch.from_numpy(x_in)), 1), torch.from_numpy(t).long())
        for g, r in zip(got, ref):
            assert g.shape == shape
            assert np.abs(g - r.numpy()).max() <= 1e-4


def test_step_graph_loop_matches_torch_sampler(tiny):
    path = exported("step")
    sess = _session(path)
    for steps in (5, 3):  # K changes at run time without re-export
        plan = SamplingPlan.create(tiny.diffusion, steps)
        x_in, noise = _images(SHAPES[1], steps)
        ref = TorchRDDM(tiny.net, tiny.diffusion).sample_model_space(x_in, plan, noise=noise)
        x = x_in + plan.init_scale() * noise
        for i in range(plan.steps):
            x, x0 = sess.run(None, {"x_t": x, "x_input": x_in, "coef": plan.coefs[i].astype(np.float32),
                                    "noise": np.zeros_like(x)})
        assert np.abs(x - ref).max() <= 1e-3
        np.testing.assert_array_equal(x, x0)  # last step returns the x0 estimate
        assert np.abs(ref).max() > 0.05  # a non-trivial image


@pytest.mark.slow  # over 2 s on 2 cores
def test_fused_graph_matches_torch_sampler(tiny):
    path = exported("fused", steps=2)
    for i, shape in enumerate(SHAPES):
        got, ref = run_fused_and_torch(path, tiny, 2, shape, seed=10 + i)
        assert got.shape == shape and np.abs(got - ref).max() <= 1e-3
    meta = read_metadata(path)
    assert (meta.graph, meta.steps, meta.precision, meta.size_multiple) == ("fused", 2, "fp32", TINY.size_multiple)


def test_metadata_round_trip(tiny):
    path = exported("unet")
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    meta = read_metadata(path)
    assert meta.graph == "unet" and meta.unet == TINY.to_dict() and meta.diffusion == tiny.diffusion.to_dict()
    assert meta.steps == 5 and meta.channel_order == "RGB" and meta.input_range == (-1.0, 1.0)
    assert meta.size_multiple == 2 and meta.precision == "fp32" and meta.extra["opset"] == 17
    assert '"times": [999, 799, 599, 399, 199]' in props[META_KEY]
    assert meta.source.endswith("tiny.safetensors")


def test_steps_outside_the_schedule_are_refused(tiny, tmp_path):
    with pytest.raises(ValueError, match="steps must be in"):
        export_onnx(tiny, tmp_path / "x.onnx", "fused", steps=0)
    assert not (tmp_path / "x.onnx").exists()


def test_graph_hygiene():
    model = onnx.load(str(exported("step")))
    g = model.graph
    inits = {i.name for i in g.initializer}
    produced_by = {o: n for n in g.node for o in n.output}
    ops = [n.op_type for n in g.node]
    assert "Einsum" not in ops and "MatMul" in ops and "Softmax" in ops
    # export form: channel LayerNorms as LayerNormalization, qkv as three convs (no Split), every softmax
    # over the contiguous last axis (the linear attention's q is normalised after its matmul)
    assert "LayerNormalization" in ops and "ReduceMean" not in ops and "Split" not in ops
    assert all(a.i in (-1, 3) for n in g.node if n.op_type == "Softmax" for a in n.attribute if a.name == "axis")
    # weight standardisation folded: every convolution reads constant weights
    assert all(n.input[1] in inits for n in g.node if n.op_type == "Conv")
    # reshape targets are constants or a tensor's Shape read directly, never Gather/Concat arithmetic
    for n in g.node:
        if n.op_type == "Reshape" and n.input[1] not in inits:
            assert produced_by[n.input[1]].op_type == "Shape", n.name
    assert "Concat" not in {produced_by[i].op_type for n in g.node if n.op_type == "Reshape"
                            for i in n.input[1:] if i in produced_by}
    assert ops.count("Shape") <= 16  # was 85 before the cleanup


@pytest.mark.slow  # over 2 s on 2 cores
def test_generation_model_with_eta_keeps_the_contract(tmp_path):
    from helpers.export import DiffusionConfig, UNetConfig
    from rddm_export.validate import validate_onnx

    cfg = UNetConfig(dim=8, dim_mults=(1, 2), heads=2, dim_head=8, condition=False)
    gen = load_checkpoint(tiny_checkpoint(tmp_path, cfg, DiffusionConfig(condition=False, sum_scale=1.0)))
    step = export_onnx(gen, tmp_path / "step.onnx", "step", steps=2, eta=0.5)
    # x_input is unused by a generation network, but stays an input so every graph has the same interface
    assert [i.name for i in _session(step).get_inputs()] == ["x_t", "x_input", "coef", "noise"]
    fused = export_onnx(gen, tmp_path / "fused.onnx", "fused", steps=2, eta=0.5)
    assert [i.name for i in _session(fused).get_inputs()] == ["x_input", "noise", "step_noise"]
    assert read_metadata(fused).eta == 0.5
    for path in (step, fused):  # stochastic steps: same z in ONNX Runtime and torch
        assert validate_onnx(path, gen).ok


@pytest.mark.parametrize("share_encoder, objective", [(-1, "pred_noise")])
@pytest.mark.slow  # over 2 s on 2 cores
def test_other_architectures_export(tmp_path, share_encoder, objective):
    from helpers.export import DiffusionConfig, UNetConfig
    from rddm_export.validate import validate_onnx

    cfg = UNetConfig(dim=8, dim_mults=(1, 2), heads=2, dim_head=8, share_encoder=share_encoder)
    loaded = load_checkpoint(tiny_checkpoint(tmp_path, cfg, DiffusionConfig(objective=objective)))
    path = export_onnx(loaded, tmp_path / "unet.onnx", "unet")
    assert len(_session(path).get_outputs()) == cfg.num_outputs
    result = validate_onnx(path, loaded)
    assert result.worst("call").value <= 1e-4 and result.worst("image").value <= 1e-3
