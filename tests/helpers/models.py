"""Tiny real models for the runtime tests, built once per test session.

The network is a random-weight reference ``UnetRes`` (dim 8, two levels), exported with
the real exporter, so every backend test runs the real graphs on real ONNX Runtime.
"""

from __future__ import annotations

import functools
import shutil
import atexit
import tempfile
from pathlib import Path

ROOT = Path(tempfile.mkdtemp(prefix="rddm-rt-models-"))
atexit.register(shutil.rmtree, ROOT, ignore_errors=True)


@functools.cache
def loaded_model():
    import torch
    from rddm_infer.model import LoadedModel, UNetConfig, UnetRes
    from rddm_infer.diffusion.schedule import DiffusionConfig

    torch.manual_seed(0)
    cfg = UNetConfig(dim=8, dim_mults=(1, 2), heads=1, dim_head=8)
    return LoadedModel(UnetRes(cfg).eval(), cfg, DiffusionConfig(), "tiny-test-model")


@functools.cache
def onnx_model(kind: str = "step") -> Path:
    from rddm_export import export_onnx

    # slim=False: onnxslim's constant folding is the exporter's concern (tested there) and
    # costs most of the export time; the graphs compute the same thing either way.
    return export_onnx(loaded_model(), ROOT / f"tiny_{kind}.onnx", kind=kind, steps=5, eta=0.0, slim=False)


@functools.cache
def checkpoint() -> Path:
    from rddm_infer.model import save_checkpoint

    m = loaded_model()
    return save_checkpoint(ROOT / "tiny.safetensors", m.net, m.unet, m.diffusion)


@functools.cache
def pointwise_onnx() -> Path:
    """The tiny model with its final convolutions zeroed (outputs = per-channel biases), so the
    whole restoration is a per-pixel function of the input and the noise: tiled and untiled runs
    must then agree to rounding, which checks tile placement, blending and noise cropping."""
    import copy

    import torch
    from rddm_export import export_onnx
    from rddm_infer.model import LoadedModel

    m = loaded_model()
    net = copy.deepcopy(m.net)
    with torch.no_grad():
        for name, mod in net.named_modules():
            if name.endswith("final_conv"):
                mod.weight.zero_()
                mod.bias.copy_(torch.tensor([0.3, -0.2, 0.1])[: mod.bias.numel()])
    pw = LoadedModel(net, m.unet, m.diffusion, "tiny-pointwise")
    return export_onnx(pw, ROOT / "pointwise_step.onnx", kind="step", steps=5, eta=0.0, slim=False)


@functools.cache
def onnx_fp16_step() -> Path:
    from rddm_export import export_onnx

    return export_onnx(loaded_model(), ROOT / "tiny_step_fp16.onnx", kind="step", steps=5, fp16=True, slim=False)


TINY = dict(dim=8, dim_mults=(1, 2))  # attention keeps the reference heads (4 × 32)


def tiny_loaded_model(share_encoder: int = 1, objective: str = "pred_res_noise", seed: int = 0, **diffusion):
    """A randomly initialised, reference-compatible model small enough for any test."""
    import torch

    from rddm_infer.model import LoadedModel, UNetConfig, UnetRes
    from rddm_infer.diffusion.schedule import DiffusionConfig

    torch.manual_seed(seed)
    cfg = UNetConfig(share_encoder=share_encoder, **TINY)
    net = UnetRes(cfg).eval()
    # Random init leaves GroupNorm/LayerNorm at identity and biases at zero: perturb so every
    # parameter matters and outputs span a realistic range.
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return LoadedModel(net, cfg, DiffusionConfig(objective=objective, **diffusion), source="tiny")
