"""The graph kinds, each one entry: its ONNX contract, its facts, its export wrapper and its driver.

A :class:`GraphKind` row holds everything that differs between kinds:

* the contract: inputs, outputs, what a chain carries between calls and the dynamic axes (the exporter
  traces with these names, every runner feeds them; docs/ARCHITECTURE.md shows the same table);
* the facts other modules ask about (``bakes_plan``: the steps and η are constants of the graph);
* ``wrapper``: the torch module exported for the kind, as a ``"module:Class"`` string so this module
  stays free of torch (the classes live in :mod:`rddm_infer.model.graphs`);
* the driver, :meth:`GraphKind.run`: the calls one sampling run makes through any runner (``infer``,
  ``run_chain``, ``upload`` / ``download``); :class:`~rddm_infer.diffusion.engine_sampler.EngineSampler` hands
  every run to it, so ``restore`` and the export validator go through the same code.

A new graph kind is one subclass with its ``run`` (and :meth:`GraphKind.call_reference`), one row in ``KINDS``
and one wrapper class.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from .sampler import initial_state, reverse_step, sample, time_array
from .schedule import SamplingPlan

if TYPE_CHECKING:  # the driver only reads ``noise.eps`` / ``noise.steps``; engine_sampler imports this module
    from .engine_sampler import Noise

IMAGE_AXES = {0: "batch", 2: "height", 3: "width"}  # (B, C, H, W)
AXES = {"t": {0: "batch"}, "coef": {}, "step_noise": {1: "batch", 3: "height", 4: "width"}}  # others: IMAGE_AXES


@dataclass(frozen=True)
class GraphKind:
    name: str
    inputs: tuple[str, ...]  # in contract order
    outputs: tuple[str, ...]  # all possible outputs, in order
    wrapper: str  # "module:Class": the torch nn.Module exported for this kind
    carry: tuple[str, str] | None = None  # (input, output) fed back between calls of one run
    optional_inputs: tuple[str, ...] = ()  # present only in some graphs of the kind (e.g. η > 0)
    bakes_plan: bool = False  # the sampling plan (steps K, η) is built into the graph at export
    output_per_network: bool = False  # one output per network output (out0[, out1]), not fixed outputs

    def input_names(self, stochastic: bool = False) -> tuple[str, ...]:
        """The inputs a graph of this kind has (``step_noise`` only when its plan is stochastic)."""
        return self.inputs + (self.optional_inputs if stochastic else ())

    def output_names(self, num_outputs: int = 2) -> tuple[str, ...]:
        """A ``unet`` graph has one output per network output; the others have fixed outputs."""
        return self.outputs[:num_outputs] if self.output_per_network else self.outputs

    def contract_problem(self, inputs: dict, outputs: dict, stochastic: bool = False, num_outputs: int = 2,
                         time_input: str = "index") -> str:
        """What a loaded graph breaks of this kind's contract ('' when nothing): ``inputs`` / ``outputs`` map each
        name to (rank or None, dtype name). Checked at load, so a renamed input is one model error, not a failed
        call for every image."""
        problems = []
        for what, want, got in (("input", self.input_names(stochastic), inputs),
                                ("output", self.output_names(num_outputs), outputs)):
            missing, extra = [n for n in want if n not in got], [n for n in got if n not in want]
            problems += [f"{how} {what}{'s' if len(names) > 1 else ''} {', '.join(names)}"
                         for how, names in (("missing", missing), ("unexpected", extra)) if names]
            for name in (n for n in want if n in got):
                (rank, dtype), need = got[name], _rank(name, time_input)
                if rank is not None and rank != need:
                    problems.append(f"{what} {name} has rank {rank}, expected {need}")
                if dtype != "float32":
                    problems.append(f"{what} {name} is {dtype}, expected float32")
        if not problems:
            return ""
        return (f"{'; '.join(problems)} (a {self.name} graph takes {', '.join(self.input_names(stochastic))} and "
                f"gives {', '.join(self.output_names(num_outputs))})")

    # -- export (torch): the wrapper module
    def wrapper_class(self) -> type:
        """The torch module exported for this kind (imports torch)."""
        module, cls = self.wrapper.split(":")
        return getattr(importlib.import_module(module), cls)

    def build(self, net, plan: SamplingPlan, num_outputs: int = 2, concat: bool | None = None):
        """The wrapper around ``net`` (an ``nn.Module`` ``(x, t) -> outputs``) for one sampling plan, in eval mode.

        Every wrapper takes ``(net, plan, num_outputs, concat)``; a kind that does not bake the plan in reads
        only ``plan.config`` from it. ``concat``: whether the network takes x_input as channels (default
        ``plan.config.condition``)."""
        return self.wrapper_class()(net, plan, num_outputs, concat).eval()

    # -- run time: the driver
    def run(self, runner, x_input: np.ndarray, plan: SamplingPlan, noise: "Noise") -> np.ndarray:
        """One sampling run through ``runner`` (a graph of this kind): ``x_input`` (B, C, H, W) float32
        in [-1, 1] -> the restored batch, same layout, on the host."""
        raise NotImplementedError

    def call_reference(self, net_outputs: Sequence[np.ndarray], x_input: np.ndarray, plan: SamplingPlan,
                       noise: "Noise") -> list[np.ndarray] | None:
        """What the first call of :meth:`run` returns (in :meth:`output_names` order), from the network's
        outputs at step 0 of the same run; ``None`` where that one call is the whole run (its image is
        checked instead). The validator compares each graph's first call with this."""
        raise NotImplementedError


