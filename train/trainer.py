"""The RDDM training loop: L1 on the predicted residual / noise at random t, Adam, EMA.

A run lives in one folder: ``ema.safetensors`` and ``model.safetensors`` (self-describing,
loadable by :func:`rddm_infer.model.load_checkpoint`), ``state.pt`` (the resume point, see
:mod:`.state`), ``config.toml``, ``train_log.jsonl``, ``val_log.csv`` / ``val_log.jsonl``,
``val/step_N.png`` grids and ``best_ema.safetensors`` (see :mod:`.validation`). The pieces live
beside this module: :mod:`.loss` (what one micro-batch is trained on), :mod:`.ema`,
:mod:`.cuda_graph`, :mod:`.state` (save / resume) and :mod:`.progress` (logs, progress bar, SIGTERM);
the :class:`Trainer` builds them from a :class:`TrainConfig` and runs the iterations.
"""

from __future__ import annotations

import functools
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch

from rddm_infer.errors import CheckpointError, RDDMError
from rddm_infer.model import UnetRes

from . import config as cfgmod
from .config import TrainConfig
from .cuda_graph import graphed_forward
from .data import TrainSet, make_loader, training_set, validation_data
from .ema import EMA
from .loss import Loss
from .progress import ProgressBar, StopOnSigterm, TrainLog
from .real_pairs import MixedSet, RealPairs
from .state import Checkpoint
from .validation import Validator


