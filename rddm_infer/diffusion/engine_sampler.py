"""The one loop that drives every backend: noise, the sampling plan, and each graph kind's calls.

:class:`EngineSampler` owns the diffusion: it draws the noise (numpy, seeded, so every backend sees the same),
builds the :class:`~rddm_infer.diffusion.schedule.SamplingPlan` from the artifact's metadata and hands the
run to the artifact's graph kind (:meth:`rddm_infer.diffusion.graph_kinds.GraphKind.run`, the kind's driver),
which knows how to call a graph of its kind through any runner (``infer``, ``run_chain``, ``upload`` / ``download``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import RDDMError
from .schedule import COEF_NAMES, SamplingPlan

_SIGMA = COEF_NAMES.index("sigma")


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

    def __init__(self, runner):  # any rddm_infer.backends.base.Runner (diffusion/ imports no backend)
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
        return self.meta.kind.run(self.runner, x_input, plan, noise)