class UNetKind(GraphKind):
    """``unet``: one network call per graph call; the sampler loop runs on the host (or in the runner's
    own arrays, e.g. torch tensors)."""

    def run(self, runner, x_input, plan, noise):
        whole = runner.run_plan(x_input, plan, noise)  # a runner that holds all K steps itself (a CUDA graph)
        if whole is not None:
            return whole
        outputs = self.output_names(runner.meta.num_outputs)
        native = runner.array_math
        put = runner.upload if native else (lambda a: a)
        get = (lambda h: h) if native else runner.download
        batch = x_input.shape[0]
        x_t = initial_state(plan, x_input, noise=noise.eps)

        def model(xt, xi, t):  # t stays on the host: a runner reads the step from it (no device round trip)
            outs = runner.infer(dict(zip(self.inputs, (xt, xi, time_array(t, batch)))))
            return [get(outs[k]) for k in outputs if k in outs]

        out = sample(model, plan, put(x_input), put(x_t), lambda i: put(noise.steps[i]))
        return out if isinstance(out, np.ndarray) else runner.download(out)

    def call_reference(self, net_outputs, x_input, plan, noise):
        return list(net_outputs)


class StepKind(GraphKind):
    """``step``: one network call plus the reverse update per graph call, chained K times with the state
    carried from ``x_next`` to ``x_t`` (on the device where the runner keeps it there)."""

    def run(self, runner, x_input, plan, noise):
        _, x_in_name, coef_name, noise_name = self.inputs
        zeros = runner.upload(np.zeros_like(x_input)) if any(z is None for z in noise.steps) else None
        per_step = [{coef_name: plan.coefs[i].astype(np.float32),
                     noise_name: zeros if noise.steps[i] is None else noise.steps[i]} for i in range(plan.steps)]
        x_t = initial_state(plan, x_input, noise=noise.eps)
        return runner.run_chain({x_in_name: x_input}, per_step, self.carry, x_t)

    def call_reference(self, net_outputs, x_input, plan, noise):
        outs = [*net_outputs, None]
        x_t = initial_state(plan, x_input, noise=noise.eps)
        return list(reverse_step(plan.config.objective, outs[0], outs[1], x_t, x_input, plan.coefs[0],
                                 noise.steps[0]))


class FusedKind(GraphKind):
    """``fused``: all K steps of one plan unrolled into a single graph call."""

    def run(self, runner, x_input, plan, noise):
        values: list[Any] = [x_input, noise.eps]
        if plan.stochastic:
            values.append(np.stack([np.zeros_like(x_input) if z is None else z for z in noise.steps]))
        feeds = dict(zip(self.input_names(plan.stochastic), values))
        return runner.download(runner.infer(feeds)[self.outputs[0]])

    def call_reference(self, net_outputs, x_input, plan, noise):
        return None


_WRAPPERS = "rddm_infer.model.graphs"
KINDS: dict[str, GraphKind] = {
    "unet": UNetKind("unet", ("x_t", "x_input", "t"), ("out0", "out1"), f"{_WRAPPERS}:UNetGraph",
                     output_per_network=True),
    "step": StepKind("step", ("x_t", "x_input", "coef", "noise"), ("x_next", "x0"), f"{_WRAPPERS}:StepGraph",
                     carry=("x_t", "x_next")),
    "fused": FusedKind("fused", ("x_input", "noise"), ("x0",), f"{_WRAPPERS}:FusedGraph",
                       optional_inputs=("step_noise",), bakes_plan=True),
}
GRAPH_KINDS = tuple(KINDS)


def graph_kind(name: str) -> GraphKind:
    try:
        return KINDS[name]
    except KeyError:
        raise ValueError(f"unknown graph kind {name!r}; expected one of {', '.join(GRAPH_KINDS)}") from None


def time_dims(time_input: str) -> tuple[int, ...]:
    """Trailing dims of a ``unet`` graph's ``t`` after the batch: none for the index t, (2,) for the
    "scaled" pair (ᾱ_t·T, β̄_t·T) (rddm_infer.diffusion.schedule.TIME_INPUTS)."""
    return (2,) if time_input == "scaled" else ()


def _rank(name: str, time_input: str) -> int:
    """The rank of a contract input or output: images (B, C, H, W), t (B[, 2]), coef (n,), step_noise (K, B, C, H, W)."""
    return {"t": 1 + len(time_dims(time_input)), "coef": 1, "step_noise": 5}.get(name, 4)


def dynamic_axes(name: str) -> dict[int, str]:
    """Which axes of the input/output ``name`` are dynamic, and what they are called."""
    return dict(AXES.get(name, IMAGE_AXES))