class TrainingDiverged(RDDMError):
    """The loss became NaN or infinite; the last good checkpoint is kept untouched."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RDDMError(f"--device {name}: CUDA is not available on this machine (torch {torch.__version__})")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise RDDMError(f"--device {name}: MPS is not available on this machine")
    return dev


def _seed_and_tune(cfg: TrainConfig, device: torch.device) -> None:
    """Global seeds and torch settings, before any weight is drawn: a run is a function of its config."""
    if cfg.run.threads > 0:
        torch.set_num_threads(cfg.run.threads)
    random.seed(cfg.run.seed)
    np.random.seed(cfg.run.seed)
    torch.manual_seed(cfg.run.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


class Trainer:
    """Builds the network, optimizer and EMA from a :class:`TrainConfig`; ``fit()`` runs to ``run.steps`` iterations."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg.validate()
        self.out = Path(cfg.run.out)
        self.device = resolve_device(cfg.run.device)
        self.unet_cfg, self.diffusion = cfg.unet_config(), cfg.diffusion_config()
        self.amp = cfg.run.bf16 and self.device.type in ("cuda", "cpu")
        self.iteration = 0
        _seed_and_tune(cfg, self.device)
        self.net = UnetRes(self.unet_cfg).to(self.device)
        if cfg.run.init:
            self._init_weights(cfg.run.init)
        if cfg.run.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        o = cfg.optim
        self.opt = torch.optim.Adam(self.net.parameters(), lr=o.lr, betas=tuple(o.betas),
                                    fused=self.device.type == "cuda")
        self.ema = EMA(self.net, o.ema_decay, o.ema_every, o.ema_start)  # copied before any graph capture
        self.forward = torch.compile(self.net) if cfg.run.compile else self.net
        if cfg.run.cuda_graph:
            self.forward = graphed_forward(self.net, cfg, self.device, self.amp)
        self.gen = torch.Generator(self.device).manual_seed(cfg.run.seed)
        self.loss_fn = Loss(cfg, self.diffusion, self.device, self.amp, self.gen)
        self.checkpoint = Checkpoint(self.out, cfg, self.unet_cfg, self.diffusion)
        self.validator = Validator(cfg, self.out, self.unet_cfg, self.diffusion, self.device, self.amp)
        self._pending_losses: list[torch.Tensor] = []
        self.last_saved: int | None = None
        self.resume_notes: list[str] = []

    def _init_weights(self, path: str) -> None:
        """Start from a trained checkpoint's weights (fine-tuning); optimizer and iteration count start fresh."""
        from rddm_infer.model import load_checkpoint

        loaded = load_checkpoint(path)
        if loaded.unet != self.unet_cfg:
            raise CheckpointError(f"{path}: --init architecture {loaded.unet} differs from the config's {self.unet_cfg}")
        self.net.load_state_dict(loaded.net.state_dict())

    @property
    def best_val(self) -> dict | None:
        """Iteration and PSNR of best_ema.safetensors (None before the first validation)."""
        return self.validator.best

    # ---- one iteration --------------------------------------------------------------------------------------
    def loss(self, inp: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        """Σ over outputs of mean L1 for one micro-batch ([0, 1] NCHW on the device)."""
        return self.loss_fn(inp, gt, self.forward, self.net)

    def rollout(self, x_in: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t, t) before step k of the K-step sampler, run by the current network (see :meth:`Loss.rollout`)."""
        return self.loss_fn.rollout(self.net, x_in, k)

    def sample_t(self, b: int) -> torch.Tensor:
        return self.loss_fn.sample_t(b)

    def lr_at(self, iteration: int) -> float:
        """Learning rate for the update after ``iteration`` iterations (a function of it alone: resumes stay exact)."""
        o = self.cfg.optim
        if o.lr_schedule == "constant":
            return o.lr
        frac = min(iteration / max(self.cfg.run.steps, 1), 1.0)
        return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))

    def train_iteration(self, micro_batches) -> torch.Tensor:
        """Accumulate gradients over micro-batches, clip, apply Adam's update, update the EMA; returns the mean loss."""
        self.net.train()
        total = torch.zeros((), device=self.device)
        n = len(micro_batches)
        for inp, gt in micro_batches:
            inp, gt = inp.to(self.device, non_blocking=True), gt.to(self.device, non_blocking=True)
            loss = self.loss(inp, gt)
            (loss / n).backward()
            total += loss.detach() / n
        if self.cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.cfg.optim.grad_clip)
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(self.iteration)
        self.opt.step()
        self.opt.zero_grad(set_to_none=not self.cfg.run.cuda_graph)
        self.iteration += 1
        self.ema.update(self.net, self.iteration)
        return total

    # ---- checkpoints ----------------------------------------------------------------------------------------
    @property
    def state_path(self) -> Path:
        return self.checkpoint.path

    def save(self) -> None:
        """Checkpoint the run (see :meth:`Checkpoint.save`), unless the weights are no longer finite."""
        if not bool(torch.stack([torch.isfinite(p).all() for p in self.net.parameters()]).all()):
            self._diverged("the weights became non-finite")
        self.checkpoint.save(self.iteration, self.net, self.ema.model, self.opt, self.gen)
        self.last_saved = self.iteration

    def resume(self, path: str | os.PathLike | None = None) -> int:
        """Restore the iteration, weights, optimizer, EMA and RNGs from ``state.pt``; returns the iteration."""
        self.iteration, self.resume_notes = self.checkpoint.load(self.net, self.ema.model, self.opt, self.gen, path)
        self.last_saved = self.iteration
        self.validator.load_best()
        return self.iteration

    # ---- data and validation --------------------------------------------------------------------------------
    @functools.cached_property
    def real_pairs(self) -> RealPairs | None:
        """The config's real pairs split by scene (``real.pairs``), decoded once; None without them."""
        return RealPairs(self.cfg) if self.cfg.real.pairs else None

    def dataset(self) -> TrainSet | MixedSet:
        """The synthetic (or paired) set, with real pairs mixed in at ``real.ratio`` when the config names them."""
        r, d = self.cfg.real, self.cfg.data
        if self.real_pairs is None:
            return training_set(self.cfg)
        synthetic = training_set(self.cfg) if r.ratio < 1 else None
        return MixedSet(self.real_pairs.train_set(d.crop, self.cfg.run.seed, d.flip), synthetic, r.ratio,
                        r.transplant)

    def validation_data(self):
        """The held-out real pairs when the config names real pairs, else its val.clean / val.input set."""
        return self.real_pairs.held_out_set if self.real_pairs is not None else validation_data(self.cfg)

    def validate(self, val) -> dict:
        """Restore the fixed set with the EMA weights and the few-step sampler; log scores and a grid (and, with real
        pairs, the train/held-out gap)."""
        gap = self.real_pairs.gap_set if self.real_pairs is not None else None
        return self.validator(self.ema.model, val, self.iteration, gap)

    # ---- the loop -------------------------------------------------------------------------------------------
    def _check_finite(self, losses: list[torch.Tensor]) -> float | None:
        if not losses:
            return None
        mean = float(torch.stack(losses).mean())
        if not math.isfinite(mean):
            self._diverged(f"loss became {mean}")
        return mean

    def _diverged(self, what: str):
        kept = (f"the last good checkpoint (step {self.last_saved}) is kept in {self.out}"
                if self.last_saved is not None else "no checkpoint had been written")
        raise TrainingDiverged(f"{what} by step {self.iteration}; training stopped and {kept}. "
                               f"Lower optim.lr, enable optim.grad_clip or check the data")

    def _open_run(self, resume: bool, log) -> None:
        """Resume from state.pt, or refuse to write over another run; then clear half-written files."""
        if resume:
            self.resume()
            if self.resume_notes:
                log(f"resuming with a changed data stream ({', '.join(self.resume_notes)}): "
                    f"the continuation will differ from an uninterrupted run")
        elif self.state_path.exists():
            raise RDDMError(f"{self.out} already holds a run (state.pt); pass --resume to continue it "
                            f"or choose another --out")
        self.out.mkdir(parents=True, exist_ok=True)
        self.checkpoint.remove_partial_writes()
        cfgmod.save(self.cfg, self.out / "config.toml")

    def fit(self, resume: bool = False, log=print) -> dict:
        """Train to ``run.steps`` iterations (or the wall-clock budget); checkpoints every N and at the end."""
        cfg, r = self.cfg, self.cfg.run
        # The budget covers loading data too; the final validation and checkpoint come after it.
        deadline = time.monotonic() + r.max_minutes * 60 if r.max_minutes > 0 else None
        self._open_run(resume, log)
        val = self.validation_data()
        if self.real_pairs is not None:
            log(f"{self.real_pairs.describe()}; {cfg.real.ratio:g} of the training samples real"
                + (f", {cfg.real.transplant:g} real noise on photos" if cfg.real.transplant else ""))
        summary = {"start_step": self.iteration, "steps": r.steps}  # keys read by rddm-train and users' scripts
        if self.iteration >= r.steps:
            log(f"{self.out}: already at step {self.iteration} of {r.steps}; nothing to do")
            return {**summary, "end_step": self.iteration, "stopped": "done"}
        ds = self.dataset()
        accum = cfg.optim.grad_accum
        loader = make_loader(ds, r.batch_size, self.iteration * accum, cfg.data.num_workers,
                             pin_memory=self.device.type == "cuda")
        batches = iter(loader)
        stopped, last_val = "done", None
        train_log = TrainLog(self.out / "train_log.jsonl", self.iteration, r.batch_size * accum,
                             getattr(ds, "sources", None))
        progress = ProgressBar(r.progress, r.steps, self.iteration, log)
        terminated = StopOnSigterm()
        try:
            while self.iteration < r.steps:
                self._pending_losses.append(self.train_iteration([next(batches) for _ in range(accum)]))
                i = self.iteration
                at_ckpt = i % r.checkpoint_every == 0 or i == r.steps
                out_of_time = (deadline is not None and time.monotonic() >= deadline) or terminated.requested
                if i % r.log_every == 0 or at_ckpt or out_of_time:
                    mean = self._check_finite(self._pending_losses)
                    self._pending_losses.clear()
                    progress.update(i, mean, train_log.write(i, mean, self.lr_at(i - 1)))
                early = False
                if val is not None and (i % cfg.val.every == 0 or i == r.steps or out_of_time):
                    last_val = self.validate(val)
                    progress.note(_val_note(i, last_val))
                    early = self.validator.patience_spent(i)
                if at_ckpt or out_of_time or early:
                    self.save()
                if out_of_time or early:
                    stopped = "early stop" if early else "SIGTERM" if terminated.requested else "time budget"
                    break
        finally:
            terminated.restore()
            progress.close()
            del batches, loader  # stop persistent workers
        if stopped == "early stop":
            b = self.validator.best
            log(f"early stop at step {self.iteration}: the validation PSNR has not beaten step {b['iteration']}'s "
                f"{b['psnr']:.2f} dB for {cfg.val.patience} validations (val.patience); its EMA weights are "
                f"best_ema.safetensors, the checkpoint is in {self.out}")
        elif stopped != "done":
            why = "SIGTERM received" if stopped == "SIGTERM" else f"wall-clock budget of {r.max_minutes} min reached"
            log(f"{why} at step {self.iteration}; checkpoint saved in {self.out}")
        return {**summary, "end_step": self.iteration, "stopped": stopped, "val": last_val}


def _val_note(iteration: int, row: dict) -> str:
    """One validation's line: PSNR over the input, and with real pairs the train/held-out gap."""
    gap = (f"; training pairs {row['train_psnr']:.2f} (input {row['train_psnr_input']:.2f}), "
           f"gap {row['gap']:+.2f} dB" if "gap" in row else "")
    return (f"step {iteration}: val PSNR {row['psnr']:.2f} dB (input {row['psnr_input']:.2f}), SSIM {row['ssim']:.4f}"
            + gap + (" (best so far: best_ema.safetensors)" if row["best"] else ""))
