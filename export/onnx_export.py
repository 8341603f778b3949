"""Checkpoint -> self-describing ONNX graph (unet / step / fused; fp32 or mixed fp16).

The network is traced and simplified **once** per export, whatever graphs are asked for:
a copy of it in its export form (WS folded, ORT-friendly norms and attention) is exported
on its own with a small example input (the axes are dynamic anyway), simplified with
onnxslim (constant folding, no leftover shape arithmetic), and then spliced into each
graph kind. The graph kinds' wrappers (:mod:`rddm_infer.model.graphs`) are traced around a
placeholder node that stands for one network call, which costs milliseconds; every
placeholder is then replaced by a copy of the network's nodes, all sharing one set of
weights. The fused graph of K steps thus costs one network trace instead of K, and the
step and fused graphs of one export share it (benchmarks/NOTES.md, "export speed").
The ``dynamo`` exporter traces each whole graph instead (no placeholder support there).
"""

from __future__ import annotations

import copy
import gc
import os
import tempfile
import time
from pathlib import Path
from typing import Callable

import onnx
import torch
from torch import nn

from rddm_infer.diffusion.metadata import ArtifactMeta
from rddm_infer.errors import CheckpointError
from rddm_infer.diffusion.graph_kinds import dynamic_axes, time_dims
from rddm_infer.model import LoadedModel, to_export_form
from rddm_infer.diffusion.schedule import NUM_COEFS, SamplingPlan

from .artifact import artifact_meta, save_model, set_metadata
from .graph_cleanup import static_reshapes, symbolic_shapes
from .graphs import build_graph

EXPORTERS = ("legacy", "dynamo")
LEGACY_OPSET = 17
DYNAMO_OPSET = 18  # the dynamo exporter will not go lower
_DOMAIN, _NET_OP = "rddm.placeholder", "Net"


class GraphBuilder:
    """Builds every graph kind of one loaded model from a single trace of its network."""

    def __init__(self, loaded: LoadedModel, exporter: str = "legacy", opset: int | None = None, slim: bool = True,
                 log: Callable[[str], None] = lambda s: None):
        if exporter not in EXPORTERS:
            raise ValueError(f"unknown exporter {exporter!r}; expected one of {EXPORTERS}")
        if loaded.unet.input_condition:
            raise CheckpointError(f"{loaded.source}: models with an extra input condition are not exportable "
                                  "(the graph contract has no input for it)")
        self.loaded, self.exporter, self.opset, self.slim, self.log = loaded, exporter, opset, slim, log
        self._net: onnx.ModelProto | None = None

    def build(self, kind: str, steps: int = 5, eta: float = 0.0, fp16: bool = False, last: bool = False
              ) -> tuple[onnx.ModelProto, ArtifactMeta]:
        """The finished, checked graph of ``kind`` and the metadata stamped into it.

        ``last``: no graph is built after this one, so it takes over the traced network (weights not copied).
        """
        loaded = self.loaded
        SamplingPlan.create(loaded.diffusion, steps, eta)  # refuse a bad K or η before any tracing
        if self.exporter == "dynamo":
            model = self._whole_graph(kind, steps, eta)
        else:
            wrapper = build_graph(NetPlaceholder(loaded.unet.channels, loaded.unet.num_outputs), loaded.diffusion,
                                  kind, loaded.unet.num_outputs, steps, eta, concat=loaded.unet.condition)
            model = inline_net(trace(wrapper, loaded.unet.channels, loaded.unet.size_multiple, opset=self.opset,
                                     custom_opsets={_DOMAIN: 1}), self.net(), in_place=last)
            if last:
                self._net = None
            keep_contract_inputs(model, wrapper, loaded.unet.channels)
        if fp16:
            from .fp16 import to_mixed_fp16

            model = to_mixed_fp16(model)
        meta = artifact_meta(loaded, kind, steps, eta, "fp16" if fp16 else "fp32", exporter=self.exporter,
                             opset=_opset(model))
        set_metadata(model, meta)
        onnx.checker.check_model(model)
        return model, meta

    def net(self) -> onnx.ModelProto:
        """The network alone, (x, t) -> out0[, out1], traced and simplified once."""
        if self._net is None:
            u = self.loaded.unet
            export_form = to_export_form(copy.deepcopy(self.loaded.net).float().cpu().eval())
            t0 = time.perf_counter()
            # two UNets fed a "scaled" time take its (B, 2) pair; one network gets its column (graphs.select_time)
            dims = time_dims(self.loaded.diffusion.time_input) if u.num_outputs == 2 else ()
            self._net = trace(_NetGraph(export_form, dims), u.channels, u.size_multiple, opset=self.opset)
            del export_form
            gc.collect()
            self.log(f"  traced the network: {len(self._net.graph.node)} nodes in {time.perf_counter() - t0:.1f} s")
            if self.slim:
                t0 = time.perf_counter()
                self._net = simplify(self._net)
                static_reshapes(self._net)
                self.log(f"  simplified to {len(self._net.graph.node)} nodes in {time.perf_counter() - t0:.1f} s")
        return self._net

    def _whole_graph(self, kind: str, steps: int, eta: float) -> onnx.ModelProto:
        loaded = self.loaded
        net = to_export_form(copy.deepcopy(loaded.net).float().cpu().eval())
        graph = build_graph(net, loaded.diffusion, kind, loaded.unet.num_outputs, steps, eta,
                            concat=loaded.unet.condition)
        t0 = time.perf_counter()
        model = trace(graph, loaded.unet.channels, loaded.unet.size_multiple, self.exporter, self.opset)
        self.log(f"  traced {kind} graph: {len(model.graph.node)} nodes in {time.perf_counter() - t0:.1f} s")
        if self.slim:
            model = simplify(model)
            static_reshapes(model)
        keep_contract_inputs(model, graph, loaded.unet.channels)
        return model


