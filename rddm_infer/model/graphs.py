"""The export wrapper of each graph kind (unet / step / fused): a torch module around a network ``(x, t) -> outs``.

Each :class:`~rddm_infer.diffusion.graph_kinds.GraphKind` names its wrapper here (``GraphKind.wrapper``) and
builds it with :meth:`~rddm_infer.diffusion.graph_kinds.GraphKind.build`; every wrapper takes the same
``(net, plan, num_outputs, concat)`` and makes its own example inputs (:meth:`KindGraph.example_inputs`), so
the exporter has no per-kind code. The RDDM update is :func:`rddm_infer.diffusion.sampler.reverse_step`
itself, traced into the graph: the ``step`` graph takes the coefficient row as an input (so K and η can
change at run time), the ``fused`` graph bakes every row of its :class:`SamplingPlan` in as constants.
I/O names follow the contract in :mod:`rddm_infer.diffusion.graph_kinds`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..diffusion.graph_kinds import KINDS, time_dims
from ..diffusion.sampler import reverse_step, select_time
from ..diffusion.schedule import COEF_NAMES, SamplingPlan

_SIGMA, _ALPHA_BAR, _BETA_BAR = (COEF_NAMES.index(n) for n in ("sigma", "alpha_bar", "beta_bar"))


def _batch_vector(x: torch.Tensor, value) -> torch.Tensor:
    """``value`` broadcast to shape (B,), written so the batch stays dynamic in the graph."""
    return torch.ones_like(x[:, 0, 0, 0]) * value


def _scaled_time(x: torch.Tensor, alpha_bar, beta_bar, timesteps: int) -> torch.Tensor:
    """(B, 2) [ᾱ_t·T, β̄_t·T], multiplied in float32 inside the graph as the reference does with its buffers."""
    return torch.stack((_batch_vector(x, alpha_bar * timesteps), _batch_vector(x, beta_bar * timesteps)), dim=1)


class KindGraph(nn.Module):
    """(x_t, x_input, t) -> network outputs, concatenating the condition as the reference does.

    ``concat``: whether the network takes x_input as channels (an img2img translation network does not;
    default ``plan.config.condition``); ``t`` is (B,) or, for a "scaled" time input, (B, 2), routed to the
    network(s) by ``select_time``. Subclasses set ``input_names`` / ``output_names`` from their kind."""

    def __init__(self, net: nn.Module, plan: SamplingPlan, num_outputs: int = 2, concat: bool | None = None):
        super().__init__()
        self.net = net
        self.plan = plan
        self.diffusion = plan.config
        self.condition = plan.config.condition if concat is None else concat
        self.num_outputs, self.objective = num_outputs, plan.config.objective
        self.time_dims = time_dims(plan.config.time_input)

    def call(self, x_t, x_input, t):
        x = torch.cat((x_t, x_input), dim=1) if self.condition else x_t
        outs = self.net(x, select_time(t, self.num_outputs, self.objective))
        return outs[0], (outs[1] if len(outs) > 1 else None)

    def example_inputs(self, shape: tuple[int, int, int, int], seed: int = 0) -> tuple[torch.Tensor, ...]:
        """Random inputs of this graph's names and shapes (tracing), images of ``shape`` (B, C, H, W)."""
        raise NotImplementedError


def _random(seed: int):
    g = torch.Generator().manual_seed(seed)
    return g, (lambda *s: torch.randn(*s, generator=g))


class UNetGraph(KindGraph):
    """``unet``: (x_t, x_input, t) -> out0[, out1]."""

    input_names = KINDS["unet"].inputs

    def __init__(self, net, plan: SamplingPlan, num_outputs: int = 2, concat: bool | None = None):
        super().__init__(net, plan, num_outputs, concat)
        self.output_names = KINDS["unet"].output_names(num_outputs)

    def forward(self, x_t, x_input, t):
        out0, out1 = self.call(x_t, x_input, t)
        return (out0,) if out1 is None else (out0, out1)

    def example_inputs(self, shape, seed=0):
        g, rnd = _random(seed)
        return rnd(*shape), rnd(*shape).clamp(-1, 1), torch.rand(shape[0], *self.time_dims, generator=g) * 999


class StepGraph(KindGraph):
    """``step``: (x_t, x_input, coef (8,), noise) -> (x_next, x0); one network call plus the update."""

    input_names = KINDS["step"].inputs
    output_names = KINDS["step"].outputs

    def forward(self, x_t, x_input, coef, noise):
        d = self.diffusion
        t = _batch_vector(x_t, coef[0]) if d.time_input == "index" else \
            _scaled_time(x_t, coef[_ALPHA_BAR], coef[_BETA_BAR], d.timesteps)
        out0, out1 = self.call(x_t, x_input, t)
        return reverse_step(d.objective, out0, out1, x_t, x_input, coef, noise)

    def example_inputs(self, shape, seed=0):
        _, rnd = _random(seed)
        coef = torch.tensor(self.plan.coefs[0], dtype=torch.float32)  # an input: any row traces the same graph
        return rnd(*shape), rnd(*shape).clamp(-1, 1), coef, rnd(*shape)


class FusedGraph(KindGraph):
    """``fused``: (x_input, noise[, step_noise]) -> x0, all K steps of one plan unrolled."""

    output_names = KINDS["fused"].outputs

    def __init__(self, net, plan: SamplingPlan, num_outputs: int = 2, concat: bool | None = None):
        super().__init__(net, plan, num_outputs, concat)
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
            x, _ = reverse_step(plan.config.objective, out0, out1, x, x_input, coef, z)
        return x

    def example_inputs(self, shape, seed=0):
        _, rnd = _random(seed)
        fused = [rnd(*shape).clamp(-1, 1), rnd(*shape)]
        if self.plan.stochastic:
            fused.append(rnd(self.plan.steps, *shape))
        return tuple(fused)
