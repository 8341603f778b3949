"""Int8 ONNX graphs for CPUs with VNNI: convolutions quantised (QDQ), everything else fp32.

Why: on the 2-core AMD EPYC (avx512_vnni) the default denoiser's 5-step restore at 512²
runs ~3× faster than the torch eager reference with int8 convolutions, against ~1.6× in fp32
(benchmarks/NOTES.md). Static quantisation needs activation ranges, so the fp32 graph
is first run through the real sampling loop on calibration images and every call's inputs
are recorded: the ranges then cover every step's x_t, not just the first. Weights are
per output channel (s8), activations u8 asymmetric; norms, attention, the sampler update
and graph inputs/outputs stay fp32. Quality is a property of the model, so measure it:
``python -m benchmarks.backends --int8`` reports the restored image's PSNR against fp32.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np
import onnx

from rddm_infer.artifact import META_KEY
from rddm_infer.backends import EngineSampler, Noise
from rddm_infer.backends.onnxruntime import OnnxRuntimeRunner
from rddm_infer.errors import RDDMError

from .onnx_export import save_model

INT8_OPS = ("Conv",)


def synthetic_calibration(shape=(1, 3, 128, 128), count: int = 2, sigma: float = 25 / 255, seed: int = 0):
    """Smooth random scenes plus Gaussian noise, in model space: for when no images are at hand."""
    import cv2

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        small = rng.uniform(-1, 1, (shape[0], shape[1], 8, 8)).astype(np.float32)
        clean = np.stack([np.stack([cv2.resize(c, shape[2:][::-1], interpolation=cv2.INTER_CUBIC) for c in img])
                          for img in small])
        out.append(np.clip(clean + 2 * sigma * rng.standard_normal(shape), -1, 1).astype(np.float32))
    return out


def calibration_feeds(fp32_path: str | os.PathLike, images: Iterable[np.ndarray], steps: int | None = None,
                      eta: float | None = None, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Every graph call's inputs while restoring ``images`` (NCHW, model space) with the fp32 graph."""
    runner = OnnxRuntimeRunner(fp32_path, providers=["CPUExecutionProvider"])
    feeds: list[dict[str, np.ndarray]] = []
    infer = runner.infer

    def recording(f):
        feeds.append({k: np.array(v) for k, v in f.items() if k in runner.input_names})
        return infer(f)

    runner.infer = recording
    sampler = EngineSampler(runner)
    for i, x in enumerate(images):
        plan = sampler.plan(steps, eta)
        sampler.run(x, plan, Noise.draw(plan, x.shape, seed + i))
    return feeds


def quantize_int8(fp32_path: str | os.PathLike, out_path: str | os.PathLike,
                  images: Iterable[np.ndarray] | None = None, *, steps: int | None = None) -> Path:
    """Write an int8 (QDQ Conv) copy of an exported fp32 graph; ``precision`` becomes ``int8``."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src = onnx.load(str(fp32_path))
    props = {p.key: p.value for p in src.metadata_props}
    if META_KEY not in props or json.loads(props[META_KEY]).get("precision") != "fp32":
        raise RDDMError(f"{fp32_path}: int8 quantisation starts from an fp32 graph exported by rddm-export")
    feeds = calibration_feeds(fp32_path, images if images is not None else synthetic_calibration(), steps)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    out_path = Path(out_path)
    with tempfile.TemporaryDirectory(prefix="rddm-int8-") as tmp:
        pre, q = Path(tmp) / "pre.onnx", Path(tmp) / "q.onnx"
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(q), Reader(), quant_format=QuantFormat.QDQ, op_types_to_quantize=list(INT8_OPS),
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        model = onnx.load(str(q))
    meta = json.loads(props[META_KEY])
    meta["precision"] = "int8"
    for p in [p for p in model.metadata_props if p.key == META_KEY]:
        model.metadata_props.remove(p)
    model.metadata_props.add(key=META_KEY, value=json.dumps(meta))
    model.producer_name = "rddm-export"
    save_model(model, out_path)
    return out_path
