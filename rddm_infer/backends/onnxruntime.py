"""ONNX Runtime runner: CPU, CUDA and TensorRT execution providers.

On a GPU provider the runner's handles are device ``OrtValue``s and every call goes
through IO binding, so the sampler state (``x_t``) stays on the GPU across the K
steps of a ``step`` graph; only the final image is copied back.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..diffusion.metadata import META_KEY, ArtifactMeta
from ..errors import BackendUnavailable, CheckpointError, OptionError, RDDMError
from .base import Runner, threads_note
from .registry import optional_cache_dir, parse_device

PROVIDER_ALIASES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
                    "tensorrt": "TensorrtExecutionProvider", "trt": "TensorrtExecutionProvider"}
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
FASTEST_FIRST = (*GPU_PROVIDERS, "CPUExecutionProvider")
TRT_CACHE = Path(os.environ.get("RDDM_TRT_CACHE", Path.home() / ".cache" / "rddm-infer" / "ort-trt"))


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise BackendUnavailable("the onnxruntime backend needs: pip install onnxruntime (or onnxruntime-gpu)") \
            from None
    return onnxruntime


def available_providers() -> list[str]:
    try:
        return list(_ort().get_available_providers())
    except BackendUnavailable:
        return []


def resolve_providers(providers: Sequence[str] | str | None, available: Sequence[str]) -> list[str]:
    """Short or full provider names -> full names; ``None``/"auto" -> the fastest available ones, in order."""
    if providers in (None, "auto"):
        return [p for p in FASTEST_FIRST if p in available] or ["CPUExecutionProvider"]
    if isinstance(providers, str):
        providers = [p.strip() for p in providers.split(",") if p.strip()]
    full = [PROVIDER_ALIASES.get(p.lower(), p) for p in providers]
    missing = [p for p in full if p not in available]
    if missing:
        raise BackendUnavailable(f"onnxruntime provider(s) {', '.join(missing)} not available here "
                                 f"(available: {', '.join(available) or 'none'}); "
                                 f"GPU providers need onnxruntime-gpu and a CUDA GPU")
    if "CPUExecutionProvider" not in full:
        full.append("CPUExecutionProvider")  # fallback for nodes a GPU provider rejects
    return full


def device_providers(device: str | None, providers, device_id: int | None, available: Sequence[str]):
    """``--device`` onto providers and the CUDA device index: cpu -> the CPU provider, cuda[:N] -> the
    fastest GPU providers on device N. Explicit providers or device_id that contradict it are an error."""
    kind, index = parse_device(device)
    if device_id is not None and index is not None and device_id != index:
        raise OptionError(f"--device {device} contradicts device_id {device_id}")
    device_id = index if index is not None else (device_id or 0)
    if kind == "auto":
        return providers, device_id
    if providers not in (None, "auto"):
        names = [p.strip() for p in providers.split(",")] if isinstance(providers, str) else list(providers)
        first = PROVIDER_ALIASES.get(names[0].lower(), names[0]) if names else "CPUExecutionProvider"
        if (kind == "cpu") != (first == "CPUExecutionProvider"):
            raise OptionError(f"--device {device} contradicts providers {','.join(names)}")
        return providers, device_id
    if kind == "cpu":
        return ["CPUExecutionProvider"], device_id
    gpu = [p for p in GPU_PROVIDERS if p in available]
    if not gpu:
        raise BackendUnavailable(f"--device {device}: onnxruntime has no GPU provider here (available: "
                                 f"{', '.join(available) or 'none'}); pip install 'rddm-infer[gpu]' on a CUDA machine")
    return gpu, device_id


def read_meta(path: str | os.PathLike, custom: Mapping[str, str]) -> ArtifactMeta:
    raw = custom.get(META_KEY)
    if raw is None:
        raise CheckpointError(f"{path}: ONNX model has no '{META_KEY}' metadata; export it with rddm-export")
    return ArtifactMeta.from_json(raw, where=str(path))


def _io(args) -> dict:
    """ONNX Runtime's NodeArgs -> {name: (rank or None, dtype name)}, as the graph contract is checked."""
    return {a.name: (None if a.shape is None else len(a.shape), ORT_DTYPES.get(a.type, a.type)) for a in args}


ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64"}