def export_onnx(loaded: LoadedModel, path: str | os.PathLike, kind: str = "step", *, steps: int = 5,
                eta: float = 0.0, fp16: bool = False, exporter: str = "legacy", opset: int | None = None,
                slim: bool = True, log: Callable[[str], None] = lambda s: None) -> Path:
    """Export one graph kind of ``loaded`` to ``path`` (written atomically); returns the path."""
    model, _ = GraphBuilder(loaded, exporter, opset, slim, log).build(kind, steps, eta, fp16, last=True)
    return save_model(model, path)


class _NetCall(torch.autograd.Function):
    """One network call, traced as a single placeholder node that :func:`inline_net` replaces."""

    @staticmethod
    def forward(ctx, x, t, channels: int, num_outputs: int):
        outs = tuple(x[:, :channels] * 0 for _ in range(num_outputs))  # the right shape; values never used
        return outs if num_outputs > 1 else outs[0]

    @staticmethod
    def symbolic(g, x, t, channels: int, num_outputs: int):
        outs = g.op(f"{_DOMAIN}::{_NET_OP}", x, t, outputs=num_outputs)
        sizes = x.type().varyingSizes()
        for v in outs if num_outputs > 1 else (outs,):  # x's shape with the output channels: no "missing" warning
            v.setType(x.type().with_sizes([sizes[0], channels, *sizes[2:]]) if sizes else x.type())
        return outs


class NetPlaceholder(nn.Module):
    """Stands in for ``UnetRes`` while a graph kind's own arithmetic is traced."""

    def __init__(self, channels: int, num_outputs: int):
        super().__init__()
        self.channels, self.num_outputs = channels, num_outputs

    def forward(self, x, t):
        outs = _NetCall.apply(x, t, self.channels, self.num_outputs)
        return outs if isinstance(outs, tuple) else (outs,)


class _NetGraph(nn.Module):
    """The network on its own: (x, t) with x already holding the condition channels."""

    def __init__(self, net: nn.Module, time_dims: tuple[int, ...] = ()):
        super().__init__()
        self.net = net
        self.time_dims = time_dims
        self.input_names = ("x", "t")
        self.output_names = ("out0", "out1")[:net.config.num_outputs]
        self.in_channels = net.config.in_channels

    def forward(self, x, t):
        return tuple(self.net(x, t))

    def example_inputs(self, shape: tuple[int, int, int, int], seed: int = 0):
        """(x, t) for images of ``shape``'s batch and size, with the network's own input channels."""
        g = torch.Generator().manual_seed(seed)
        return (torch.randn(shape[0], self.in_channels, *shape[2:], generator=g),
                torch.rand(shape[0], *self.time_dims, generator=g) * 999)


