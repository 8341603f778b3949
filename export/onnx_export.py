"""Checkpoint -> self-describing ONNX graph (unet / step / fused; fp32 or mixed fp16).

Pipeline: put a copy of the network in its export form (WS folded, ORT-friendly norms and attention), wrap it
(:mod:`rddm_export.graphs`), export with a small example input (the axes are dynamic
anyway; the legacy exporter needs tens of GB of RAM for an unrolled dim-64 graph at
256²), simplify with onnxslim (constant folding, no leftover shape arithmetic),
optionally convert to mixed precision, then stamp the ``rddm`` metadata and write
atomically.
"""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path
from typing import Callable

import onnx
import torch

from rddm_infer.atomic import atomic_path
from rddm_infer.artifact import META_KEY, ArtifactMeta
from rddm_infer.errors import CheckpointError
from rddm_infer.graph_kinds import dynamic_axes
from rddm_infer.model import LoadedModel, to_export_form
from rddm_infer.schedule import NUM_COEFS, SamplingPlan

from .graph_cleanup import static_reshapes, symbolic_shapes
from .graphs import build_graph, example_inputs

EXPORTERS = ("legacy", "dynamo")
LEGACY_OPSET = 17
DYNAMO_OPSET = 18  # the dynamo exporter will not go lower


def artifact_meta(loaded: LoadedModel, kind: str, steps: int, eta: float, precision: str, **extra) -> ArtifactMeta:
    """The ``rddm`` self-description of one graph exported from ``loaded``."""
    plan = SamplingPlan.create(loaded.diffusion, steps, eta)  # validates K and applies the η rule
    return ArtifactMeta(graph=kind, unet=loaded.unet.to_dict(), diffusion=loaded.diffusion.to_dict(), steps=steps,
                        eta=plan.eta, precision=precision, size_multiple=loaded.unet.size_multiple,
                        source=str(loaded.source), extra={**loaded.info, **extra})


def export_onnx(loaded: LoadedModel, path: str | os.PathLike, kind: str = "step", *, steps: int = 5,
                eta: float = 0.0, fp16: bool = False, exporter: str = "legacy", opset: int | None = None,
                slim: bool = True, log: Callable[[str], None] = lambda s: None) -> Path:
    """Export one graph kind of ``loaded`` to ``path`` (written atomically); returns the path."""
    if exporter not in EXPORTERS:
        raise ValueError(f"unknown exporter {exporter!r}; expected one of {EXPORTERS}")
    if loaded.unet.input_condition:
        raise CheckpointError(f"{loaded.source}: models with an extra input condition are not exportable "
                              "(the graph contract has no input for it)")
    SamplingPlan.create(loaded.diffusion, steps, eta)  # refuse a bad K or η before any tracing
    path = Path(path)
    net = to_export_form(copy.deepcopy(loaded.net).float().cpu().eval())
    graph = build_graph(net, loaded.diffusion, kind, loaded.unet.num_outputs, steps, eta)
    t0 = time.perf_counter()
    model = trace(graph, loaded.unet.channels, loaded.unet.size_multiple, exporter, opset)
    log(f"  traced {kind} graph: {len(model.graph.node)} nodes in {time.perf_counter() - t0:.1f} s")
    if slim:
        t0 = time.perf_counter()
        model = simplify(model)
        static_reshapes(model)
        log(f"  simplified to {len(model.graph.node)} nodes in {time.perf_counter() - t0:.1f} s")
    if fp16:
        from .fp16 import to_mixed_fp16

        model = to_mixed_fp16(model)
    keep_contract_inputs(model, graph, loaded.unet.channels)
    meta = artifact_meta(loaded, kind, steps, eta, "fp16" if fp16 else "fp32", exporter=exporter,
                         opset=_opset(model))
    set_metadata(model, meta)
    onnx.checker.check_model(model)
    save_model(model, path)
    return path


def trace(graph: torch.nn.Module, channels: int, size_multiple: int, exporter: str = "legacy",
          opset: int | None = None) -> onnx.ModelProto:
    """Export ``graph`` with dynamic batch/height/width and return the in-memory ONNX model."""
    m = max(size_multiple, 8)
    # Batch 2: the dynamo exporter silently fixes a batch of 1 even where the graph says otherwise.
    args = example_inputs(graph, (2, channels, 2 * m, 3 * m), getattr(getattr(graph, "plan", None), "steps", 5))
    names, outs = list(graph.input_names), list(graph.output_names)
    axes = {n: dynamic_axes(n) for n in names + outs}
    import tempfile

    with torch.no_grad(), tempfile.TemporaryDirectory(prefix="rddm-export-") as tmp:
        f = Path(tmp) / "graph.onnx"
        if exporter == "legacy":
            torch.onnx.export(graph, args, str(f), dynamo=False, input_names=names, output_names=outs,
                              dynamic_axes=axes, opset_version=opset or LEGACY_OPSET, do_constant_folding=True)
        else:
            dims = {"batch": torch.export.Dim("batch"), "height": torch.export.Dim.AUTO,
                    "width": torch.export.Dim.AUTO}
            shapes = {n: ({a: dims[d] for a, d in axes[n].items()} or None) for n in names}
            prog = torch.onnx.export(graph, args, dynamo=True, input_names=names, output_names=outs,
                                     dynamic_shapes=shapes, opset_version=max(opset or DYNAMO_OPSET, DYNAMO_OPSET),
                                     optimize=True)
            prog.save(str(f))
        model = onnx.load(str(f), load_external_data=True)
    return model


def keep_contract_inputs(model: onnx.ModelProto, graph: torch.nn.Module, channels: int) -> None:
    """Put back inputs dropped as unused (``x_input`` of a generation model), in contract order."""
    names = list(graph.input_names)
    present = {i.name: i for i in model.graph.input}
    if all(n in present for n in names):
        return
    image = ["batch", channels, "height", "width"]
    dims = {"t": ["batch"], "coef": [NUM_COEFS], "step_noise": [getattr(graph, "plan", None) and graph.plan.steps,
                                                                  *image]}
    for n in names:
        if n not in present:
            present[n] = onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, dims.get(n, image))
    extra = [i for i in model.graph.input if i.name not in names]
    del model.graph.input[:]
    model.graph.input.extend([present[n] for n in names] + extra)


def simplify(model: onnx.ModelProto) -> onnx.ModelProto:
    """Constant folding and dead shape arithmetic removal (onnxslim)."""
    import onnxslim

    return symbolic_shapes(onnxslim.slim(model))


def set_metadata(model: onnx.ModelProto, meta: ArtifactMeta) -> None:
    """Record the ``rddm`` JSON in ``metadata_props`` (replacing an older value)."""
    for p in [p for p in model.metadata_props if p.key == META_KEY]:
        model.metadata_props.remove(p)
    model.metadata_props.add(key=META_KEY, value=meta.to_json())
    model.producer_name = "rddm-export"
    model.doc_string = f"RDDM {meta.graph} graph ({meta.precision}) from {meta.source}"


def read_metadata(path: str | os.PathLike) -> ArtifactMeta:
    """The ``rddm`` self-description of an exported ONNX file."""
    model = onnx.load(str(path), load_external_data=False)
    props = {p.key: p.value for p in model.metadata_props}
    if META_KEY not in props:
        raise CheckpointError(f"{path}: no '{META_KEY}' metadata (not exported by rddm-export)")
    return ArtifactMeta.from_json(props[META_KEY], where=str(path))


def save_model(model: onnx.ModelProto, path: Path) -> None:
    """Atomic write: temp file beside the target, then os.replace."""
    with atomic_path(path) as tmp:
        onnx.save(model, str(tmp))


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
