"""Validation gates every artifact; fp16 graphs keep fp32 I/O and statistics and stay within 40 dB."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

from helpers.export import exported, run_fused_and_torch, tiny_loaded
from rddm_infer.metrics import psnr
from rddm_export.artifact import read_metadata
from rddm_export.validate import ValidationError, validate_onnx


@pytest.fixture(scope="module")
def tiny():
    return tiny_loaded()


@pytest.mark.slow  # over 2 s on 2 cores
def test_fp16_fused_graph_is_mixed_precision_and_within_40db(tiny):
    path = exported("fused", steps=2, fp16=True)
    model = onnx.load(str(path))
    io = [*model.graph.input, *model.graph.output]
    assert all(v.type.tensor_type.elem_type == TensorProto.FLOAT for v in io)
    weights = {i.name: i.data_type for i in model.graph.initializer}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert convs and all(weights[n.input[1]] == TensorProto.FLOAT16 for n in convs)
    # statistics stay fp32: every normalisation / softmax / reduction reads an fp32 tensor
    fp32_ops = [n for n in model.graph.node if n.op_type in ("InstanceNormalization", "Softmax", "ReduceMean")]
    assert fp32_ops and all(not n.input[0].endswith("__fp16") for n in fp32_ops)
    assert read_metadata(path).precision == "fp16"

    got, ref = run_fused_and_torch(path, tiny, 2, (2, 3, 32, 24), seed=5)
    assert got.dtype == np.float32
    assert 40.0 <= psnr(got, ref, data_range=2.0) < 150.0  # close, but really computed in fp16

    result = validate_onnx(path, tiny)
    assert result.ok and result.worst("image").metric == "psnr" and result.worst("image").value >= 40.0


def test_validation_fails_loudly_with_the_measured_error(tiny, tmp_path):
    path = tmp_path / "step.onnx"
    model = onnx.load(str(exported("step")))
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    init = next(i for i in model.graph.initializer if i.name == conv.input[1])
    w = numpy_helper.to_array(init).copy()
    w.flat[0] += 0.05  # a small corruption of one weight
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    onnx.save(model, str(path))
    with pytest.raises(ValidationError, match=r"step fp32 graph does not match PyTorch: call .*max_abs [0-9.e-]+ \(≤") as e:
        validate_onnx(path, tiny)
    assert not e.value.result.ok and e.value.result.worst("call").value > 1e-4
