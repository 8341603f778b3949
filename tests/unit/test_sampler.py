"""The few-step sampler against an independent oracle of the reference's ddim_sample, and DDIM."""

import numpy as np
import pytest
import torch

from helpers.models import tiny_loaded_model
from rddm_infer.backends.base import Runner
from rddm_infer.diffusion.engine_sampler import EngineSampler, Noise
from rddm_infer.diffusion.graph_kinds import GRAPH_KINDS, graph_kind
from rddm_infer.diffusion.metadata import ArtifactMeta
from rddm_infer.model import TorchRDDM, UNetConfig, UnetRes
from rddm_infer.diffusion.sampler import initial_state, sample
from rddm_infer.diffusion.schedule import DiffusionConfig, SamplingPlan


def reference_oracle(net, x_input, x_T, step_noises, *, T, K, sum_scale, objective, eta, condition):
    """The reference's sampling arithmetic, written from REFERENCE.md: float32 buffers, torch ops."""
    lin = torch.linspace(1, T, T, dtype=torch.float64) / (0.5 * T * (T + 1))
    alphas_cumsum = lin.flip(0).cumsum(0).clip(0, 1).float()
    betas2_cumsum = (lin * sum_scale).cumsum(0).clip(0, 1).float()
    betas_cumsum = betas2_cumsum.sqrt()
    one_minus = 1 - alphas_cumsum
    one_minus[-1] = 1e-6
    times = list(reversed(torch.linspace(-1, T - 1, steps=K + 1).int().tolist()))
    img, x_in = x_T.clone(), x_input
    clip = lambda a: a.clamp(-1, 1)  # noqa: E731
    for i, (t, tn) in enumerate(zip(times[:-1], times[1:])):
        x = torch.cat((img, x_in), 1) if condition else img
        out = net(x, torch.full((x.shape[0],), t, dtype=torch.long))
        ab, bb = alphas_cumsum[t], betas_cumsum[t]
        if objective == "pred_res_noise":
            res, eps = clip(out[0]), out[1]
            x0 = clip(img - ab * res - bb * eps)
        elif objective == "pred_x0_noise":
            res, eps, x0 = clip(x_in - out[0]), out[1], clip(out[0])
        elif objective == "pred_noise":
            eps = out[0]
            x0 = clip((img - ab * x_in - bb * eps) / one_minus[t])
            res = clip(x_in - x0)
        else:  # pred_res
            res = clip(out[0])
            eps = (img - x_in - (ab - 1) * res) / bb
            x0 = clip(x_in - res)
        if tn < 0:
            img = x0
            continue
        alpha = ab - alphas_cumsum[tn]
        b2, b2n = betas2_cumsum[t], betas2_cumsum[tn]
        sigma2 = eta * ((b2 - b2n) * b2n / b2)
        noise = step_noises[i] if eta > 0 else 0
        img = img - alpha * res - (bb - (b2n - sigma2).sqrt()) * eps + sigma2.sqrt() * noise
    return img


@pytest.mark.parametrize("objective,share", [("pred_res_noise", 1), ("pred_res_noise", 0), ("pred_x0_noise", 0),
                                             ("pred_res", -1), ("pred_noise", -1)])
@pytest.mark.parametrize("K", [1, 5])
def test_restoration_matches_reference_oracle(objective, share, K, rng):
    m = tiny_loaded_model(share_encoder=share, objective=objective)
    x_in = rng.uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)
    eps0 = rng.standard_normal(x_in.shape).astype(np.float32)
    ours = TorchRDDM(m.net, m.diffusion).sample_model_space(x_in, SamplingPlan.create(m.diffusion, K), noise=eps0)
    x_T = torch.from_numpy(x_in + np.sqrt(0.01, dtype=np.float32) * eps0)
    with torch.no_grad():
        ref = reference_oracle(m.net, torch.from_numpy(x_in), x_T, None, T=1000, K=K, sum_scale=0.01,
                               objective=objective, eta=0.0, condition=True).numpy()
    assert np.abs(ours - ref).max() <= 1e-5
    assert np.all(np.abs(ours) <= 1.0)


def test_generation_with_eta_matches_reference_oracle(rng):
    cfg = DiffusionConfig(condition=False, sum_scale=1.0)
    torch.manual_seed(3)
    net = UnetRes(UNetConfig(dim=8, dim_mults=(1, 2), condition=False)).eval()
    K, eta = 4, 0.8
    plan = SamplingPlan.create(cfg, K, eta)
    assert plan.stochastic
    shape = (1, 3, 16, 16)
    eps0 = rng.standard_normal(shape).astype(np.float32)
    zs = [rng.standard_normal(shape).astype(np.float32) for _ in range(K)]
    ours = TorchRDDM(net, cfg).sample_model_space(np.zeros(shape, np.float32), plan, noise=eps0, step_noises=zs)
    with torch.no_grad():
        ref = reference_oracle(net, torch.zeros(shape), torch.from_numpy(eps0), [torch.from_numpy(z) for z in zs],
                               T=1000, K=K, sum_scale=1.0, objective="pred_res_noise", eta=eta,
                               condition=False).numpy()
    assert np.abs(ours - ref).max() <= 1e-5


def test_same_seed_same_output_different_seed_differs(rng):
    m = tiny_loaded_model()
    sampler = TorchRDDM(m.net, m.diffusion)
    x = rng.uniform(0, 1, (1, 3, 16, 16)).astype(np.float32)
    a, b, c = sampler.restore(x, seed=7), sampler.restore(x, seed=7), sampler.restore(x, seed=8)
    assert np.array_equal(a, b)
    assert np.abs(a - c).max() > 1e-6
    assert a.shape == x.shape and a.dtype == np.float32 and 0 <= a.min() and a.max() <= 1


