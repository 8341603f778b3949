"""The one place a backend is chosen: which runner loads which model file, and why.

``resolve_model`` names the file (the built-in model when none is given), ``choose_backend`` picks the
registry row (the user's, this machine's timing table, or the first installed row that runs the artifact)
and ``load_runner`` constructs it with its checked options. Runners are imported only when used, so
choosing never pulls in torch, TensorRT or CUDA.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..diffusion.metadata import ArtifactMeta
from ..errors import BackendUnavailable, CheckpointError, OptionError, RDDMError  # noqa: F401
from .base import Runner
from .onnx_external import check_external_data
from .registry import (ARTIFACT_WORDS, ARTIFACTS, BACKENDS, BY_NAME, backends_for, MODEL_OPTIONS, SAMPLING_OPTIONS,
                       BackendSpec, _importable, artifact_kind, backend_spec, check_baked_options,
                       parse_device, split_options)

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "weights" / "default.onnx"
DEFAULT_CHECKPOINT = DEFAULT_MODEL.with_suffix(".safetensors")  # what the built-in ONNX model was exported from


def resolve_model(model: str | os.PathLike | None, backend: str = "auto") -> Path:
    """The given model path, or the built-in default (a clear error when none is installed): the
    checkpoint for a backend that loads only checkpoints (``--backend torch``), else the ONNX model."""
    if model is not None:
        path = Path(model)
        if not path.exists():
            raise CheckpointError(f"{path}: no such model file")
        if path.suffix.lower() == ".onnx" and path.is_file():
            check_external_data(path)  # before ONNX Runtime opens it: older releases follow any path
        return path
    if backend in BY_NAME and BY_NAME[backend].artifacts == ("checkpoint",):
        if not DEFAULT_CHECKPOINT.is_file():
            raise CheckpointError(f"no built-in checkpoint is installed ({DEFAULT_CHECKPOINT} is missing); "
                                  f"pass --model PATH")
        return DEFAULT_CHECKPOINT
    if not DEFAULT_MODEL.is_file():
        raise CheckpointError(f"no built-in model is installed ({DEFAULT_MODEL} is missing); "
                              f"pass --model PATH (an .onnx model, a TensorRT .engine or a checkpoint)")
    return DEFAULT_MODEL


ENGINE_EXTS = ARTIFACTS["engine"]
ONNX_EXTS = ARTIFACTS["onnx"]
CHECKPOINT_EXTS = ARTIFACTS["checkpoint"]


def installed_modules() -> set[str]:
    """Which modules the backends need are importable (looked up, not imported: keeps startup fast)."""
    return {m for b in BACKENDS for m in b.requires if _importable(m)}


@dataclass
class Choice:
    backend: str
    model: Path
    options: dict = field(default_factory=dict)
    reason: str = ""


def _sibling_engine(path: Path) -> Path | None:
    return next((p for p in (path.with_suffix(e) for e in ENGINE_EXTS) if p.is_file()), None)


def _runs(spec: BackendSpec, kind: str, engine: Path | None) -> bool:
    return kind in spec.artifacts or ("engine" in spec.artifacts and engine is not None)


def choose_backend(model: str | os.PathLike, requested: str = "auto", *, modules: set[str] | None = None,
                   providers: list[str] | None = None, device: str | None = None) -> Choice:
    """Pick the runner for ``model`` from the backend table; ``auto`` takes the first row (fastest first)
    that runs this artifact on ``device`` and is installed, and says why."""
    path = Path(model)
    spec = None if requested == "auto" else backend_spec(requested)
    dev, index = parse_device(device)
    kind = artifact_kind(path)
    if kind is None:
        ext = path.suffix.lower()
        raise CheckpointError(f"{path}: unknown model type {ext or '(no extension)'!r}; expected .onnx, "
                              f"a TensorRT engine ({', '.join(ENGINE_EXTS)}) or a checkpoint "
                              f"({', '.join(CHECKPOINT_EXTS)})")
    engine = path if kind == "engine" else _sibling_engine(path) if kind == "onnx" else None
    if spec is not None:
        if not _runs(spec, kind, engine):
            words, hint = ARTIFACT_WORDS[spec.artifacts[0]]
            exts = ", ".join(e for a in spec.artifacts for e in ARTIFACTS[a])
            raise CheckpointError(f"{path}: the {spec.name} backend {words} ({exts}){hint}")
        if dev != "auto" and dev not in spec.devices:
            raise OptionError(f"--device {device}: the {spec.name} backend runs on {' or '.join(spec.devices)}")
        if not spec.available(modules):
            raise BackendUnavailable(spec.install_hint)
        return _choice(spec, path, kind, engine, dev, providers, f"--backend {spec.name}")
    fits = [b for b in BACKENDS if _runs(b, kind, engine) and (dev == "auto" or dev in b.devices)]
    ready = [b for b in fits if b.available(modules)]
    if not ready:
        if fits:
            raise BackendUnavailable(fits[0].install_hint)
        raise OptionError(f"{path}: no backend runs a {kind} artifact on --device {device}")
    return _choice(ready[0], path, kind, engine, dev, providers, None)


def _choice(spec: BackendSpec, path: Path, kind: str, engine: Path | None, dev: str, providers, given) -> Choice:
    """The choice of ``spec`` with its reason: a backend that runs engines takes the one beside an ONNX model."""
    target = engine if engine is not None and "engine" in spec.artifacts else path
    why = spec.runner_class().choice_reason(kind, target, dev, providers)
    return Choice(spec.name, target, reason=f"{given}, {why}" if given else why)


def load_runner(model: str | os.PathLike, backend: str = "auto", **options) -> tuple[Runner, Choice]:
    """Choose and construct the runner. ``options``: the chosen backend's options (see the table in
    :mod:`.registry`), model options and sampling options; ``None`` means "not given". An unknown option,
    or one that does not apply to the chosen backend or to the artifact, is an :class:`OptionError`."""
    device = options.get("device")
    allow_reduced = options.get("precision") == "auto"  # opt-in: a calibrated reduced precision may be picked
    if allow_reduced:
        options = {**options, "precision": None}
    choice = None
    if backend == "auto":
        choice, note = _calibrated_choice(model, options, allow_reduced)
    if choice is None:
        choice = choose_backend(model, backend, device=device)
        if backend == "auto":
            choice.reason += f"; {note}"
        elif allow_reduced:
            choice.reason += "; --precision auto: the backend's default (only --backend auto picks by measurement)"
    spec = BY_NAME[choice.backend]
    own, model_opts, sampling = split_options(spec, {**options, **choice.options})
    loader = {k: v for k, v in model_opts.items() if k in spec.model_options}
    runner = spec.runner_class()(choice.model, **own, **loader)
    check_baked_options(runner.meta, {k: v for k, v in model_opts.items() if k not in loader}, str(choice.model))
    runner.meta = runner.meta.with_sampling(**sampling)
    return runner, choice


def _no_table_reason(path: Path, dev: str) -> str | None:
    """Why calibration tables do not apply to this run (None: they do)."""
    if dev == "cuda" or not path.is_file() or artifact_kind(path) is None:
        return "fixed rule (calibration tables cover the CPU only)"
    if dev == "auto" and any(b.available() and b.runner_class().gpu_visible() for b in BACKENDS if "cuda" in b.devices):
        return "fixed rule: a GPU is here (calibration tables cover the CPU: --device cpu uses them)"
    return None


def wants_calibration(model, options: dict) -> bool:
    """Whether ``--backend auto`` would have to guess: tables apply here but none exists for this model and CPU
    (or ``--precision auto`` meets a first-use table that timed the exact paths only)."""
    from .timings import load_table

    path = Path(model)
    if _no_table_reason(path, parse_device(options.get("device"))[0]) is not None:
        return False
    table, _ = load_table(path)
    return table is None or (options.get("precision") == "auto" and table.exact_only)


def _calibrated_choice(model, options: dict, allow_reduced: bool) -> tuple[Choice | None, str]:
    """The fastest accurate entry of this machine's calibration table that fits the given options,
    or (None, why not) -- then ``auto`` keeps the fixed rule and the reason says so."""
    from .timings import load_table

    path = Path(model)
    why_not = _no_table_reason(path, parse_device(options.get("device"))[0])
    if why_not is not None:
        return None, why_not
    table, where = load_table(path)
    if table is None:
        return None, "fixed rule: no timing table for this model on this CPU (`rddm-infer bench --calibrate`)"
    common = {o.name for o in (*MODEL_OPTIONS, *SAMPLING_OPTIONS)} | {"device"}
    given = {k: v for k, v in options.items() if v is not None and k not in common}

    def usable(e) -> bool:
        spec = BY_NAME.get(e.backend)
        return (spec is not None and spec.available() and all(spec.option(k) for k in given)
                and all(e.options.get(k, v) == v for k, v in given.items()))

    best = table.best(allow_reduced, usable)
    if best is None:
        return None, f"fixed rule: no accurate entry in {where} fits the options given"
    exact = table.best(False, usable)
    others = sorted((e for e in table.entries if e.ok and e is not best and (allow_reduced or not e.reduced)
                     and usable(e)), key=lambda e: e.median_ms)
    vs = f" vs {others[0].label()} {others[0].median_ms:.0f} ms" if others else ""
    why = f"fastest {'accurate' if best.reduced else 'exact'} path on this CPU: {best.median_ms:.0f} ms{vs} at " \
          f"{table.size}²"
    if best.reduced:
        why += (f"; reduced precision {best.options['precision']} ({best.psnr_db:.1f} dB vs fp32 on the probe) because "
                f"--precision auto allows it" + (f"; exact {exact.label()}: {exact.median_ms:.0f} ms" if exact else ""))
    else:
        faster = table.best(True, usable)
        if faster is not None and faster.reduced:
            why += (f"; {faster.label()} would take {faster.median_ms:.0f} ms at {faster.psnr_db:.1f} dB: "
                    f"--precision auto allows reduced precision")
    return Choice(best.backend, path, {**best.options, "device": "cpu"}, why), ""


def read_artifact_meta(model: str | os.PathLike, **options) -> ArtifactMeta:
    """An artifact's self-description without running it (ONNX: a CPU session; engines: the header).

    ``options``: model and sampling options only (a checkpoint is loaded with them; an
    artifact's baked-in values are checked against them)."""
    path = Path(model)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such model file")
    names = {o.name for o in (*MODEL_OPTIONS, *SAMPLING_OPTIONS)}
    bad = [k for k in options if k not in names]
    if bad:
        raise OptionError(f"unknown option {bad[0]!r} here (model and sampling options: {', '.join(sorted(names))})")
    _, model_opts, sampling = split_options(None, options)
    kind = artifact_kind(path)
    rows = backends_for(kind)
    if not rows:
        raise CheckpointError(f"{path}: unknown model type {path.suffix or '(no extension)'!r}")
    spec = next((b for b in rows if b.available()), rows[0])  # an engine's header needs no TensorRT
    loader = {k: v for k, v in model_opts.items() if k in spec.model_options}
    meta = spec.runner_class().read_meta(path, **loader)
    check_baked_options(meta, {k: v for k, v in model_opts.items() if k not in loader}, str(path))
    return meta.with_sampling(**sampling)
