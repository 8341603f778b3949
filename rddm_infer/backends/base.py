"""The Runner interface every backend implements, and the one loop that drives them all.

A :class:`Runner` (Polygraphy's shape: ``activate`` / ``infer`` / ``deactivate``) owns one
loaded artifact and knows nothing about diffusion. :class:`EngineSampler` owns the
diffusion: it draws the noise (numpy, seeded, so every backend sees the same), builds
the :class:`~rddm_infer.schedule.SamplingPlan` from the artifact's metadata and runs

* ``unet`` graphs: the K-step loop with :func:`rddm_infer.sampler.sample` around ``infer``;
* ``step`` graphs: a chain of K ``infer`` calls feeding one ``coef`` row each, where each
  call's ``x_next`` becomes the next ``x_t`` (:meth:`Runner.run_chain`, which GPU runners
  override to keep the state on the device or replay it as a CUDA graph);
* ``fused`` graphs: one call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from ..artifact import ArtifactMeta
from ..errors import RDDMError
from ..graph_kinds import KINDS
from ..sampler import initial_state, sample, time_array
from ..schedule import COEF_NAMES, SamplingPlan

_SIGMA = COEF_NAMES.index("sigma")


def threads_note(threads: int | None) -> str:
    """The ", N thread(s)" a runner's description carries when the thread count was set."""
    return f", {threads} thread{'s' if threads != 1 else ''}" if threads else ""


