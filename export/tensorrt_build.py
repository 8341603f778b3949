"""ONNX -> TensorRT engine file (TensorRT 10.x / 11.x Python API), with our metadata header.

Networks are created strongly typed: precision comes from the graph itself (the mixed
fp16 ONNX from :mod:`rddm_export.fp16`), which is the only mode TensorRT 11 has and
works the same on 10.x. One optimization profile covers every image input (min / opt /
max batch, height, width); the timing cache is loaded and saved beside the engines so
rebuilds are fast. The engine is written with :func:`rddm_infer.backends.engine_file.write_engine`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from rddm_infer.io.atomic import write_bytes_atomic
from rddm_infer.diffusion.metadata import ArtifactMeta
from rddm_infer.backends.engine_file import BuildTarget, local_target, write_engine
from rddm_infer.errors import BackendUnavailable, RDDMError
from rddm_infer.diffusion.graph_kinds import KINDS, time_dims
from rddm_infer.diffusion.schedule import NUM_COEFS

from .artifact import Artifact, write_validated

Shape = tuple[int, ...]


@dataclass(frozen=True)
class EngineProfile:
    """min / opt / max (batch, height, width) of the image inputs."""

    min: tuple[int, int, int] = (1, 64, 64)
    opt: tuple[int, int, int] = (1, 512, 512)
    max: tuple[int, int, int] = (4, 1024, 1024)

    @classmethod
    def parse(cls, min: str, opt: str, max: str) -> "EngineProfile":
        """From ``BxHxW`` (or ``BxCxHxW``) strings, e.g. ``1x512x512``."""
        return cls(*(_parse_shape(s, what) for s, what in ((min, "min"), (opt, "opt"), (max, "max"))))

    def check(self, size_multiple: int) -> None:
        for i, axis in enumerate(("batch", "height", "width")):
            lo, mid, hi = self.min[i], self.opt[i], self.max[i]
            if not 1 <= lo <= mid <= hi:
                raise RDDMError(f"TensorRT profile: {axis} must satisfy 1 <= min <= opt <= max (got {lo}, {mid}, {hi})")
            if i and any(v % size_multiple for v in (lo, mid, hi)):
                raise RDDMError(f"TensorRT profile: {axis} values must be multiples of the model's size multiple "
                                f"{size_multiple} (got {lo}, {mid}, {hi})")

    def input_shapes(self, meta: ArtifactMeta) -> dict[str, tuple[Shape, Shape, Shape]]:
        """(min, opt, max) for every input of a graph of ``meta``'s kind (names from the graph contract)."""
        self.check(meta.size_multiple)
        c = meta.channels
        image = tuple((b, c, h, w) for b, h, w in (self.min, self.opt, self.max))
        other = {"t": tuple((s[0], *time_dims(meta.config.time_input)) for s in image), "coef": ((NUM_COEFS,),) * 3,
                 "step_noise": tuple((meta.plan().steps, *s) for s in image)}
        return {n: other.get(n, image) for n in KINDS[meta.graph].input_names(meta.plan().stochastic)}


def _parse_shape(text: str, what: str) -> tuple[int, int, int]:
    parts = [p for p in re.split(r"[x×,]", str(text).strip().lower()) if p]
    if len(parts) not in (3, 4) or not all(p.isdigit() for p in parts):
        raise RDDMError(f"TensorRT {what} shape {text!r}: expected BxHxW such as 1x512x512")
    b, *_, h, w = (int(p) for p in parts)
    return b, h, w


def import_tensorrt():
    """The tensorrt module, or a clear error saying how to get it."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise BackendUnavailable(f"building engines needs TensorRT 10 or 11 and an NVIDIA GPU "
                                 f"(pip install 'rddm-infer[tensorrt]'): {e}") from None
    return trt


def current_target(trt) -> BuildTarget:
    """This machine's TensorRT version and GPU 0, or a clear error when cuda-python or the GPU is missing."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError as e:
        raise BackendUnavailable(f"building engines needs cuda-python (pip install 'rddm-infer[tensorrt]'): {e}") from None
    return local_target(trt, cudart)


def build_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, meta: ArtifactMeta,
                 profile: EngineProfile = EngineProfile(), *, opt_level: int = 3,
                 timing_cache: str | os.PathLike | None = None, workspace_gb: float | None = None,
                 log: Callable[[str], None] = lambda s: None) -> Path:
    """Parse ``onnx_path``, build a strongly typed engine for ``profile``, write it with our header."""
    shapes = profile.input_shapes(meta)  # option errors before any GPU work
    if not 0 <= opt_level <= 5:
        raise RDDMError(f"builder optimization level must be 0-5, got {opt_level}")
    trt = import_tensorrt()
    target = current_target(trt)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors))
        raise RDDMError(f"{onnx_path}: TensorRT cannot parse the graph: {errors[:400]}")

    config = builder.create_builder_config()
    config.builder_optimization_level = opt_level
    if workspace_gb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if meta.precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # TF32 convolutions would miss the fp32 tolerance
    opt_profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        name = network.get_input(i).name
        if name not in shapes:
            raise RDDMError(f"{onnx_path}: unexpected graph input {name!r} for a {meta.graph} graph")
        opt_profile.set_shape(name, *shapes[name])
    config.add_optimization_profile(opt_profile)

    cache_path = Path(timing_cache) if timing_cache else None
    cache_bytes = cache_path.read_bytes() if cache_path and cache_path.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)

    log(f"building TensorRT engine from {Path(onnx_path).name} for {target.describe()}")
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RDDMError(f"{onnx_path}: TensorRT failed to build an engine (see the messages above); "
                        f"try a smaller --max-shape or a larger --workspace-gb")
    if cache_path:
        _write_atomic(cache_path, memoryview(config.get_timing_cache().serialize()))
    return write_engine(engine_path, meta, memoryview(plan), target)


def build_engine_artifact(onnx: Artifact, loaded, *, profile: EngineProfile = EngineProfile(), opt_level: int = 3,
                          timing_cache: str | os.PathLike | None = None, workspace_gb: float | None = None,
                          validate: bool = True, reference=None, log: Callable[[str], None] = lambda s: None
                          ) -> Artifact:
    """Build the engine of an exported ONNX artifact beside it and validate it against PyTorch (the report's row);
    ``reference``: the export's :func:`rddm_export.validate.reference_sampler`, reused."""
    cache = Path(timing_cache) if timing_cache else onnx.path.parent / "timing.cache"

    def write(tmp: Path) -> None:
        build_engine(onnx.path, tmp, onnx.meta, profile, opt_level=opt_level, timing_cache=cache,
                     workspace_gb=workspace_gb, log=log)

    def check(tmp: Path, final: Path):
        from .validate import validate_engine

        return validate_engine(tmp, loaded, profile, report_as=final, reference=reference)

    return write_validated(onnx.path.with_suffix(".engine"), "tensorrt", onnx.meta, write,
                           check if validate else None, log)


def _write_atomic(path: Path, data) -> None:
    write_bytes_atomic(path, bytes(data))
