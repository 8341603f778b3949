"""The RDDM training loop: L1 on the predicted residual / noise at random t, Adam, EMA.

A run lives in one folder: ``ema.safetensors`` and ``model.safetensors`` (self-describing,
loadable by :func:`rddm_infer.model.load_checkpoint`), ``state.pt`` (everything a resume
needs: step, both weight sets, optimizer, EMA and RNG states; loads with
``weights_only=True``), ``config.toml``, ``train_log.jsonl``, ``val_log.csv`` /
``val_log.jsonl``, ``val/step_N.png`` grids (the first 8 images) and ``best_ema.safetensors``
(the EMA weights at the best validation PSNR so far: a fine-tune's validation often peaks
before its last step). Every file is written atomically, and ``state.pt`` alone decides where
a resume starts, so a run killed at any moment loses at most the steps since its last checkpoint.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import signal
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rddm_infer.io.atomic import atomic_path
from rddm_infer.errors import CheckpointError, RDDMError
from rddm_infer.model import TorchRDDM, UnetRes, save_checkpoint
from rddm_infer.diffusion.sampler import sample
from rddm_infer.diffusion.schedule import SamplingPlan, Schedule, time_grid
from rddm_infer.restore.tiling import shuffle_merge, shuffle_split

from . import config as cfgmod
from .config import TrainConfig
from .data import ImageBank, TrainSet, list_images, make_loader, pair_files, validation_set
from .degradations import Pipeline
from .validation import scores, write_grid

STATE_FORMAT = "rddm-train-state/1"


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


def targets(objective: str, x0: torch.Tensor, res: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """What each network output is trained to predict (REFERENCE.md, objectives)."""
    return {"pred_res_noise": (res, noise), "pred_res": (res,), "pred_noise": (noise,),
            "pred_x0_noise": (x0, noise), "pred_res_add_noise": (res, res + noise),
            "pred_x0_add_noise": (x0, x0 + noise), "pred_x0": (x0,)}[objective]


GRID_ROWS = 8  # images shown in each validation grid


class EMA:
    """Exponential moving average of the weights, updated every ``every`` steps.

    Until ``start`` it copies the online weights; then the decay warms up as
    ``1 - (1 + n)^(-2/3)`` capped at ``decay`` (ema-pytorch's schedule, which the reference uses).
    """

    def __init__(self, net: torch.nn.Module, decay: float, every: int, start: int):
        self.model = copy.deepcopy(net).eval().requires_grad_(False)
        self.decay, self.every, self.start = decay, every, start

    def current_decay(self, step: int) -> float:
        n = step - self.start - 1
        return 0.0 if n <= 0 else min(self.decay, 1 - (1 + n) ** (-2 / 3))

    @torch.no_grad()
    def update(self, net: torch.nn.Module, step: int) -> None:
        if step % self.every:
            return
        ema_p, net_p = list(self.model.parameters()), list(net.parameters())
        d = self.current_decay(step)
        if d == 0.0:
            torch._foreach_copy_(ema_p, net_p)
        else:
            torch._foreach_lerp_(ema_p, net_p, 1.0 - d)


def _atomic_torch_save(obj, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _append(path: Path, line: str) -> None:
    with open(path, "a") as f:
        f.write(line + "\n")


def _rng_state(gen: torch.Generator) -> dict:
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


class Trainer:
    """Builds the network, optimizer and EMA from a :class:`TrainConfig`; ``fit()`` runs to ``run.steps``."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg.validate()
        self.out = Path(cfg.run.out)
        self.device = resolve_device(cfg.run.device)
        self.unet_cfg, self.diffusion = cfg.unet_config(), cfg.diffusion_config()
        self.amp = cfg.run.bf16 and self.device.type in ("cuda", "cpu")
        self.step = 0
        if cfg.run.threads > 0:
            torch.set_num_threads(cfg.run.threads)
        random.seed(cfg.run.seed)
        np.random.seed(cfg.run.seed)
        torch.manual_seed(cfg.run.seed)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
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
            self.forward = self._graphed_forward()
            # The graphed backward hands out views of its static buffers; autograd would adopt them as .grad
            # and the next micro-batch's replay would overwrite them. Own .grad buffers make it add instead.
            for p in self.net.parameters():
                p.grad = torch.zeros_like(p)
        self.gen = torch.Generator(self.device).manual_seed(cfg.run.seed)
        sched = Schedule.from_config(self.diffusion)  # the tables come from the core, never re-derived
        self.alpha_bar = torch.tensor(sched.alphas_cumsum, dtype=torch.float32, device=self.device)
        self.beta_bar = torch.tensor(sched.betas_cumsum, dtype=torch.float32, device=self.device)
        # optim.t_grid: train on the sampler's own time indices (the trailing -1 is "done", not a step)
        grid = time_grid(self.diffusion.timesteps, cfg.optim.t_grid)[:-1] if cfg.optim.t_grid else []
        self.t_grid = torch.tensor(grid, dtype=torch.long, device=self.device)
        self.plan = SamplingPlan.create(self.diffusion, cfg.optim.t_grid) if cfg.optim.rollout else None
        self._pending_losses: list[torch.Tensor] = []
        self.last_saved: int | None = None
        self.best_val: dict | None = None  # the validation row of best_ema.safetensors
        self.resume_notes: list[str] = []

    def _graphed_forward(self):
        """Forward and backward of the network captured as CUDA graphs (fixed batch and crop).

        The eager UNet issues ~13k small ops per step, so a GPU waits on Python for most of it;
        replaying captured graphs removes that launch overhead at no compile time.
        """
        if self.device.type != "cuda":
            raise RDDMError(f"run.cuda_graph needs a CUDA device, not {self.device}")
        if self.cfg.run.compile:
            raise RDDMError("run.cuda_graph and run.compile exclude each other (use one)")
        r, crop = self.cfg.run, self.cfg.data.crop
        fmt = torch.channels_last if r.channels_last else torch.contiguous_format
        x = torch.randn(r.batch_size, self.unet_cfg.in_channels, crop, crop, device=self.device).contiguous(
            memory_format=fmt)
        t = torch.randint(0, self.diffusion.timesteps, (r.batch_size,), device=self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp, cache_enabled=False):
            return torch.cuda.make_graphed_callables(self.net, (x, t))

    def _init_weights(self, path: str) -> None:
        """Start from a trained checkpoint's weights (fine-tuning); optimizer and step start fresh."""
        from rddm_infer.model import load_checkpoint

        loaded = load_checkpoint(path)
        if loaded.unet != self.unet_cfg:
            raise CheckpointError(f"{path}: --init architecture {loaded.unet} differs from the config's {self.unet_cfg}")
        self.net.load_state_dict(loaded.net.state_dict())

    # ---- one step -------------------------------------------------------------------------------------------
    def loss(self, inp: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        """Σ over outputs of mean L1 for one micro-batch ([0, 1] NCHW on the device)."""
        x_in, x0 = inp * 2 - 1, gt * 2 - 1
        res = x_in - x0
        b = x0.shape[0]
        if self.plan is not None:  # optim.rollout: x_t where the sampler itself arrives
            x_t, t = self.rollout(x_in)
            a, s = self.alpha_bar[t].view(b, 1, 1, 1), self.beta_bar[t].view(b, 1, 1, 1)
            noise = (x_t - x0 - a * res) / s  # the ε that q_sample would need to land on this x_t
        else:
            t = self.sample_t(b)
            noise = torch.randn(x0.shape, generator=self.gen, device=self.device)
            # Schedule.q_sample's I_t = I_0 + ᾱ_t·I_res + β̄_t·ε with one t per sample.
            x_t = x0 + self.alpha_bar[t].view(b, 1, 1, 1) * res + self.beta_bar[t].view(b, 1, 1, 1) * noise
        outs = self._net_outputs(x_t, x_in, t, self.forward)
        goals = targets(self.diffusion.objective, x0, res, noise)
        return sum(F.l1_loss(o, g) for o, g in zip(outs, goals))

    def _net_outputs(self, x_t, x_in, t, net) -> list[torch.Tensor]:
        x = torch.cat((x_t, x_in), dim=1)
        if self.cfg.run.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp,
                            cache_enabled=not self.cfg.run.cuda_graph):
            return [o.float() for o in net(x, t)]

    @torch.no_grad()
    def rollout(self, x_in: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t, t) before a random step k of the K-step sampler, run by the current network from x_T.

        q_sample's x_t carries the *true* residual, so at low t the network learns to copy it; at
        inference x_t carries the network's own earlier estimates. Training on the sampler's own states
        (one k per micro-batch) teaches each step to improve on them, which is what the output is made of.
        """
        plan, b = self.plan, x_in.shape[0]
        if k is None:
            k = int(torch.randint(0, plan.steps, (1,), generator=self.gen, device=self.device))
        x_t = x_in + plan.init_scale() * torch.randn(x_in.shape, generator=self.gen, device=self.device)
        times = lambda t: torch.full((b,), int(t), dtype=torch.long, device=self.device)  # noqa: E731
        model = lambda x, xi, t: self._net_outputs(x, xi, times(t), self.net)  # noqa: E731
        return sample(model, plan, x_in, x_t, stop=k), times(plan.times[k])

    def sample_t(self, b: int) -> torch.Tensor:
        """One time index per sample: uniform over [0, T), or over the sampling grid with ``optim.t_grid``."""
        if len(self.t_grid):
            return self.t_grid[torch.randint(0, len(self.t_grid), (b,), generator=self.gen, device=self.device)]
        return torch.randint(0, self.diffusion.timesteps, (b,), generator=self.gen, device=self.device)

    def lr_at(self, step: int) -> float:
        """Learning rate for the update after ``step`` steps (a function of the step alone: resumes stay exact)."""
        o = self.cfg.optim
        if o.lr_schedule == "constant":
            return o.lr
        frac = min(step / max(self.cfg.run.steps, 1), 1.0)
        return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))

    def train_step(self, micro_batches) -> torch.Tensor:
        """Accumulate gradients over micro-batches, clip, step Adam, update the EMA; returns the mean loss."""
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
            group["lr"] = self.lr_at(self.step)
        self.opt.step()
        self.opt.zero_grad(set_to_none=not self.cfg.run.cuda_graph)
        self.step += 1
        self.ema.update(self.net, self.step)
        return total

    # ---- checkpoints ----------------------------------------------------------------------------------------
    @property
    def state_path(self) -> Path:
        return self.out / "state.pt"

    def save(self) -> None:
        """Weights (EMA, online) as safetensors, config, then state.pt last: state.pt is the resume point."""
        if not bool(torch.stack([torch.isfinite(p).all() for p in self.net.parameters()]).all()):
            self._diverged("the weights became non-finite")
        self.out.mkdir(parents=True, exist_ok=True)
        info = dict(step=self.step, trainer="rddm-train")
        save_checkpoint(self.out / "ema.safetensors", self.ema.model, self.unet_cfg, self.diffusion,
                        weights="ema", **info)
        save_checkpoint(self.out / "model.safetensors", self.net, self.unet_cfg, self.diffusion,
                        weights="online", **info)
        cfgmod.save(self.cfg, self.out / "config.toml")
        state = {"format": STATE_FORMAT, "step": self.step, "unet": self.unet_cfg.to_dict(),
                 "diffusion": self.diffusion.to_dict(), "batch_size": self.cfg.run.batch_size,
                 "grad_accum": self.cfg.optim.grad_accum, "seed": self.cfg.run.seed,
                 "model": self.net.state_dict(), "ema": self.ema.model.state_dict(),
                 "optimizer": self.opt.state_dict(), "rng": _rng_state(self.gen)}
        _atomic_torch_save(state, self.state_path)
        self.last_saved = self.step

    def resume(self, path: str | os.PathLike | None = None) -> int:
        """Restore step, weights, optimizer, EMA and RNGs from ``state.pt``; refuse corrupt or mismatched files."""
        path = Path(path) if path else self.state_path
        if not path.is_file():
            raise CheckpointError(f"{path}: no checkpoint to resume from")
        try:
            s = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise CheckpointError(f"{path}: not a readable training state ({msg[:160]})") from None
        if not isinstance(s, dict) or s.get("format") != STATE_FORMAT:
            raise CheckpointError(f"{path}: not an rddm-train state (format {s.get('format') if isinstance(s, dict) else None!r})")
        norm = lambda v: list(v) if isinstance(v, (list, tuple)) else v  # noqa: E731
        for key, want in (("unet", self.unet_cfg.to_dict()), ("diffusion", self.diffusion.to_dict())):
            have = s.get(key) if isinstance(s.get(key), dict) else {}
            diff = [f"{key}.{k}: checkpoint {have.get(k)!r}, config {v!r}" for k, v in want.items()
                    if norm(have.get(k)) != norm(v)]
            if diff:
                raise CheckpointError(f"{path}: does not match the config ({'; '.join(diff[:3])})")
        stream = {"batch_size": self.cfg.run.batch_size, "grad_accum": self.cfg.optim.grad_accum,
                  "seed": self.cfg.run.seed}
        self.resume_notes = [f"{k} {s.get(k)} -> {v}" for k, v in stream.items() if s.get(k) != v]
        try:
            self.net.load_state_dict(s["model"])
            self.ema.model.load_state_dict(s["ema"])
            self.opt.load_state_dict(s["optimizer"])
            for group in self.opt.param_groups:  # the config's hyper-parameters win (e.g. a lower lr to fine-tune)
                group["lr"], group["betas"] = self.cfg.optim.lr, tuple(self.cfg.optim.betas)
            _set_rng_state(self.gen, s["rng"])
            self.step = int(s["step"])
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise CheckpointError(f"{path}: incomplete or mismatched training state ({msg[:160]})") from None
        self.last_saved = self.step
        self.best_val = self._saved_best()
        return self.step

    def _saved_best(self) -> dict | None:
        """The validation row of the run's best_ema.safetensors: the file itself is the record (it may be newer
        than state.pt), so a resumed run only replaces it with a better one."""
        try:
            meta = json.loads((self.out / "best_ema.json").read_text())
            return {"step": int(meta["step"]), "psnr": float(meta["val_psnr"])}
        except (OSError, ValueError, KeyError, TypeError):
            return None

    # ---- data -----------------------------------------------------------------------------------------------
    def pipeline(self) -> Pipeline:
        return Pipeline.from_specs(self.cfg.data.degradations, bits=self.cfg.data.bits)

    def dataset(self) -> TrainSet:
        d = self.cfg.data
        if d.input or d.gt:
            if not (d.input and d.gt):
                raise RDDMError("paired training data needs both --input and --gt")
            pairs = pair_files(d.input, d.gt)
            inputs, gts = ImageBank.load_pairs(pairs)
            return TrainSet(gts, d.crop, self.cfg.run.seed, inputs=inputs, flip=d.flip)
        if not d.clean:
            raise RDDMError("no training data: give --data DIR (clean photos) or --input DIR --gt DIR")
        return TrainSet(ImageBank.load(list_images(d.clean)), d.crop, self.cfg.run.seed, self.pipeline(), flip=d.flip,
                        saturation=d.saturation)

    def validation_data(self):
        v = self.cfg.val
        if not (v.clean or v.input or v.gt):
            return None
        return validation_set(v.crop, v.count, v.seed, v.clean, v.input, v.gt, self.pipeline())

    # ---- validation -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self, val) -> dict:
        """Restore the fixed set with the EMA weights and the few-step sampler; log scores and a grid."""
        inp, gt, _ = val
        dtype = torch.bfloat16 if self.amp else torch.float32
        sampler = TorchRDDM(self.ema.model, self.diffusion, self.device, dtype)
        bs, ps = max(self.cfg.run.batch_size, 1), self.cfg.val.pixel_shuffle
        x = np.concatenate(shuffle_split(inp, ps))  # as restore --pixel-shuffle does: the sub-images apart
        restored = np.concatenate([sampler.restore(x[i:i + bs], self.cfg.val.steps, seed=self.cfg.val.seed)
                                   for i in range(0, len(x), bs)])
        restored = shuffle_merge(np.split(restored, ps * ps), ps)
        p, s = scores(restored, gt)
        p_in, _ = scores(inp, gt)
        row = {"step": self.step, "psnr": round(p, 4), "ssim": round(s, 5), "psnr_input": round(p_in, 4)}
        csv = self.out / "val_log.csv"
        if not csv.exists():
            _append(csv, ",".join(row))
        _append(csv, ",".join(str(v) for v in row.values()))
        _append(self.out / "val_log.jsonl", json.dumps(row))
        # the grid shows the first GRID_ROWS images: a full-size set would make a PNG of hundreds of MB
        write_grid(self.out / "val" / f"step_{self.step:07d}.png", [a[:GRID_ROWS] for a in (inp, restored, gt)])
        row["best"] = self.best_val is None or row["psnr"] > self.best_val["psnr"]
        if row["best"]:
            save_checkpoint(self.out / "best_ema.safetensors", self.ema.model, self.unet_cfg, self.diffusion,
                            weights="ema", step=self.step, trainer="rddm-train", val_psnr=row["psnr"],
                            val_psnr_input=row["psnr_input"])
            self.best_val = {"step": self.step, "psnr": row["psnr"]}
        return row

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
        raise TrainingDiverged(f"{what} by step {self.step}; training stopped and {kept}. "
                               f"Lower optim.lr, enable optim.grad_clip or check the data")

    def fit(self, resume: bool = False, log=print) -> dict:
        """Train to ``run.steps`` (or the wall-clock budget); checkpoints every N steps and at the end."""
        cfg, r = self.cfg, self.cfg.run
        # The budget covers loading data too; the final validation and checkpoint come after it.
        deadline = time.monotonic() + r.max_minutes * 60 if r.max_minutes > 0 else None
        if resume:
            self.resume()
            if self.resume_notes:
                log(f"resuming with a changed data stream ({', '.join(self.resume_notes)}): "
                    f"the continuation will differ from an uninterrupted run")
        elif self.state_path.exists():
            raise RDDMError(f"{self.out} already holds a run (state.pt); pass --resume to continue it "
                            f"or choose another --out")
        self.out.mkdir(parents=True, exist_ok=True)
        for name in ("state.pt", "ema.safetensors", "model.safetensors", "ema.json", "model.json", "config.toml",
                     "best_ema.safetensors", "best_ema.json"):
            for stale in self.out.glob(f".{name}.tmp*"):  # half-written by a run killed mid-checkpoint
                stale.unlink(missing_ok=True)
        cfgmod.save(cfg, self.out / "config.toml")
        val = self.validation_data()
        summary = {"start_step": self.step, "steps": r.steps}
        if self.step >= r.steps:
            log(f"{self.out}: already at step {self.step} of {r.steps}; nothing to do")
            return {**summary, "end_step": self.step, "stopped": "done"}
        ds = self.dataset()
        accum = cfg.optim.grad_accum
        loader = make_loader(ds, r.batch_size, self.step * accum, cfg.data.num_workers,
                             pin_memory=self.device.type == "cuda")
        batches = iter(loader)
        stopped, last_val, t_log, s_log = "done", None, time.perf_counter(), self.step
        progress = _progress(r.progress, r.steps, self.step, log)
        terminated = _StopOnSigterm()
        try:
            while self.step < r.steps:
                loss = self.train_step([next(batches) for _ in range(accum)])
                self._pending_losses.append(loss)
                at_ckpt = self.step % r.checkpoint_every == 0 or self.step == r.steps
                out_of_time = (deadline is not None and time.monotonic() >= deadline) or terminated.requested
                if self.step % r.log_every == 0 or at_ckpt or out_of_time:
                    mean = self._check_finite(self._pending_losses)
                    self._pending_losses.clear()
                    now = time.perf_counter()
                    its = (self.step - s_log) / max(now - t_log, 1e-9)
                    t_log, s_log = now, self.step
                    _append(self.out / "train_log.jsonl", json.dumps(
                        {"step": self.step, "loss": mean, "it_s": round(its, 3),
                         "img_s": round(its * r.batch_size * accum, 1), "lr": self.lr_at(self.step - 1),
                         "time": round(time.time(), 3)}))
                    progress.update(self.step, mean, its)
                if val is not None and (self.step % cfg.val.every == 0 or self.step == r.steps or out_of_time):
                    last_val = self.validate(val)
                    progress.note(f"step {self.step}: val PSNR {last_val['psnr']:.2f} dB "
                                  f"(input {last_val['psnr_input']:.2f}), SSIM {last_val['ssim']:.4f}"
                                  + (" (best so far: best_ema.safetensors)" if last_val["best"] else ""))
                if at_ckpt or out_of_time:
                    self.save()
                if out_of_time:
                    stopped = "SIGTERM" if terminated.requested else "time budget"
                    break
        finally:
            terminated.restore()
            progress.close()
            del batches, loader  # stop persistent workers
        if stopped != "done":
            why = "SIGTERM received" if stopped == "SIGTERM" else f"wall-clock budget of {r.max_minutes} min reached"
            log(f"{why} at step {self.step}; checkpoint saved in {self.out}")
        return {**summary, "end_step": self.step, "stopped": stopped, "val": last_val}


class _StopOnSigterm:
    """SIGTERM (what `timeout` and job schedulers send) ends the run after the current step, with a checkpoint."""

    def __init__(self):
        self.requested = False
        self._old = None
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


class _progress:
    """A rich progress bar with loss and it/s; when disabled (logs, schedulers), only the notes, as plain lines."""

    def __init__(self, enabled: bool, total: int, start: int, log=print):
        self.bar, self.log = None, log
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[its]} it/s"),
                                TimeRemainingColumn())
            self.task = self.bar.add_task("train", total=total, completed=start, loss="-", its="-")
            self.bar.start()

    def update(self, step: int, loss: float, its: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, loss=f"{loss:.4f}", its=f"{its:.2f}")

    def note(self, text: str) -> None:
        if self.bar is not None:
            self.bar.console.print(text)
        else:
            self.log(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
