"""Training config: TOML + overrides, typo-proof, saved config reads back identically, the shipped default."""

from __future__ import annotations

import pytest

from rddm_train import config
from rddm_train.config import ConfigError
from rddm_train.degradations import Chain


def test_file_then_overrides_then_flags(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[model]\ndim = 16\n[optim]\nlr = 1e-4\n[data]\ncrop = 64\n'
                 'degradations = [{ name = "jpeg", quality = [20, 80] }]\n')
    cfg = config.load(p, ["optim.lr=3e-4", "model.dim_mults=[1, 2]", "run.device=cuda:1", "run.bf16=true"],
                      **{"run.steps": 7, "optim.lr": None, "data.crop": 32})
    assert (cfg.model.dim, cfg.model.dim_mults, cfg.optim.lr, cfg.run.steps) == (16, [1, 2], 3e-4, 7)
    assert cfg.run.device == "cuda:1" and cfg.run.bf16 is True and cfg.data.crop == 32
    assert cfg.data.degradations == [{"name": "jpeg", "quality": [20, 80]}]
    assert cfg.optim.betas == [0.9, 0.99]  # untouched defaults survive
    unet, diff = cfg.unet_config(), cfg.diffusion_config()
    assert unet.dim_mults == (1, 2) and unet.condition and diff.objective == "pred_res_noise"


def test_saved_config_reads_back_equal(tmp_path):
    cfg = config.load("default_denoiser", ["data.clean='/some where/\"quoted\"'", "optim.lr=5e-5", "run.max_minutes=2.5"])
    path = config.save(cfg, tmp_path / "run" / "config.toml")
    assert config.load(path) == cfg
    assert not list((tmp_path / "run").glob(".*tmp*"))


@pytest.mark.parametrize("overrides, message", [
    (["model.dimm=8"], "unknown key model.dimm"),
    (["modle.dim=8"], "unknown section [modle]"),
    (["model.dim=eight"], "model.dim: expected int, got 'eight'"),
    (["run.bf16=1"], "run.bf16: expected true/false"),
    (["diffusion.objective='pred_magic'"], "diffusion.objective must be one of"),
    (["model.share_encoder=1", "diffusion.objective='pred_res'"], "objective pred_res needs 1 output (share_encoder = -1)"),
    (["model.share_encoder=-1", "diffusion.objective='pred_x0_noise'"], "objective pred_x0_noise needs 2 outputs"),
    (["data.crop=100"], "multiples of 8"),
    (["lr=1"], "--set 'lr=1': expected section.key=value"),
    (["data.saturation=[2, 1]"], "data.saturation must be [lo, hi] with 0 <= lo <= hi <= 4.0"),
    (["data.saturation=[1, 9]"], "data.saturation must be [lo, hi]"),
    (["data.saturation=[1, 'x']"], "data.saturation must be [lo, hi]"),
    (["data.saturation=[1, 2]", "data.input='in'", "data.gt='gt'"], "paired data (--input/--gt) is used as it is"),
])
def test_bad_settings_are_refused_with_the_key_named(overrides, message):
    with pytest.raises(ConfigError) as e:
        config.load("default_denoiser", overrides)
    assert message in str(e.value) and ("default_denoiser" in str(e.value) or "--set" in str(e.value))


def test_bad_config_files(tmp_path):
    with pytest.raises(ConfigError, match="nope.toml: no such config file"):
        config.load(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\ndim = 3")
    with pytest.raises(ConfigError, match="bad.toml: not valid TOML"):
        config.load(bad)


def test_shipped_default_denoiser():
    assert "default_denoiser" in config.packaged_configs()
    cfg = config.load("default_denoiser")  # validated: objective and outputs agree, crops fit the UNet
    unet, diffusion = cfg.unet_config(), cfg.diffusion_config()
    assert unet.condition and diffusion.condition and diffusion.sum_scale == 0.01
    assert unet.num_outputs == (1 if diffusion.objective in ("pred_res", "pred_noise") else 2)
    chain = Chain.from_specs(cfg.data.degradations)
    assert [(s.name, s.p, s.params) for s in chain.stages] == [("gaussian", 1.0, {"sigma": [0, 50]})]
