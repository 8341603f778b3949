"""Synthetic degradations: deterministic per seed, each doing what its name says, composable."""

import numpy as np
import pytest

from rddm_train.degradations import REGISTRY, DegradationError, Pipeline


def photo(size=64, seed=0):
    """A smooth image with edges (gradients plus a bright square), float32 HWC RGB in [0, 1]."""
    y, x = np.mgrid[0:size, 0:size] / size
    img = np.stack([0.2 + 0.6 * x, 0.3 + 0.4 * y, 0.5 + 0.2 * np.sin(6 * x)], -1)
    img[size // 4:size // 2, size // 4:size // 2] = 0.9
    return img.astype(np.float32)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_each_degradation_is_deterministic_and_changes_the_image(name):
    pipe = Pipeline.from_specs([{"name": name}])
    img = photo()
    a = pipe(img, np.random.default_rng(7))
    b = pipe(img, np.random.default_rng(7))
    assert a.dtype == np.float32 and a.shape == img.shape
    assert np.array_equal(a, b), "same seed must give the same degraded image"
    assert 0.0 <= a.min() and a.max() <= 1.0
    assert np.abs(a - img).mean() > 1e-3, f"{name} left the image unchanged"
    seeds = [pipe(img, np.random.default_rng(s)) for s in range(4)]
    assert any(not np.array_equal(seeds[0], o) for o in seeds[1:]), "different seeds never differ"


def test_gaussian_sigma_is_in_255_units_and_blind_over_the_range():
    flat = np.full((128, 128, 3), 0.5, np.float32)
    fixed = Pipeline.from_specs([{"name": "gaussian", "sigma": 25}])
    std = (fixed(flat, np.random.default_rng(0)) - flat).std()
    assert abs(std - 25 / 255) < 0.05 * 25 / 255
    blind = Pipeline.from_specs([{"name": "gaussian", "sigma": [0, 50]}])
    stds = [(blind(flat, np.random.default_rng(s)) - flat).std() * 255 for s in range(40)]
    assert min(stds) < 12 and max(stds) > 38 and max(stds) < 52  # spread over the range, never beyond it


def test_poisson_gaussian_noise_grows_with_brightness():
    img = np.zeros((64, 128, 3), np.float32)
    img[:, :64], img[:, 64:] = 0.1, 0.6
    out = Pipeline.from_specs([{"name": "poisson_gaussian", "peak": 100, "sigma": 0}])(img, np.random.default_rng(0))
    dark, bright = (out - img)[:, :64].var(), (out - img)[:, 64:].var()
    assert 4 < bright / dark < 8  # shot-noise variance is proportional to the signal (0.6 / 0.1 = 6)
    assert abs(bright - 0.6 / 100) < 0.1 * 0.6 / 100 and abs(out[:, 64:].mean() - 0.6) < 0.005


def test_jpeg_error_falls_with_quality():
    img = photo(64) + np.random.default_rng(0).uniform(-0.05, 0.05, (64, 64, 3)).astype(np.float32)
    img = np.clip(img, 0, 1)
    err = {q: np.abs(Pipeline.from_specs([{"name": "jpeg", "quality": q}])(img, np.random.default_rng(0)) - img).mean()
           for q in (10, 50, 95)}
    assert err[10] > err[50] > err[95] > 0


def test_blurs_keep_flat_regions_and_soften_detail():
    rng = np.random.default_rng(0)
    texture = rng.uniform(0, 1, (64, 64, 3)).astype(np.float32)
    flat = np.full((32, 32, 3), 0.4, np.float32)
    for spec in ({"name": "motion_blur", "length": 9, "angle": 30}, {"name": "defocus_blur", "radius": 3}):
        pipe = Pipeline.from_specs([spec])
        assert np.allclose(pipe(flat, np.random.default_rng(1)), 0.4, atol=1e-5)
        assert pipe(texture, np.random.default_rng(1)).var() < 0.3 * texture.var()


def test_horizontal_motion_blur_smears_along_rows_only():
    img = np.zeros((32, 32, 3), np.float32)
    img[:, 16:] = 1.0  # vertical edge
    out = Pipeline.from_specs([{"name": "motion_blur", "length": 9, "angle": 0}])(img, np.random.default_rng(0))
    assert np.allclose(out, out[:1])  # every row identical: nothing moved vertically
    assert 0.1 < out[0, 14, 0] < 0.9 and out[0, 5, 0] == 0 and out[0, 28, 0] == 1


def test_rain_only_brightens_and_low_light_darkens():
    img = photo()
    rain = Pipeline.from_specs([{"name": "rain", "density": 0.01}])(img, np.random.default_rng(0))
    assert (rain >= img - 1e-6).all() and rain.mean() > img.mean() + 0.01
    dark = Pipeline.from_specs([{"name": "low_light", "gamma": 2.0, "scale": 0.3, "sigma": 0}])(
        img, np.random.default_rng(0))
    assert np.allclose(dark, 0.3 * img ** 2.0, atol=1e-6)


def test_pipeline_composes_in_order_with_probabilities():
    img = photo()
    never = Pipeline.from_specs([{"name": "gaussian", "p": 0.0, "sigma": 30}])
    assert np.array_equal(never(img, np.random.default_rng(0)), img)
    half = Pipeline.from_specs([{"name": "defocus_blur", "p": 0.5, "radius": 2}])
    applied = [not np.array_equal(half(img, np.random.default_rng(s)), img) for s in range(40)]
    assert 8 < sum(applied) < 32
    both = Pipeline.from_specs([{"name": "low_light", "gamma": 2, "scale": 0.5, "sigma": 0},
                                {"name": "gaussian", "sigma": 10}])
    out = both(img, np.random.default_rng(3))
    assert abs(out.mean() - (0.5 * img ** 2).mean()) < 0.01 and (out - 0.5 * img ** 2).std() > 0.02


@pytest.mark.parametrize("spec, message", [
    ({"name": "snow"}, "unknown degradation 'snow'"),
    ({"name": "gaussian", "sigmaa": 5}, "unknown parameter 'sigmaa'"),
    ({"name": "gaussian", "sigma": [50, 10]}, "lo <= hi"),
    ({"name": "jpeg", "quality": 0}, "quality"),
    ({"name": "gaussian", "p": 1.5}, "p must be in [0, 1]"),
    ({"sigma": 3}, "expected a table with a 'name'"),
])
def test_bad_specs_are_refused_with_a_clear_message(spec, message):
    with pytest.raises(DegradationError, match=None) as e:
        Pipeline.from_specs([spec], source="my.toml data.degradations")
    assert message in str(e.value) and "data.degradations" in str(e.value)


def test_bits_rounds_the_degraded_input_to_8_bit_levels_like_a_saved_photo():
    img = photo()
    spec = [{"name": "gaussian", "sigma": 40}]
    floats = Pipeline.from_specs(spec)(img, np.random.default_rng(5))
    eight = Pipeline.from_specs(spec, bits=8)(img, np.random.default_rng(5))
    assert np.abs(floats * 255 - np.round(floats * 255)).max() > 0.1  # float noise is off the 8-bit grid
    assert np.abs(eight * 255 - np.round(eight * 255)).max() < 1e-4  # ... rounding puts it back on it
    assert np.abs(eight - floats).max() <= 0.5 / 255 + 1e-6 and eight.min() >= 0 and eight.max() <= 1
    with pytest.raises(DegradationError, match="data.bits"):
        Pipeline.from_specs(spec, bits=17)
