"""The torch runner's speed levers (channels_last, folded WS, SDPA, CUDA graphs, pinned copies, torch.compile,
bf16 / fp16): each gives the reference's pixels within float tolerance, is stated in the backend line, can be
switched off, and is refused where the device cannot run it. The CUDA tests run on a GPU only (benchmarks/
gpu_check.sh runs this file there)."""

import json

import numpy as np
import pytest
import torch

from helpers import models
from helpers.cli import cli
from helpers.models import tiny_loaded_model
from rddm_infer.backends import EngineSampler, Noise, load_runner
from rddm_infer.backends.registry import cli_options
from rddm_infer.backends.torch import (BASELINE, CUDA_ONLY, LEVERS, MAX_GRAPHS, TorchRunner, _StepsGraph,
                                       bench_levers, lever_variants)
from rddm_infer.diffusion.sampler import initial_state
from rddm_infer.errors import CheckpointError, OptionError
from rddm_infer.metrics import psnr
from rddm_infer.model.unet import Attention, WeightStandardizedConv2d

X = np.random.default_rng(5).uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)
OFF = {n: False for n in LEVERS}
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (torch.cuda.is_available() is False)")


def _restore(runner, x=X, steps=2, seed=3, eta=None):
    return EngineSampler(runner)(x, steps=steps, eta=eta, seed=seed)


def _state(net):
    """What the levers would change in a caller's network: weights, their memory format, WS and SDPA flags."""
    convs = [m for m in net.modules() if isinstance(m, WeightStandardizedConv2d)]
    return ([m.weight.detach().clone() for m in convs], [m.standardize for m in convs],
            [m.weight.is_contiguous() for m in convs], [m.sdpa for m in net.modules() if isinstance(m, Attention)])


def _same_state(a, b):
    return all(torch.equal(x, y) for x, y in zip(a[0], b[0])) and a[1:] == b[1:]


# ------------------------------------------------------------------------------------------------ CPU

def test_cpu_default_is_the_reference_math_with_every_lever_stated_off():
    runner = TorchRunner(tiny_loaded_model(), device="cpu")
    assert runner.levers == OFF and runner.precision == "fp32"
    d = runner.description
    assert d.startswith("torch (cpu, fp32; ") and "not compiled" in d
    for name, label in LEVERS.items():
        assert f"{label} off" + (" (cpu)" if name in CUDA_ONLY else "") in d, (label, d)
    assert "torch.compile" in TorchRunner(tiny_loaded_model(), device="cpu", compile=True).description


@pytest.mark.parametrize("levers", [("channels_last",), ("fold_ws",), ("sdpa",), ("channels_last", "fold_ws", "sdpa")])
def test_cpu_levers_give_the_reference_pixels_and_leave_the_callers_model_alone(levers):
    m = tiny_loaded_model()
    before = _state(m.net)
    ref = _restore(TorchRunner(m, device="cpu"))
    runner = TorchRunner(m, device="cpu", **{n: True for n in levers})
    out = _restore(runner)
    assert out.dtype == np.float32 and out.flags.c_contiguous and out.shape == X.shape
    np.testing.assert_allclose(out, ref, atol=2e-5)
    assert _same_state(_state(m.net), before)  # the levers worked on a copy
    net = runner._rddm.net
    convs = [c for c in net.modules() if isinstance(c, WeightStandardizedConv2d)]
    attn = [a for a in net.modules() if isinstance(a, Attention)]
    assert convs and attn  # the tiny model has both, so each lever below is really exercised
    assert all(not c.standardize for c in convs) == ("fold_ws" in levers)
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs) == ("channels_last" in levers)
    assert all(a.sdpa for a in attn) == ("sdpa" in levers)
    for name in levers:
        assert f"{LEVERS[name]} off" not in runner.description and LEVERS[name] in runner.description


@pytest.mark.slow  # a CLI subprocess: over 2 s on 2 cores
def test_levers_are_registry_options_and_command_line_flags():
    flags = {o.name: owners for o, owners in cli_options("backend")}
    for name in LEVERS:
        assert "torch" in flags[name], name
    assert set(flags["cuda_graph"]) == {"tensorrt", "torch"}  # one --cuda-graph/--no-cuda-graph for both rows
    runner, _ = load_runner(models.checkpoint(), "torch", device="cpu", channels_last=True, fold_ws=True, sdpa=True,
                            cuda_graph=False, pinned_memory=False)
    assert runner.levers == {**OFF, "channels_last": True, "fold_ws": True, "sdpa": True}
    r = cli("bench", models.checkpoint(), "--backend", "torch", "--device", "cpu", "--cuda-graph", "--size", 16)
    assert r.returncode == 2 and "--cuda-graph" in r.stderr and "CPU" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr  # one line, no traceback


def test_cuda_only_levers_and_fp16_are_refused_on_the_cpu_not_ignored():
    m = tiny_loaded_model()
    for name in CUDA_ONLY:
        with pytest.raises(OptionError, match=f"--{name.replace('_', '-')}: .* CPU"):
            TorchRunner(m, device="cpu", **{name: True})
        TorchRunner(m, device="cpu", **{name: False})  # switching it off is always fine
    with pytest.raises(OptionError, match="fp16 runs on CUDA only"):
        TorchRunner(m, device="cpu", precision="fp16")
    with pytest.raises(OptionError, match="must be one of fp32, bf16, fp16"):
        TorchRunner(m, device="cpu", precision="int8")


