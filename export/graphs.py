"""The three exportable graphs (unet / step / fused) as torch modules around a folded ``UnetRes``.

The RDDM update is :func:`rddm_infer.sampler.step` itself, traced into the graph: the
``step`` graph takes the coefficient row as an input (so K and η can change at run
time), the ``fused`` graph bakes every row of one :class:`SamplingPlan` in as constants.
I/O names follow the contract in docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import torch
from torch import nn

from rddm_infer.graph_kinds import KINDS
from rddm_infer.sampler import step
from rddm_infer.schedule import COEF_NAMES, DiffusionConfig, SamplingPlan

_SIGMA = COEF_NAMES.index("sigma")


def _batch_vector(x: torch.Tensor, value) -> torch.Tensor:
    """``value`` broadcast to shape (B,), written so the batch stays dynamic in the graph."""
    return torch.ones_like(x[:, 0, 0, 0]) * value


class _Net(nn.Module):
    """(x_t, x_input, t) -> network outputs, concatenating the condition as the reference does."""

    def __init__(self, net: nn.Module, condition: bool):
        super().__init__()
        self.net = net
        self.condition = condition

    def call(self, x_t, x_input, t):
        x = torch.cat((x_t, x_input), dim=1) if self.condition else x_t
        outs = self.net(x, t)
        return outs[0], (outs[1] if len(outs) > 1 else None)


class UNetGraph(_Net):
    """``unet``: (x_t, x_input, t) -> out0[, out1]."""

    input_names = KINDS["unet"].inputs

    def __init__(self, net, diffusion: DiffusionConfig, num_outputs: int):
        super().__init__(net, diffusion.condition)
        self.output_names = KINDS["unet"].output_names(num_outputs)

    def forward(self, x_t, x_input, t):
        out0, out1 = self.call(x_t, x_input, t)
        return (out0,) if out1 is None else (out0, out1)


class StepGraph(_Net):
    """``step``: (x_t, x_input, coef (8,), noise) -> (x_next, x0); one network call plus the update."""

    input_names = KINDS["step"].inputs
    output_names = KINDS["step"].outputs

    def __init__(self, net, diffusion: DiffusionConfig):
        super().__init__(net, diffusion.condition)
        self.diffusion = diffusion

    def forward(self, x_t, x_input, coef, noise):
        out0, out1 = self.call(x_t, x_input, _batch_vector(x_t, coef[0]))
        return step(self.diffusion.objective, out0, out1, x_t, x_input, coef, noise)


class FusedGraph(_Net):
    """``fused``: (x_input, noise[, step_noise]) -> x0, all K steps of one plan unrolled."""

    output_names = KINDS["fused"].outputs

    def __init__(self, net, plan: SamplingPlan):
        super().__init__(net, plan.config.condition)
        self.plan = plan
        self.input_names = KINDS["fused"].input_names(plan.stochastic)

    def forward(self, x_input, noise, step_noise=None):
        plan = self.plan
        x = (x_input if plan.config.condition else 0.0) + plan.init_scale() * noise
        for i in range(plan.steps):
            coef = plan.coefs[i]
            out0, out1 = self.call(x, x_input, _batch_vector(x_input, float(coef[0])))
            z = step_noise[i] if (step_noise is not None and coef[_SIGMA] > 0) else None
            x, _ = step(plan.config.objective, out0, out1, x, x_input, coef, z)
        return x


def build_graph(net: nn.Module, diffusion: DiffusionConfig, kind: str, num_outputs: int, steps: int = 5,
                eta: float = 0.0) -> nn.Module:
    """The wrapper module for one graph kind."""
    if kind == "unet":
        return UNetGraph(net, diffusion, num_outputs).eval()
    if kind == "step":
        return StepGraph(net, diffusion).eval()
    if kind == "fused":
        return FusedGraph(net, SamplingPlan.create(diffusion, steps, eta)).eval()
    raise ValueError(f"unknown graph kind {kind!r}; expected unet, step or fused")


def example_inputs(graph: nn.Module, shape: tuple[int, int, int, int], steps: int = 5, seed: int = 0):
    """Random inputs of the right names/shapes for ``graph`` (used for tracing and validation)."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    b = shape[0]
    if isinstance(graph, UNetGraph):
        return rnd(*shape), rnd(*shape).clamp(-1, 1), torch.rand(b, generator=g) * 999
    if isinstance(graph, StepGraph):
        plan = SamplingPlan.create(graph.diffusion, steps)
        return rnd(*shape), rnd(*shape).clamp(-1, 1), torch.tensor(plan.coefs[0], dtype=torch.float32), rnd(*shape)
    fused = [rnd(*shape).clamp(-1, 1), rnd(*shape)]
    if graph.plan.stochastic:
        fused.append(rnd(graph.plan.steps, *shape))
    return tuple(fused)