def test_sampler_drives_plain_numpy_callables(rng):
    """Backend-agnostic: the loop runs on numpy arrays with any model callable."""
    plan = SamplingPlan.create(DiffusionConfig(), 5)
    target = rng.uniform(-0.5, 0.5, (1, 3, 4, 4))
    x_in = target + 0.2

    def oracle(x_t, x_input, t):  # predicts the true residual and the implied noise
        sch_row = plan.row(plan.times.index(t))
        res = x_input - target
        return res, (x_t - target - sch_row["alpha_bar"] * res) / sch_row["beta_bar"]

    x_T = initial_state(plan, x_in.astype(np.float32), np.random.default_rng(0)).astype(np.float64)
    out = sample(oracle, plan, x_in, x_T)
    np.testing.assert_allclose(out, target, atol=1e-9)


def test_rddm_generation_is_ddim_under_coefficient_transformation(rng):
    """Paper, Sec. 3: for I_in = 0 the RDDM update equals DDIM (η = 0) after rescaling.

    With λ_t = 1 − ᾱ_t, RDDM's x_t = λ_t·x₀ + β̄_t·ε is DDIM's x^D_t = √ā_t·x₀ + √(1−ā_t)·ε scaled by
    c_t = √(λ_t² + β̄_t²), with ā_t = λ_t² / c_t². Feed both the same (nonlinear) noise network.
    """
    cfg = DiffusionConfig(condition=False, sum_scale=1.0, objective="pred_noise")
    K = 6
    plan = SamplingPlan.create(cfg, K, 0.0)
    lam = {int(r[0]): r[3] for r in plan.coefs}  # one_minus_alpha_bar, guarded at T-1 as in the reference
    bb = {int(r[0]): r[2] for r in plan.coefs}
    c = {t: np.sqrt(lam[t] ** 2 + bb[t] ** 2) for t in lam}
    x0_star = rng.uniform(-0.5, 0.5, (1, 3, 8, 8))

    def eps_net(x_t, t):  # nonlinear in x_t; keeps the x0 estimate inside [-1, 1] so clipping stays idle
        return (x_t - lam[t] * x0_star) / bb[t] + 0.05 * lam[t] * np.tanh(3 * x_t)

    x_T = rng.standard_normal(x0_star.shape)
    rddm = sample(lambda x, x_in, t: (eps_net(x, t),), plan, np.zeros_like(x_T), x_T.copy())

    xd = x_T / c[plan.times[0]]
    times = list(plan.times) + [-1]
    for t, tn in zip(times[:-1], times[1:]):
        a_t = lam[t] ** 2 / c[t] ** 2
        eps = eps_net(xd * c[t], t)
        x0 = (xd - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t)
        if tn < 0:
            xd = x0
            break
        a_n = lam[tn] ** 2 / c[tn] ** 2
        xd = np.sqrt(a_n) * x0 + np.sqrt(1 - a_n) * eps
    assert np.abs(rddm).max() < 1  # the clamp never engaged
    np.testing.assert_allclose(rddm, xd, atol=1e-8)



class _EagerWrapper(Runner):
    """A graph kind's export wrapper run eagerly in torch, behind the Runner interface (no ONNX involved)."""

    name = "eager-wrapper"

    def __init__(self, module, meta):
        super().__init__(meta)
        self.module = module

    def infer(self, feeds):
        with torch.no_grad():
            outs = self.module(*(torch.from_numpy(np.asarray(feeds[n])) for n in self.module.input_names))
        outs = outs if isinstance(outs, tuple) else (outs,)
        return {n: o.numpy() for n, o in zip(self.module.output_names, outs)}


@pytest.mark.parametrize("kind", GRAPH_KINDS)
@pytest.mark.parametrize("generation", [False, True])
def test_each_graph_kind_owns_a_driver_and_a_wrapper_that_agree_with_the_torch_sampler(kind, generation, rng):
    """One GraphKind entry carries both halves: its wrapper (what gets exported), driven by its own driver
    through EngineSampler, samples what the torch reference sampler samples (η > 0 on a generation model)."""
    if generation:
        torch.manual_seed(3)
        net = UnetRes(UNetConfig(dim=8, dim_mults=(1, 2), condition=False)).eval()
        diffusion = DiffusionConfig(condition=False, sum_scale=1.0)
    else:
        m = tiny_loaded_model()
        net, diffusion = m.net, m.diffusion
    gk, cfg = graph_kind(kind), net.config
    plan = SamplingPlan.create(diffusion, 3, 0.8)  # η applies to generation only
    assert plan.stochastic == generation
    wrapper = gk.build(net, plan, cfg.num_outputs)
    assert tuple(wrapper.input_names) == gk.input_names(plan.stochastic)
    assert tuple(wrapper.output_names) == gk.output_names(cfg.num_outputs)
    assert len(wrapper.example_inputs((2, 3, 16, 16))) == len(wrapper.input_names)
    meta = ArtifactMeta(graph=kind, unet=cfg.to_dict(), diffusion=diffusion.to_dict(), steps=3, eta=plan.eta)
    shape = (2, 3, 16, 16)
    x_in = np.zeros(shape, np.float32) if generation else rng.uniform(-1, 1, shape).astype(np.float32)
    noise = Noise.draw(plan, shape, seed=1)
    got = EngineSampler(_EagerWrapper(wrapper, meta)).run(x_in, plan, noise)
    zs = [np.zeros(shape, np.float32) if z is None else z for z in noise.steps]
    ref = TorchRDDM(net, diffusion).sample_model_space(x_in, plan, noise=noise.eps, step_noises=zs)
    assert np.abs(got - ref).max() <= 1e-5
