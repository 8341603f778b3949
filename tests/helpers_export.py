"""Tiny RDDM checkpoints for the exporter tests (ours: safetensors; the reference's: model-N.pt)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from rddm_infer.model import UNetConfig, UnetRes, save_checkpoint
from rddm_infer.schedule import DiffusionConfig, Schedule

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
