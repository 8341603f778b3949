"""The trainer on a CUDA GPU: bf16 autocast, CUDA-graph replay, resume. Skipped where there is no GPU."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from helpers.train import tiny_config, write_photos
from rddm_infer.model import load_checkpoint
from rddm_train.trainer import Trainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (torch.cuda.is_available() is False)")


def _losses(out):
    return [json.loads(x)["loss"] for x in (out / "train_log.jsonl").read_text().splitlines()]


def test_cuda_graph_replay_matches_eager_and_resumes(tmp_path):
    photos = write_photos(tmp_path / "photos", n=6)[0].parent
    common = ["run.device='cuda'", "run.steps=30", "optim.lr=2e-3", "run.checkpoint_every=15", "optim.grad_accum=2"]
    Trainer(tiny_config(tmp_path / "eager", photos, *common)).fit()
    Trainer(tiny_config(tmp_path / "graph", photos, *common, "run.cuda_graph=true")).fit()
    eager, graph = _losses(tmp_path / "eager"), _losses(tmp_path / "graph")
    assert np.allclose(eager[:3], graph[:3], rtol=1e-3), (eager[:3], graph[:3])
    assert np.mean(graph[-5:]) < 0.9 * np.mean(graph[:5])
    result = Trainer(tiny_config(tmp_path / "graph", photos, *common, "run.steps=40", "run.cuda_graph=true")).fit(
        resume=True)
    assert (result["start_step"], result["end_step"]) == (30, 40)
    assert load_checkpoint(tmp_path / "graph" / "ema.safetensors").info["step"] == 40


def test_bf16_autocast_trains_and_validates(tmp_path):
    photos = write_photos(tmp_path / "photos", n=6)[0].parent
    cfg = tiny_config(tmp_path / "run", photos, "run.device='cuda'", "run.bf16=true", "run.steps=20",
                      f"val.clean='{photos}'", "val.every=10", "optim.lr=2e-3")
    result = Trainer(cfg).fit()
    assert np.isfinite(_losses(tmp_path / "run")).all()
    assert result["val"]["step"] == 20 and np.isfinite(result["val"]["psnr"])
