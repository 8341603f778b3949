"""Schedules, time grid and step coefficients against closed forms and the reference's torch grid."""

import numpy as np
import pytest
import torch

from rddm_infer.diffusion.sampler import predictions
from rddm_infer.diffusion.schedule import COEF_NAMES, DiffusionConfig, SamplingPlan, Schedule, coefficients, time_grid


@pytest.mark.parametrize("T", [1, 10, 1000])
def test_schedule_shapes_closed_form(T):
    S = T * (T + 1) / 2
    inc = coefficients(T, "increased")
    np.testing.assert_allclose(inc, np.arange(1, T + 1) / S, rtol=0, atol=1e-15)
    np.testing.assert_allclose(coefficients(T, "decreased"), np.arange(T, 0, -1) / S, rtol=0, atol=1e-15)
    np.testing.assert_allclose(coefficients(T, "average"), np.full(T, 1 / T), rtol=0, atol=1e-15)
    np.testing.assert_allclose(coefficients(T, "increased", 0.01).sum(), 0.01, rtol=1e-12)


def test_cumulative_tables_closed_form():
    T, s = 1000, 0.01
    sch = Schedule.from_config(DiffusionConfig(timesteps=T, sum_scale=s))
    t = np.arange(T)
    S = T * (T + 1) / 2
    alpha_bar = ((t + 1) * T - t * (t + 1) / 2) / S  # sum_{i<=t} (T - i) / S
    beta2_bar = s * (t + 1) * (t + 2) / 2 / S  # sum_{i<=t} (i + 1) / S, scaled
    np.testing.assert_allclose(sch.alphas_cumsum, alpha_bar, atol=1e-12)
    np.testing.assert_allclose(sch.betas2_cumsum, beta2_bar, atol=1e-12)
    np.testing.assert_allclose(sch.betas_cumsum, np.sqrt(beta2_bar), atol=1e-12)
    assert sch.alphas_cumsum[-1] == pytest.approx(1.0, abs=1e-12)
    assert sch.betas2_cumsum[-1] == pytest.approx(s, abs=1e-12)
    assert sch.one_minus_alphas_cumsum[-1] == 1e-6  # the reference's guard
    assert np.all(np.diff(sch.alphas_cumsum) > 0) and np.all(sch.alphas_cumsum <= 1)


def test_cumulative_sums_are_clipped_to_one():
    sch = Schedule.from_config(DiffusionConfig(timesteps=100, sum_scale=2.0))
    assert sch.betas2_cumsum.max() == 1.0 and sch.betas2_cumsum[0] < 1.0


@pytest.mark.parametrize("K", [1, 2, 3, 5, 7, 10, 50, 999, 1000])
def test_time_grid_matches_reference_torch_grid(K):
    T = 1000
    ref = list(reversed(torch.linspace(-1, T - 1, steps=K + 1).int().tolist()))
    assert time_grid(T, K) == ref


def test_time_grid_five_steps():
    assert time_grid(1000, 5) == [999, 799, 599, 399, 199, -1]
    with pytest.raises(ValueError):
        time_grid(1000, 0)


def test_plan_coefficients_closed_form():
    cfg = DiffusionConfig(condition=False, sum_scale=1.0)
    sch = Schedule.from_config(cfg)
    eta = 0.7
    plan = SamplingPlan.create(cfg, steps=5, eta=eta)
    assert plan.times == (999, 799, 599, 399, 199)
    assert plan.coefs.dtype == np.float64 and plan.coefs.shape == (5, len(COEF_NAMES))
    for i, (t, tn) in enumerate(zip(plan.times, [799, 599, 399, 199, -1])):
        r = plan.row(i)
        assert r["t"] == t
        # the reference's float32 buffers, exactly
        assert r["alpha_bar"] == np.float32(sch.alphas_cumsum[t]) and r["beta_bar"] == np.float32(sch.betas_cumsum[t])
        if tn < 0:
            assert r["last"] == 1.0 and r["c_res"] == r["c_eps"] == r["sigma"] == 0.0
            continue
        b2, b2n = sch.betas2_cumsum[t], sch.betas2_cumsum[tn]
        sigma2 = eta * (b2 - b2n) * b2n / b2
        assert r["c_res"] == pytest.approx(sch.alphas_cumsum[t] - sch.alphas_cumsum[tn], abs=2e-7)
        assert r["c_eps"] == pytest.approx(np.sqrt(b2) - np.sqrt(b2n - sigma2), abs=2e-7)
        assert r["sigma"] == pytest.approx(np.sqrt(sigma2), abs=2e-7) and r["sigma"] > 0


