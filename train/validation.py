"""Validation during training: few-step restoration of a fixed set, PSNR/SSIM, an image grid, the best weights.

PSNR/SSIM are the runtime's (:mod:`rddm_infer.metrics`), so training and evaluation agree.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import torch

from rddm_infer.io.atomic import atomic_path
from rddm_infer.metrics import psnr, ssim
from rddm_infer.model import TorchRDDM, save_checkpoint
from rddm_infer.restore.tiling import shuffle_merge, shuffle_split

from .config import TrainConfig
from .degradations import to_uint8
from .progress import append_line

GRID_ROWS = 8  # images shown in each validation grid


def hwc(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x).transpose(1, 2, 0))


def scores(restored: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
    """Mean PSNR (dB) and SSIM over NCHW batches in [0, 1]."""
    pairs = [(np.clip(r, 0, 1), g) for r, g in zip(restored, gt)]
    return (float(np.mean([psnr(r, g) for r, g in pairs])), float(np.mean([ssim(r, g) for r, g in pairs])))


def write_grid(path: str | os.PathLike, columns: list[np.ndarray], gap: int = 4) -> Path:
    """A PNG with one row per image and one column per NCHW [0, 1] batch (input | restored | gt), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n, _, h, w = columns[0].shape
    k = len(columns)
    grid = np.full((n * h + (n - 1) * gap, k * w + (k - 1) * gap, 3), 255, np.uint8)
    for i in range(n):
        for j, col in enumerate(columns):
            grid[i * (h + gap):i * (h + gap) + h, j * (w + gap):j * (w + gap) + w] = to_uint8(hwc(col[i]))
    with atomic_path(path) as tmp:
        if not cv2.imwrite(str(tmp), grid[..., ::-1]):
            raise OSError(f"{path}: could not write the validation grid")
    return path


class Validator:
    """Scores the EMA weights and keeps ``best_ema.safetensors``, the EMA at the best PSNR so far
    (a fine-tune's validation often peaks before its last iteration)."""

    def __init__(self, cfg: TrainConfig, out: Path, unet_cfg, diffusion, device: torch.device, amp: bool):
        self.cfg, self.out, self.unet_cfg, self.diffusion = cfg, Path(out), unet_cfg, diffusion
        self.device, self.amp = device, amp
        self.best: dict | None = None  # iteration and PSNR of best_ema.safetensors

    def load_best(self) -> None:
        """The file itself is the record (it may be newer than state.pt), so a resumed run only replaces it
        with a better one."""
        try:
            meta = json.loads((self.out / "best_ema.json").read_text())
            self.best = {"iteration": int(meta["step"]), "psnr": float(meta["val_psnr"])}
        except (OSError, ValueError, KeyError, TypeError):
            self.best = None

    @torch.no_grad()
    def restore(self, ema_model, inp: np.ndarray) -> np.ndarray:
        """The few-step sampler on the set, as ``restore --pixel-shuffle`` runs it: the sub-images apart."""
        dtype = torch.bfloat16 if self.amp else torch.float32
        sampler = TorchRDDM(ema_model, self.diffusion, self.device, dtype)
        bs, ps, v = max(self.cfg.run.batch_size, 1), self.cfg.val.pixel_shuffle, self.cfg.val
        x = np.concatenate(shuffle_split(inp, ps))
        restored = np.concatenate([sampler.restore(x[i:i + bs], v.steps, seed=v.seed) for i in range(0, len(x), bs)])
        return shuffle_merge(np.split(restored, ps * ps), ps)

    def __call__(self, ema_model, val, iteration: int, train_pairs=None) -> dict:
        """Restore, score, log a row (val_log.csv / .jsonl) and a grid; returns the row with ``best``.

        ``train_pairs`` (a fixed set cut from the training pairs, as ``val``) adds ``train_psnr``,
        ``train_psnr_input`` and ``gap``: the gain over the input on them minus the gain on ``val``."""
        inp, gt, _ = val
        restored = self.restore(ema_model, inp)
        p, s = scores(restored, gt)
        p_in, _ = scores(inp, gt)
        row = {"step": iteration, "psnr": round(p, 4), "ssim": round(s, 5), "psnr_input": round(p_in, 4)}
        if train_pairs is not None:
            t_inp, t_gt, _ = train_pairs
            t, t_in = scores(self.restore(ema_model, t_inp), t_gt)[0], scores(t_inp, t_gt)[0]
            row.update(train_psnr=round(t, 4), train_psnr_input=round(t_in, 4), gap=round((t - t_in) - (p - p_in), 4))
        csv = self.out / "val_log.csv"
        if not csv.exists():
            append_line(csv, ",".join(row))
        append_line(csv, ",".join(str(v) for v in row.values()))
        append_line(self.out / "val_log.jsonl", json.dumps(row))
        # the grid shows the first GRID_ROWS images: a full-size set would make a PNG of hundreds of MB
        write_grid(self.out / "val" / f"step_{iteration:07d}.png", [a[:GRID_ROWS] for a in (inp, restored, gt)])
        row["best"] = self.best is None or row["psnr"] > self.best["psnr"]
        if row["best"]:
            save_checkpoint(self.out / "best_ema.safetensors", ema_model, self.unet_cfg, self.diffusion,
                            weights="ema", step=iteration, trainer="rddm-train", val_psnr=row["psnr"],
                            val_psnr_input=row["psnr_input"])
            self.best = {"iteration": iteration, "psnr": row["psnr"]}
        return row

    def patience_spent(self, iteration: int) -> bool:
        """Early stopping: the best validation is ``val.patience`` validations (× ``val.every`` iterations) old."""
        v = self.cfg.val
        return v.patience > 0 and self.best is not None and iteration - self.best["iteration"] >= v.patience * v.every
