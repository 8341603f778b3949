"""Mixed-precision ONNX: convolutions and matmuls in fp16, everything else in fp32.

TensorRT 11 builds strongly typed engines only (no FP16 builder flag), so precision
has to live in the graph. An allow-list is the safe direction: only the compute-bound
ops (Conv, MatMul, Gemm) get fp16 weights and Cast-ed inputs, their outputs are cast
straight back, so normalisation statistics, softmax and the sampler update stay fp32,
and graph inputs/outputs stay fp32. Back-to-back fp16 ops share one fp16 tensor
instead of a Cast pair. (onnxconverter-common 1.16 produced graphs ONNX Runtime
refused to load; a block-list converter also leaves norm arithmetic in fp16.)
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .graph_cleanup import drop_dead, drop_unused_initializers

FP16_OPS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm"})
_FP16_MAX = float(np.finfo(np.float16).max)


def to_mixed_fp16(model: onnx.ModelProto, ops: frozenset[str] = FP16_OPS) -> onnx.ModelProto:
    """Return a copy of ``model`` whose ``ops`` compute in fp16 (weights stored as fp16)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    half: dict[str, str] = {}  # fp32 tensor -> its fp16 twin
    nodes = []

    def fp16_name(name: str) -> str:
        if name not in half:
            new = f"{name}__fp16"
            if name in inits:
                arr = np.clip(numpy_helper.to_array(inits[name]), -_FP16_MAX, _FP16_MAX).astype(np.float16)
                g.initializer.append(numpy_helper.from_array(arr, new))
            else:
                nodes.append(helper.make_node("Cast", [name], [new], to=TensorProto.FLOAT16, name=f"{new}_cast"))
            half[name] = new
        return half[name]

    for node in g.node:
        if node.op_type not in ops or not all(_is_float(i, inits) for i in node.input if i in inits):
            nodes.append(node)
            continue
        node.input[:] = [fp16_name(i) if i else i for i in node.input]
        outs = list(node.output)
        node.output[:] = [f"{o}__fp16" for o in outs]
        nodes.append(node)
        for o in outs:
            nodes.append(helper.make_node("Cast", [f"{o}__fp16"], [o], to=TensorProto.FLOAT, name=f"{o}_cast32"))
            half[o] = f"{o}__fp16"
    del g.node[:]
    g.node.extend(drop_dead(nodes, {o.name for o in g.output}))  # fp32 Casts an fp16 consumer made redundant
    drop_unused_initializers(model)
    return model


def _is_float(name: str, inits: dict) -> bool:
    return inits[name].data_type == TensorProto.FLOAT

