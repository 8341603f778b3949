"""Validation gates every artifact; fp16 graphs keep fp32 I/O and statistics and stay within 40 dB."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper

from helpers_export import tiny_checkpoint
from rddm_infer.metrics import psnr
from rddm_infer.model import TorchRDDM, load_checkpoint
from rddm_infer.schedule import SamplingPlan
from rddm_export.onnx_export import export_onnx, read_metadata
from rddm_export.validate import ValidationError, validate_onnx


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_checkpoint(tiny_checkpoint(tmp_path_factory.mktemp("ckpt")))


def test_fp16_fused_graph_is_mixed_precision_and_within_40db(tiny, tmp_path):
    path = export_onnx(tiny, tmp_path / "fused2_fp16.onnx", "fused", steps=2, fp16=True)
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

    plan = SamplingPlan.create(tiny.diffusion, 2)
    rng = np.random.default_rng(5)
    x_in = rng.uniform(-1, 1, (2, 3, 32, 24)).astype(np.float32)
    noise = rng.standard_normal(x_in.shape, dtype=np.float32)
    ref = TorchRDDM(tiny.net, tiny.diffusion).sample_model_space(x_in, plan, noise=noise)
    got = ort.InferenceSession(str(path)).run(None, {"x_input": x_in, "noise": noise})[0]
    assert got.dtype == np.float32
    assert 40.0 <= psnr(got, ref, data_range=2.0) < 150.0  # close, but really computed in fp16

    result = validate_onnx(path, tiny)
    assert result.ok and result.worst("image").metric == "psnr" and result.worst("image").value >= 40.0


def test_validation_fails_loudly_with_the_measured_error(tiny, tmp_path):
    path = export_onnx(tiny, tmp_path / "step.onnx", "step")
    model = onnx.load(str(path))
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    init = next(i for i in model.graph.initializer if i.name == conv.input[1])
    w = numpy_helper.to_array(init).copy()
    w.flat[0] += 0.05  # a small corruption of one weight
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    onnx.save(model, str(path))
    with pytest.raises(ValidationError, match=r"step fp32 graph does not match PyTorch: call .*max_abs [0-9.e-]+ \(≤"):
        validate_onnx(path, tiny)
    report = validate_onnx(path, tiny, raise_on_failure=False)
    assert not report.ok and report.worst("call").value > 1e-4
