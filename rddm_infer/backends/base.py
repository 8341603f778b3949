"""The Runner interface every backend implements (Polygraphy's shape: ``activate`` / ``infer`` / ``deactivate``).

A :class:`Runner` owns one loaded artifact and knows nothing about diffusion: the loop that drives it
is :class:`rddm_infer.diffusion.engine_sampler.EngineSampler`, the same for every backend.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from ..diffusion.metadata import ArtifactMeta


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

    # -- what ``choose_backend`` asks a backend before loading anything (cheap: no framework import)
    @classmethod
    def choice_reason(cls, kind: str, model, device: str, providers) -> str:
        """Why this backend runs ``model`` (an artifact of ``kind``) on ``device``, in a few words."""
        return {"checkpoint": "PyTorch checkpoint"}.get(kind, f"{kind} model")

    @classmethod
    def gpu_visible(cls) -> bool:
        """Whether this backend sees a GPU here, when that can be told without loading a framework
        (``auto`` then leaves the CPU timing table alone); False when it cannot tell cheaply."""
        return False

    @classmethod
    def read_meta(cls, path, **model_options) -> ArtifactMeta:
        """An artifact's self-description without running it (``rddm-infer info``)."""
        with cls(path, **model_options) as runner:
            return runner.meta

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

    # Full-attention matrices (batch·heads·tokens², fp32) alive at once in one call on the CPU, which restore's
    # memory estimate reads: ONNX Runtime and torch keep the scores and their softmax (measured 2.2-2.4x).
    attention_matrices = 2.5

    @property
    def activations_on_gpu(self) -> bool:
        """Whether a call's activations live in GPU memory: restore's host-memory check does not apply."""
        return bool(getattr(self, "on_gpu", False)) or str(getattr(self, "device", "")).startswith("cuda")

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

    def run_plan(self, x_input: np.ndarray, plan, noise) -> np.ndarray | None:
        """A whole sampling run (all ``plan.steps`` calls) done by the runner itself, or None: then the graph
        kind's driver calls :meth:`infer` step by step. A ``unet`` runner that captures the K-step loop as one
        CUDA graph answers here, with the driver's math (:func:`rddm_infer.diffusion.sampler.sample`) and noise."""
        return None

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


class RunnerWrapper(Runner):
    """A runner passed on unchanged (lifecycle, handles, calls): subclasses override ``infer`` to watch the
    calls (int8 calibration records inputs; export validation checks the first outputs)."""

    def __init__(self, inner: Runner, meta: ArtifactMeta | None = None):
        super().__init__(meta or inner.meta)
        self.inner, self.name, self.array_math = inner, inner.name, inner.array_math

    def _activate(self) -> None:
        self.inner.activate()

    def _deactivate(self) -> None:
        self.inner.deactivate()

    def upload(self, a):
        return self.inner.upload(a)

    def download(self, h):
        return self.inner.download(h)

    def infer(self, feeds):
        return self.inner.infer(feeds)