class OnnxRuntimeRunner(Runner):
    """An ONNX artifact in an ``InferenceSession``; ``threads`` sets intra-op threads (CPU)."""

    name = "onnxruntime"

    def __init__(self, path: str | os.PathLike, providers: Sequence[str] | str | None = None,
                 threads: int | None = None, device_id: int | None = None, device: str | None = None):
        ort = _ort()
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: no such model file")
        providers, self.device_id = device_providers(device, providers, device_id, ort.get_available_providers())
        self.providers = resolve_providers(providers, ort.get_available_providers())
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        self.threads = threads
        if threads:
            opts.intra_op_num_threads = int(threads)
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=opts,
                                                providers=[self._provider_entry(p) for p in self.providers])
        except Exception as e:  # ORT raises its own Fail/InvalidGraph/… types
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise CheckpointError(f"{self.path}: not a loadable ONNX model ({first[:200]})") from None
        super().__init__(read_meta(self.path, self.session.get_modelmeta().custom_metadata_map))
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.input_names = [i.name for i in self.session.get_inputs()]
        problem = self.meta.contract_problem(_io(self.session.get_inputs()), _io(self.session.get_outputs()))
        if problem:
            raise CheckpointError(f"{self.path}: not a usable {self.meta.graph} graph: {problem}")
        self.on_gpu = self.session.get_providers()[0] in GPU_PROVIDERS

    @classmethod
    def choice_reason(cls, kind: str, model, device: str, providers) -> str:
        providers = available_providers() if providers is None else providers
        order = {"cpu": FASTEST_FIRST[-1:], "cuda": GPU_PROVIDERS}.get(device, FASTEST_FIRST)
        return f"ONNX model, fastest provider here: {next((p for p in order if p in providers), order[0])}"

    @classmethod
    def gpu_visible(cls) -> bool:
        return bool(set(GPU_PROVIDERS) & set(available_providers()))

    @classmethod
    def read_meta(cls, path, **model_options) -> ArtifactMeta:
        return cls(path, providers=["CPUExecutionProvider"], **model_options).meta

    def _provider_entry(self, p: str):
        if p == "TensorrtExecutionProvider":
            cache = optional_cache_dir(TRT_CACHE, "TensorRT engine cache")
            if cache is None:
                return p, {"device_id": self.device_id}
            return p, {"device_id": self.device_id, "trt_engine_cache_enable": True,
                       "trt_engine_cache_path": str(cache), "trt_timing_cache_enable": True,
                       "trt_timing_cache_path": str(cache)}
        if p == "CUDAExecutionProvider":
            return p, {"device_id": self.device_id}
        return p

    @property
    def description(self) -> str:
        first = self.session.get_providers()[0]
        return f"onnxruntime ({first}{threads_note(self.threads) if first == 'CPUExecutionProvider' else ''})"

    def _deactivate(self) -> None:
        pass  # the session lives as long as the runner; nothing per-activation to free

    def upload(self, a: np.ndarray) -> Any:
        if not self.on_gpu:
            return a
        return _ort().OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a, dtype=np.float32), "cuda", self.device_id)

    def download(self, h: Any) -> np.ndarray:
        return h.numpy() if hasattr(h, "numpy") and not isinstance(h, np.ndarray) else np.asarray(h)

    def infer(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        feeds = {k: v for k, v in feeds.items() if k in self.input_names}
        try:
            return self._infer(feeds)
        except Exception as e:  # e.g. out of memory for a huge tile: that image fails, the run goes on
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise RDDMError(f"{self.path.name}: inference failed ({first[:200]})") from None

    def _infer(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        if not self.on_gpu:
            outs = self.session.run(self.output_names, {k: np.ascontiguousarray(v) for k, v in feeds.items()})
            return dict(zip(self.output_names, outs))
        binding = self.session.io_binding()
        for k, v in feeds.items():
            if isinstance(v, np.ndarray):
                binding.bind_cpu_input(k, np.ascontiguousarray(v))
            else:
                binding.bind_ortvalue_input(k, v)
        for name in self.output_names:
            binding.bind_output(name, "cuda", self.device_id)
        self.session.run_with_iobinding(binding)
        return dict(zip(self.output_names, binding.get_outputs()))
