"""OpenVINO runner: our ONNX graphs (unet / step / fused; fp32, fp16 or int8) on the CPU.

The inference precision is always set explicitly: without a hint OpenVINO picks bf16 on
CPUs with AMX / avx512_bf16, silently. ``precision="fp32"`` is exact (matches ONNX Runtime to
~1e-5); ``"bf16"`` is the fast mode on such CPUs. The precision OpenVINO actually compiled for
is read back and stated in :attr:`description`; a mismatch is an error, never a quiet fallback.
Compiling takes seconds, so the compiled model is cached on disk (``cache_dir``; ``""`` disables).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..artifact import META_KEY, ArtifactMeta
from ..errors import BackendUnavailable, CheckpointError, OptionError, RDDMError
from .base import Runner
from .registry import PRECISION, parse_device, user_cache_dir

OV_PRECISION = {"fp32": "f32", "bf16": "bf16"}


def _ov():
    try:
        import openvino
    except ImportError:
        raise BackendUnavailable("the openvino backend needs OpenVINO: pip install 'rddm-infer[openvino]'") from None
    return openvino


def default_cache_dir() -> Path:
    return user_cache_dir("openvino")


class OpenVINORunner(Runner):
    """An ONNX artifact compiled by OpenVINO for the CPU, with one reusable infer request."""

    name = "openvino"

    def __init__(self, path: str | os.PathLike, precision: str = "fp32", threads: int | None = None,
                 cache_dir: str | os.PathLike | None = None, device: str | None = None):
        ov = _ov()
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: no such model file")
        if parse_device(device)[0] == "cuda":
            raise BackendUnavailable(f"--device {device}: the openvino backend runs on the CPU here "
                                     f"(use onnxruntime or tensorrt on a CUDA GPU)")
        if precision not in PRECISION:
            raise OptionError(f"openvino option 'precision' must be one of {', '.join(PRECISION)}, got {precision!r}")
        self.precision, self.threads = precision, threads
        self.cache_dir = default_cache_dir() if cache_dir is None else (Path(cache_dir) if str(cache_dir) else None)
        core = ov.Core()
        try:
            model = core.read_model(str(self.path))
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise CheckpointError(f"{self.path}: not a loadable ONNX model ({first[:200]})") from None
        if not model.has_rt_info(["framework", META_KEY]):
            raise CheckpointError(f"{self.path}: ONNX model has no '{META_KEY}' metadata; export it with rddm-export")
        super().__init__(ArtifactMeta.from_json(model.get_rt_info(["framework", META_KEY]).astype(str),
                                                where=str(self.path)))
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": OV_PRECISION[precision], "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            config["CACHE_DIR"] = str(self.cache_dir)
        try:  # from the path: the cache then skips reading and compiling the model on later runs
            self.compiled = core.compile_model(str(self.path), "CPU", config)
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise RDDMError(f"{self.path}: OpenVINO could not compile the model ({first[:200]})") from None
        hint = self.compiled.get_property("INFERENCE_PRECISION_HINT")
        got = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)
        self.compiled_precision = {"float32": "fp32", "f32": "fp32", "bfloat16": "bf16", "bf16": "bf16"}.get(got, got)
        if self.compiled_precision != precision:
            raise BackendUnavailable(f"openvino: {precision} was asked for but this CPU runs {got} "
                                     f"(bf16 needs AMX or avx512_bf16); use --precision fp32")
        # A port can carry several tensor names (any_name may pick an internal one): index them all.
        self._inputs = {n: i for i, port in enumerate(self.compiled.inputs) for n in port.get_names()}
        self._outputs = {n: port for port in self.compiled.outputs for n in port.get_names()}
        self._request = None

    @property
    def description(self) -> str:
        exact = "fp32 exact" if self.precision == "fp32" else "bf16 inference precision"
        graph = "" if self.meta.precision == "fp32" else f", {self.meta.precision} graph"
        return f"openvino (CPU, {exact}{graph}{f', {self.threads} threads' if self.threads else ''})"

    def _activate(self) -> None:
        self._request = self.compiled.create_infer_request()

    def _deactivate(self) -> None:
        self._request = None

    def infer(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        request = self._request or self.compiled.create_infer_request()
        feeds = {self._inputs[k]: np.ascontiguousarray(v, dtype=np.float32) for k, v in feeds.items()
                 if k in self._inputs}
        try:
            results = request.infer(feeds)
        except Exception as e:  # e.g. out of memory for a huge tile: that image fails, the run goes on
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise RDDMError(f"{self.path.name}: inference failed ({first[:200]})") from None
        return {n: np.array(results[port]) for n, port in self._outputs.items()}
