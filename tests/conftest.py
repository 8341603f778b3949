"""Shared fixtures: tiny models and images, so the whole suite runs in minutes on 2 CPU cores."""

from __future__ import annotations

import numpy as np
import pytest

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


@pytest.fixture
def tiny_model():
    return tiny_loaded_model()


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def pytest_configure(config):
    # The user's cache (calibration tables steer --backend auto; compiled OpenVINO models) stays out of tests.
    import atexit
    import os
    import shutil
    import tempfile

    os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="rddm-test-cache-")
    atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], ignore_errors=True)
    try:
        import torch

        torch.set_num_threads(2)
    except ImportError:
        pass