@pytest.mark.parametrize("model", ["restoration", "generation", "scaled-time"])
def test_the_captured_loop_is_the_drivers_loop(model):
    """The loop a CUDA graph records (static buffers, time tensors made once, z of each stochastic step), run
    eagerly here on the CPU, gives the step-by-step driver's very pixels (same coefficients, same noise)."""
    if model == "generation":
        m, x, eta = tiny_loaded_model(condition=False, sum_scale=1.0), np.zeros_like(X), 0.7
    else:
        m, x, eta = (tiny_loaded_model(share_encoder=0, time_input="scaled") if model == "scaled-time"
                     else tiny_loaded_model()), X, None
    runner = TorchRunner(m, device="cpu")
    sampler = EngineSampler(runner)
    plan = sampler.plan(2, eta)
    assert plan.stochastic == (model == "generation")
    noise = Noise.draw(plan, x.shape, seed=4)
    ref = sampler.run(x, plan, noise)
    graph = _StepsGraph(runner, x.shape, plan)
    assert len(graph.noisy) == (1 if model == "generation" else 0)  # the last step adds no noise
    graph.fill(x, initial_state(plan, x, noise=noise.eps), noise.steps)
    with torch.no_grad():
        out = graph._loop().numpy()
    np.testing.assert_array_equal(out, ref)


