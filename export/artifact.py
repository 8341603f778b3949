"""One exported file from start to finish: its metadata, its name, write -> validate -> rename.

Every artifact (ONNX fp32 / fp16 / int8, TensorRT engine) is written to a hidden temp
file beside its final path, validated there, and renamed into place only once it
passed: a file at a reported path has been checked. The :class:`ArtifactMeta` the
writer stamped into the file travels with it (``Artifact.meta``), so nothing reads
back a file it has just written to learn what it holds.
"""

from __future__ import annotations

import os
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from rddm_infer.backends.registry import artifact_kind, backends_for
from rddm_infer.diffusion.graph_kinds import graph_kind
from rddm_infer.diffusion.metadata import META_KEY, ArtifactMeta
from rddm_infer.io.atomic import atomic_path, ensure_folder, remove_stale_temps_in
from rddm_infer.errors import CheckpointError
from rddm_infer.diffusion.schedule import SamplingPlan

if TYPE_CHECKING:  # torch only for the type: this module stays importable without it
    from rddm_infer.model import LoadedModel


@dataclass
class Artifact:
    """One written file and what is known about it (the report's row)."""

    path: Path
    format: str  # onnx | tensorrt
    meta: ArtifactMeta
    build_s: float
    validation: object | None = None  # rddm_export.validate.Validation
    notes: list[str] = field(default_factory=list)

    @property
    def graph(self) -> str:
        return self.meta.graph

    @property
    def precision(self) -> str:
        return self.meta.precision

    @property
    def size(self) -> int:
        return self.path.stat().st_size

    @property
    def backend(self) -> str:
        """The registry's first backend that runs this file's artifact kind (the one ``auto`` prefers without a
        calibration table)."""
        kind = artifact_kind(self.path)
        return backends_for(kind)[0].name

    def restore_command(self) -> str:
        return f"rddm-infer restore INPUT -o restored --model {shlex.quote(str(self.path))} --backend {self.backend}"

    def to_dict(self) -> dict:
        v = self.validation
        return {"path": str(self.path), "format": self.format, "graph": self.graph, "precision": self.precision,
                "bytes": self.size, "build_s": round(self.build_s, 3), "validated": v is not None and v.ok,
                "checks": [dict(what=c.what, shape=list(c.shape), metric=c.metric, value=c.value, limit=c.limit)
                           for c in v.checks] if v else [], "command": self.restore_command(), "notes": self.notes}


def artifact_name(graph: str, precision: str, steps: int, suffix: str = ".onnx") -> str:
    """``step_fp32.onnx``, ``fused5_fp16.onnx``: K is in the name only where the kind bakes it in."""
    return f"{graph}{steps if graph_kind(graph).bakes_plan else ''}_{precision}{suffix}"


def default_out_dir(checkpoint: str | os.PathLike) -> Path:
    """``<stem>_onnx/`` in the current directory: never beside the checkpoint (it may sit inside a package)."""
    return Path.cwd() / f"{Path(checkpoint).stem}_onnx"


def prepare_out_dir(out: Path) -> Path:
    """Create the output folder (one-line error when it cannot be) and remove temp files a killed export left."""
    ensure_folder(out)
    remove_stale_temps_in(out)  # left by an export killed between write and rename
    return out


def write_validated(path: Path, fmt: str, meta: ArtifactMeta, write: Callable[[Path], None],
                    validate: Callable[[Path, Path], object] | None, log: Callable[[str], None] = lambda s: None
                    ) -> Artifact:
    """``write(tmp)`` a hidden temp file beside ``path``, ``validate(tmp, path)`` it (``path``: the name to
    report), then rename it into place."""
    t0 = time.perf_counter()
    with atomic_path(path) as tmp:
        write(tmp)
        build_s = time.perf_counter() - t0
        validation = None
        if validate is not None:
            log(f"validating {path.name} against PyTorch")
            validation = validate(tmp, path)
    notes = [] if validate is not None else ["not validated (--no-validate)"]
    return Artifact(path, fmt, meta, build_s, validation, notes)


# -- the ``rddm`` metadata of ONNX files (TensorRT engines carry it in rddm_infer.backends.engine_file's header)

def artifact_meta(loaded: "LoadedModel", kind: str, steps: int, eta: float, precision: str, **extra) -> ArtifactMeta:
    """The ``rddm`` self-description of one graph exported from ``loaded``."""
    plan = SamplingPlan.create(loaded.diffusion, steps, eta)  # validates K and applies the η rule
    info = dict(loaded.info)
    recommended = info.pop("recommended_steps", None)  # measured on the network: every graph that takes steps keeps it
    correlated = info.pop("correlated_noise_mode", None)  # measured on the network: every graph keeps it
    return ArtifactMeta(graph=kind, unet=loaded.unet.to_dict(), diffusion=loaded.diffusion.to_dict(), steps=steps,
                        eta=plan.eta, precision=precision, size_multiple=loaded.unet.size_multiple,
                        source=Path(loaded.source).name,  # the file's name only: no build-machine paths ship
                        extra={**info, **extra},
                        recommended_steps=None if graph_kind(kind).bakes_plan else recommended,
                        correlated_noise_mode=correlated,
                        attention=_attention(loaded))


def _attention(loaded: "LoadedModel") -> list[dict]:
    """Every attention layer, measured on the network: the runtime estimates a tile's memory from it."""
    from rddm_infer.model import attention_layout

    return attention_layout(loaded.net, loaded.unet.size_multiple)


def set_metadata(model, meta: ArtifactMeta) -> None:
    """Record the ``rddm`` JSON in an ONNX model's ``metadata_props`` (replacing an older value)."""
    for p in [p for p in model.metadata_props if p.key == META_KEY]:
        model.metadata_props.remove(p)
    model.metadata_props.add(key=META_KEY, value=meta.to_json())
    model.producer_name = "rddm-export"
    model.doc_string = f"RDDM {meta.graph} graph ({meta.precision}) from {meta.source}"


def get_metadata(model, where: str) -> ArtifactMeta:
    """The ``rddm`` self-description of an in-memory ONNX model."""
    props = {p.key: p.value for p in model.metadata_props}
    if META_KEY not in props:
        raise CheckpointError(f"{where}: no '{META_KEY}' metadata (not exported by rddm-export)")
    return ArtifactMeta.from_json(props[META_KEY], where=where)


def read_metadata(path: str | os.PathLike) -> ArtifactMeta:
    """The ``rddm`` self-description of an exported ONNX file (for files this process did not write)."""
    import onnx

    return get_metadata(onnx.load(str(path), load_external_data=False), str(path))


def save_model(model, path: str | os.PathLike) -> Path:
    """Atomic ONNX write: temp file beside the target, then os.replace."""
    import onnx

    with atomic_path(path) as tmp:
        onnx.save(model, str(tmp))
    return Path(path)
