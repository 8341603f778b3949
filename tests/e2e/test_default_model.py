"""The built-in model: shipped, self-describing, and denoising the README's sample images out of the box."""

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np

from rddm_infer import DEFAULT_MODEL, psnr
from rddm_infer.backends import read_artifact_meta

ROOT = Path(__file__).resolve().parents[2]


def _chw(path):
    return np.moveaxis(cv2.imread(str(path)), -1, 0) / 255.0


def test_default_model_is_small_and_describes_itself():
    weights = DEFAULT_MODEL.parent
    assert sum(p.stat().st_size for p in weights.iterdir() if p.is_file()) <= 20e6
    meta = read_artifact_meta(DEFAULT_MODEL)
    assert meta.graph == "step" and meta.steps == 5 and meta.precision == "fp32"
    assert meta.recommended_steps == 2  # measured (weights/README.md, "Steps"): restore's default
    assert meta.correlated_noise_mode == "whole-1"  # measured on held-out real pairs (weights/README.md, stage 14)
    assert read_artifact_meta(weights / "default.safetensors").correlated_noise_mode == "whole-1"
    assert meta.diffusion["objective"] == "pred_res" and meta.unet["dim"] == 16
    assert (weights / "default.safetensors").is_file()  # the checkpoint it was exported from


def test_readme_command_restores_the_samples_with_the_built_in_model(tmp_path):
    out = tmp_path / "restored"
    r = subprocess.run([sys.executable, "-m", "rddm_infer.cli", "restore", str(ROOT / "examples" / "noisy"), "-o",
                        str(out), "--gt", str(ROOT / "examples" / "clean"), "--json", "-q"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["restored"] == 3 and summary["failed"] == 0
    for name in ("scene0.png", "scene1.png", "scene2.png"):
        clean = _chw(ROOT / "examples" / "clean" / name)
        noisy = psnr(_chw(ROOT / "examples" / "noisy" / name), clean)
        restored = psnr(_chw(out / name), clean)
        assert restored > noisy + 3.0, f"{name}: {noisy:.2f} dB noisy -> {restored:.2f} dB restored"
