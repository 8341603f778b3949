"""Backend registry: which runner loads which artifact, and what ``--backend auto`` picks.

Runners are imported only when used, so listing or choosing backends never pulls in
torch, TensorRT or CUDA.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..artifact import ArtifactMeta
from ..errors import BackendUnavailable, CheckpointError
from .base import EngineSampler, Noise, Runner

BACKENDS = ("auto", "tensorrt", "onnxruntime", "torch")
ENGINE_EXTS = (".engine", ".trt", ".plan")
ONNX_EXTS = (".onnx",)
CHECKPOINT_EXTS = (".safetensors", ".pt", ".pth", ".ckpt")


def installed_modules() -> set[str]:
    """Which optional engines are importable (looked up, not imported: keeps startup fast)."""
    names = {"tensorrt": "tensorrt", "cuda": "cuda.bindings", "torch": "torch", "onnxruntime": "onnxruntime"}
    found = set()
    for key, mod in names.items():
        try:
            if importlib.util.find_spec(mod) is not None:
                found.add(key)
        except (ImportError, ValueError):
            pass
    return found


@dataclass
class Choice:
    backend: str
    model: Path
    options: dict = field(default_factory=dict)
    reason: str = ""


def _sibling_engine(path: Path) -> Path | None:
    return next((p for p in (path.with_suffix(e) for e in ENGINE_EXTS) if p.is_file()), None)


def choose_backend(model: str | os.PathLike, requested: str = "auto", *, modules: set[str] | None = None,
                   providers: list[str] | None = None) -> Choice:
    """Pick the runner for ``model``; ``auto`` takes the fastest one this machine can run, and says why."""
    from .onnxruntime import FASTEST_FIRST, available_providers

    path = Path(model)
    modules = installed_modules() if modules is None else modules
    providers = available_providers() if providers is None else providers
    ext = path.suffix.lower()
    if requested not in BACKENDS:
        raise BackendUnavailable(f"unknown backend {requested!r}; choose one of {', '.join(BACKENDS)}")
    trt_ok = {"tensorrt", "cuda"} <= modules
    engine = path if ext in ENGINE_EXTS else _sibling_engine(path) if ext in ONNX_EXTS else None

    if requested == "tensorrt" or (requested == "auto" and ext in ENGINE_EXTS):
        if engine is None:
            raise CheckpointError(f"{path}: the tensorrt backend runs TensorRT engines (.engine); "
                                  f"build one with `rddm-export CHECKPOINT --tensorrt`")
        if not trt_ok:
            raise BackendUnavailable("the tensorrt backend needs the tensorrt and cuda-python packages "
                                     "(pip install 'rddm-infer[tensorrt]') and an NVIDIA GPU")
        return Choice("tensorrt", engine, reason="native TensorRT engine")
    if requested == "torch" or (requested == "auto" and ext in CHECKPOINT_EXTS):
        if ext not in CHECKPOINT_EXTS:
            raise CheckpointError(f"{path}: the torch backend loads checkpoints ({', '.join(CHECKPOINT_EXTS)})")
        if "torch" not in modules:
            raise BackendUnavailable("the torch backend needs PyTorch: pip install 'rddm-infer[torch]'")
        return Choice("torch", path, reason="PyTorch checkpoint")
    if ext not in ONNX_EXTS:
        raise CheckpointError(f"{path}: unknown model type {ext or '(no extension)'!r}; expected .onnx, "
                              f"a TensorRT engine ({', '.join(ENGINE_EXTS)}) or a checkpoint "
                              f"({', '.join(CHECKPOINT_EXTS)})")
    if requested == "auto" and engine is not None and trt_ok:
        return Choice("tensorrt", engine, reason=f"TensorRT engine {engine.name} found beside the ONNX model")
    if "onnxruntime" not in modules:
        raise BackendUnavailable("the onnxruntime backend needs: pip install onnxruntime (or onnxruntime-gpu)")
    best = next((p for p in FASTEST_FIRST if p in providers), "CPUExecutionProvider")
    return Choice("onnxruntime", path, reason=f"ONNX model, fastest provider here: {best}")


def load_runner(model: str | os.PathLike, backend: str = "auto", **options) -> tuple[Runner, Choice]:
    """Choose and construct the runner; ``options`` go to its constructor (e.g. providers, threads)."""
    choice = choose_backend(model, backend)
    opts = {**choice.options, **{k: v for k, v in options.items() if v is not None}}
    if choice.backend == "tensorrt":
        from .tensorrt import TensorRTRunner
        opts = {k: v for k, v in opts.items() if k in ("device_id", "cuda_graph")}
        return TensorRTRunner(choice.model, **opts), choice
    if choice.backend == "torch":
        from .torch import TorchRunner
        opts = {k: v for k, v in opts.items() if k in ("device", "compile")}
        return TorchRunner(choice.model, **opts), choice
    from .onnxruntime import OnnxRuntimeRunner
    opts = {k: v for k, v in opts.items() if k in ("providers", "threads", "device_id")}
    return OnnxRuntimeRunner(choice.model, **opts), choice


def read_artifact_meta(model: str | os.PathLike) -> ArtifactMeta:
    """An artifact's self-description without running it (ONNX: a CPU session; engines: the header)."""
    path = Path(model)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such model file")
    ext = path.suffix.lower()
    if ext in ENGINE_EXTS:
        from ..engine_file import read_engine
        return read_engine(path)[0]
    if ext in CHECKPOINT_EXTS:
        from .torch import TorchRunner
        return TorchRunner(path, device="cpu").meta
    from .onnxruntime import OnnxRuntimeRunner
    return OnnxRuntimeRunner(path, providers=["CPUExecutionProvider"]).meta


__all__ = ["BACKENDS", "Choice", "EngineSampler", "Noise", "Runner", "choose_backend", "installed_modules",
           "load_runner", "read_artifact_meta"]