def test_restoration_forces_eta_zero():
    plan = SamplingPlan.create(DiffusionConfig(condition=True), steps=5, eta=1.0)
    assert plan.eta == 0.0 and not plan.stochastic
    assert plan.init_scale() == pytest.approx(0.1)


def test_invalid_settings_rejected():
    with pytest.raises(ValueError):
        DiffusionConfig(objective="pred_magic")
    with pytest.raises(ValueError):
        SamplingPlan.create(DiffusionConfig(), steps=5, eta=-0.1)


@pytest.mark.parametrize("t", [0, 199, 599, 998])
def test_q_sample_then_exact_inversion(t, rng):
    """x_t = x0 + ᾱ·res + β̄·ε, then the prediction algebra recovers I₀ and I_res exactly."""
    cfg = DiffusionConfig(sum_scale=0.01)
    sch = Schedule.from_config(cfg)
    x0 = rng.uniform(-0.8, 0.8, (2, 3, 8, 8))
    x_in = np.clip(x0 + rng.normal(0, 0.1, x0.shape), -1, 1)
    res, eps = x_in - x0, rng.standard_normal(x0.shape)
    x_t = sch.q_sample(x0, res, t, eps)
    coef = np.array([t, sch.alphas_cumsum[t], sch.betas_cumsum[t], sch.one_minus_alphas_cumsum[t], 0, 0, 0, 0.0])
    r, e, x0_hat = predictions("pred_res_noise", res, eps, x_t, x_in, coef)
    np.testing.assert_allclose(x0_hat, x0, atol=1e-12)
    r, e, x0_hat = predictions("pred_res", res, None, x_t, x_in, coef)  # ε derived from res
    np.testing.assert_allclose(e, eps, atol=1e-9)
    np.testing.assert_allclose(x0_hat, x0, atol=1e-12)
    r, e, x0_hat = predictions("pred_noise", eps, None, x_t, x_in, coef)  # x0 derived from ε
    np.testing.assert_allclose(x0_hat, x0, atol=1e-9)
    np.testing.assert_allclose(r, res, atol=1e-9)
    r, e, x0_hat = predictions("pred_x0_noise", x0, eps, x_t, x_in, coef)
    np.testing.assert_allclose(r, res, atol=1e-12)


def test_scaled_time_is_the_reference_float32_product():
    """time_input scaled feeds alphas_cumsum[t]·T and betas_cumsum[t]·T as the reference computes them:
    a float32 buffer times the int T, rounded once in float32."""
    cfg = DiffusionConfig(time_input="scaled", sum_scale=0.3)
    plan, s = SamplingPlan.create(cfg, 4), Schedule.from_config(cfg)
    ac, bc = torch.tensor(s.alphas_cumsum, dtype=torch.float32), torch.tensor(s.betas_cumsum, dtype=torch.float32)
    for i, t in enumerate(plan.times):
        assert plan.net_time(i) == ((ac[t] * cfg.timesteps).item(), (bc[t] * cfg.timesteps).item())
    assert SamplingPlan.create(DiffusionConfig(), 4).net_time(1) == 749  # index: the integer t
    with pytest.raises(ValueError, match="unknown time_input 'continuous'"):
        DiffusionConfig(time_input="continuous")


def test_two_pass_plan_is_the_residual_pass_then_the_noise_pass():
    cfg = DiffusionConfig(condition=False, sum_scale=1.0)
    one, two = SamplingPlan.create(cfg, 3, 0.5), SamplingPlan.create(DiffusionConfig(**{**cfg.to_dict(),
                                                                                        "two_pass": True}), 3, 0.5)
    c_res, c_eps = COEF_NAMES.index("c_res"), COEF_NAMES.index("c_eps")
    assert (two.steps, two.k, two.times) == (6, 3, one.times * 2)
    res_pass, eps_pass = two.coefs[:3], two.coefs[3:]
    np.testing.assert_array_equal(res_pass[:, c_res], one.coefs[:, c_res])
    np.testing.assert_array_equal(eps_pass[:, c_eps], one.coefs[:, c_eps])
    assert not res_pass[:, c_eps].any() and not eps_pass[:, c_res].any()
    for part in (res_pass, eps_pass):  # the rest (time, ᾱ, β̄, σ, last: each pass ends on its x₀) as one pass
        keep = [i for i in range(len(COEF_NAMES)) if i not in (c_res, c_eps)]
        np.testing.assert_array_equal(part[:, keep], one.coefs[:, keep])
