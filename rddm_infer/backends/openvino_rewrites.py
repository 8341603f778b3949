"""Load-time graph rewrites that make OpenVINO's CPU kernels faster on our ONNX graphs, none changing the math.

OpenVINO runs convolutions in a blocked / channels-last memory layout, and every node that needs plain NCHW
(a Reshape that regroups channels, a Transpose) costs two layout reorders of the whole activation. Our exports
are shaped for ONNX Runtime, so two normalisations pay that around every convolution (benchmarks/NOTES.md,
sessions 11 and 12):

* :func:`channel_layernorms`: a channel LayerNorm, exported as Transpose → LayerNormalization → Transpose,
  becomes one MVN over the channel axis.
* :func:`group_norms`: a GroupNorm, exported as Reshape(N, G, -1) → InstanceNormalization → Reshape → affine,
  becomes per-channel spatial means (which run in any layout), averaged within each group by a small C×C matrix,
  in torch's two passes (mean, then the mean of squared deviations): no reshape of the activation at all.
"""

from __future__ import annotations

import numpy as np

_NHWC, _NCHW = [0, 2, 3, 1], [0, 3, 1, 2]
_PASS_THROUGH = ("Reshape", "Broadcast", "Convert", "Unsqueeze", "Squeeze")


def _const(node) -> np.ndarray | None:
    return node.get_data() if node.get_type_name() == "Constant" else None


def _traced_const(output) -> np.ndarray | None:
    """The constant behind reshapes / broadcasts (the ONNX frontend reshapes InstanceNorm's scale at run time)."""
    node = output.get_node()
    while node.get_type_name() in _PASS_THROUGH:
        node = node.input_value(0).get_node()
    return _const(node)


def _order(transpose) -> list[int] | None:
    order = _const(transpose.input_value(1).get_node())
    return None if order is None else [int(v) for v in order.reshape(-1)]


def _next(node):
    """The one consumer of ``node`` that is not a ShapeOf (shape arithmetic that dies with it), else None."""
    users = [i.get_node() for i in node.output(0).get_target_inputs() if i.get_node().get_type_name() != "ShapeOf"]
    return users[0] if len(users) == 1 else None


def _affine(node, channels: int | None, ndim: int | None) -> tuple[list[tuple[str, np.ndarray]], object]:
    """The chain of per-channel constant Multiply / Add after ``node``: ([(op, constant)], last node)."""
    affine = []
    while True:
        user = _next(node)
        if user is None or user.get_type_name() not in ("Multiply", "Add"):
            return affine, node
        k = _const(user.input_value(1).get_node())
        if k is None or (channels is not None and k.size != channels) or (ndim is not None and k.ndim != ndim):
            return affine, node
        affine.append((user.get_type_name(), k))
        node = user


def _replace(node, new) -> None:
    for target in list(node.output(0).get_target_inputs()):
        target.replace_source_output(new.output(0))


def channel_layernorms(model) -> int:
    """Rewrite ``Transpose(0,2,3,1) → MVN(last axis) → ×g → +b → Transpose(0,3,1,2)`` into
    ``MVN(axis 1) × g + b`` in NCHW (in place); returns how many. Same eps, same eps mode: same math."""
    from openvino import opset13 as ops

    count = 0
    for mvn in model.get_ordered_ops():
        if mvn.get_type_name() != "MVN" or mvn.get_input_size() != 2:
            continue
        first = mvn.input_value(0).get_node()
        if first.get_type_name() != "Transpose" or _order(first) != _NHWC or len(first.input_value(0).get_partial_shape()) != 4:
            continue
        axes = _const(mvn.input_value(1).get_node())  # the ONNX frontend computes LayerNormalization's axes:
        if axes is None:  # from axis to the rank, so one axis (a static shape of [1]) is the last one
            shape = mvn.input_value(1).get_partial_shape()
            if not (shape.is_static and list(shape.to_shape()) == [1]):
                continue
        elif [int(a) % 4 for a in axes.reshape(-1)] != [3]:
            continue
        channels = first.input_value(0).get_partial_shape()[1]
        affine, last = _affine(mvn, channels.get_length() if channels.is_static else None, 1)
        node = _next(last)
        if node is None or node.get_type_name() != "Transpose" or _order(node) != _NCHW:
            continue
        a = mvn.get_attributes()
        y = ops.mvn(first.input_value(0), ops.constant(np.array([1], np.int64)), a["normalize_variance"], a["eps"],
                    a["eps_mode"].lower())
        for op, k in affine:
            k = ops.constant(np.ascontiguousarray(k.reshape(1, -1, 1, 1)))
            y = ops.multiply(y, k) if op == "Multiply" else ops.add(y, k)
        _replace(node, y)
        count += 1
    if count:
        model.validate_nodes_and_infer_types()
    return count


