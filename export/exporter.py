"""Checkpoint -> every requested artifact, each validated before it is put in place.

The network is traced once (:class:`rddm_export.onnx_export.GraphBuilder`) and every graph
kind and precision is built from that trace; each file goes through
:func:`rddm_export.artifact.write_validated` (hidden temp file, validation, rename).
"""

from __future__ import annotations

import os
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Callable

from rddm_infer.errors import OptionError, RDDMError
from rddm_infer.model import LoadedModel, load_checkpoint
from rddm_infer.diffusion.schedule import SamplingPlan, eta_problem

from .artifact import Artifact, artifact_name, default_out_dir, prepare_out_dir, save_model, write_validated
from .onnx_export import GraphBuilder
from .tensorrt_build import EngineProfile
from .validate import check_reference, reference_sampler, validate_onnx

DEFAULT_GRAPHS = ("step", "fused")


def _steps(loaded: LoadedModel, steps: int | None, log) -> tuple[LoadedModel, int]:
    """K for the graphs: the one asked for (which then replaces a measured recommendation as every graph's
    default), else the checkpoint's recommended steps, else 5."""
    recommended = loaded.info.get("recommended_steps")
    if steps is None:
        if recommended:
            log(f"{Path(loaded.source).name}: {recommended} steps, the checkpoint's recommended (--steps to change)")
        return loaded, recommended or 5
    if recommended and steps != recommended:
        loaded = replace(loaded, info={k: v for k, v in loaded.info.items() if k != "recommended_steps"})
    return loaded, steps


def export_all(checkpoint: str | os.PathLike | LoadedModel, out_dir: str | os.PathLike | None = None, *,
               graphs=DEFAULT_GRAPHS, fp16: bool = False, int8: bool = False, calib: str | os.PathLike | None = None,
               steps: int | None = None, eta: float = 0.0, exporter: str = "legacy", validate: bool = True,
               tensorrt: dict | None = None, load_options: dict | None = None,
               log: Callable[[str], None] = lambda s: None) -> list[Artifact]:
    """Export (and validate) every requested graph into ``out_dir`` (default ``./<stem>_onnx``); ``int8`` adds
    CPU int8 copies of the fp32 graphs (calibrated on noisy crops of ``calib`` photos, else synthetic scenes);
    ``tensorrt`` (builder options) adds engines."""
    owned = not isinstance(checkpoint, LoadedModel)  # loaded here: its network may be folded in place
    loaded = load_checkpoint(checkpoint, **(load_options or {})) if owned else checkpoint
    loaded, steps = _steps(loaded, steps, log)
    if problem := eta_problem(loaded.diffusion, eta):  # not silently replaced by the η a restoration model fixes
        raise OptionError(f"{loaded.source}: --{problem}")
    try:
        SamplingPlan.create(loaded.diffusion, steps, eta)
    except ValueError as e:
        raise RDDMError(f"{loaded.source}: {e}") from None
    if int8 and calib is not None and not Path(calib).is_dir():
        raise RDDMError(f"{calib}: --calib needs a folder of photos")
    if tensorrt is not None:  # fail before minutes of ONNX work, not after
        from .tensorrt_build import current_target, import_tensorrt

        tensorrt.get("profile", EngineProfile()).check(loaded.unet.size_multiple)
        current_target(import_tensorrt())
    reference = reference_sampler(loaded, in_place=owned) if validate else None  # one for every artifact
    if reference is not None:  # a degenerate model fails here, before any folder or trace
        check_reference(reference, SamplingPlan.create(loaded.diffusion, steps, eta), loaded.unet.channels,
                        loaded.unet.size_multiple, loaded.source)
    out = prepare_out_dir(Path(out_dir) if out_dir is not None else default_out_dir(loaded.source))
    if loaded.info.get("time_input"):
        log(f"{loaded.source}: reference checkpoint, {loaded.info['time_input']}")
    builder = GraphBuilder(loaded, exporter, log=log)
    check = (lambda meta: partial(_validate, loaded=loaded, meta=meta, reference=reference)) if validate else \
        (lambda meta: None)
    artifacts = []
    todo = [(graph, precision) for precision in (("fp32", "fp16") if fp16 else ("fp32",)) for graph in graphs]
    for i, (graph, precision) in enumerate(todo):
        path = out / artifact_name(graph, precision, steps)
        log(f"exporting {path.name} ({exporter} exporter)")
        model, meta = builder.build(graph, steps, eta, fp16=precision == "fp16", last=i == len(todo) - 1)
        held = [model]  # saved, then dropped before validation loads the file: one copy of the weights at a time
        del model
        artifacts.append(write_validated(path, "onnx", meta, lambda tmp: save_model(held.pop(), tmp), check(meta),
                                         log))
    if int8:
        from .int8 import calibration_images, quantize_int8

        images = calibration_images(calib) if calib else None
        for a in [a for a in artifacts if a.precision == "fp32"]:
            path = out / artifact_name(a.graph, "int8", steps)
            log(f"quantizing {path.name} (int8 Conv, calibrated on {calib or 'synthetic scenes'})")
            meta = replace(a.meta, precision="int8")
            q = write_validated(path, "onnx", meta, lambda tmp, a=a: quantize_int8(a.path, tmp, images, meta=a.meta),
                                check(meta), log)
            q.notes.append("CPU int8 (VNNI), ~40-48 dB vs fp32 on photos; its speed depends on the CPU (ONNX Runtime "
                           "int8 over fp32: 1.3x on an AMD EPYC, 1.0x on an Intel Xeon with AMX): measure it here "
                           "with `rddm-infer bench --calibrate` (benchmarks/RESULTS.md)")
            artifacts.append(q)
    if tensorrt is not None:
        from .tensorrt_build import build_engine_artifact

        want = "fp16" if fp16 else "fp32"
        for a in [a for a in artifacts if a.precision == want]:
            artifacts.append(build_engine_artifact(a, loaded, validate=validate, reference=reference, log=log,
                                                    **tensorrt))
    return artifacts



def _validate(tmp: Path, final: Path, *, loaded: LoadedModel, meta, reference) -> object:
    return validate_onnx(tmp, loaded, meta=meta, report_as=final, reference=reference)
