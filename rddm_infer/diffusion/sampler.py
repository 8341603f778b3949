"""The RDDM reverse step, written once for numpy arrays, torch tensors and exported graphs.

Only arithmetic and a clamp are used, so the same function runs eagerly on numpy
or torch and traces into an ONNX graph (where the coefficients are graph inputs or
constants). The step is :func:`reverse_step`; the loop that calls it lives in :func:`sample`, which drives any
*model* callable ``model(x_t, x_input, t) -> (out0, out1)``: a torch module, an
ONNX Runtime session or a TensorRT engine (k-diffusion style).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from .schedule import COEF_NAMES, SamplingPlan

_I = {n: i for i, n in enumerate(COEF_NAMES)}


def _clip(a):
    if isinstance(a, np.ndarray):
        return np.clip(a, -1.0, 1.0)
    return a.clamp(-1.0, 1.0)  # torch


def _c(coef, name):
    """A coefficient as a scalar (python float) or a broadcastable tensor/array element."""
    v = coef[_I[name]]
    return float(v) if isinstance(v, (float, np.floating)) else v


def predictions(objective: str, out0, out1, x_t, x_input, coef):
    """Network outputs -> (residual, noise, x₀ estimate), clamped as the reference does."""
    ab, bb = _c(coef, "alpha_bar"), _c(coef, "beta_bar")
    if objective in ("pred_res_noise", "pred_res_add_noise"):
        res = _clip(out0)
        eps = out1 if objective == "pred_res_noise" else out1 - out0  # the second net learned res + ε
        x0 = _clip(x_t - ab * res - bb * eps)
    elif objective in ("pred_res", "pred_x0"):
        res = _clip(out0) if objective == "pred_res" else _clip(x_input - out0)
        eps = (x_t - x_input - (ab - 1.0) * res) / bb
        x0 = _clip(x_input - res)
    elif objective == "pred_noise":
        eps = out0
        x0 = _clip((x_t - ab * x_input - bb * eps) / _c(coef, "one_minus_alpha_bar"))
        res = _clip(x_input - x0)
    elif objective in ("pred_x0_noise", "pred_x0_add_noise"):
        res = _clip(x_input - out0)
        eps = out1 if objective == "pred_x0_noise" else out1 - out0  # the second net learned x₀ + ε
        x0 = _clip(out0)
    else:
        raise ValueError(f"unknown objective {objective!r}")
    return res, eps, x0


def update(x_t, res, eps, x0, coef, noise=None):
    """One reverse update x_t -> x_{t_next}; on the last step the x₀ estimate itself.

    ``last`` is a 0/1 coefficient, so the same arithmetic serves every step and no
    branch is needed inside an exported graph.
    """
    nxt = x_t - _c(coef, "c_res") * res - _c(coef, "c_eps") * eps
    if noise is not None:
        nxt = nxt + _c(coef, "sigma") * noise
    last = _c(coef, "last")
    if isinstance(last, float):
        return x0 if last >= 0.5 else nxt
    return last * x0 + (1.0 - last) * nxt


def reverse_step(objective: str, out0, out1, x_t, x_input, coef, noise=None):
    """One RDDM reverse step, predictions plus update: returns (x_next, x0_estimate)."""
    res, eps, x0 = predictions(objective, out0, out1, x_t, x_input, coef)
    return update(x_t, res, eps, x0, coef, noise), x0


ModelFn = Callable[[object, object, "int | tuple[float, float]"], Sequence[object]]


def time_array(value, batch: int) -> np.ndarray:
    """A step's network time (:meth:`SamplingPlan.net_time`) as the ``unet`` graph's ``t`` input, float32:
    (B,) holding the index t, or (B, 2) holding (ᾱ_t·T, β̄_t·T) for a "scaled" time input."""
    if isinstance(value, tuple):
        return np.tile(np.asarray(value, dtype=np.float32), (batch, 1))
    return np.full((batch,), value, dtype=np.float32)


def select_time(time, num_outputs: int, objective: str):
    """The time one network call gets, from ``t`` of shape (B,) or (B, 2) (numpy or torch).

    (B, 2) is the reference's [ᾱ_t·T, β̄_t·T]: two UNets take a column each; one UNet takes β̄_t·T when it
    predicts the noise (pred_noise) and ᾱ_t·T otherwise, as the official ``UnetRes.forward`` routes it.
    """
    if time.ndim == 1 or num_outputs == 2:
        return time
    return time[:, 1] if objective == "pred_noise" else time[:, 0]


def initial_state(plan: SamplingPlan, x_input: np.ndarray, rng: np.random.Generator | None = None,
                  noise: np.ndarray | None = None) -> np.ndarray:
    """x_T = I_in + √sum_scale·ε (restoration) or ε (generation), float32."""
    if noise is None:
        noise = (rng or np.random.default_rng()).standard_normal(x_input.shape, dtype=np.float32)
    x_t = np.multiply(noise, np.float32(plan.init_scale()), dtype=np.float32)  # one buffer, the same roundings
    if plan.config.condition:
        x_t += x_input
    return x_t


def sample(model: ModelFn, plan: SamplingPlan, x_input, x_t, step_noise: Callable[[int], object] | None = None,
           stop: int | None = None):
    """Run the K-step reverse loop with any model callable; returns the restored sample in [-1, 1].

    ``x_input`` and ``x_t`` are arrays/tensors of the same kind; the model gets each step's
    :meth:`~rddm_infer.diffusion.schedule.SamplingPlan.net_time` (an int, or a float pair); ``step_noise(i)`` supplies
    z for stochastic steps (η > 0). ``stop`` = k runs only the first k steps and returns the
    state the loop holds before step k (the trainer's rollout).
    """
    for i in range(plan.steps if stop is None else stop):
        coef = plan.coefs[i]
        outs = model(x_t, x_input, plan.net_time(i))
        out1 = outs[1] if len(outs) > 1 else None
        z = step_noise(i) if (step_noise is not None and coef[_I["sigma"]] > 0) else None
        x_t, _ = reverse_step(plan.config.objective, outs[0], out1, x_t, x_input, coef, z)
    return x_t