def _group_norm(reshape) -> tuple | None:
    """(x, groups, eps, last node, gamma, beta) if ``reshape`` starts a GroupNorm as the ONNX frontend reads
    torch's export: Reshape(x, [0, G, -1]) → MVN(axis 2, inside sqrt) → ×1 → +0 (InstanceNormalization's
    scale and bias) → Reshape back → ×gamma → +beta (per channel); else None."""
    x = reshape.input_value(0)
    shape, target = x.get_partial_shape(), _const(reshape.input_value(1).get_node())
    if len(shape) != 4 or shape[1].is_dynamic or target is None:
        return None
    t = [int(v) for v in target.reshape(-1)]
    channels = shape[1].get_length()
    if len(t) != 3 or t[0] != 0 or t[2] != -1 or t[1] < 1 or channels % t[1]:
        return None
    mvn = _next(reshape)
    if mvn is None or mvn.get_type_name() != "MVN":
        return None
    a, axes = mvn.get_attributes(), _const(mvn.input_value(1).get_node())
    if (not a["normalize_variance"] or a["eps_mode"].lower() != "inside_sqrt" or axes is None
            or [int(v) % 3 for v in axes.reshape(-1)] != [2]):
        return None
    node = mvn
    for op, identity in (("Multiply", 1.0), ("Add", 0.0)):
        node = _next(node)
        if node is None or node.get_type_name() != op:
            return None
        k = _traced_const(node.input_value(1))
        if k is None or not np.all(k == identity):
            return None
    node = _next(node)
    if node is None or node.get_type_name() != "Reshape" or len(node.get_output_partial_shape(0)) != 4:
        return None
    affine, last = _affine(node, channels, None)
    if [op for op, _ in affine] != ["Multiply", "Add"]:
        return None
    gamma, beta = (k.reshape(-1).astype(np.float32) for _, k in affine)
    return x, t[1], float(a["eps"]), last, gamma, beta


def group_norms(model) -> int:
    """Rewrite each GroupNorm (see :func:`_group_norm`) into layout-free NCHW ops (in place); returns how many.
    Same statistics, same eps inside the square root: exact to float rounding (~1e-6)."""
    from openvino import opset13 as ops

    count = 0
    for reshape in model.get_ordered_ops():
        found = _group_norm(reshape) if reshape.get_type_name() == "Reshape" else None
        if found is None:
            continue
        x, groups, eps, last, gamma, beta = found
        c = gamma.size
        share = np.kron(np.eye(groups, dtype=np.float32), np.full((c // groups,) * 2, groups / c, np.float32))
        share = ops.constant(share.reshape(1, c, c))
        spatial = ops.constant(np.array([2, 3], np.int64))

        def group_mean(per_channel):  # (N, C, 1, 1) -> each channel's group mean, same shape
            row = ops.reshape(per_channel, ops.constant(np.array([0, 1, c], np.int64)), True)
            mixed = ops.matmul(row, share, False, False)
            return ops.reshape(mixed, ops.constant(np.array([0, c, 1, 1], np.int64)), True)

        centred = ops.subtract(x, group_mean(ops.reduce_mean(x, spatial, True)))
        var = group_mean(ops.reduce_mean(ops.multiply(centred, centred), spatial, True))
        scale = ops.multiply(ops.power(ops.add(var, ops.constant(np.float32(eps))), ops.constant(np.float32(-0.5))),
                             ops.constant(gamma.reshape(1, c, 1, 1)))
        _replace(last, ops.add(ops.multiply(centred, scale), ops.constant(beta.reshape(1, c, 1, 1))))
        count += 1
    if count:
        model.validate_nodes_and_infer_types()
    return count


REWRITES = {"channel_layernorm": channel_layernorms, "group_norm": group_norms}


def rewrite(model) -> dict[str, int]:
    """Apply every rewrite in place: {name: how many subgraphs it replaced}."""
    return {name: fn(model) for name, fn in REWRITES.items()}
