"""Our TensorRT engine file: a length-prefixed JSON header, then the serialized TensorRT plan.

Layout (little endian)::

    b"RDDMTRT\\0"  magic (8 bytes)
    uint32        header format version (1)
    uint32        N, byte length of the JSON header
    N bytes       UTF-8 JSON {"rddm": <ArtifactMeta JSON>, "tensorrt": {"version", "compute_capability", "device"}}
    rest          the engine, exactly as ``IBuilder.build_serialized_network`` returned it

The artifact therefore describes itself (no side file), and a runtime can tell an
engine built for another TensorRT version or GPU *before* handing it to TensorRT,
with a message that says to rebuild. stdlib only: the lean runtime reads it too.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from ..io.atomic import atomic_path
from ..diffusion.metadata import ArtifactMeta
from ..errors import BackendUnavailable, CheckpointError

MAGIC = b"RDDMTRT\x00"
VERSION = 1
_PREFIX = struct.Struct("<8sII")
_MAX_HEADER = 1 << 20  # a header is a few KB; anything larger is a corrupt length


@dataclass(frozen=True)
class BuildTarget:
    """What an engine was built for: it only runs under the same TensorRT on the same GPU architecture."""

    tensorrt_version: str
    compute_capability: tuple[int, int]
    device: str = ""

    def to_dict(self) -> dict:
        return {"version": self.tensorrt_version, "compute_capability": list(self.compute_capability),
                "device": self.device}

    @classmethod
    def from_dict(cls, d: dict) -> "BuildTarget":
        major, minor = (int(v) for v in d["compute_capability"])
        return cls(str(d["version"]), (major, minor), str(d.get("device", "")))

    def describe(self) -> str:
        cc = ".".join(map(str, self.compute_capability))
        return f"TensorRT {self.tensorrt_version}, compute capability {cc}" + (f" ({self.device})" if self.device else "")


def write_engine(path: str | os.PathLike, meta: ArtifactMeta, engine_bytes: bytes, target: BuildTarget) -> Path:
    """Write header + engine atomically; the target is also recorded in ``meta.extra['tensorrt']``."""
    path = Path(path)
    meta.extra = {**meta.extra, "tensorrt": target.to_dict()}
    header = json.dumps({"rddm": json.loads(meta.to_json()), "tensorrt": target.to_dict()}, sort_keys=True).encode()
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(_PREFIX.pack(MAGIC, VERSION, len(header)))
        f.write(header)
        f.write(memoryview(engine_bytes))
    return path


def read_header(path: str | os.PathLike) -> tuple[ArtifactMeta, BuildTarget, int]:
    """(metadata, build target, byte offset of the engine) without reading the engine itself."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            prefix = f.read(_PREFIX.size)
            if len(prefix) < _PREFIX.size or not prefix.startswith(MAGIC):
                raise CheckpointError(f"{path}: not an rddm-infer TensorRT engine (no {MAGIC[:-1].decode()} header); "
                                      f"build one with `rddm-export CHECKPOINT --tensorrt`")
            _, version, size = _PREFIX.unpack(prefix)
            if version != VERSION:
                raise CheckpointError(f"{path}: engine header version {version} is not supported (expected {VERSION}); "
                                      f"rebuild it with this version's rddm-export")
            raw = f.read(size) if size <= _MAX_HEADER else b""
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read engine file ({e.strerror or e})") from None
    if len(raw) != size:
        raise CheckpointError(f"{path}: truncated engine header")
    try:
        doc = json.loads(raw.decode("utf-8"))
        target = BuildTarget.from_dict(doc["tensorrt"])
        meta_json = json.dumps(doc["rddm"])
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"{path}: corrupt engine header (not the expected JSON)") from None
    meta = ArtifactMeta.from_json(meta_json, where=str(path))
    meta.extra = {**meta.extra, "tensorrt": target.to_dict()}
    return meta, target, _PREFIX.size + size


def read_engine(path: str | os.PathLike) -> tuple[ArtifactMeta, bytes]:
    """(metadata, serialized engine); ``meta.extra['tensorrt']`` says what it was built for."""
    meta, _, offset = read_header(path)
    with open(path, "rb") as f:
        f.seek(offset)
        engine = f.read()
    if not engine:
        raise CheckpointError(f"{path}: the engine file holds a header but no engine")
    return meta, engine


def local_target(trt, cudart, device: int = 0) -> BuildTarget:
    """This machine's TensorRT and GPU, from the ``tensorrt`` and ``cuda.bindings.runtime`` modules passed in
    (the caller imports them, so this module stays stdlib-only)."""
    err, count = cudart.cudaGetDeviceCount()
    if int(err) != 0 or count <= device:
        raise BackendUnavailable(f"TensorRT needs an NVIDIA GPU; CUDA reports none usable ({err!r}, {count} devices)")
    err, prop = cudart.cudaGetDeviceProperties(device)
    if int(err) != 0:
        raise BackendUnavailable(f"cannot query GPU {device} ({err!r})")
    name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
    return BuildTarget(str(trt.__version__), (int(prop.major), int(prop.minor)), name.rstrip("\x00"))


def check_compatible(path: str | os.PathLike, built: BuildTarget, here: BuildTarget) -> None:
    """Refuse, with the fix, an engine built for another TensorRT release or GPU architecture.

    Runtime use: ``meta, plan = read_engine(p)``, then
    ``check_compatible(p, BuildTarget.from_dict(meta.extra["tensorrt"]), local_target(trt, cudart))``.
    """
    problems = []
    if _release(built.tensorrt_version) != _release(here.tensorrt_version):
        problems.append("TensorRT version")
    if tuple(built.compute_capability) != tuple(here.compute_capability):
        problems.append("GPU compute capability")
    if problems:
        raise CheckpointError(f"{path}: engine built for {built.describe()}, this machine has {here.describe()} "
                              f"({' and '.join(problems)} differ); rebuild it here with "
                              f"`rddm-export CHECKPOINT --tensorrt`, or use the ONNX model")


def _release(version: str) -> tuple[str, ...]:
    """major.minor.patch: TensorRT plans are only portable within one release."""
    return tuple(str(version).split(".")[:3])