def inline_net(wrapper: onnx.ModelProto, net: onnx.ModelProto, *, in_place: bool = False) -> onnx.ModelProto:
    """``wrapper`` with each placeholder node replaced by ``net``'s nodes (weights shared by every copy).

    ``in_place`` builds the result inside ``net`` itself, so the weights are never copied (its last use).
    """
    g, ng = wrapper.graph, net.graph
    outer = {i.name for i in g.initializer} | {v.name for v in [*g.input, *g.output]} | \
            {o for n in g.node for o in n.output}
    weights = {i.name: (i.name if i.name not in outer else f"net/{i.name}") for i in ng.initializer}
    inputs, outputs = [i.name for i in ng.input], [o.name for o in ng.output]
    nodes, infos, calls = [], [], 0
    for node in g.node:
        if (node.domain, node.op_type) != (_DOMAIN, _NET_OP):
            nodes.append(node)
            continue
        prefix, calls = f"net{calls}/", calls + 1
        outer_of = {**dict(zip(inputs, node.input)), **dict(zip(outputs, node.output))}

        def rename(name: str) -> str:
            return name if not name else outer_of.get(name) or weights.get(name) or prefix + name

        for n in ng.node:
            if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in n.attribute):
                raise ValueError(f"network node {n.name} ({n.op_type}) has a subgraph; cannot be spliced")
            c = onnx.NodeProto()
            c.CopyFrom(n)
            c.name = prefix + n.name
            c.input[:] = [rename(i) for i in n.input]
            c.output[:] = [rename(o) for o in n.output]
            nodes.append(c)
        for v in ng.value_info:
            if v.name not in outer_of:
                infos.append(onnx.ValueInfoProto())
                infos[-1].CopyFrom(v)
                infos[-1].name = prefix + v.name
    if calls == 0:
        raise ValueError("the traced graph holds no network call")
    if in_place:
        model = net
    else:
        model = onnx.ModelProto()
        model.CopyFrom(net)
    mg = model.graph
    for init in mg.initializer:
        init.name = weights[init.name]
    mg.initializer.extend(g.initializer)
    for field, items in (("node", nodes), ("value_info", [*infos, *g.value_info]), ("input", g.input),
                         ("output", g.output)):
        items = list(items)
        del getattr(mg, field)[:]
        getattr(mg, field).extend(items)
    mg.name = g.name
    del model.opset_import[:]
    model.opset_import.extend(o for o in wrapper.opset_import if o.domain != _DOMAIN)
    model.ir_version = wrapper.ir_version
    return model


def trace(graph: torch.nn.Module, channels: int, size_multiple: int, exporter: str = "legacy",
          opset: int | None = None, custom_opsets: dict | None = None) -> onnx.ModelProto:
    """Export ``graph`` (a module with ``input_names``, ``output_names`` and ``example_inputs(shape)``) with dynamic
    batch/height/width and return the in-memory ONNX model."""
    m = max(size_multiple, 8)
    # Batch 2: the dynamo exporter silently fixes a batch of 1 even where the graph says otherwise.
    args = graph.example_inputs((2, channels, 2 * m, 3 * m))
    names, outs = list(graph.input_names), list(graph.output_names)
    axes = {n: dynamic_axes(n) for n in names + outs}
    with torch.no_grad(), tempfile.TemporaryDirectory(prefix="rddm-export-") as tmp:
        f = Path(tmp) / "graph.onnx"
        if exporter == "legacy":
            torch.onnx.export(graph, args, str(f), dynamo=False, input_names=names, output_names=outs,
                              dynamic_axes=axes, opset_version=opset or LEGACY_OPSET, do_constant_folding=True,
                              custom_opsets=custom_opsets)
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
    dims = {"t": ["batch", *getattr(graph, "time_dims", ())], "coef": [NUM_COEFS],
            "step_noise": [getattr(graph, "plan", None) and graph.plan.steps, *image]}
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


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)

