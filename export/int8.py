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

import os
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Iterable

import numpy as np
import onnx

from rddm_infer.diffusion.metadata import ArtifactMeta
from rddm_infer.backends import EngineSampler, Noise
from rddm_infer.backends.base import Runner, RunnerWrapper
from rddm_infer.backends.onnxruntime import OnnxRuntimeRunner
from rddm_infer.errors import RDDMError

from .artifact import read_metadata, save_model, set_metadata

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


class RecordingRunner(RunnerWrapper):
    """Wraps a runner and keeps a copy of the inputs of every call it passes on."""

    def __init__(self, inner: Runner):
        super().__init__(inner)
        self.feeds: list[dict[str, np.ndarray]] = []

    def infer(self, feeds):
        self.feeds.append({k: np.array(self.download(v)) for k, v in feeds.items()})
        return self.inner.infer(feeds)


def calibration_feeds(fp32_path: str | os.PathLike, images: Iterable[np.ndarray], steps: int | None = None,
                      eta: float | None = None, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Every graph call's inputs while restoring ``images`` (NCHW, model space) with the fp32 graph."""
    inner = OnnxRuntimeRunner(fp32_path, providers=["CPUExecutionProvider"])
    runner = RecordingRunner(inner)
    sampler = EngineSampler(runner)
    try:
        for i, x in enumerate(images):
            plan = sampler.plan(steps, eta)
            sampler.run(x, plan, Noise.draw(plan, x.shape, seed + i))
    finally:
        runner.deactivate()
    return [{k: v for k, v in f.items() if k in inner.input_names} for f in runner.feeds]


def boundary_convs(model: onnx.ModelProto, channels: int) -> list[str]:
    """The convs that read the image-space input or write the image-space output: kept fp32.

    They see the widest-ranged tensors (the raw state and the final prediction) and cost
    little (3-6 channels on one side), so int8 there loses most and gains least.
    """
    shapes = {i.name: tuple(i.dims) for i in model.graph.initializer}
    keep = []
    for n in model.graph.node:
        w = shapes.get(n.input[1]) if n.op_type == "Conv" and len(n.input) > 1 else None
        if w and len(w) == 4 and (w[0] == channels or w[1] in (channels, 2 * channels)):
            keep.append(n.name)
    return keep


def quantize_int8(fp32_path: str | os.PathLike, out_path: str | os.PathLike,
                  images: Iterable[np.ndarray] | None = None, *, steps: int | None = None,
                  keep_boundary: bool = True, meta: ArtifactMeta | None = None) -> Path:
    """Write an int8 (QDQ Conv) copy of an exported fp32 graph; ``precision`` becomes ``int8``.

    ``meta``: the fp32 graph's metadata when the caller has it (else read from ``fp32_path``).
    """
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if meta is None:
        try:
            meta = read_metadata(fp32_path)
        except RDDMError:  # no or broken rddm metadata
            raise RDDMError(f"{fp32_path}: int8 quantisation starts from an fp32 graph exported by rddm-export") \
                from None
        except Exception as e:  # protobuf DecodeError, OSError, ...
            raise RDDMError(f"{fp32_path}: not a readable ONNX model ({type(e).__name__})") from None
    if meta.precision != "fp32":
        raise RDDMError(f"{fp32_path}: int8 quantisation starts from an fp32 graph exported by rddm-export "
                        f"(this one is {meta.precision})")
    feeds = calibration_feeds(fp32_path, images if images is not None else synthetic_calibration(), steps)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    with tempfile.TemporaryDirectory(prefix="rddm-int8-") as tmp:
        pre, q = Path(tmp) / "pre.onnx", Path(tmp) / "q.onnx"
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
        exclude = boundary_convs(onnx.load(str(pre)), meta.channels) if keep_boundary else []
        quantize_static(str(pre), str(q), Reader(), quant_format=QuantFormat.QDQ, op_types_to_quantize=list(INT8_OPS),
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        nodes_to_exclude=exclude)
        model = onnx.load(str(q))
    set_metadata(model, replace(meta, precision="int8"))
    return save_model(model, out_path)


def calibration_images(folder: str | os.PathLike, count: int = 2, size: int = 128, sigma: float = 25.0,
                       seed: int = 0) -> list[np.ndarray]:
    """Noisy centre crops of the first ``count`` images in ``folder``, in model space (NCHW, [-1, 1])."""
    from rddm_infer import read_image

    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp",
                                                                              ".tif", ".tiff", ".webp"))[:count]
    if not files:
        raise RDDMError(f"{folder}: no calibration images (png/jpg/bmp/tif/webp) found")
    rng = np.random.default_rng(seed)
    out = []
    for f in files:
        px = read_image(f).pixels
        px = np.repeat(px[..., None], 3, -1) if px.ndim == 2 else px[..., :3]
        img = px.astype(np.float32) / (65535.0 if px.dtype == np.uint16 else 255.0)
        h, w = img.shape[:2]
        s = min(size, h, w) // 8 * 8
        if s < 8:
            raise RDDMError(f"{f}: too small for calibration ({w}×{h})")
        y, x = (h - s) // 2, (w - s) // 2
        crop = img[y:y + s, x:x + s, ::-1].transpose(2, 0, 1)[None]  # BGR -> RGB, NCHW
        noisy = np.clip(crop + sigma / 255.0 * rng.standard_normal(crop.shape), 0, 1)
        out.append(np.ascontiguousarray(noisy * 2 - 1, dtype=np.float32))
    return out


def main(argv=None) -> None:
    """``python -m rddm_export.int8 step_fp32.onnx step_int8.onnx [--images DIR]``"""
    import argparse
    import sys

    ap = argparse.ArgumentParser(description="Int8 (QDQ Conv) copy of an rddm-export fp32 graph, for VNNI CPUs.")
    ap.add_argument("fp32", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--images", type=Path, default=None,
                    help="clean images to calibrate on (noise of --sigma is added); default: synthetic scenes")
    ap.add_argument("--count", type=int, default=2)
    ap.add_argument("--sigma", type=float, default=25.0)
    a = ap.parse_args(argv)
    try:
        if not a.fp32.is_file():
            raise RDDMError(f"{a.fp32}: no such model file")
        images = calibration_images(a.images, a.count, sigma=a.sigma) if a.images else None
        print(quantize_int8(a.fp32, a.out, images))
    except RDDMError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
