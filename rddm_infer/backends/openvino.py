"""OpenVINO runner: our ONNX graphs (unet / step / fused; fp32, fp16 or int8) on the CPU.

The inference precision is always set explicitly: without a hint OpenVINO picks bf16 on
CPUs with AMX / avx512_bf16, silently. ``precision="fp32"`` is exact (matches ONNX Runtime to
~1e-5); ``"bf16"`` is the fast mode on such CPUs. The precision OpenVINO actually compiled for
is read back and stated in :attr:`description`; a mismatch is an error, never a quiet fallback.
Compiling takes seconds, so the compiled model is cached on disk (``cache_dir``; ``""`` disables).

Two load-time changes make OpenVINO's CPU kernels faster on our graphs, neither changes the math
(benchmarks/NOTES.md, sessions 11-12): the channel LayerNorms and GroupNorms, exported in ONNX Runtime's
shapes, are rewritten into ops that need no layout reorders around the convolutions
(:mod:`.openvino_rewrites`), and with ``static_shapes`` each input size is compiled as its own static
model (no run-time shape arithmetic; every new size compiles once, then comes from the disk cache;
beyond :data:`MAX_STATIC_SIZES` sizes per runner the rest share one dynamic model).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..diffusion.metadata import META_KEY, ArtifactMeta
from ..errors import BackendUnavailable, CheckpointError, OptionError, RDDMError
from .base import Runner, threads_note
from .openvino_rewrites import rewrite
from .registry import PRECISION, cache_dir_problem, optional_cache_dir, parse_device, user_cache_dir

OV_PRECISION = {"fp32": "f32", "bf16": "bf16"}
MAX_STATIC_SIZES = 8  # static models compiled per runner (each ~ the weights' size in the disk cache)


def _ov():
    try:
        import openvino
    except ImportError:
        raise BackendUnavailable("the openvino backend needs OpenVINO: pip install 'rddm-infer[openvino]'") from None
    return openvino


def default_cache_dir() -> Path:
    return user_cache_dir("openvino")


def _io(ports, meta: ArtifactMeta) -> dict:
    """OpenVINO ports -> {name: (rank or None, dtype name)}, each port under its contract name where it has one
    (a port may carry several tensor names), as the graph contract is checked."""
    kind = meta.kind
    contract = {*kind.inputs, *kind.optional_inputs, *kind.outputs}
    out = {}
    for port in ports:
        names = port.get_names()
        name = next((n for n in sorted(names) if n in contract), port.get_any_name() if names else "(unnamed)")
        rank = port.get_partial_shape().rank
        out[name] = (rank.get_length() if rank.is_static else None, _dtype(port.get_element_type()))
    return out


def _dtype(element_type) -> str:
    """An OpenVINO element type as numpy names it (f32 -> float32), or OpenVINO's own name."""
    try:
        return str(element_type.to_dtype())
    except Exception:  # types numpy has no name for (dynamic, u1, ...)
        return element_type.get_type_name()


