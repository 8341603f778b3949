"""`rddm-train` as a user runs it: real subprocesses, real files, a real kill -9 and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import cv2
import pytest
import torch

from helpers.train import TINY_TRAIN, write_photos, write_real_pairs
from helpers.cli import command, run
from rddm_infer.model import load_checkpoint
from rddm_train import config

EXE = command("rddm-train")
TINY_ARGS = [a for item in TINY_TRAIN for a in ("--set", item)]


def rddm_train(*args, timeout=180):
    return run("rddm-train", *args, timeout=timeout)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    write_photos(folder, n=4)
    return folder


def test_train_validate_checkpoint_and_resume_from_the_saved_config(tmp_path, photos):
    out = tmp_path / "run"
    r = rddm_train(*TINY_ARGS, "--data", photos, "--val", photos, "--out", out, "--steps", 6, "--checkpoint-every", 3,
                   "--val-every", 3, "--workers", 1, "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "step 6/6 (done), val PSNR" in r.stdout
    assert "rddm-train: step 3: val PSNR" in r.stdout  # each validation is reported, also without the progress bar
    assert load_checkpoint(out / "ema.safetensors").info == {"weights": "ema", "step": 6}
    saved = config.load(out / "config.toml")
    assert saved.run.steps == 6 and saved.data.num_workers == 1 and saved.model.dim == 8
    rows = (out / "val_log.csv").read_text().splitlines()
    assert rows[0] == "step,psnr,ssim,psnr_input" and [r.split(",")[0] for r in rows[1:]] == ["3", "6"]
    assert [json.loads(x)["step"] for x in (out / "val_log.jsonl").read_text().splitlines()] == [3, 6]
    grid = cv2.imread(str(out / "val" / "step_0000006.png"))
    assert grid.shape == (2 * 32 + 4, 3 * 32 + 2 * 4, 3)  # 2 images × (input | restored | gt)

    r = rddm_train("--out", out, "--resume", "--steps", 9, "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "step 9/9 (done)" in r.stdout
    steps = [json.loads(x)["step"] for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 10))
    assert torch.load(out / "state.pt", weights_only=True)["step"] == 9


def test_a_killed_run_resumes_from_its_last_checkpoint(tmp_path, photos):
    out = tmp_path / "run"
    proc = subprocess.Popen([*EXE, *TINY_ARGS, "--data", str(photos), "--out", str(out), "--steps", "100000",
                             "--checkpoint-every", "2", "--no-progress"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (out / "state.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)  # let it run on past the first checkpoint
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert (out / "state.pt").exists(), proc.stderr.read().decode()
    saved = torch.load(out / "state.pt", weights_only=True)["step"]
    assert saved >= 2 and saved % 2 == 0
    (out / ".state.pt.tmp99999").write_bytes(b"half a checkpoint")  # as if killed while writing
    r = rddm_train("--out", out, "--resume", "--steps", saved + 2, "--no-progress")
    assert r.returncode == 0, r.stderr
    assert not list(out.glob(".*tmp*"))
    assert f"step {saved + 2}/{saved + 2} (done)" in r.stdout
    assert load_checkpoint(out / "ema.safetensors").info["step"] == saved + 2


def test_sigterm_stops_after_the_current_step_with_a_checkpoint(tmp_path, photos):
    out = tmp_path / "run"
    proc = subprocess.Popen([*EXE, *TINY_ARGS, "--data", str(photos), "--out", str(out), "--steps", "100000",
                             "--checkpoint-every", "1000", "--no-progress"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "train_log.jsonl").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    step = torch.load(out / "state.pt", weights_only=True)["step"]
    assert 1 <= step < 1000  # saved where it stopped, not at a checkpoint boundary
    assert f"SIGTERM received at step {step}; checkpoint saved" in stdout
    assert f"step {step}/100000 (SIGTERM)" in stdout


@pytest.mark.parametrize("args, message", [
    (["--data", "/no/such/folder"], "/no/such/folder: no such folder or .flist file"),
    (["--set", "optim.lrr=1"], "unknown key optim.lrr"),
    (["--steps", 5], "no training data: give --data DIR"),
    (["--input", "/tmp"], "paired training data needs both --input and --gt"),
    (["--config", "missing.toml"], "missing.toml: no such config file"),
    (["--real-pairs", "/tmp", "--set", "real.held_out=['a', 'b']"], "config: real.held_out names 2 scene(s); at least 3"),
])
def test_user_errors_are_one_line_without_traceback(tmp_path, args, message):
    r = rddm_train(*TINY_ARGS, "--out", tmp_path / "run", *args)
    assert r.returncode == 2
    assert r.stderr.strip() == r.stderr.strip().splitlines()[0] and "Traceback" not in r.stderr
    assert r.stderr.startswith("rddm-train: error: ") and message in r.stderr, r.stderr


def test_print_config_and_resume_without_a_run(tmp_path):
    r = rddm_train("--config", "default_denoiser", "--set", "optim.lr=1e-4", "--bf16", "--print-config")
    assert r.returncode == 0
    assert "lr = 0.0001" in r.stdout and "bf16 = true" in r.stdout and "dim_mults = [1, 2, 4, 8]" in r.stdout
    r = rddm_train(*TINY_ARGS, "--out", tmp_path / "nothing", "--resume")
    assert r.returncode == 2 and "state.pt: no checkpoint to resume from" in r.stderr


def test_real_denoiser_config_fine_tunes_the_built_in_model(tmp_path, photos):
    """The packaged mixture (camera / correlated / gray / Gaussian noise, JPEG) runs as shipped, from --init."""
    out = tmp_path / "real"
    weights = Path(__file__).parents[2] / "rddm_infer" / "weights" / "default.safetensors"
    small = ["data.crop=32", "val.crop=32", "val.count=2", "run.batch_size=2", "data.num_workers=0", "run.threads=1"]
    r = rddm_train("--config", "real_denoiser", "--init", weights, *[a for s in small for a in ("--set", s)],
                   "--data", photos, "--val", photos, "--out", out, "--steps", 2, "--val-every", 2, "--device", "cpu",
                   "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "step 2/2 (done), val PSNR" in r.stdout
    saved = config.load(out / "config.toml")
    assert saved.data.degradations[0]["one_of"][2]["name"] == "camera_noise" and saved.model.dim == 16
    assert saved.val.pixel_shuffle == 2  # validated as real photos are restored
    assert json.loads((out / "best_ema.json").read_text())["step"] == 2  # the best (only) validation's weights
    assert load_checkpoint(out / "ema.safetensors").info == {"weights": "ema", "step": 2}


def test_real_pairs_config_fine_tunes_on_real_pairs_split_by_scene(tmp_path, photos):
    """The packaged real-pairs config as its fine-tune command runs it: --real-pairs, --init the built-in weights;
    tiny pairs named as the config's held-out scenes (16 pairs) plus two training scenes."""
    pairs, out = tmp_path / "real", tmp_path / "run"
    held = config.load("real_pairs_denoiser", ["real.pairs='x'"]).real.held_out
    write_real_pairs(pairs, {**dict(zip(held, [3, 5, 4, 3, 1])), "Cam_1_1_100_chair": 2, "Cam_1_1_100_stair": 2})
    weights = Path(__file__).parents[2] / "rddm_infer" / "weights" / "default.safetensors"
    small = ["data.crop=32", "val.crop=32", "run.batch_size=4", "data.num_workers=0", "run.threads=1"]
    r = rddm_train("--config", "real_pairs_denoiser", "--real-pairs", pairs, "--init", weights, "--data", photos,
                   *[a for s in small for a in ("--set", s)], "--out", out, "--steps", 2, "--val-every", 2,
                   "--device", "cpu", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert f"real pairs from {pairs}: training on 4 pairs of 2 scenes; validating on 16 pairs" in r.stdout
    assert "0.25 of the training samples real" in r.stdout and "gap " in r.stdout
    rows = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [(x["sources"]["samples"], x["sources"]["synthetic"]) for x in rows] == [([0, 8], 6)]  # 2 steps × 4
    assert sum(map(len, rows[0]["sources"]["real"].values())) == 2  # a quarter real
    assert all(n.startswith("Cam_1_1_100_") for x in rows for n in x["sources"]["real"])
    assert json.loads((out / "val_log.jsonl").read_text())["gap"] is not None
