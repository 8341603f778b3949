"""Graph hygiene after export: no leftover shape arithmetic around reshapes.

With dynamic axes the exporters compute every ``Reshape`` target at run time
(Shape -> Gather -> Unsqueeze -> Concat per call). onnxslim's symbolic shape inference
already knows each target in terms of the input axes, so a target with at most one
unknown axis becomes a constant (0 = keep that axis, -1 = the rest), and one that
equals the shape of a tensor computed earlier reads that tensor's ``Shape`` directly.
The arithmetic left without consumers is then dropped.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper


def symbolic_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Re-derive every intermediate shape with ONNX Runtime's symbolic inference (in place; returns ``model``).

    onnxslim names a fresh unknown for a Conv's spatial axes when its input comes out of a
    Transpose (the export form's LayerNormalization); ONNX Runtime's inference carries
    ``height``/``width`` through. It runs on a copy without the weights' values (their shapes
    are all it reads), which for a 290 MB network saves two copies of it. Where it cannot handle
    a graph, onnxslim's shapes stay.
    """
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    try:
        inferred = SymbolicShapeInference.infer_shapes(_shapes_only(model), auto_merge=True)
    except Exception:  # an op it does not know: static_reshapes then rewrites fewer targets
        return model
    del model.graph.value_info[:]
    model.graph.value_info.extend(inferred.graph.value_info)
    for out, new in zip(model.graph.output, inferred.graph.output):
        out.type.CopyFrom(new.type)
    return model


_WEIGHT_MIN = 4096  # float initializers at least this large are weights: no shape is ever computed from them


def _shapes_only(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose large float initializers keep their name, type and dims but no data."""
    light = onnx.ModelProto()
    graph = model.graph
    saved = list(graph.initializer), list(graph.value_info)
    del graph.initializer[:]
    del graph.value_info[:]  # re-derived from scratch
    try:
        light.CopyFrom(model)
    finally:
        graph.initializer.extend(saved[0])
        graph.value_info.extend(saved[1])
    for init in graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT and np.prod(init.dims) >= _WEIGHT_MIN:
            light.graph.initializer.add(name=init.name, dims=init.dims, data_type=init.data_type)
        else:
            light.graph.initializer.add().CopyFrom(init)
    return light


def static_reshapes(model: onnx.ModelProto) -> int:
    """Rewrite computed Reshape targets in place; returns how many were rewritten."""
    g = model.graph
    shapes = {v.name: _dims(v) for v in [*g.input, *g.value_info, *g.output]}
    consts = {i.name for i in g.initializer} | {o for n in g.node if n.op_type == "Constant" for o in n.output}
    seen: dict[tuple, str] = {}  # a fully known symbolic shape -> first tensor having it
    for v in g.input:
        if shapes.get(v.name):
            seen.setdefault(shapes[v.name], v.name)
    nodes, shape_of, rewritten = [], {}, 0
    for node in g.node:
        if node.op_type == "Reshape" and node.input[1] not in consts and not _attr(node, "allowzero"):
            src, dst = shapes.get(node.input[0]), shapes.get(node.output[0])
            target = _constant_target(src, dst)
            if target is not None:
                name = f"{node.output[0]}__target"
                g.initializer.append(numpy_helper.from_array(np.array(target, dtype=np.int64), name))
                node.input[1] = name
                rewritten += 1
            elif dst in seen:
                ref = seen[dst]
                if ref not in shape_of:
                    shape_of[ref] = f"{ref}__shape"
                    nodes.append(helper.make_node("Shape", [ref], [shape_of[ref]], name=f"{ref}__shape_op"))
                node.input[1] = shape_of[ref]
                rewritten += 1
        nodes.append(node)
        for o in node.output:
            if shapes.get(o):
                seen.setdefault(shapes[o], o)
    live = drop_dead(nodes, {o.name for o in g.output})
    del g.node[:]
    g.node.extend(live)
    drop_unused_initializers(model)
    produced = {o for n in live for o in n.output}
    infos = [v for v in g.value_info if v.name in produced]
    del g.value_info[:]
    g.value_info.extend(infos)
    return rewritten


def _dims(v) -> tuple | None:
    """Symbolic shape as a tuple of ints / symbol strings; None where any axis is unknown."""
    t = v.type.tensor_type
    if not t.HasField("shape"):
        return None
    dims = tuple(d.dim_value if d.HasField("dim_value") else d.dim_param for d in t.shape.dim)
    return None if any(d in ("", 0) for d in dims) else dims


def _constant_target(src: tuple | None, dst: tuple | None) -> list[int] | None:
    if not src or not dst:
        return None
    target = [d if isinstance(d, int) else 0 if i < len(src) and src[i] == d else -1 for i, d in enumerate(dst)]
    return target if target.count(-1) <= 1 else None


def _attr(node, name: str):
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), None)


def drop_dead(nodes: list, outputs: set[str]) -> list:
    """Nodes that contribute to ``outputs``, in their original (topological) order."""
    live, kept = set(outputs), []
    for n in reversed(nodes):
        if any(o in live for o in n.output):
            kept.append(n)
            live.update(i for i in n.input if i)
    return kept[::-1]


def drop_unused_initializers(model: onnx.ModelProto) -> None:
    g = model.graph
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    keep = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
