"""Tiny RDDM checkpoints for the exporter tests (ours: safetensors; the reference's: model-N.pt)."""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from rddm_infer.model import UNetConfig, UnetRes, save_checkpoint
from rddm_infer.diffusion.schedule import DiffusionConfig, Schedule

TINY = UNetConfig(dim=8, dim_mults=(1, 2), heads=2, dim_head=8)


def tiny_net(cfg: UNetConfig = TINY, seed: int = 0) -> UnetRes:
    """A randomly initialised tiny network whose norms/gains are perturbed too, so outputs are non-trivial."""
    torch.manual_seed(seed)
    net = UnetRes(cfg).eval()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith((".g", "norm.weight", "norm.bias")) or p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return net


def tiny_checkpoint(tmp: Path, cfg: UNetConfig = TINY, diffusion: DiffusionConfig | None = None,
                    name: str = "tiny.safetensors") -> Path:
    diffusion = diffusion or DiffusionConfig(sum_scale=0.01)
    return save_checkpoint(Path(tmp) / name, tiny_net(cfg), cfg, diffusion, weights="ema", step=1)


def reference_checkpoint(tmp: Path, cfg: UNetConfig = UNetConfig(dim=8, dim_mults=(1, 2)), sum_scale: float = 0.01,
                         name: str = "model-3.pt") -> Path:
    """A trainer checkpoint laid out as nachifur/RDDM's ``Trainer.save`` writes it."""
    net = tiny_net(cfg)
    s = Schedule.from_config(DiffusionConfig(sum_scale=sum_scale))
    buffers = {k: torch.from_numpy(np.asarray(getattr(s, k), dtype=np.float32)) for k in
               ("alphas", "alphas_cumsum", "one_minus_alphas_cumsum", "betas2", "betas2_cumsum", "betas_cumsum")}
    model = {**{f"model.{k}": v for k, v in net.state_dict().items()}, **buffers}
    ema = {"initted": torch.tensor(True), "step": torch.tensor(30)}
    ema.update({f"online_model.{k}": v.clone() for k, v in model.items()})
    ema.update({f"ema_model.{k}": v.clone() for k, v in model.items()})
    path = Path(tmp) / name
    torch.save({"step": 30, "model": model, "opt": {}, "ema": ema, "scaler": None}, path)
    return path


def run_fused_and_torch(path: Path, loaded, steps: int, shape, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(ONNX Runtime output of a fused graph, torch sampler output) for the same fresh inputs and noise."""
    import onnxruntime as ort

    from rddm_infer.model import TorchRDDM
    from rddm_infer.diffusion.schedule import SamplingPlan

    rng = np.random.default_rng(seed)
    x_in = rng.uniform(-1, 1, shape).astype(np.float32)
    noise = rng.standard_normal(shape, dtype=np.float32)
    plan = SamplingPlan.create(loaded.diffusion, steps)
    ref = TorchRDDM(loaded.net, loaded.diffusion).sample_model_space(x_in, plan, noise=noise)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x_input": x_in, "noise": noise})[0], ref


@functools.lru_cache(maxsize=None)
def _cache_dir() -> Path:
    d = Path(tempfile.mkdtemp(prefix="rddm-export-tests-"))
    atexit.register(shutil.rmtree, d, ignore_errors=True)
    return d


@functools.lru_cache(maxsize=None)
def tiny_loaded():
    """The TINY checkpoint, loaded once per test process (read-only: do not modify the network)."""
    from rddm_infer.model import load_checkpoint

    return load_checkpoint(tiny_checkpoint(_cache_dir()))


@functools.lru_cache(maxsize=None)
def exported(kind: str, steps: int = 5, fp16: bool = False) -> Path:
    """One export of the TINY model per process, shared by the test modules (copy before modifying)."""
    from rddm_export.onnx_export import export_onnx

    name = f"{kind}{steps}_{'fp16' if fp16 else 'fp32'}.onnx"
    return export_onnx(tiny_loaded(), _cache_dir() / name, kind, steps=steps, fp16=fp16)
