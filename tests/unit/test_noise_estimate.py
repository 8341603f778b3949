"""The blind noise estimate behind the per-image mode, on synthetic noise of known level and correlation."""

import cv2
import numpy as np
import pytest

from rddm_infer.errors import CheckpointError
from rddm_infer.restore.mode import CAMERA_CORRELATION, MODES, choose_mode, correlated_mode, rule_text
from rddm_infer.restore.noise_estimate import estimate_noise

RNG = np.random.default_rng(0)


def _scene(h=256, w=320):
    """A photo-like clean image: smooth shading, flat regions and a few edges (uint8, 3 channels)."""
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.stack([90 + 80 * x, 120 + 60 * y, 160 - 70 * x * y], -1)
    img[h // 3: h // 2, w // 4: w // 2] = (40, 200, 90)
    cv2.circle(img, (w * 3 // 4, h * 2 // 3), h // 6, (220, 60, 50), -1)
    return img.astype(np.uint8)


def _white(img, sigma, seed=0):
    return np.clip(np.round(img + np.random.default_rng(seed).normal(0, sigma, img.shape)), 0, 255).astype(np.uint8)


def _correlated(img, sigma, seed=0):
    """Noise blurred over about a pixel, then scaled back to ``sigma``: as demosaicking leaves camera noise."""
    n = cv2.GaussianBlur(np.random.default_rng(seed).normal(0, 1, img.shape), (0, 0), 0.8)
    return np.clip(np.round(img + n * sigma / n.std()), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("sigma", [3, 10, 25, 50])
def test_white_noise_level_is_read_within_15_percent_and_its_correlation_is_near_zero(sigma):
    est = estimate_noise(_white(_scene(), sigma)[..., 0])  # one channel: the level of that channel
    assert est.sigma == pytest.approx(sigma, rel=0.15)
    assert abs(est.correlation) < 0.12 and est.blocks >= 16


@pytest.mark.parametrize("sigma", [4, 12, 30])
def test_correlated_noise_reads_as_correlated_and_white_as_white(sigma):
    white, corr = estimate_noise(_white(_scene(), sigma)), estimate_noise(_correlated(_scene(), sigma))
    assert corr.correlation > CAMERA_CORRELATION > white.correlation + 0.3
    assert (choose_mode(corr).pixel_shuffle, choose_mode(white).pixel_shuffle) == (2, 1)
    assert "correlated" in choose_mode(corr).why and f"{corr.correlation:.2f}" in choose_mode(corr).why


def test_a_models_measured_correlated_noise_mode_replaces_the_default_for_correlated_noise_only():
    white, corr = estimate_noise(_white(_scene(), 12)), estimate_noise(_correlated(_scene(), 12))
    own = correlated_mode("whole-1", "m.onnx")  # e.g. a model trained on real camera pairs
    mode = choose_mode(corr, own)
    assert (mode.pixel_shuffle, mode.steps, mode.label) == (1, 1, "whole-1") and "correlated" in mode.why
    assert choose_mode(white, own).label == "whole" and choose_mode(white, own).steps is None
    assert correlated_mode(None) == MODES["camera"] and "whole, 1 step" in rule_text(own)
    with pytest.raises(CheckpointError, match="m.onnx: correlated_noise_mode 'sideways' is not one of"):
        correlated_mode("sideways", "m.onnx")


def test_a_clean_flat_image_reads_as_noiseless_and_layouts_agree():
    clean = _scene()
    est = estimate_noise(clean)
    assert est.sigma == 0 and est.blocks == 0 and choose_mode(est).pixel_shuffle == 1
    noisy = _white(clean, 10)
    bgr, rgb = estimate_noise(noisy), estimate_noise(noisy[..., ::-1])
    assert bgr == rgb  # channel order does not matter
    as16 = estimate_noise(noisy.astype(np.uint16) * 257)  # 16-bit: the same 0-255 scale
    as_float = estimate_noise(noisy.astype(np.float32) / 255)
    assert as16.sigma == pytest.approx(bgr.sigma, rel=1e-6) and as_float.sigma == pytest.approx(bgr.sigma, rel=1e-5)
    bgra = np.dstack([noisy, np.full(noisy.shape[:2], 255, np.uint8)])
    assert estimate_noise(bgra) == bgr  # alpha is not image content


def test_tiny_images_give_no_estimate_rather_than_a_guess():
    est = estimate_noise(_white(_scene(16, 16), 20))
    assert (est.sigma, est.correlation, est.blocks) == (0.0, 0.0, 0)
    assert choose_mode(est).pixel_shuffle == 1
