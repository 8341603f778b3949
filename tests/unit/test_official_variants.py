"""Every checkpoint the official RDDM experiments can save loads and samples as their ``ddim_sample`` does.

Each variant (docs/OFFICIAL_VARIANTS.md) is written in its exact trainer layout (EMA with
``online_model.``/``ema_model.``, ``model.`` prefix, the experiment's registered buffers) and
sampled by rddm_infer and by the independent oracle in ``helpers/oracle.py`` from the same noise.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from helpers import oracle as official
from helpers.export import tiny_net
from rddm_infer import DiffusionConfig, Noise, SamplingPlan
from rddm_infer.diffusion.metadata import ArtifactMeta
from rddm_infer.errors import CheckpointError, RDDMError
from rddm_infer.model import TorchRDDM, UNetConfig, load_checkpoint, save_checkpoint

T = 1000
SHAPE = (2, 3, 8, 8)  # small: the reference's 4×32-head attention dominates a dim-8 UNet


def net_config(share_encoder: int, condition: bool = True, input_condition: bool = False) -> UNetConfig:
    return UNetConfig(dim=8, dim_mults=(1, 2), share_encoder=share_encoder, condition=condition,  # reference heads 4×32
                      input_condition=input_condition)


SCHEDULES = {  # name -> registered buffers of one experiment's __init__
    "exp2": lambda s: official.cumulative(official.gen_coefficients_linear(T, "decreased"),
                                          official.gen_coefficients_linear(T, "increased", s)),
    "exp2_average": lambda s: official.cumulative(official.gen_coefficients_linear(T, "average"),
                                                  official.gen_coefficients_linear(T, "increased", s)),
    "ratio1": lambda s: official.cumulative(official.gen_coefficients_ratio(T, "decreased"),
                                            official.gen_coefficients_ratio(T, "increased", s)),
    "ratio2_normal": lambda s: official.cumulative(official.gen_coefficients_ratio(T, "decreased", ratio=2),
                                                   official.gen_coefficients_ratio(T, "normal", s)),
    "ddim_linear": lambda s: official.ddim_converted(T, "linear"),
    "ddim_scaled_linear": lambda s: official.ddim_converted(T, "scaled_linear"),
    "ddim_cosine": lambda s: official.ddim_converted(T, "squaredcos_cap_v2"),
}


@dataclass(frozen=True)
class Variant:
    name: str
    schedule: str
    objective: str  # as the official ResidualDiffusion was constructed
    share_encoder: int  # 0: two UNets (num_unet=2), 1: shared encoder, -1: one UNet (num_unet=1)
    condition: bool = True
    sum_scale: float = 0.01
    eta: float = 0.0
    steps: int = 5
    alpha_res: float | None = None  # experiment 3's auto_res_noise parameter
    two_optimizers: bool = False  # experiments 0/3-6 save opt0/opt1
    options: dict = field(default_factory=dict)  # what the user passes where the file cannot tell
    tol: float = 1e-5  # max-abs against the oracle
    scaled: bool = False  # experiments 0, 4, 5: the UNets are fed ᾱ_t·T / β̄_t·T (user option time_input)
    translation: bool = False  # experiments 4, 5: img_to_img_translation, an x_t-only network (option translation)
    only_noise: bool = False  # test_res_or_noise "noise": unet1's noise alone
    two_pass: bool = False  # experiment 0 / root src/ ddim_sample (option two_pass)

    @property
    def network_condition(self) -> bool:
        return self.condition and not self.translation


VARIANTS = [
    # experiment 2 (restoration): every objective × share_encoder its module accepts
    *[Variant(f"exp2-{o}-se{s}", "exp2", o, s, sum_scale=1.0)
      for o in ("pred_res_noise", "pred_res_add_noise", "pred_x0_noise", "pred_x0_add_noise") for s in (0, 1)],
    *[Variant(f"exp2-{o}-se{s}", "exp2", o, s, sum_scale=0.01) for o in ("pred_res", "pred_noise") for s in (0, 1, -1)],
    Variant("exp2-average-alpha", "exp2_average", "pred_res_noise", 0, sum_scale=0.5),
    Variant("exp2-generation-eta", "exp2", "pred_res_noise", 1, condition=False, sum_scale=1.0, eta=0.5, steps=4),
    # experiment 6 (generation, decreased α / increased β with the ratio form), num_unet 2 and 1, η > 0
    Variant("exp6-res_noise-2unets", "ratio1", "pred_res_noise", 0, condition=False, sum_scale=1.0, eta=1.0,
            two_optimizers=True),
    Variant("exp6-res-1unet", "ratio1", "pred_res", -1, condition=False, sum_scale=1.0, two_optimizers=True),
    # pred_noise divides by 1 − ᾱ, which the reference pins to 1e-6 at t = T−1: float32 rounding of the
    # network output is amplified there (float64 coefficients here vs float32 there), hence 2e-5
    Variant("exp6-noise-1unet", "ratio1", "pred_noise", -1, condition=False, sum_scale=1.0, eta=0.3,
            two_optimizers=True),
    Variant("ratio2-normal-x0_noise", "ratio2_normal", "pred_x0_noise", 0, sum_scale=0.1, two_optimizers=True),
    # experiment 3 (AOSA low-light): DDIM-converted betas, auto_res_noise resolved by the learned alpha_res;
    # sum_scale is not in the buffers there, so the option (or the 0.01 default) decides
    Variant("exp3-auto-res", "ddim_linear", "auto_res_noise", -1, alpha_res=0.73, two_optimizers=True),
    Variant("exp3-auto-noise", "ddim_linear", "auto_res_noise", -1, alpha_res=0.21, two_optimizers=True),
    Variant("exp3-res_noise-2unets", "ddim_linear", "pred_res_noise", 0, sum_scale=0.05, two_optimizers=True,
            options={"sum_scale": 0.05}),
    Variant("ddim-scaled_linear", "ddim_scaled_linear", "pred_res_noise", 1),
    Variant("ddim-cosine-x0_add", "ddim_cosine", "pred_x0_add_noise", 0, steps=3),
    Variant("ddim-linear-generation", "ddim_linear", "pred_res_noise", 0, condition=False, sum_scale=1.0, eta=0.5),
    # experiments 4 (inpainting, ratio-form schedule) and 5 (translation, DDIM-converted betas): continuous time
    # ᾱ_t·T / β̄_t·T and img_to_img_translation; neither is in the file, so the user names both
    *[Variant(f"exp{e}-{o}-{'2unets' if s == 0 else '1unet'}", sched, o, s, scaled=True, translation=True,
              sum_scale=0.05 if e == 4 else 0.01, two_optimizers=True,
              options={"time_input": "scaled", "translation": True})
      for e, sched, cases in ((4, "ratio1", (("pred_res_noise", 0), ("pred_x0", -1), ("pred_noise", -1))),
                              (5, "ddim_linear", (("pred_x0_noise", 0), ("pred_res", -1), ("pred_noise", -1))))
      for o, s in cases],
    # test_res_or_noise "res" on a two-UNet file: unet0 alone, still fed ᾱ_t·T
    Variant("exp4-test_res-2unets", "ratio1", "pred_res", 0, scaled=True, translation=True, sum_scale=0.05,
            options={"time_input": "scaled", "translation": True}),
    # test_res_or_noise "noise": unet1 alone (fed β̄_t·T where the time is scaled), x₀ from its noise
    Variant("exp5-test_noise-2unets", "ddim_linear", "pred_res_noise", 0, scaled=True, translation=True,
            only_noise=True, options={"time_input": "scaled", "translation": True, "test_res_or_noise": "noise"}),
    Variant("exp6-test_noise-2unets", "ratio1", "pred_res_noise", 0, condition=False, sum_scale=1.0, eta=0.5,
            only_noise=True, two_optimizers=True, options={"test_res_or_noise": "noise"}),
    # experiment 0 (generation, η honoured) and the root src/ (restoration): continuous time and the two-pass
    # ddim_sample (K residual-only then K noise-only updates)
    *[Variant(f"exp0-{o}-{'2unets' if s == 0 else '1unet'}", "ddim_linear", o, s, condition=False, sum_scale=1.0,
              eta=eta, steps=3, scaled=True, two_pass=True, two_optimizers=True,
              options={"time_input": "scaled", "two_pass": True})
      for o, s, eta in (("pred_res_noise", 0, 0.5), ("pred_x0_noise", 0, 0.0), ("pred_res", -1, 0.3),
                        ("pred_noise", -1, 0.0))],
    Variant("exp0-test_noise-2unets", "ddim_linear", "pred_res_noise", 0, condition=False, sum_scale=1.0, steps=3,
            scaled=True, two_pass=True, only_noise=True,
            options={"time_input": "scaled", "two_pass": True, "test_res_or_noise": "noise"}),
    *[Variant(f"root-{o}-{'2unets' if s == 0 else '1unet'}", "ddim_linear", o, s, steps=4, scaled=True,
              two_pass=True, options={"time_input": "scaled", "two_pass": True})
      for o, s in (("pred_res_noise", 0), ("pred_x0_noise", 0), ("pred_res", -1))],
]


def load(path, v: Variant):
    """As a user would: the objective is not in the file (except auto_res_noise's alpha_res), so it is passed."""
    return load_checkpoint(path, **{"objective": None if v.alpha_res is not None else v.objective, **v.options})


def test_test_res_or_noise_noise_reads_the_second_unet(tmp_path):
    v = variant("exp5-test_noise-2unets")
    path, _, _ = write_variant(tmp_path, v)
    loaded = load(path, v)
    assert (loaded.diffusion.objective, loaded.unet.share_encoder, loaded.info["unused_weights"]) == \
        ("pred_noise", -1, "unet0")


def write_variant(tmp_path, v: Variant):
    """The checkpoint file this variant's official Trainer.save would write, and its registered buffers."""
    cfg = net_config(v.share_encoder, v.network_condition)
    online, ema = tiny_net(cfg, seed=1), tiny_net(cfg, seed=2)
    buffers = official.registered_buffers(*SCHEDULES[v.schedule](v.sum_scale))
    params = {} if v.alpha_res is None else {"alpha_res": torch.tensor([v.alpha_res])}
    path = tmp_path / f"model-{v.name}.pt"
    official.save_trainer_checkpoint(path, online, ema, buffers, params, v.two_optimizers)
    return path, ema, buffers


def noise_for(v: Variant, seed: int = 0):
    rng = np.random.default_rng(seed)
    x_in = rng.uniform(-1, 1, SHAPE).astype(np.float32) if v.condition else np.zeros(SHAPE, np.float32)
    eps = rng.standard_normal(SHAPE, dtype=np.float32)
    zs = [rng.standard_normal(SHAPE, dtype=np.float32) for _ in range(v.steps * (2 if v.two_pass else 1))]
    return x_in, eps, zs


def oracle(v: Variant, ema, buffers, x_in, eps, zs) -> np.ndarray:
    t = torch.from_numpy
    return official.ddim_sample(ema, buffers, v.objective, t(x_in), t(eps), v.steps, condition=v.condition,
                                sum_scale=v.sum_scale, eta=v.eta, zs=[t(z) for z in zs],
                                alpha_res=v.alpha_res, scaled=v.scaled, translation=v.translation,
                                only_noise=v.only_noise, two_pass=v.two_pass).numpy()


def ours_torch(loaded, v: Variant, x_in, eps, zs) -> np.ndarray:
    plan = SamplingPlan.create(loaded.diffusion, v.steps, v.eta)
    noise = Noise.given(plan, eps, [z if plan.coefs[i, 6] > 0 else None for i, z in enumerate(zs)])
    return TorchRDDM(loaded.net, loaded.diffusion).sample_model_space(x_in, plan, noise=noise.eps,
                                                                     step_noises=noise.steps)


def error_vs_oracle(sampler, plan, v: Variant, ema, buffers, seed: int) -> float:
    """Max-abs difference between ``sampler`` (an EngineSampler) and the oracle on the same explicit noise."""
    x_in, eps, zs = noise_for(v, seed)
    noise = Noise.given(plan, eps, [z if plan.coefs[i, 6] > 0 else None for i, z in enumerate(zs[:plan.steps])])
    return float(np.abs(sampler.run(x_in, plan, noise) - oracle(v, ema, buffers, x_in, eps, zs)).max())


@pytest.mark.parametrize("v", VARIANTS, ids=lambda v: v.name)
@pytest.mark.slow  # over 2 s on 2 cores
def test_variant_samples_as_the_official_ddim_sample(tmp_path, v):
    path, ema, buffers = write_variant(tmp_path, v)
    loaded = load(path, v)  # schedule, T, sum_scale (where stored), auto objective: from the file
    assert loaded.info["weights"] == "ema"
    x_in, eps, zs = noise_for(v)
    want = oracle(v, ema, buffers, x_in, eps, zs)
    got = ours_torch(loaded, v, x_in, eps, zs)
    assert np.abs(want).max() > 0.05 and np.isfinite(want).all()  # a non-trivial sample
    assert np.abs(got - want).max() <= v.tol, v.name


def test_objective_option_is_honoured_for_a_two_unet_checkpoint(tmp_path):
    """Experiment 2 with only the objective changed to pred_res (share_encoder stays 0): loads, reads unet0 only."""
    v = Variant("exp2-pred_res-se0", "exp2", "pred_res", 0, sum_scale=1.0)
    path, ema, buffers = write_variant(tmp_path, v)
    loaded = load_checkpoint(path, objective="pred_res")
    assert (loaded.diffusion.objective, loaded.unet.share_encoder, loaded.info["unused_weights"]) == \
        ("pred_res", -1, "unet1")
    x_in, eps, zs = noise_for(v, 3)
    assert np.abs(ours_torch(loaded, v, x_in, eps, zs) - oracle(v, ema, buffers, x_in, eps, zs)).max() <= 1e-5


@pytest.mark.parametrize("schedule, explicit", [("exp2", False), ("exp2_average", True), ("ratio1", True),
                                                ("ddim_cosine", True)])
def test_schedule_is_read_from_the_buffers(tmp_path, schedule, explicit):
    v = Variant("s", schedule, "pred_res_noise", 1, sum_scale=0.2)
    path, _, buffers = write_variant(tmp_path, v)
    d = load_checkpoint(path).diffusion
    assert d.explicit == explicit and d.timesteps == T
    if explicit:  # the checkpoint's own float32 numbers, exactly
        np.testing.assert_array_equal(np.float32(d.alphas_cumsum), buffers["alphas_cumsum"].numpy())
        np.testing.assert_array_equal(np.float32(d.betas2_cumsum), buffers["betas2_cumsum"].numpy())
    if not schedule.startswith("ddim"):
        assert d.sum_scale == pytest.approx(0.2)  # gen_coefficients form: sum(betas2) is sum_scale
    # the tables survive the artifact JSON and our own checkpoint format unchanged
    meta = ArtifactMeta(graph="step", unet={}, diffusion=d.to_dict())
    assert ArtifactMeta.from_json(meta.to_json()).config == d
    assert ("alphas_cumsum" in json.loads(meta.to_json())["diffusion"]) == explicit  # named schedules stay lean
    assert len(json.dumps(d.summary())) < 600  # what a display shows: tables shortened
    loaded = load_checkpoint(path)
    again = load_checkpoint(save_checkpoint(tmp_path / "ours.safetensors", loaded.net, loaded.unet, loaded.diffusion))
    assert again.diffusion == d


def test_ddim_converted_sum_scale_comes_from_the_options(tmp_path):
    """The DDIM-converted buffers do not hold sum_scale (it only scales x_T): options decide, defaults apply."""
    v = Variant("s", "ddim_linear", "pred_res_noise", 1)
    path, _, _ = write_variant(tmp_path, v)
    assert load_checkpoint(path).diffusion.sum_scale == 0.01  # the reference's restoration default
    assert load_checkpoint(path, sum_scale=0.3).diffusion.sum_scale == 0.3
    gen = Variant("g", "ddim_linear", "pred_res_noise", 1, condition=False)
    gpath, _, _ = write_variant(tmp_path, gen)
    assert load_checkpoint(gpath).diffusion.sum_scale == 1.0  # generation default


@pytest.mark.parametrize("v, options, message", [
    (Variant("a", "exp2", "pred_res_noise", 1, sum_scale=1.0), {"sum_scale": 0.01}, "contradicts the checkpoint's"),
    (Variant("b", "exp2", "pred_res_noise", 1), {"timesteps": 500}, "contradicts the checkpoint's"),
    (Variant("c", "ddim_linear", "auto_res_noise", -1, alpha_res=0.9), {"objective": "pred_noise"},
     "auto_res_noise with alpha_res=0.9"),
    (Variant("d", "exp2", "pred_res_noise", 1), {"objective": "auto_res_noise"}, "needs the checkpoint's alpha_res"),
    (Variant("e", "exp2", "pred_res", -1), {"objective": "pred_x0_add_noise"}, "needs 2 network outputs"),
    (Variant("f", "exp2", "pred_res_noise", 1), {"objective": "pred_magic"}, "unknown objective 'pred_magic'"),
    # options the file cannot answer, where they do not apply to it
    (Variant("g", "exp2", "pred_res_noise", 1), {"time_input": "scaled"},
     "time_input scaled does not apply to a shared-encoder network"),
    (Variant("h", "exp2", "pred_res_noise", 0), {"translation": True}, "translation does not apply"),
    (Variant("i", "exp2", "pred_res_noise", 0), {"test_res_or_noise": "x0"}, "test_res_or_noise x0 is not supported"),
    (Variant("j", "exp2", "pred_res_noise", 0), {"test_res_or_noise": "noise", "objective": "pred_res"},
     "does not apply to objective"),
    (Variant("k", "exp2", "pred_res_noise", 0), {"test_res_or_noise": "sometimes"},
     "unknown test_res_or_noise 'sometimes'"),
    (Variant("l", "exp2", "pred_res", -1), {"test_res_or_noise": "noise"}, "reads the second of two UNets"),
])
def test_conflicts_are_clear_errors(tmp_path, v, options, message):
    path, _, _ = write_variant(tmp_path, v)
    with pytest.raises(CheckpointError, match=message) as e:
        load_checkpoint(path, **options)
    assert str(path) in str(e.value)


def test_inconsistent_buffers_are_refused(tmp_path):
    v = Variant("x", "exp2", "pred_res_noise", 1)
    path, ema, buffers = write_variant(tmp_path, v)
    buffers["betas_cumsum"] = buffers["betas_cumsum"] * 1.01
    official.save_trainer_checkpoint(path, ema, ema, buffers)
    with pytest.raises(CheckpointError, match="betas_cumsum and betas2_cumsum disagree"):
        load_checkpoint(path)


def test_input_condition_models_are_refused_when_sampled(tmp_path):
    cfg = net_config(1, input_condition=True)
    net = tiny_net(cfg)
    buffers = official.registered_buffers(*SCHEDULES["exp2"](0.01))
    path = tmp_path / "model-ic.pt"
    official.save_trainer_checkpoint(path, net, net, buffers)
    loaded = load_checkpoint(path)
    assert loaded.unet.input_condition
    with pytest.raises(RDDMError, match="input-condition image"):
        TorchRDDM(loaded.net, loaded.diffusion)


def test_explicit_noise_is_checked_against_the_plan():
    plan = SamplingPlan.create(DiffusionConfig(condition=False, sum_scale=1.0), 3, eta=0.5)
    eps = np.zeros(SHAPE, np.float32)
    with pytest.raises(RDDMError, match="step 0 is stochastic"):
        Noise.given(plan, eps)
    with pytest.raises(RDDMError, match="3-step plan"):
        Noise.given(plan, eps, [eps])
    with pytest.raises(RDDMError, match="initial noise has shape"):
        Noise.given(plan, eps, [eps] * 3).check(plan, (1, 3, 16, 16))


def test_engine_sampler_with_explicit_noise_matches_the_official_loop(tmp_path):
    """The public path: EngineSampler.run(x, plan, Noise.given(...)) on the torch backend, η > 0."""
    from rddm_infer import EngineSampler
    from rddm_infer.backends.torch import TorchRunner

    v = VARIANTS[[x.name for x in VARIANTS].index("exp6-res_noise-2unets")]
    path, ema, buffers = write_variant(tmp_path, v)
    x_in, eps, zs = noise_for(v, 5)
    sampler = EngineSampler(TorchRunner(path, device="cpu"))
    plan = sampler.plan(v.steps, v.eta)
    got = sampler.run(x_in, plan, Noise.given(plan, eps, zs))
    assert np.abs(got - oracle(v, ema, buffers, x_in, eps, zs)).max() <= 1e-5


# -- exported graphs: a representative subset through ONNX Runtime

ONNX_SUBSET = ["exp3-auto-noise", "ddim-cosine-x0_add", "exp6-res_noise-2unets"]


@pytest.mark.parametrize("name", ONNX_SUBSET)
@pytest.mark.slow  # over 2 s on 2 cores
def test_step_graph_in_onnxruntime_matches_the_official_loop(tmp_path, name):
    from rddm_export.artifact import read_metadata
    from rddm_export.onnx_export import export_onnx
    from rddm_infer import EngineSampler
    from rddm_infer.backends.onnxruntime import OnnxRuntimeRunner

    v = VARIANTS[[x.name for x in VARIANTS].index(name)]
    path, ema, buffers = write_variant(tmp_path, v)
    loaded = load(path, v)
    onnx_path = export_onnx(loaded, tmp_path / "step.onnx", "step", steps=v.steps, eta=v.eta)
    assert read_metadata(onnx_path).config == loaded.diffusion  # tables and objective carried in the artifact
    sampler = EngineSampler(OnnxRuntimeRunner(onnx_path))
    x_in, eps, zs = noise_for(v, 7)
    plan = sampler.plan(v.steps, v.eta)
    got = sampler.run(x_in, plan, Noise.given(plan, eps, [z if plan.coefs[i, 6] > 0 else None
                                                          for i, z in enumerate(zs)]))
    assert np.abs(got - oracle(v, ema, buffers, x_in, eps, zs)).max() <= 1e-4


@pytest.mark.slow  # over 2 s on 2 cores
def test_fp16_step_graph_of_an_explicit_schedule(tmp_path):
    from rddm_export.onnx_export import export_onnx
    from rddm_infer import EngineSampler
    from rddm_infer.backends.onnxruntime import OnnxRuntimeRunner

    v = VARIANTS[[x.name for x in VARIANTS].index("exp3-res_noise-2unets")]
    path, ema, buffers = write_variant(tmp_path, v)
    loaded = load(path, v)
    assert loaded.diffusion.explicit
    onnx_path = export_onnx(loaded, tmp_path / "step16.onnx", "step", steps=v.steps, fp16=True)
    sampler = EngineSampler(OnnxRuntimeRunner(onnx_path))
    x_in, eps, zs = noise_for(v, 9)
    got = sampler.run(x_in, sampler.plan(), Noise.given(sampler.plan(), eps))
    want = oracle(v, ema, buffers, x_in, eps, zs)
    psnr = 10 * np.log10(4.0 / np.mean((got - want) ** 2))  # peak-to-peak 2 in [-1, 1]
    assert psnr >= 45, psnr


@pytest.mark.parametrize("objective", ["pred_res_noise", "pred_res_add_noise", "pred_x0_noise", "pred_x0_add_noise",
                                       "pred_res", "pred_noise", "pred_x0"])
def test_training_targets_invert_to_the_true_residual_and_noise(objective):
    """rddm-train's targets per objective and the sampler's predictions are inverses (every objective trains)."""
    from rddm_infer.diffusion.sampler import predictions
    from rddm_train.loss import targets

    rng = np.random.default_rng(0)
    x0, x_in = (torch.from_numpy(rng.uniform(-0.5, 0.5, SHAPE).astype(np.float32)) for _ in range(2))
    noise = torch.from_numpy(rng.standard_normal(SHAPE, dtype=np.float32))
    plan = SamplingPlan.create(DiffusionConfig(objective=objective, sum_scale=0.5), 5)
    coef, t = plan.coefs[2], plan.times[2]
    x_t = x0 + coef[1] * (x_in - x0) + coef[2] * noise
    outs = targets(objective, x0, x_in - x0, noise)
    res, eps, est = predictions(objective, outs[0], outs[1] if len(outs) > 1 else None, x_t, x_in, coef)
    for got, want in ((res, x_in - x0), (eps, noise), (est, x0)):
        assert (got - want).abs().max() <= 1e-5, t


def test_restore_array_takes_explicit_noise(tmp_path):
    from helpers.export import tiny_checkpoint
    from rddm_infer import Restorer
    from rddm_infer.backends.torch import TorchRunner

    r = Restorer(TorchRunner(tiny_checkpoint(tmp_path), device="cpu"), tile=16)
    pixels = np.random.default_rng(0).integers(0, 256, (10, 12, 3), dtype=np.uint8)  # pads to 10×12 (multiple 2)
    seeded = r.restore_array(pixels)  # seed 0
    same = r.restore_array(pixels, noise=Noise.draw(r.plan, (3, 10, 12), seed=0))
    np.testing.assert_array_equal(same, seeded)  # the explicit path is the seeded path with the noise spelled out
    other = r.restore_array(pixels, noise=Noise.given(r.plan, np.ones((3, 10, 12), np.float32)))
    assert other.dtype == np.uint8 and np.abs(other.astype(int) - seeded).max() > 0
    with pytest.raises(RDDMError, match="initial noise has shape"):
        r.restore_array(pixels, noise=Noise.given(r.plan, np.ones((3, 8, 8), np.float32)))
    with pytest.raises(RDDMError, match="untiled image"):
        r.restore_array(np.zeros((40, 40, 3), np.uint8), noise=Noise.given(r.plan, np.ones((3, 40, 40), np.float32)))


# -- continuous time (ᾱ_t·T / β̄_t·T) and img2img translation: every entry point and graph kind

def variant(name: str) -> Variant:
    return VARIANTS[[x.name for x in VARIANTS].index(name)]


GRAPH_CASES = [  # two UNets (a time column each) / one UNet fed β̄_t·T or ᾱ_t·T; two passes with η > 0
    ("exp4-pred_res_noise-2unets", "unet"), ("exp5-pred_noise-1unet", "unet"), ("exp5-pred_noise-1unet", "step"),
    ("exp0-pred_res_noise-2unets", "step"), ("exp0-pred_res_noise-2unets", "fused"), ("root-pred_res-1unet", "unet")]


@pytest.mark.parametrize("name, kind", GRAPH_CASES)
@pytest.mark.slow  # over 2 s on 2 cores
def test_continuous_time_translation_and_two_pass_graphs_in_onnxruntime(tmp_path, name, kind):
    """The exported graph knows its time input, translation and passes, and samples as the official loop."""
    import onnxruntime as ort
    from rddm_export.onnx_export import export_onnx
    from rddm_infer import EngineSampler
    from rddm_infer.backends.onnxruntime import OnnxRuntimeRunner

    v = variant(name)
    path, ema, buffers = write_variant(tmp_path, v)
    onnx_path = export_onnx(load(path, v), tmp_path / f"{kind}.onnx", kind, steps=v.steps, eta=v.eta)
    sampler = EngineSampler(OnnxRuntimeRunner(onnx_path))
    d, unet = sampler.meta.config, sampler.meta.unet
    assert (d.time_input, d.two_pass, d.condition and not unet["condition"]) == ("scaled", v.two_pass, v.translation)
    if kind == "unet":  # the graph's time input carries the float pair (ᾱ_t·T, β̄_t·T)
        t = {i.name: i for i in ort.InferenceSession(str(onnx_path)).get_inputs()}["t"]
        assert t.type == "tensor(float)" and t.shape[1:] == [2]
    plan = sampler.plan()
    assert (sampler.meta.steps, plan.k, plan.steps, plan.stochastic) == \
        (v.steps, v.steps, v.steps * (2 if v.two_pass else 1), v.eta > 0)  # K as asked; 2K calls for two passes
    assert error_vs_oracle(sampler, plan, v, ema, buffers, 11) <= 1e-4


def test_time_input_and_translation_reach_the_model_through_every_entry_point(tmp_path):
    from rddm_infer import EngineSampler, Restorer, load_model
    from rddm_infer.backends import load_runner, read_artifact_meta
    from rddm_infer.model import time_input_note

    v = variant("exp4-pred_res_noise-2unets")
    path, ema, buffers = write_variant(tmp_path, v)

    def error(runner):
        sampler = EngineSampler(runner)
        return error_vs_oracle(sampler, sampler.plan(v.steps), v, ema, buffers, 13)

    runner, _ = load_runner(path, "torch", device="cpu", **v.options)
    assert error(runner) <= 1e-5
    assert time_input_note("scaled") in runner.description  # the choice is stated wherever the model is described
    index, _ = load_runner(path, "torch", device="cpu", translation=True)  # time_input index: the default
    assert "step index t" in index.description
    assert error(index) > 1e-3  # the option changes the sampling, not only the metadata
    with load_model(path, "torch", device="cpu", steps=v.steps, **v.options) as m, \
            Restorer(path, "torch", device="cpu", steps=v.steps, **v.options) as r:
        assert m.meta.config.time_input == r.meta.config.time_input == "scaled"
        assert error_vs_oracle(m.sampler, m.plan, v, ema, buffers, 13) <= 1e-5
    assert read_artifact_meta(path, **v.options).config.time_input == "scaled"


@pytest.mark.parametrize("options, message", [
    ({"time_input": "continuous"}, "model option 'time_input' must be one of index, scaled"),
    ({"translation": "yes"}, "model option 'translation' must be bool"),
])
def test_entry_points_refuse_an_unknown_value(tmp_path, options, message):
    from rddm_infer import load_model
    from rddm_infer.backends import load_runner, read_artifact_meta
    from rddm_infer.errors import OptionError

    path, _, _ = write_variant(tmp_path, variant("exp4-pred_res_noise-2unets"))
    for call in (lambda: load_runner(path, "torch", device="cpu", **options),
                 lambda: load_model(path, "torch", device="cpu", **options),
                 lambda: read_artifact_meta(path, **options)):
        with pytest.raises(OptionError, match=message):
            call()
    with pytest.raises(CheckpointError, match="unknown time_input 'continuous'"):
        load_checkpoint(path, time_input="continuous")


@pytest.mark.slow  # over 2 s on 2 cores
def test_exported_time_input_is_checked_and_our_checkpoints_keep_it(tmp_path):
    from rddm_infer.backends import load_runner
    from rddm_infer.errors import OptionError

    from rddm_export.exporter import export_all

    v = variant("exp5-pred_noise-1unet")
    path, _, _ = write_variant(tmp_path, v)
    loaded = load(path, v)
    (art,) = export_all(path, tmp_path / "out", graphs=("step",), steps=v.steps, validate=True,
                        load_options={"objective": v.objective, **v.options})  # rddm-export's path, validated
    assert art.validation.ok and art.meta.config == loaded.diffusion
    step = art.path
    load_runner(step, "onnxruntime", time_input="scaled", translation=True)  # the same values: fine
    with pytest.raises(OptionError, match="time_input index does not apply: the artifact was exported with "
                                          "time_input scaled"):
        load_runner(step, "onnxruntime", time_input="index")
    with pytest.raises(OptionError, match="translation False does not apply"):
        load_runner(step, "onnxruntime", translation=False)
    ours = save_checkpoint(tmp_path / "ours.safetensors", loaded.net, loaded.unet, loaded.diffusion)
    assert load_checkpoint(ours).diffusion == loaded.diffusion  # time_input and translation travel with the file
    with pytest.raises(CheckpointError, match="--time-input index contradicts the checkpoint"):
        load_checkpoint(ours, time_input="index")


@pytest.mark.slow  # over 2 s on 2 cores
def test_cli_time_input_and_translation(tmp_path):
    import cv2
    from helpers.cli import cli

    path, _, _ = write_variant(tmp_path, variant("exp4-pred_res_noise-2unets"))
    img = tmp_path / "a.png"
    cv2.imwrite(str(img), np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    outs = {}
    for tag in ("index", "scaled"):
        r = cli("restore", img, "--model", path, "--backend", "torch", "--device", "cpu", "-o", tmp_path / tag,
                "-q", "--translation", "--time-input", tag)
        assert r.returncode == 0, r.stderr
        outs[tag] = cv2.imread(str(tmp_path / tag / "a.png")).astype(int)
    assert np.abs(outs["index"] - outs["scaled"]).max() > 2
    r = cli("info", path, "--time-input", "scaled", "--translation", "--test-res-or-noise", "noise")
    assert r.returncode == 0 and '"time_input": "scaled"' in r.stdout and '"objective": "pred_noise"' in r.stdout, \
        r.stderr
    r = cli("bench", path, "--backend", "torch", "--time-input", "continuous", "--runs", 1)
    assert r.returncode == 2 and "'time_input' must be one of index, scaled" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow  # over 2 s on 2 cores
def test_two_pass_is_an_option_of_every_entry_point(tmp_path):
    from rddm_export.onnx_export import export_onnx
    from rddm_infer import EngineSampler, load_model
    from rddm_infer.backends import load_runner, read_artifact_meta
    from rddm_infer.errors import OptionError
    from helpers.cli import cli

    v = variant("root-pred_res_noise-2unets")
    path, ema, buffers = write_variant(tmp_path, v)
    one = dict(v.options, two_pass=False)
    with load_model(path, "torch", device="cpu", steps=v.steps, **v.options) as two, \
            load_model(path, "torch", device="cpu", steps=v.steps, **one) as single:
        assert (two.plan.steps, single.plan.steps) == (2 * v.steps, v.steps)
        assert error_vs_oracle(two.sampler, two.plan, v, ema, buffers, 19) <= 1e-5
        assert error_vs_oracle(single.sampler, single.plan, v, ema, buffers, 19) > 1e-3
    assert read_artifact_meta(path, **v.options).config.two_pass
    step = export_onnx(load(path, v), tmp_path / "step.onnx", "step", steps=v.steps)
    runner, _ = load_runner(step, "onnxruntime", two_pass=True)
    assert EngineSampler(runner).plan().steps == 2 * v.steps
    with pytest.raises(OptionError, match="two_pass False does not apply: the artifact was exported with two_pass "
                                          "True"):
        load_runner(step, "onnxruntime", two_pass=False)
    r = cli("info", step, "--no-two-pass")
    assert r.returncode == 2 and "two_pass False does not apply" in r.stderr, r.stderr
