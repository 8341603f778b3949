"""Prove an exported graph matches PyTorch before anyone is told it exists.

Every graph runs the way ``restore`` runs it (ONNX Runtime on the CPU, or the TensorRT
engine, driven by :class:`~rddm_infer.diffusion.engine_sampler.EngineSampler`) on fresh random
inputs at two shapes (one with batch 2, so a batch silently fixed at export shows up) and is
compared with the PyTorch sampler fed the same noise: fp32 per network call (max-abs ≤ 1e-4) and on
the restored image (≤ 1e-3); fp16 restored image ≥ 40 dB PSNR against fp32 torch (int8: ≥ 30 dB, see
INT8_MIN_PSNR).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from rddm_infer.backends.base import Runner, RunnerWrapper
from rddm_infer.diffusion.engine_sampler import EngineSampler, Noise
from rddm_infer.diffusion.metadata import ArtifactMeta
from rddm_infer.diffusion.sampler import initial_state, sample
from rddm_infer.diffusion.schedule import COEF_NAMES
from rddm_infer.errors import RDDMError
from rddm_infer.metrics import psnr
from rddm_infer.model import LoadedModel, TorchRDDM, fold_weight_standardization

CALL_MAX_ABS = 1e-4
IMAGE_MAX_ABS = 1e-3
FP16_MIN_PSNR = 40.0
# int8 graphs are checked on the same random inputs, which lie far outside the photos they were calibrated on:
# the bar catches a broken graph; the real quality (≈40 dB vs fp32 on photos) is measured by benchmarks.backends.
INT8_MIN_PSNR = 30.0
MIN_PSNR = {"fp16": FP16_MIN_PSNR, "int8": INT8_MIN_PSNR}  # reduced precisions: PSNR, not max-abs
_SIGMA = COEF_NAMES.index("sigma")


class ValidationError(RDDMError):
    """An exported artifact that does not reproduce PyTorch within tolerance (``.result`` has every check)."""

    def __init__(self, message: str, result: "Validation | None" = None):
        super().__init__(message)
        self.result = result


@dataclass
class Check:
    what: str  # "call" (one network call / step) or "image" (the restored image)
    shape: tuple
    metric: str  # "max_abs" (must be <= limit) or "psnr" (must be >= limit)
    value: float
    limit: float | None  # None: measured and reported, not gated

    @property
    def ok(self) -> bool:
        if self.limit is None:
            return True
        return self.value <= self.limit if self.metric == "max_abs" else self.value >= self.limit

    def __str__(self) -> str:
        unit = " dB" if self.metric == "psnr" else ""
        bound = "" if self.limit is None else f" ({'≤' if self.metric == 'max_abs' else '≥'} {self.limit:g}{unit})"
        return f"{self.what} {'x'.join(map(str, self.shape))}: {self.metric} {self.value:.3g}{unit}{bound}"


@dataclass
class Validation:
    path: Path
    graph: str
    precision: str
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def worst(self, what: str) -> Check | None:
        """The least favourable check of one kind (largest error / lowest PSNR)."""
        cs = [c for c in self.checks if c.what == what]
        if not cs:
            return None
        return max(cs, key=lambda c: c.value if c.metric == "max_abs" else -c.value)

    def summary(self) -> str:
        return "; ".join(str(c) for c in filter(None, (self.worst("call"), self.worst("image"))))


def default_shapes(channels: int, size_multiple: int) -> list[tuple[int, int, int, int]]:
    """Two small shapes that differ from the trace's example (2, C, 2m, 3m) in batch, height and width.

    Small on purpose (24×16 and 2×16×40 for m = 8): a wrong graph is wrong at any size, and the torch
    reference of a 72 M-parameter model costs seconds per call at 64², not milliseconds.
    """
    m = max(size_multiple, 8)
    return [(1, channels, 3 * m, 2 * m), (2, channels, 2 * m, 5 * m)]


def reference_sampler(loaded: LoadedModel, in_place: bool = False) -> TorchRDDM:
    """The PyTorch sampler artifacts are compared with, weight standardisation folded once instead of per call.

    ``in_place`` folds ``loaded.net`` itself (no second copy of a large model); only for a model the caller owns.
    """
    net = loaded.net if in_place else copy.deepcopy(loaded.net)
    return TorchRDDM(fold_weight_standardization(net.float().eval()), loaded.diffusion)


@torch.no_grad()
def validate_onnx(path: str | os.PathLike, loaded: LoadedModel, *, meta: ArtifactMeta | None = None, shapes=None,
                  seed: int = 0, raise_on_failure: bool = True, report_as: str | os.PathLike | None = None,
                  reference: TorchRDDM | None = None) -> Validation:
    """Compare ``path`` with the PyTorch sampler of ``loaded``; raises ValidationError above tolerance.

    The graph runs the way ``restore`` runs it: an :class:`OnnxRuntimeRunner` (CPU) driven by
    :class:`EngineSampler` (its graph kind's driver), fed the reference's noise. Where one graph call is
    not the whole run, its first call is also compared with the kind's expectation from the reference
    network's first outputs (:meth:`GraphKind.call_reference`).

    ``meta``: what the writer stamped into the file (read from it when not given). ``report_as``
    names the file in the result and errors (the final name of a file validated under a temporary one).
    ``reference``: a :func:`reference_sampler` to reuse across artifacts.
    """
    from rddm_infer.backends.onnxruntime import OnnxRuntimeRunner

    path = Path(path)
    runner = _FirstCall(OnnxRuntimeRunner(path, providers=["CPUExecutionProvider"]), meta)
    meta = runner.meta
    plan = meta.plan()
    reduced = meta.precision in MIN_PSNR
    torch_rddm = reference or reference_sampler(loaded)
    result = Validation(Path(report_as or path), meta.graph, meta.precision)
    rng = np.random.default_rng(seed)
    sampler = EngineSampler(runner)
    try:
        for shape in shapes or default_shapes(meta.channels, meta.size_multiple):
            shape = tuple(shape)
            x_in, noise, ref, first = _reference(torch_rddm, plan, shape, rng)
            _refuse_degenerate(result.path, x_in, initial_state(plan, x_in, noise=noise.eps), ref)
            runner.first = None
            image = sampler.run(x_in, plan, noise)
            want = meta.kind.call_reference(first, x_in, plan, noise)
            if want is not None:
                err = max(_max_abs(g, w) for g, w in zip(runner.first, want))
                result.checks.append(Check("call", shape, "max_abs", err, None if reduced else CALL_MAX_ABS))
            result.checks.append(_image_check(shape, image, ref, meta.precision))
    finally:
        runner.deactivate()
    return _finish(result, raise_on_failure)


class _FirstCall(RunnerWrapper):
    """A runner passed through unchanged, remembering the outputs of its first ``infer`` since ``first`` was
    reset (host arrays, in the graph's output order); ``meta`` replaces the one read from the file when given."""

    def __init__(self, inner: Runner, meta: ArtifactMeta | None = None):
        super().__init__(inner, meta)
        self.first: list[np.ndarray] | None = None

    def infer(self, feeds):
        outs = self.inner.infer(feeds)
        if self.first is None:
            self.first = [self.inner.download(v) for v in outs.values()]
        return outs


@torch.no_grad()
def validate_engine(path: str | os.PathLike, loaded: LoadedModel, profile, *, seed: int = 0,
                    raise_on_failure: bool = True, report_as: str | os.PathLike | None = None,
                    reference: TorchRDDM | None = None) -> Validation:
    """The same image comparison for a TensorRT engine file, at two shapes inside its profile."""
    from rddm_infer.backends.tensorrt import TensorRTRunner

    runner = TensorRTRunner(path, cuda_graph=False)
    meta = runner.meta
    plan = meta.plan()
    result = Validation(Path(report_as or path), meta.graph, meta.precision)
    torch_rddm = reference or reference_sampler(loaded)
    rng = np.random.default_rng(seed)
    sampler = EngineSampler(runner)
    try:
        for shape in engine_shapes(profile, meta.channels, meta.size_multiple):
            x_in, noise, ref, _ = _reference(torch_rddm, plan, shape, rng)
            image = sampler.run(x_in, plan, noise)
            result.checks.append(_image_check(shape, image, ref, meta.precision))
    finally:
        runner.deactivate()
    return _finish(result, raise_on_failure)


def engine_shapes(profile, channels: int, size_multiple: int) -> list[tuple[int, int, int, int]]:
    """The profile's minimum shape and a batch-2 (where allowed), one-step-taller variant of it."""
    b, h, w = profile.min
    taller = h + size_multiple if h + size_multiple <= profile.max[1] else h
    return [(b, channels, h, w), (min(max(b, 2), profile.max[0]), channels, taller, w)]


def _reference(torch_rddm: TorchRDDM, plan, shape, rng) -> tuple[np.ndarray, Noise, np.ndarray, list[np.ndarray]]:
    """Fresh random inputs and all the noise of one run (z drawn for every step, kept where the plan is
    stochastic), the PyTorch sampler's result for them and its first network call's outputs (numpy), from
    one pass of the loop."""
    x_in = rng.uniform(-1, 1, shape).astype(np.float32)
    eps = rng.standard_normal(shape, dtype=np.float32)
    zs = [rng.standard_normal(shape, dtype=np.float32) for _ in range(plan.steps)]
    calls = []

    def model(x_t, x_input, t):
        outs = torch_rddm.model_fn(x_t, x_input, t)
        if not calls:
            calls.append([o.numpy() for o in outs])
        return outs

    t_ = lambda a: torch.from_numpy(a)  # noqa: E731
    x_t = initial_state(plan, x_in, noise=eps)
    ref = sample(model, plan, t_(x_in), t_(x_t), lambda i: t_(zs[i])).numpy()
    noise = Noise(eps, [z if plan.coefs[i][_SIGMA] > 0 else None for i, z in enumerate(zs)])
    return x_in, noise, ref, calls[0]


DEGENERATE_MAX_ABS = 1e-6


def degenerate(x_in: np.ndarray, x_start: np.ndarray, image: np.ndarray) -> str | None:
    """Why a restored image shows its model is broken (None if it does not): an image equal to the input, to
    the unchanged starting state (a network whose outputs are all zero) or a constant image. An artifact that
    reproduces such a model still passes the comparison with PyTorch, so this is checked on its own."""
    if _max_abs(image, x_in) <= DEGENERATE_MAX_ABS:
        return "restores every image as its input (an identity model)"
    if _max_abs(image, np.clip(x_start, -1, 1)) <= DEGENERATE_MAX_ABS:
        return "leaves the starting noise unchanged (its network outputs nothing but zeros)"
    if float(np.ptp(image)) <= DEGENERATE_MAX_ABS:
        return "restores every image as one constant"
    return None


@torch.no_grad()
def check_reference(torch_rddm: TorchRDDM, plan, channels: int, size_multiple: int, source, seed: int = 0) -> None:
    """Refuse a degenerate PyTorch model (:func:`degenerate`) before anything is exported from it."""
    shape = default_shapes(channels, size_multiple)[0]
    x_in, noise, ref, _ = _reference(torch_rddm, plan, shape, np.random.default_rng(seed))
    _refuse_degenerate(source, x_in, initial_state(plan, x_in, noise=noise.eps), ref)


def _refuse_degenerate(source, x_in, x_start, image) -> None:
    why = degenerate(x_in, x_start, image)
    if why is not None:
        raise ValidationError(f"{source}: the model is degenerate: in PyTorch it {why}; nothing exported from it "
                              "would restore anything")


def _image_check(shape, image, ref, precision: str) -> Check:
    if precision in MIN_PSNR:
        return Check("image", shape, "psnr", psnr(image, ref, data_range=2.0), MIN_PSNR[precision])
    return Check("image", shape, "max_abs", _max_abs(image, ref), IMAGE_MAX_ABS)


def _finish(result: Validation, raise_on_failure: bool) -> Validation:
    if raise_on_failure and not result.ok:
        bad = "; ".join(str(c) for c in result.checks if not c.ok)
        kind = "engine" if result.path.suffix == ".engine" else "graph"
        raise ValidationError(f"{result.path}: {result.graph} {result.precision} {kind} does not match PyTorch: {bad}",
                              result)
    return result


def _max_abs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))))
