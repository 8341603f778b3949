"""The run folder's checkpoint: ``state.pt`` (the resume point) and the weight files written beside it.

``state.pt`` holds everything a resume needs (iteration counter, both weight sets, optimizer, EMA
and RNG states) and loads with ``weights_only=True``: a checkpoint is data, never code. It is written
last and atomically, so it alone decides where a resume starts, and a run killed at any moment loses
at most the iterations since its last checkpoint. The key names are a file format (``STATE_FORMAT``):
they stay as they are, including ``"step"`` for the iteration counter.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from rddm_infer.errors import CheckpointError
from rddm_infer.io.atomic import atomic_path
from rddm_infer.model import save_checkpoint

from . import config as cfgmod
from .config import TrainConfig

STATE_FORMAT = "rddm-train-state/1"
# Every file of a run folder written through atomic_path; a killed run may leave a ".NAME.tmp*" of any of them.
ATOMIC_FILES = ("state.pt", "ema.safetensors", "model.safetensors", "ema.json", "model.json", "config.toml",
                "best_ema.safetensors", "best_ema.json")


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:160]


def _rng_state(gen: torch.Generator) -> dict:
    """Every random stream a training iteration draws from, as plain tensors and lists (weights_only-loadable)."""
    np_state = np.random.get_state(legacy=False)
    return {"generator": gen.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {**np_state, "state": {"key": np_state["state"]["key"].tolist(), "pos": np_state["state"]["pos"]}},
            "python": random.getstate()}


def _set_rng_state(gen: torch.Generator, s: dict) -> None:
    gen.set_state(s["generator"])
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    np_state = s["numpy"]
    np.random.set_state({**np_state, "state": {"key": np.array(np_state["state"]["key"], dtype=np.uint32),
                                               "pos": np_state["state"]["pos"]}})
    version, internal, gauss = s["python"]
    random.setstate((version, tuple(internal), gauss))


# Stream keys added after checkpoints were written without them: the value those checkpoints trained with.
STREAM_BEFORE_ITS_KEYS = {"real_transplant": 0.0}


class Checkpoint:
    """Saves and restores one run's training state; refuses files that are corrupt or from another config."""

    def __init__(self, out: Path, cfg: TrainConfig, unet_cfg, diffusion):
        self.out, self.cfg, self.unet_cfg, self.diffusion = Path(out), cfg, unet_cfg, diffusion

    @property
    def path(self) -> Path:
        return self.out / "state.pt"

    def stream(self) -> dict:
        """What decides which samples a resumed run draws (a change is allowed, and said when resuming)."""
        c = self.cfg
        stream = {"batch_size": c.run.batch_size, "grad_accum": c.optim.grad_accum, "seed": c.run.seed}
        real = {"real_ratio": c.real.ratio, "real_transplant": c.real.transplant}
        return {**stream, **real} if c.real.pairs else stream  # absent without real pairs

    def remove_partial_writes(self) -> None:
        """Delete the temporary files of a run killed mid-checkpoint."""
        for name in ATOMIC_FILES:
            for stale in self.out.glob(f".{name}.tmp*"):
                stale.unlink(missing_ok=True)

    def save(self, iteration: int, net, ema_model, opt, gen: torch.Generator) -> None:
        """Weights (EMA, online) as safetensors, config, then state.pt last: state.pt is the resume point."""
        self.out.mkdir(parents=True, exist_ok=True)
        info = dict(step=iteration, trainer="rddm-train")
        save_checkpoint(self.out / "ema.safetensors", ema_model, self.unet_cfg, self.diffusion, weights="ema", **info)
        save_checkpoint(self.out / "model.safetensors", net, self.unet_cfg, self.diffusion, weights="online", **info)
        cfgmod.save(self.cfg, self.out / "config.toml")
        state = {"format": STATE_FORMAT, "step": iteration, "unet": self.unet_cfg.to_dict(),
                 "diffusion": self.diffusion.to_dict(), **self.stream(),
                 "model": net.state_dict(), "ema": ema_model.state_dict(),
                 "optimizer": opt.state_dict(), "rng": _rng_state(gen)}
        with atomic_path(self.path) as tmp:
            torch.save(state, tmp)

    def load(self, net, ema_model, opt, gen: torch.Generator,
             path: str | os.PathLike | None = None) -> tuple[int, list[str]]:
        """Restore weights, optimizer and RNGs in place; returns (iteration, notes on a changed data stream)."""
        path = Path(path) if path else self.path
        if not path.is_file():
            raise CheckpointError(f"{path}: no checkpoint to resume from")
        try:
            s = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{path}: not a readable training state ({_first_line(e)})") from None
        if not isinstance(s, dict) or s.get("format") != STATE_FORMAT:
            raise CheckpointError(f"{path}: not an rddm-train state (format {s.get('format') if isinstance(s, dict) else None!r})")
        self._check_architecture(path, s)
        saved = {k: s.get(k, STREAM_BEFORE_ITS_KEYS.get(k)) for k in self.stream()}
        notes = [f"{k} {saved[k]} -> {v}" for k, v in self.stream().items() if saved[k] != v]
        try:
            net.load_state_dict(s["model"])
            ema_model.load_state_dict(s["ema"])
            opt.load_state_dict(s["optimizer"])
            for group in opt.param_groups:  # the config's hyper-parameters win (e.g. a lower lr to fine-tune)
                group["lr"], group["betas"] = self.cfg.optim.lr, tuple(self.cfg.optim.betas)
            _set_rng_state(gen, s["rng"])
            iteration = int(s["step"])
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            raise CheckpointError(f"{path}: incomplete or mismatched training state ({_first_line(e)})") from None
        return iteration, notes

    def _check_architecture(self, path: Path, s: dict) -> None:
        norm = lambda v: list(v) if isinstance(v, (list, tuple)) else v  # noqa: E731
        for key, want in (("unet", self.unet_cfg.to_dict()), ("diffusion", self.diffusion.to_dict())):
            have = s.get(key) if isinstance(s.get(key), dict) else {}
            diff = [f"{key}.{k}: checkpoint {have.get(k)!r}, config {v!r}" for k, v in want.items()
                    if norm(have.get(k)) != norm(v)]
            if diff:
                raise CheckpointError(f"{path}: does not match the config ({'; '.join(diff[:3])})")