def test_lever_variants_time_each_lever_against_eager_fp32(tmp_path):
    from rddm_infer.backends.timings import json_safe, time_variants

    cuda = lever_variants("cuda", compile=True)
    assert cuda[0] == (BASELINE, {**OFF, "compile": False, "precision": "fp32"})
    assert {label for label, _ in cuda} >= {f"fp32 + {label}" for label in LEVERS.values()}
    assert [o["precision"] for _, o in cuda[-4:]] == ["fp32", "bf16", "fp16", "bf16"] and cuda[-1][1]["compile"]
    cpu = lever_variants("cpu")
    assert not any(o[n] for _, o in cpu for n in CUDA_ONLY) and "fp16" not in {o["precision"] for _, o in cpu}
    lines = []
    rows = bench_levers(models.checkpoint(), 16, 1, runs=1, warmup=0, log=lines.append, device="cpu", steps=1,
                        threads=None, compile=None)  # as `rddm-infer bench --levers --device cpu --steps 1` calls it
    assert [r["variant"] for r in rows] == [label for label, _ in cpu] and not any(r["error"] for r in rows)
    assert len(lines) == len(rows) and lines[0].startswith(f"{BASELINE}: median ") and rows[0]["steps"] == 1
    assert rows[0]["speedup"] == 1 and rows[0]["psnr_db"] == float("inf")
    assert "channels_last off" in rows[0]["backend"] and "channels_last off" not in rows[1]["backend"]
    for r in rows[1:]:
        assert r["psnr_db"] > (30 if r["options"]["precision"] == "bf16" else 90), r
    m = tiny_loaded_model()
    make = lambda o: TorchRunner(m, device="cpu", **o)  # noqa: E731
    bad = time_variants(make, [("fp16", {"precision": "fp16"})], 16, 1, 1)
    assert "fp16 runs on CUDA only" in bad[0]["error"]  # a lever that cannot run here is a row, not the end
    ref = {}  # a later call (gpu_torch's compile job) is against the baseline of an earlier one
    first = time_variants(make, cpu[:1], 16, 1, 1, 0, 1, baseline=ref)
    later = time_variants(make, [c for c in cpu if c[0] == "fp32, every lever"], 16, 1, 1, 0, 1, baseline=ref)
    assert "out" in ref and first[0]["psnr_db"] == float("inf") and 90 < later[0]["psnr_db"] < float("inf")
    with pytest.raises(OptionError, match="--levers sets --sdpa, --precision itself"):
        bench_levers(models.checkpoint(), 16, sdpa=True, precision="bf16")
    (tmp_path / "m.onnx").write_bytes(b"onnx")
    with pytest.raises(CheckpointError, match="the torch backend loads checkpoints"):
        bench_levers(tmp_path / "m.onnx", 16)  # one error, not a row of failures
    with pytest.raises(OptionError, match="'providers' does not apply to the torch backend"):
        bench_levers(models.checkpoint(), 16, providers="cpu")
    assert json_safe(rows)[0]["psnr_db"] == "inf" and json.loads(json.dumps(json_safe(rows)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason=(
    "torch.compile on the CPU: the tiny model took 120 s to compile on 2 cores (inductor's C++ build), over this "
    "suite's 30 s per test; on a GPU it runs (below)"))
def test_torch_compile_gives_the_same_pixels():
    m = tiny_loaded_model()
    ref = _restore(TorchRunner(m, device="cuda", cuda_graph=False))
    runner = TorchRunner(m, device="cuda", compile=True)
    assert "torch.compile" in runner.description
    eager, graphed = _restore(runner), _restore(runner)  # compiled step by step, then inside the CUDA graph
    assert len(runner._graphs) == 1
    np.testing.assert_allclose(eager, ref, atol=1e-3)
    np.testing.assert_allclose(graphed, ref, atol=1e-3)


# ------------------------------------------------------------------------------------------------ CUDA

def _graph(runner):
    (g,) = runner._graphs.values()
    return g


@needs_cuda
def test_cuda_defaults_turn_every_lever_on_and_say_so():
    runner = TorchRunner(tiny_loaded_model(), device="cuda")
    assert runner.levers == {n: True for n in LEVERS} and runner.precision == "fp32"
    assert runner.description.startswith("torch (cuda, fp32") and " off" not in runner.description
    eager = TorchRunner(tiny_loaded_model(), device="cuda", **OFF)
    assert all(f"{label} off" in eager.description for label in LEVERS.values())


@needs_cuda
def test_cuda_graph_captures_all_steps_at_a_shapes_second_batch_and_replays_the_eager_pixels():
    m = tiny_loaded_model()
    graphed = TorchRunner(m, device="cuda")  # every lever, CUDA graph included
    eager = _restore(graphed)  # a shape's first batch runs step by step (a one-off shape costs no capture)
    assert len(graphed._graphs) == 0
    first = _restore(graphed)  # its second: warm-up, capture, replay
    assert _graph(graphed).graph is not None
    np.testing.assert_allclose(first, eager, atol=1e-4)  # the graph holds the driver's loop: same pixels
    again, other = _restore(graphed), _restore(graphed, seed=4)  # replays with new inputs, no new capture
    assert len(graphed._graphs) == 1
    np.testing.assert_allclose(again, first, atol=1e-6)  # the same graph, the same inputs
    assert np.abs(other - first).max() > 1e-3  # new noise reached the static buffers
    cpu = _restore(TorchRunner(m, device="cpu"))
    assert psnr((first + 1) / 2, (cpu + 1) / 2) > 45  # TF32 convolutions on the GPU, fp32 on the CPU
    for _ in range(2):
        _restore(graphed, x=X[:1])  # another batch size: another graph
    assert len(graphed._graphs) == 2


@needs_cuda
def test_cuda_graph_stochastic_steps_use_the_drivers_noise():
    m = tiny_loaded_model(condition=False, sum_scale=1.0)
    zeros = np.zeros_like(X)
    graphed, eager = TorchRunner(m, device="cuda"), TorchRunner(m, device="cuda", cuda_graph=False)
    _restore(graphed, x=zeros, eta=0.7)
    a, b = _restore(graphed, x=zeros, eta=0.7), _restore(eager, x=zeros, eta=0.7)
    assert _graph(graphed).noisy == [0]  # step 0 draws z, the last step none
    np.testing.assert_allclose(a, b, atol=1e-4)


@needs_cuda
def test_cuda_graphs_are_kept_per_shape_up_to_a_bound():
    runner = TorchRunner(tiny_loaded_model(), device="cuda", channels_last=False, sdpa=False)
    for i in range(MAX_GRAPHS + 2):
        for _ in range(2):  # captured at the second batch of a shape
            _restore(runner, x=np.zeros((1, 3, 16, 16 + 2 * i), np.float32), steps=1)
    assert len(runner._graphs) == MAX_GRAPHS
    assert list(runner._graphs)[-1][0] == (1, 3, 16, 16 + 2 * (MAX_GRAPHS + 1))  # the newest kept, the oldest gone
    runner.deactivate()
    assert not runner._graphs  # their memory goes with the runner's deactivation


@needs_cuda
def test_pinned_memory_copies_round_trip_exactly():
    pinned = TorchRunner(tiny_loaded_model(), device="cuda", cuda_graph=False)
    plain = TorchRunner(tiny_loaded_model(), device="cuda", cuda_graph=False, pinned_memory=False)
    for r in (pinned, plain):
        h = r.upload(X)
        assert h.is_cuda
        np.testing.assert_array_equal(r.download(h), X)
    graphed = TorchRunner(tiny_loaded_model(), device="cuda")
    for _ in range(2):
        _restore(graphed)
    assert _graph(graphed).host.is_pinned() and _graph(graphed).host_out.is_pinned()
    np.testing.assert_allclose(_restore(pinned), _restore(plain), atol=1e-6)


@needs_cuda
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_on_cuda_is_asked_for_stated_and_close(precision):
    m = tiny_loaded_model()
    ref = _restore(TorchRunner(m, device="cuda", cuda_graph=False))
    runner = TorchRunner(m, device="cuda", precision=precision)
    assert f"{precision} autocast" in runner.description and runner.meta.precision == precision
    eager, graphed = _restore(runner), _restore(runner)  # step by step, then the captured graph
    for out in (eager, graphed):
        assert 0 < np.abs(out - ref).max() and psnr((out + 1) / 2, (ref + 1) / 2) > 30
    np.testing.assert_allclose(graphed, eager, atol=1e-2)