class OpenVINORunner(Runner):
    """An ONNX artifact compiled by OpenVINO for the CPU, with one reusable infer request."""

    name = "openvino"
    attention_matrices = 1.25  # its softmax runs in place: measured 1.0-1.2x one attention matrix per call

    def __init__(self, path: str | os.PathLike, precision: str = "fp32", threads: int | None = None,
                 cache_dir: str | os.PathLike | None = None, device: str | None = None, static_shapes: bool = True,
                 rewrite_norms: bool = True):
        ov = _ov()
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: no such model file")
        if parse_device(device)[0] == "cuda":
            raise BackendUnavailable(f"--device {device}: the openvino backend runs on the CPU here "
                                     f"(use onnxruntime or tensorrt on a CUDA GPU)")
        if precision not in PRECISION:
            raise OptionError(f"openvino option 'precision' must be one of {', '.join(PRECISION)}, got {precision!r}")
        self.precision, self.threads, self.static_shapes = precision, threads, bool(static_shapes)
        self.cache_dir = default_cache_dir() if cache_dir is None else (Path(cache_dir) if str(cache_dir) else None)
        self._core = core = ov.Core()
        if precision == "bf16" and "BF16" not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
            raise BackendUnavailable("openvino: bf16 was asked for but this CPU has no bf16 support "
                                     "(bf16 needs AMX or avx512_bf16); use --precision fp32")
        try:
            model = core.read_model(str(self.path))
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise CheckpointError(f"{self.path}: not a loadable ONNX model ({first[:200]})") from None
        if not model.has_rt_info(["framework", META_KEY]):
            raise CheckpointError(f"{self.path}: ONNX model has no '{META_KEY}' metadata; export it with rddm-export")
        super().__init__(ArtifactMeta.from_json(model.get_rt_info(["framework", META_KEY]).astype(str),
                                                where=str(self.path)))
        problem = self.meta.contract_problem(_io(model.inputs, self.meta), _io(model.outputs, self.meta))
        if problem:
            raise CheckpointError(f"{self.path}: not a usable {self.meta.graph} graph: {problem}")
        self.rewrites = rewrite(model) if rewrite_norms else {}  # {rewrite: count}, see openvino_rewrites
        self._model = model
        self._config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": OV_PRECISION[precision],
                                        "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            self._config["INFERENCE_NUM_THREADS"] = int(threads)
        if cache_dir is not None and self.cache_dir is not None and (cause := cache_dir_problem(self.cache_dir)):
            raise OptionError(f"--cache-dir {self.cache_dir}: cannot be used ({cause}); '' turns the cache off")
        if self.cache_dir is not None:  # the default cache only saves time: unusable, it is stated and skipped
            self.cache_dir = optional_cache_dir(self.cache_dir, "OpenVINO model cache")
        if self.cache_dir is not None:
            self._config["CACHE_DIR"] = str(self.cache_dir)
        # A port can carry several tensor names (any_name may pick an internal one): index them all.
        self._inputs = {n: i for i, port in enumerate(model.inputs) for n in port.get_names()}
        self._outputs = {n: i for i, port in enumerate(model.outputs) for n in port.get_names()}
        self._compiled: dict[tuple | None, Any] = {}  # input shapes (None: dynamic) -> compiled model
        self._requests: dict[tuple | None, Any] = {}
        self.compiled_precision = None
        if not self.static_shapes:
            self._compile(None)

    def _compile(self, shapes: tuple | None):
        """Compile the model for these input shapes (None: as exported, dynamic) and check its precision."""
        try:
            model = self._model
            if shapes is not None:
                model = model.clone()
                model.reshape({i: list(shape) for i, shape in enumerate(shapes)})
            compiled = self._core.compile_model(model, "CPU", self._config)
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise RDDMError(f"{self.path}: OpenVINO could not compile the model ({first[:200]})") from None
        hint = compiled.get_property("INFERENCE_PRECISION_HINT")
        got = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)
        self.compiled_precision = {"float32": "fp32", "f32": "fp32", "bfloat16": "bf16", "bf16": "bf16"}.get(got, got)
        if self.compiled_precision != self.precision:
            raise BackendUnavailable(f"openvino: {self.precision} was asked for but this CPU runs {got} "
                                     f"(bf16 needs AMX or avx512_bf16); use --precision fp32")
        self._compiled[shapes] = compiled
        return compiled

    def _request_for(self, shapes: tuple | None):
        key = shapes if self.static_shapes else None
        if key not in self._compiled and sum(k is not None for k in self._compiled) >= MAX_STATIC_SIZES:
            key = None  # a folder of many sizes: further sizes share the dynamic model (same math, slower calls)
        if key not in self._requests:
            compiled = self._compiled.get(key) or self._compile(key)
            if not self.active:  # an infer outside activate(): a fresh request, not kept
                return compiled.create_infer_request()
            self._requests[key] = compiled.create_infer_request()
        return self._requests[key]

    @property
    def description(self) -> str:
        exact = "fp32 exact" if self.precision == "fp32" else "bf16 inference precision"
        graph = "" if self.meta.precision == "fp32" else f", {self.meta.precision} graph"
        shapes = f", compiled once per input size (up to {MAX_STATIC_SIZES})" if self.static_shapes else ", dynamic shapes"
        norms = "" if self.rewrites else ", norms as exported"
        return f"openvino (CPU, {exact}{graph}{threads_note(self.threads)}{shapes}{norms})"

    def _deactivate(self) -> None:
        self._requests = {}

    def infer(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        feeds = {self._inputs[k]: np.ascontiguousarray(v, dtype=np.float32) for k, v in feeds.items()
                 if k in self._inputs}
        shapes = tuple(feeds[i].shape for i in sorted(feeds)) if len(feeds) == len(self._model.inputs) else None
        request = self._request_for(shapes)
        try:  # share_inputs: OpenVINO reads the numpy buffers in place instead of copying them in
            results = request.infer(feeds, share_inputs=True)
        except Exception as e:  # e.g. out of memory for a huge tile: that image fails, the run goes on
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise RDDMError(f"{self.path.name}: inference failed ({first[:200]})") from None
        values = results.to_tuple()
        return {n: np.array(values[i]) for n, i in self._outputs.items()}
