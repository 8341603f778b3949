"""An independent model of what nachifur/RDDM's experiments compute, for the variant tests.

Written from reading each experiment's ``residual_denoising_diffusion_pytorch.py`` (see
docs/OFFICIAL_VARIANTS.md), not from rddm_infer: the schedule buffers each ``__init__``
registers, the trainer's ``model-N.pt`` layout and ``ddim_sample`` with ``model_predictions``.
All arithmetic is float32 on the registered buffers, as the reference runs it.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


# -- schedules (float64 unless the experiment computes in float32), registered as float32 buffers

def gen_coefficients_linear(T: int, schedule: str, sum_scale: float = 1.0) -> torch.Tensor:
    """Experiment 2: linspace(1, T) / (T(T+1)/2), float64."""
    x = torch.linspace(1, T, T, dtype=torch.float64)
    if schedule == "average":
        return torch.full([T], 1 / T, dtype=torch.float64) * sum_scale
    c = x / (0.5 * T * (T + 1))
    return (c.flip(0) if schedule == "decreased" else c) * sum_scale


def gen_coefficients_ratio(T: int, schedule: str, sum_scale: float = 1.0, ratio: float = 1) -> torch.Tensor:
    """Experiments 0, 3-6: powers of a float32 linspace(0, 1) (so the first increment is 0), or a normal bump."""
    if schedule in ("increased", "decreased"):
        y = torch.from_numpy(np.linspace(0, 1, T, dtype=np.float32) ** ratio)
        c = (y.flip(0) if schedule == "decreased" else y) / y.sum()
    elif schedule == "normal":
        x = np.linspace(-3, 3, T, dtype=np.float32)
        y = torch.from_numpy(np.e ** (-(x ** 2) / 2) / np.sqrt(2 * np.pi))
        c = y / y.sum()
    else:
        c = torch.full([T], 1 / T, dtype=torch.float32)
    return c * sum_scale


def _cosine_betas(T: int, max_beta: float = 0.999) -> torch.Tensor:
    f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    return torch.tensor([min(1 - f((i + 1) / T) / f(i / T), max_beta) for i in range(T)], dtype=torch.float32)


def ddim_converted(T: int, beta_schedule: str = "linear"):
    """convert_to_ddim=True: ᾱ = 1 − √ᾱ_DDPM, β̄² = 1 − ᾱ_DDPM; increments with the first set to 0."""
    if beta_schedule == "linear":
        betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float32)
    elif beta_schedule == "scaled_linear":
        betas = torch.linspace(1e-4 ** 0.5, 0.02 ** 0.5, T, dtype=torch.float32) ** 2
    else:
        betas = _cosine_betas(T)
    cumprod = torch.cumprod(1.0 - betas, dim=0)
    ac, b2c = 1 - cumprod ** 0.5, 1 - cumprod
    ac_prev, b2c_prev = F.pad(ac[:-1], (1, 0), value=1.0), F.pad(b2c[:-1], (1, 0), value=1.0)
    alphas, betas2 = ac - ac_prev, b2c - b2c_prev
    alphas[0] = 0
    betas2[0] = 0
    return alphas, ac, betas2, b2c, ac_prev, b2c_prev


def cumulative(alphas: torch.Tensor, betas2: torch.Tensor):
    ac, b2c = alphas.cumsum(0).clip(0, 1), betas2.cumsum(0).clip(0, 1)
    return alphas, ac, betas2, b2c, F.pad(ac[:-1], (1, 0), value=1.0), F.pad(b2c[:-1], (1, 0), value=1.0)


def registered_buffers(alphas, ac, betas2, b2c, ac_prev, b2c_prev) -> dict[str, torch.Tensor]:
    """Every buffer ResidualDiffusion.__init__ registers, float32, with its in-place fixes."""
    post_var = betas2 * b2c_prev / b2c
    post_var[0] = 0
    b = {"alphas": alphas, "alphas_cumsum": ac, "one_minus_alphas_cumsum": 1 - ac, "betas2": betas2,
         "betas": torch.sqrt(betas2), "betas2_cumsum": b2c, "betas_cumsum": torch.sqrt(b2c),
         "posterior_mean_coef1": b2c_prev / b2c, "posterior_mean_coef2": (betas2 * ac_prev - b2c_prev * alphas) / b2c,
         "posterior_mean_coef3": betas2 / b2c, "posterior_variance": post_var,
         "posterior_log_variance_clipped": torch.log(post_var.clamp(min=1e-20))}
    b = {k: v.to(torch.float32).clone() for k, v in b.items()}
    b["posterior_mean_coef1"][0], b["posterior_mean_coef2"][0], b["posterior_mean_coef3"][0] = 0, 0, 1
    b["one_minus_alphas_cumsum"][-1] = 1e-6
    return b


# -- the trainer's file

def save_trainer_checkpoint(path, online: torch.nn.Module, ema: torch.nn.Module, buffers: dict,
                            params: dict | None = None, two_optimizers: bool = False, step: int = 40) -> None:
    """``Trainer.save``: {'step', 'model': ResidualDiffusion.state_dict(), 'opt' | 'opt0'+'opt1', 'ema', 'scaler'};
    the EMA dict (ema-pytorch) holds ``online_model.*`` and ``ema_model.*`` copies of the diffusion state_dict."""
    params = params or {}

    def diffusion_sd(net):
        return {**{f"model.{k}": v.clone() for k, v in net.state_dict().items()}, **params, **buffers}

    ema_sd = {"initted": torch.tensor([True]), "step": torch.tensor([step]),
              **{f"online_model.{k}": v for k, v in diffusion_sd(online).items()},
              **{f"ema_model.{k}": v for k, v in diffusion_sd(ema).items()}}
    data = {"step": step, "model": diffusion_sd(online), "ema": ema_sd, "scaler": None}
    data.update({"opt0": {}, "opt1": {}} if two_optimizers else {"opt": {}})
    torch.save(data, path)


# -- ddim_sample

def _predictions(objective, out, x, x_input, ac, bc, om, alpha_res=None):
    clip = lambda a: a.clamp(-1.0, 1.0)  # noqa: E731
    if objective == "auto_res_noise":
        objective = "pred_res" if alpha_res > 0.5 else "pred_noise"
    if objective in ("pred_res_noise", "pred_res_add_noise"):
        res = clip(out[0])
        eps = out[1] if objective == "pred_res_noise" else out[1] - out[0]
        return res, eps, clip(x - ac * res - bc * eps)
    if objective in ("pred_x0_noise", "pred_x0_add_noise"):
        eps = out[1] if objective == "pred_x0_noise" else out[1] - out[0]
        return clip(x_input - out[0]), eps, clip(out[0])
    if objective == "pred_noise":
        x0 = clip((x - ac * x_input - bc * out[0]) / om)
        return clip(x_input - x0), out[0], x0
    if objective == "test_noise":  # test_res_or_noise "noise": the noise of output 1, then as pred_noise
        x0 = clip((x - ac * x_input - bc * out[1]) / om)
        return clip(x_input - x0), out[1], x0
    if objective in ("pred_res", "pred_x0"):  # pred_x0: experiments 4/5, one network predicting x₀
        res = clip(out[0]) if objective == "pred_res" else clip(x_input - out[0])
        eps = (x - x_input - (ac - 1) * res) / bc
        return res, eps, clip(x_input - res)
    raise ValueError(objective)


def _network(net, x_in, t: int, buffers: dict, objective: str, scaled: bool, only_noise: bool = False):
    """One ``self.model(x_in, time)`` call. Experiments 2, 3, 6 pass the index t; 0, 4, 5 and the root src/
    pass the list [alphas_cumsum[t]·T, betas_cumsum[t]·T] (float32), which their ``UnetRes.forward`` routes:
    num_unet 2 -> unet0 gets the first, unet1 the second; num_unet 1 -> the second for pred_noise, else the first."""
    b = x_in.shape[0]
    index = torch.full((b,), t, dtype=torch.long)
    if not scaled and not only_noise:
        return net(x_in, index)
    T = buffers["alphas_cumsum"].numel()
    time = [buffers["alphas_cumsum"][index] * T, buffers["betas_cumsum"][index] * T] if scaled else [index, index]
    if only_noise:  # test_res_or_noise "noise": num_unet 2 returns (0, unet1(x, time[1]))
        return 0, net.unet1(x_in, time[1])
    if hasattr(net, "unet1"):
        return net.unet0(x_in, time[0]), net.unet1(x_in, time[1])
    return [net.unet0(x_in, time[1] if objective == "pred_noise" else time[0])]


@torch.no_grad()
def ddim_sample(net, buffers: dict, objective: str, x_input: torch.Tensor, eps: torch.Tensor, steps: int, *,
                condition: bool, sum_scale: float, eta: float = 0.0, zs=None, alpha_res=None, scaled: bool = False,
                translation: bool = False, eta_forced_zero: bool = False, only_noise: bool = False,
                two_pass: bool = False) -> torch.Tensor:
    """The reference's few-step loop; ``eps``/``zs`` stand in for its torch.randn draws (in draw order).

    ``scaled``: the time input of experiments 0, 4, 5 (see :func:`_network`); ``translation``: their
    img_to_img_translation (condition on, but the network sees x_t only); ``eta_forced_zero``: experiments
    3-5 set eta = 0 inside ddim_sample; ``only_noise``: their test_res_or_noise "noise"; ``two_pass``: the
    ddim_sample of experiment 0 and the root src/ (``zs`` then holds pass 1's draws, then pass 2's)."""
    T = buffers["alphas_cumsum"].numel()
    times = list(reversed(torch.linspace(-1, T - 1, steps=steps + 1).int().tolist()))
    if condition or eta_forced_zero:
        eta = 0.0  # restoration: the constructor zeroes ddim_sampling_eta
    img = x_input + math.sqrt(sum_scale) * eps if condition else eps
    ac_t, b2c_t, bc_t, om_t = (buffers[k] for k in ("alphas_cumsum", "betas2_cumsum", "betas_cumsum",
                                                     "one_minus_alphas_cumsum"))
    # experiment 0 / root src/: the same loop twice, first moving along the residual only, then the noise only
    passes = ("res", "eps") if two_pass else ("both",)
    for p, which in enumerate(passes):
        for i, (t, t_next) in enumerate(zip(times[:-1], times[1:])):
            x_in = torch.cat((img, x_input), dim=1) if condition and not translation else img
            out = _network(net, x_in, t, buffers, objective, scaled, only_noise)
            res, pred_eps, x0 = _predictions("test_noise" if only_noise else objective, out, img, x_input, ac_t[t],
                                             bc_t[t], om_t[t], alpha_res)
            if t_next < 0:
                img = x0
                continue
            alpha = ac_t[t] - ac_t[t_next]
            b2, b2n = b2c_t[t], b2c_t[t_next]
            sigma2 = eta * ((b2 - b2n) * b2n / b2)
            z = 0 if eta == 0 else zs[p * steps + i]
            if which == "res":
                img = img - alpha * res + sigma2.sqrt() * z
            elif which == "eps":
                img = img - (bc_t[t] - (b2n - sigma2).sqrt()) * pred_eps + sigma2.sqrt() * z
            else:
                img = img - alpha * res - (bc_t[t] - (b2n - sigma2).sqrt()) * pred_eps + sigma2.sqrt() * z
    return img