class Runner:
    """One loaded artifact on one engine. Arrays in/out are the runner's own "handles"
    (numpy by default); ``upload``/``download`` convert, so a GPU runner can keep state on
    the device between calls."""

    name = "base"
    array_math = False  # True when handles support the sampler's arithmetic (torch tensors)

    def __init__(self, meta: ArtifactMeta):
        self.meta = meta
        self.active = False

    # -- lifecycle
    def activate(self) -> "Runner":
        if not self.active:
            self._activate()
            self.active = True
        return self

    def deactivate(self) -> None:
        if self.active:
            self._deactivate()
            self.active = False

    def __enter__(self) -> "Runner":
        return self.activate()

    def __exit__(self, *exc) -> None:
        self.deactivate()

    def _activate(self) -> None:
        pass

    def _deactivate(self) -> None:
        pass

    # -- data
    @property
    def description(self) -> str:
        """Human-readable engine details (e.g. the execution provider)."""
        return self.name

    def upload(self, a: np.ndarray) -> Any:
        return a

    def download(self, h: Any) -> np.ndarray:
        return np.asarray(h)

    def infer(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        """Run the graph once: named inputs (numpy or handles) -> named outputs (handles)."""
        raise NotImplementedError

    def run_chain(self, static: Mapping[str, Any], per_step: Sequence[Mapping[str, Any]], carry: tuple[str, str],
                  state: np.ndarray) -> np.ndarray:
        """``len(per_step)`` calls where output ``carry[1]`` feeds input ``carry[0]`` of the next call.

        ``static`` inputs are the same for every call. Returns the final carried output on the host.
        """
        fixed = {k: self.upload(v) for k, v in static.items()}
        x = self.upload(state)
        for feeds in per_step:
            x = self.infer({**fixed, carry[0]: x, **feeds})[carry[1]]
        return self.download(x)


@dataclass
class Noise:
    """All randomness of one sampling run: the initial ε and z for each stochastic step (else None).

    Pass your own to reproduce another implementation's run exactly: ``eps`` is the standard
    normal draw behind x_T (x_T = I_in + √sum_scale·ε for restoration, ε for generation) and
    ``steps[i]`` the z of step i (only read where the plan's σ_i > 0, i.e. η > 0 on a generation
    model). Shapes are the model-space batch (B, C, H, W), RGB, float32.
    """

    eps: np.ndarray
    steps: list[np.ndarray | None]

    @classmethod
    def given(cls, plan: SamplingPlan, eps: np.ndarray, steps: Sequence[np.ndarray | None] | None = None) -> "Noise":
        """Caller-supplied noise, checked against the plan: every stochastic step needs its z."""
        eps = np.ascontiguousarray(eps, dtype=np.float32)
        steps = list(steps) if steps is not None else [None] * plan.steps
        if len(steps) != plan.steps:
            raise RDDMError(f"noise: {len(steps)} per-step arrays for a {plan.steps}-step plan")
        out = []
        for i, z in enumerate(steps):
            if plan.coefs[i, _SIGMA] > 0 and z is None:
                raise RDDMError(f"noise: step {i} is stochastic (eta={plan.eta}) and needs its z array")
            if z is not None and np.shape(z) != eps.shape:
                raise RDDMError(f"noise: step {i} z has shape {np.shape(z)}, the initial noise {eps.shape}")
            out.append(None if z is None else np.ascontiguousarray(z, dtype=np.float32))
        return cls(eps, out)

    def check(self, plan: SamplingPlan, shape: tuple[int, ...]) -> None:
        """Refuse noise that does not fit the batch or the plan (never broadcast silently)."""
        if tuple(self.eps.shape) != tuple(shape):
            raise RDDMError(f"noise: initial noise has shape {tuple(self.eps.shape)}, the input {tuple(shape)}")
        Noise.given(plan, self.eps, self.steps)

    @classmethod
    def draw(cls, plan: SamplingPlan, shape: tuple[int, ...], seed: int | None = 0) -> "Noise":
        """Same order as the torch reference sampler: ε first, then z for each step with σ > 0."""
        rng = np.random.default_rng(seed)
        eps = rng.standard_normal(shape, dtype=np.float32)
        steps = [rng.standard_normal(shape, dtype=np.float32) if plan.coefs[i, _SIGMA] > 0 else None
                 for i in range(plan.steps)]
        return cls(eps, steps)

    def crop(self, index) -> "Noise":
        """The same noise restricted to a region (tiles see the full image's noise at their pixels)."""
        return self.map(lambda a: a[index])

    def map(self, fn) -> "Noise":
        """The same noise with ``fn`` applied to every array (e.g. a flipped view of the image)."""
        return Noise(fn(self.eps), [None if z is None else fn(z) for z in self.steps])

    @classmethod
    def stack(cls, items: Sequence["Noise"]) -> "Noise":
        return cls(np.stack([n.eps for n in items]),
                   [None if items[0].steps[i] is None else np.stack([n.steps[i] for n in items])
                    for i in range(len(items[0].steps))])


class EngineSampler:
    """Restore model-space batches (NCHW float32, [-1, 1]) with any runner."""

    def __init__(self, runner: Runner):
        self.runner = runner.activate()
        self.meta = runner.meta

    def plan(self, steps: int | None = None, eta: float | None = None) -> SamplingPlan:
        if steps is not None and steps < 1:
            raise RDDMError(f"steps must be >= 1, got {steps}")
        return self.meta.with_sampling(steps, eta).plan()

    def __call__(self, x_input: np.ndarray, steps: int | None = None, eta: float | None = None,
                 seed: int | None = 0) -> np.ndarray:
        plan = self.plan(steps, eta)
        return self.run(x_input, plan, Noise.draw(plan, x_input.shape, seed))

    def run(self, x_input: np.ndarray, plan: SamplingPlan, noise: Noise) -> np.ndarray:
        """Sample with explicit noise: ``x_input`` (B, C, H, W) in [-1, 1], RGB; returns the same layout.

        ``plan`` from :meth:`plan`; ``noise`` from :meth:`Noise.draw` (seeded) or :meth:`Noise.given`
        (your own arrays, e.g. another implementation's ε and z).
        """
        x_input = np.ascontiguousarray(x_input, dtype=np.float32)
        noise.check(plan, x_input.shape)
        graph = self.meta.graph
        if graph == "fused":
            return self._fused(x_input, plan, noise)
        x_t = initial_state(plan, x_input, noise=noise.eps)
        if graph == "step":
            return self._step(x_input, x_t, plan, noise)
        return self._unet(x_input, x_t, plan, noise)

    def _fused(self, x_input, plan, noise):
        kind = KINDS["fused"]
        values = [x_input, noise.eps]
        if plan.stochastic:
            values.append(np.stack([np.zeros_like(x_input) if z is None else z for z in noise.steps]))
        r = self.runner
        return r.download(r.infer(dict(zip(kind.input_names(plan.stochastic), values)))[kind.outputs[0]])

    def _step(self, x_input, x_t, plan, noise):
        kind = KINDS["step"]
        _, x_in_name, coef_name, noise_name = kind.inputs
        r = self.runner
        zeros = r.upload(np.zeros_like(x_input)) if any(z is None for z in noise.steps) else None
        per_step = [{coef_name: plan.coefs[i].astype(np.float32),
                     noise_name: zeros if noise.steps[i] is None else noise.steps[i]} for i in range(plan.steps)]
        return r.run_chain({x_in_name: x_input}, per_step, kind.carry, x_t)

    def _unet(self, x_input, x_t, plan, noise):
        kind = KINDS["unet"]
        outputs = kind.output_names(self.meta.num_outputs)
        r = self.runner
        native = r.array_math
        put = r.upload if native else (lambda a: a)
        get = (lambda h: h) if native else r.download
        batch = x_input.shape[0]

        def model(xt, xi, t):
            outs = r.infer(dict(zip(kind.inputs, (xt, xi, put(time_array(t, batch))))))
            return [get(outs[k]) for k in outputs if k in outs]

        out = sample(model, plan, put(x_input), put(x_t), lambda i: put(noise.steps[i]))
        return out if isinstance(out, np.ndarray) else r.download(out)
