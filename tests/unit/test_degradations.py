"""Synthetic degradations: deterministic per seed, each doing what its name says, composable."""

import numpy as np
import pytest

from rddm_train.degradations import REGISTRY, Chain, DegradationError


def photo(size=64, seed=0):
    """A smooth image with edges (gradients plus a bright square), float32 HWC RGB in [0, 1]."""
    y, x = np.mgrid[0:size, 0:size] / size
    img = np.stack([0.2 + 0.6 * x, 0.3 + 0.4 * y, 0.5 + 0.2 * np.sin(6 * x)], -1)
    img[size // 4:size // 2, size // 4:size // 2] = 0.9
    return img.astype(np.float32)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_each_degradation_is_deterministic_and_changes_the_image(name):
    chain = Chain.from_specs([{"name": name}])
    img = photo()
    a = chain(img, np.random.default_rng(7))
    b = chain(img, np.random.default_rng(7))
    assert a.dtype == np.float32 and a.shape == img.shape
    assert np.array_equal(a, b), "same seed must give the same degraded image"
    assert 0.0 <= a.min() and a.max() <= 1.0
    assert np.abs(a - img).mean() > 1e-3, f"{name} left the image unchanged"
    seeds = [chain(img, np.random.default_rng(s)) for s in range(4)]
    assert any(not np.array_equal(seeds[0], o) for o in seeds[1:]), "different seeds never differ"


def test_gaussian_sigma_is_in_255_units_and_blind_over_the_range():
    flat = np.full((128, 128, 3), 0.5, np.float32)
    fixed = Chain.from_specs([{"name": "gaussian", "sigma": 25}])
    std = (fixed(flat, np.random.default_rng(0)) - flat).std()
    assert abs(std - 25 / 255) < 0.05 * 25 / 255
    blind = Chain.from_specs([{"name": "gaussian", "sigma": [0, 50]}])
    stds = [(blind(flat, np.random.default_rng(s)) - flat).std() * 255 for s in range(40)]
    assert min(stds) < 12 and max(stds) > 38 and max(stds) < 52  # spread over the range, never beyond it


def test_poisson_gaussian_noise_grows_with_brightness():
    img = np.zeros((64, 128, 3), np.float32)
    img[:, :64], img[:, 64:] = 0.1, 0.6
    out = Chain.from_specs([{"name": "poisson_gaussian", "peak": 100, "sigma": 0}])(img, np.random.default_rng(0))
    dark, bright = (out - img)[:, :64].var(), (out - img)[:, 64:].var()
    assert 4 < bright / dark < 8  # shot-noise variance is proportional to the signal (0.6 / 0.1 = 6)
    assert abs(bright - 0.6 / 100) < 0.1 * 0.6 / 100 and abs(out[:, 64:].mean() - 0.6) < 0.005


def test_jpeg_error_falls_with_quality():
    img = photo(64) + np.random.default_rng(0).uniform(-0.05, 0.05, (64, 64, 3)).astype(np.float32)
    img = np.clip(img, 0, 1)
    err = {q: np.abs(Chain.from_specs([{"name": "jpeg", "quality": q}])(img, np.random.default_rng(0)) - img).mean()
           for q in (10, 50, 95)}
    assert err[10] > err[50] > err[95] > 0


def test_blurs_keep_flat_regions_and_soften_detail():
    rng = np.random.default_rng(0)
    texture = rng.uniform(0, 1, (64, 64, 3)).astype(np.float32)
    flat = np.full((32, 32, 3), 0.4, np.float32)
    for spec in ({"name": "motion_blur", "length": 9, "angle": 30}, {"name": "defocus_blur", "radius": 3}):
        chain = Chain.from_specs([spec])
        assert np.allclose(chain(flat, np.random.default_rng(1)), 0.4, atol=1e-5)
        assert chain(texture, np.random.default_rng(1)).var() < 0.3 * texture.var()


def test_horizontal_motion_blur_smears_along_rows_only():
    img = np.zeros((32, 32, 3), np.float32)
    img[:, 16:] = 1.0  # vertical edge
    out = Chain.from_specs([{"name": "motion_blur", "length": 9, "angle": 0}])(img, np.random.default_rng(0))
    assert np.allclose(out, out[:1])  # every row identical: nothing moved vertically
    assert 0.1 < out[0, 14, 0] < 0.9 and out[0, 5, 0] == 0 and out[0, 28, 0] == 1


def test_rain_only_brightens_and_low_light_darkens():
    img = photo()
    rain = Chain.from_specs([{"name": "rain", "density": 0.01}])(img, np.random.default_rng(0))
    assert (rain >= img - 1e-6).all() and rain.mean() > img.mean() + 0.01
    dark = Chain.from_specs([{"name": "low_light", "gamma": 2.0, "scale": 0.3, "sigma": 0}])(
        img, np.random.default_rng(0))
    assert np.allclose(dark, 0.3 * img ** 2.0, atol=1e-6)


def test_chain_composes_in_order_with_probabilities():
    img = photo()
    never = Chain.from_specs([{"name": "gaussian", "p": 0.0, "sigma": 30}])
    assert np.array_equal(never(img, np.random.default_rng(0)), img)
    half = Chain.from_specs([{"name": "defocus_blur", "p": 0.5, "radius": 2}])
    applied = [not np.array_equal(half(img, np.random.default_rng(s)), img) for s in range(40)]
    assert 8 < sum(applied) < 32
    both = Chain.from_specs([{"name": "low_light", "gamma": 2, "scale": 0.5, "sigma": 0},
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
        Chain.from_specs([spec], source="my.toml data.degradations")
    assert message in str(e.value) and "data.degradations" in str(e.value)


def test_bits_rounds_the_degraded_input_to_8_bit_levels_like_a_saved_photo():
    img = photo()
    spec = [{"name": "gaussian", "sigma": 40}]
    floats = Chain.from_specs(spec)(img, np.random.default_rng(5))
    eight = Chain.from_specs(spec, bits=8)(img, np.random.default_rng(5))
    assert np.abs(floats * 255 - np.round(floats * 255)).max() > 0.1  # float noise is off the 8-bit grid
    assert np.abs(eight * 255 - np.round(eight * 255)).max() < 1e-4  # ... rounding puts it back on it
    assert np.abs(eight - floats).max() <= 0.5 / 255 + 1e-6 and eight.min() >= 0 and eight.max() <= 1
    with pytest.raises(DegradationError, match="data.bits"):
        Chain.from_specs(spec, bits=17)


# --- real-photo noise: camera pipeline, channel-correlated, gray, mixtures ---------------------------------------

def test_camera_pipeline_round_trips_a_clean_photo():
    from rddm_train.degradations import Camera, demosaic, mosaic

    img = photo(64).astype(np.float64)
    smooth = np.ones(img.shape[:2], bool)
    smooth[12:36, 12:36] = False  # the bright square's edges: there bilinear demosaicking blurs, as cameras do
    smooth[:2], smooth[-2:], smooth[:, :2], smooth[:, -2:] = False, False, False, False
    for seed in range(3):
        cam = Camera.draw(np.random.default_rng(seed))
        assert np.allclose(cam.cam2rgb.sum(axis=1), 1.0)  # white stays white
        back = cam.process(demosaic(mosaic(cam.unprocess(img))))
        assert np.abs(back - img)[smooth].max() < 3e-3  # bilinear demosaic of smooth content is near exact


def test_camera_noise_variance_grows_with_the_signal_in_linear_raw_space():
    from rddm_train.degradations import Camera, camera_noise, raw_noise_levels

    img = np.zeros((128, 256, 3), np.float32)
    img[:, :128], img[:, 128:] = 0.25, 0.7
    for seed in range(3):
        rng = np.random.default_rng(seed)  # the draws camera_noise makes, in its order
        cam = Camera.draw(rng)
        shot, read = raw_noise_levels(rng, 1e-3)
        out = camera_noise(img, np.random.default_rng(seed), shot=1e-3)
        assert out.dtype == np.float32 and out.min() >= 0 and out.max() <= 1
        clean_lin = cam.unprocess(img.astype(np.float64))
        noise = (cam.unprocess(out.astype(np.float64)) - clean_lin)[4:-4, :, 1]  # green: half the Bayer sites
        dark, bright = noise[:, 4:124].var(), noise[:, 132:252].var()
        g_dark, g_bright = clean_lin[0, 0, 1], clean_lin[0, 255, 1]
        expected = (read + shot * g_bright) / (read + shot * g_dark)  # variance = read + shot · signal
        assert expected > 2.5 and abs(bright / dark / expected - 1) < 0.15, (bright / dark, expected)
        assert abs(noise[:, 4:124].mean()) < 0.1 * np.sqrt(dark)  # zero-mean: the colours are kept


def test_camera_noise_levels_follow_the_papers_log_linear_read_shot_relation():
    from rddm_train.degradations import raw_noise_levels

    levels = np.array([raw_noise_levels(np.random.default_rng(s)) for s in range(400)])
    log_shot, log_read = np.log(levels[:, 0]), np.log(levels[:, 1])
    assert np.log(1e-4) <= log_shot.min() and log_shot.max() <= np.log(1.2e-2)
    slope, intercept = np.polyfit(log_shot, log_read, 1)
    assert abs(slope - 2.18) < 0.1 and abs(intercept - 1.20) < 0.5
    assert abs((log_read - (2.18 * log_shot + 1.20)).std() - 0.26) < 0.04


def test_gray_gaussian_puts_one_noise_field_in_all_channels_and_grays_the_target():
    img = 0.25 + 0.5 * photo(64)  # away from 0 and 1: nothing clipped
    noisy, clean = Chain.from_specs([{"name": "gray_gaussian", "sigma": 25}]).apply(img, np.random.default_rng(3))
    assert noisy.dtype == clean.dtype == np.float32 and noisy.shape == clean.shape == img.shape
    assert np.array_equal(clean[..., 0], clean[..., 1]) and np.array_equal(clean[..., 0], clean[..., 2])
    assert np.allclose(clean[..., 0], img @ np.array([0.299, 0.587, 0.114]), atol=1e-6)
    noise = noisy - clean
    assert np.array_equal(noise[..., 0], noise[..., 1]) and np.array_equal(noise[..., 0], noise[..., 2])
    assert abs(noise.std() * 255 - 25) < 1.5


def test_correlated_gaussian_has_the_drawn_channel_covariance():
    from rddm_train.degradations import correlated_gaussian, random_covariance

    flat = np.full((256, 256, 3), 0.5, np.float32)
    for seed in range(3):
        cov = random_covariance(np.random.default_rng(seed), 20)  # the first draw correlated_gaussian makes
        noise = (correlated_gaussian(flat, np.random.default_rng(seed), 20) - flat).reshape(-1, 3)
        assert np.abs(np.cov(noise.T) - cov).max() < 0.03 * np.trace(cov) / 3
        assert abs(np.sqrt(np.trace(cov) / 3) * 255 - 20) < 1e-6  # mean per-channel σ is the drawn σ
    corr = [abs(np.corrcoef(random_covariance(np.random.default_rng(s), 20))[0, 1]) for s in range(50)]
    assert min(corr) < 0.2 and max(corr) > 0.8  # from nearly independent to nearly identical channels


def test_one_of_mixes_noise_models_with_their_weights():
    chain = Chain.from_specs([{"one_of": [{"name": "gaussian", "sigma": 20}, {"name": "gray_gaussian", "sigma": 20}],
                                 "weights": [1, 3]}])
    img = 0.25 + 0.5 * photo(32)
    gray = 0
    for s in range(200):
        noisy, clean = chain.apply(img, np.random.default_rng(s))
        same = np.array_equal(noisy[..., 0] - clean[..., 0], noisy[..., 1] - clean[..., 1])
        assert same == np.array_equal(clean[..., 0], clean[..., 2])  # gray target <=> gray noise
        gray += same
    assert 130 < gray < 170  # 3 of 4
    a, b = (chain.apply(img, np.random.default_rng(9)) for _ in range(2))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


@pytest.mark.parametrize("specs, message", [
    ([{"one_of": []}], "one_of must be a non-empty list"),
    ([{"one_of": [{"name": "gaussian"}], "weights": [1, 2]}], "weights must be 1 non-negative"),
    ([{"one_of": [{"name": "gaussian", "p": 0.5}]}], "use weights"),
    ([{"one_of": [{"name": "gaussian"}], "mode": 1}], "unknown key(s) 'mode'"),
    ([{"name": "jpeg"}, {"name": "gray_gaussian"}], "must be the first step"),
    ([{"name": "camera_noise", "shot": 0}], "camera_noise.shot"),
])
def test_bad_mixtures_are_refused_with_a_clear_message(specs, message):
    with pytest.raises(DegradationError) as e:
        Chain.from_specs(specs, source="my.toml data.degradations")
    assert message in str(e.value) and "data.degradations" in str(e.value)


def test_the_real_denoiser_config_mixes_todays_gaussian_with_real_photo_noise():
    from rddm_train import config

    cfg = config.load("real_denoiser")
    chain = Chain.from_specs(cfg.data.degradations, bits=cfg.data.bits)
    names = {c.name for c in chain.stages[0].choices}
    assert {"gaussian", "camera_noise", "correlated_gaussian", "gray_gaussian"} <= names
    sigmas = [c.params["sigma"] for c in chain.stages[0].choices if c.name == "gaussian"]
    assert sigmas == [0, [0, 50]]  # a clean share (clean in, clean out) and today's training case
    assert cfg.model == config.load("default_denoiser").model  # fine-tunes the built-in model (--init)


def test_camera_noise_changes_the_image_by_noise_alone():
    """Noisy and clean differ by noise only, as in a real pair: no demosaic blur of the edges at zero noise."""
    from rddm_train.degradations import camera_noise

    img = photo(64)
    quiet = camera_noise(img, np.random.default_rng(0), shot=1e-8)
    assert np.abs(quiet - img).max() < 2e-3  # the bright square's edges included


def test_chroma_blur_leaves_luminance_noise_correlated_across_channels():
    """In-camera chroma noise reduction: the noise of camera JPEGs is mostly luminance, R, G and B move together."""
    from rddm_train.degradations import camera_noise

    img = np.full((128, 128, 3), 0.5, np.float32)

    def cross_corr(chroma_blur):
        d = np.concatenate([(camera_noise(img, np.random.default_rng(s), shot=1e-3, chroma_blur=chroma_blur) - img)
                            .reshape(-1, 3) for s in range(3)])
        return np.corrcoef(d.T)[[0, 0, 1], [1, 2, 2]].mean(), d.std()

    raw_corr, raw_std = cross_corr(0)
    nr_corr, nr_std = cross_corr(3)
    assert raw_corr < 0.1 < 0.5 < nr_corr  # the colour matrix decorrelates; chroma NR re-correlates
    assert 0.2 * raw_std < nr_std < raw_std  # chroma noise removed, luminance noise kept


def test_luma_blur_spreads_camera_noise_over_neighbouring_pixels():
    """In-camera luma noise reduction: real camera JPEG noise is correlated two pixels apart (PolyU: lag-2
    correlation ≈ 0.37), beyond what the bilinear demosaic alone gives; luma_blur = 0 draws exactly as before."""
    from rddm_train.degradations import camera_noise

    img = np.full((128, 128, 3), 0.5, np.float32)

    def lag_corr(luma_blur, lag):
        n = camera_noise(img, np.random.default_rng(0), shot=1e-3, chroma_blur=3, luma_blur=luma_blur) - img
        n = n - n.mean((0, 1))
        return float(((n[:, lag:] * n[:, :-lag]).mean((0, 1)) / (n ** 2).mean((0, 1))).mean())

    assert lag_corr(0.8, 1) > lag_corr(0, 1) + 0.15 and lag_corr(0.8, 2) > lag_corr(0, 2) + 0.2
    before = camera_noise(img, np.random.default_rng(5), shot=[1e-4, 1e-2], chroma_blur=[0, 3])
    assert np.array_equal(before, camera_noise(img, np.random.default_rng(5), shot=[1e-4, 1e-2],
                                               chroma_blur=[0, 3], luma_blur=0))
    with pytest.raises(DegradationError, match="luma_blur"):
        Chain.from_specs([{"name": "camera_noise", "luma_blur": [2, 1]}])


def test_noise_stats_tells_camera_like_noise_from_white_noise(tmp_path):
    """benchmarks.noise_stats, as run to fit luma_blur to real pairs: the shipped examples carry i.i.d. σ = 25
    noise (no spatial or cross-channel correlation), camera noise with in-camera NR carries both; bad specs get
    one line."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "stats.json"
    run = subprocess.run([sys.executable, "-m", "benchmarks.noise_stats", "--pairs", "examples/noisy", "examples/clean",
                          "--data", "examples/clean", "--crop", "96", "--out", str(out), "--degradation",
                          '{name = "camera_noise", shot = 1e-3, chroma_blur = 3, luma_blur = 0.6}'],
                         cwd=root, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    real, camera = (r["median"] for r in json.loads(out.read_text()))
    assert 20 < real["std"] < 28 and abs(real["lag1"]) < 0.05 and abs(real["cross_channel"]) < 0.05
    assert camera["lag1"] > 0.5 and camera["lag2"] > 0.2 and camera["cross_channel"] > 0.4
    bad = subprocess.run([sys.executable, "-m", "benchmarks.noise_stats", "--data", "examples/clean",
                          "--degradation", '{name = "camera_noise", luma_blur = -1}'],
                         cwd=root, capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and bad.stderr.strip().count("\n") == 0 and "luma_blur" in bad.stderr
