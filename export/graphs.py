"""The three exportable graphs (unet / step / fused) as torch modules around a folded ``UnetRes``.

The RDDM update is :func:`rddm_infer.diffusion.sampler.step` itself, traced into the graph: the
``step`` graph takes the coefficient row as an input (so K and η can change at run
time), the ``fused`` graph bakes every row of one :class:`SamplingPlan` in as constants.
I/O names follow the contract in docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import torch
from torch import nn

from rddm_infer.diffusion.graph_kinds import KINDS, time_dims
from rddm_infer.diffusion.sampler import select_time, step
from rddm_infer.diffusion.schedule import COEF_NAMES, DiffusionConfig, SamplingPlan

_SIGMA, _ALPHA_BAR, _BETA_BAR = (COEF_NAMES.index(n) for n in ("sigma", "alpha_bar", "beta_bar"))


def _batch_vector(x: torch.Tensor, value) -> torch.Tensor:
    """``value`` broadcast to shape (B,), written so the batch stays dynamic in the graph."""
    return torch.ones_like(x[:, 0, 0, 0]) * value


def _scaled_time(x: torch.Tensor, alpha_bar, beta_bar, timesteps: int) -> torch.Tensor:
    """(B, 2) [ᾱ_t·T, β̄_t·T], multiplied in float32 inside the graph as the reference does with its buffers."""
    return torch.stack((_batch_vector(x, alpha_bar * timesteps), _batch_vector(x, beta_bar * timesteps)), dim=1)


class _Net(nn.Module):
    """(x_t, x_input, t) -> network outputs, concatenating the condition as the reference does.

    ``concat``: whether the network takes x_input as channels (an img2img translation network does not);
    ``t`` is (B,) or, for a "scaled" time input, (B, 2), routed to the network(s) by ``select_time``."""

    def __init__(self, net: nn.Module, diffusion: DiffusionConfig, concat: bool | None, num_outputs: int):
        super().__init__()
        self.net = net
        self.condition = diffusion.condition if concat is None else concat
        self.num_outputs, self.objective = num_outputs, diffusion.objective
        self.time_dims = time_dims(diffusion.time_input)

    def call(self, x_t, x_input, t):
        x = torch.cat((x_t, x_input), dim=1) if self.condition else x_t
        outs = self.net(x, select_time(t, self.num_outputs, self.objective))
        return outs[0], (outs[1] if len(outs) > 1 else None)


class UNetGraph(_Net):
    """``unet``: (x_t, x_input, t) -> out0[, out1]."""

    input_names = KINDS["unet"].inputs

    def __init__(self, net, diffusion: DiffusionConfig, num_outputs: int, concat: bool | None = None):
        super().__init__(net, diffusion, concat, num_outputs)
        self.output_names = KINDS["unet"].output_names(num_outputs)

    def forward(self, x_t, x_input, t):
        out0, out1 = self.call(x_t, x_input, t)
        return (out0,) if out1 is None else (out0, out1)


class StepGraph(_Net):
    """``step``: (x_t, x_input, coef (8,), noise) -> (x_next, x0); one network call plus the update."""

    input_names = KINDS["step"].inputs
    output_names = KINDS["step"].outputs

    def __init__(self, net, diffusion: DiffusionConfig, num_outputs: int = 2, concat: bool | None = None):
        super().__init__(net, diffusion, concat, num_outputs)
        self.diffusion = diffusion

    def forward(self, x_t, x_input, coef, noise):
        d = self.diffusion
        t = _batch_vector(x_t, coef[0]) if d.time_input == "index" else \
            _scaled_time(x_t, coef[_ALPHA_BAR], coef[_BETA_BAR], d.timesteps)
        out0, out1 = self.call(x_t, x_input, t)
        return step(self.diffusion.objective, out0, out1, x_t, x_input, coef, noise)


class FusedGraph(_Net):
    """``fused``: (x_input, noise[, step_noise]) -> x0, all K steps of one plan unrolled."""

    output_names = KINDS["fused"].outputs

    def __init__(self, net, plan: SamplingPlan, num_outputs: int = 2, concat: bool | None = None):
        super().__init__(net, plan.config, concat, num_outputs)
        self.plan = plan
        self.input_names = KINDS["fused"].input_names(plan.stochastic)

    def forward(self, x_input, noise, step_noise=None):
        plan = self.plan
        x = (x_input if plan.config.condition else 0.0) + plan.init_scale() * noise
        for i in range(plan.steps):
            coef = plan.coefs[i]
            t = plan.net_time(i)  # constants: the index, or the float32 pair (ᾱ_t·T, β̄_t·T)
            t = _batch_vector(x_input, float(t)) if not isinstance(t, tuple) else \
                torch.stack([_batch_vector(x_input, v) for v in t], dim=1)
            out0, out1 = self.call(x, x_input, t)
            z = step_noise[i] if (step_noise is not None and coef[_SIGMA] > 0) else None
            x, _ = step(plan.config.objective, out0, out1, x, x_input, coef, z)
        return x


def build_graph(net: nn.Module, diffusion: DiffusionConfig, kind: str, num_outputs: int, steps: int = 5,
                eta: float = 0.0, concat: bool | None = None) -> nn.Module:
    """The wrapper module for one graph kind (``concat``: the network takes x_input as channels;
    default ``diffusion.condition``)."""
    if kind == "unet":
        return UNetGraph(net, diffusion, num_outputs, concat).eval()
    if kind == "step":
        return StepGraph(net, diffusion, num_outputs, concat).eval()
    if kind == "fused":
        return FusedGraph(net, SamplingPlan.create(diffusion, steps, eta), num_outputs, concat).eval()
    raise ValueError(f"unknown graph kind {kind!r}; expected unet, step or fused")


def example_inputs(graph: nn.Module, shape: tuple[int, int, int, int], steps: int = 5, seed: int = 0):
    """Random inputs of the right names/shapes for ``graph`` (used for tracing and validation)."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    b = shape[0]
    if isinstance(graph, UNetGraph):
        return rnd(*shape), rnd(*shape).clamp(-1, 1), torch.rand(b, *graph.time_dims, generator=g) * 999
    if isinstance(graph, StepGraph):
        plan = SamplingPlan.create(graph.diffusion, steps)
        return rnd(*shape), rnd(*shape).clamp(-1, 1), torch.tensor(plan.coefs[0], dtype=torch.float32), rnd(*shape)
    fused = [rnd(*shape).clamp(-1, 1), rnd(*shape)]
    if graph.plan.stochastic:
        fused.append(rnd(graph.plan.steps, *shape))
    return tuple(fused)

