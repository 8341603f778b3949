"""RDDM coefficient schedules and the few-step sampling plan (numpy only).

This is the single place where the diffusion coefficients are derived. The torch
sampler, the exported ``step``/``fused`` graphs and every runtime backend read
their numbers from a :class:`SamplingPlan`; nobody re-derives them.

Conventions follow the reference implementation (nachifur/RDDM):

* ``alphas`` (ᾱ increments) use the *decreased* linear schedule summing to 1;
* ``betas2`` (β̄² increments) use the *increased* schedule summing to ``sum_scale``;
* cumulative sums are clipped to [0, 1]; everything is computed in float64.

A checkpoint whose registered buffers follow none of the named schedules (the official
experiments' ``ratio`` / ``normal`` variants, betas converted from DDIM's linear /
scaled_linear / squaredcos_cap_v2) carries its ᾱ and β̄² tables explicitly in
:class:`DiffusionConfig` (``alphas_cumsum`` / ``betas2_cumsum``), so every graph and
runtime samples with the checkpoint's own numbers (docs/OFFICIAL_VARIANTS.md).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, asdict

import numpy as np

SCHEDULES = ("increased", "decreased", "average")
OBJECTIVES = ("pred_res_noise", "pred_res", "pred_noise", "pred_x0_noise", "pred_res_add_noise",
              "pred_x0_add_noise", "pred_x0")
SINGLE_OUTPUT = ("pred_res", "pred_noise", "pred_x0")  # objectives that read only the first network output
# What the network is fed as its time (the checkpoint cannot tell; docs/OFFICIAL_VARIANTS.md):
# "index": the step index t (official experiments 2, 3, 6, rddm-train);
# "scaled": ᾱ_t·T to the residual UNet and β̄_t·T to the noise UNet, as floats (experiments 0, 4, 5, root src/).
TIME_INPUTS = ("index", "scaled")
# Explicit per-t tables a DiffusionConfig may carry: the four buffers the reference's ddim_sample
# reads (the last two are derived from the first two when absent).
TABLES = ("alphas_cumsum", "betas2_cumsum", "betas_cumsum", "one_minus_alphas_cumsum")


def coefficients(timesteps: int, schedule: str = "increased", sum_scale: float = 1.0) -> np.ndarray:
    """Per-step increments of a schedule, summing to ``sum_scale`` (float64)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; expected one of {SCHEDULES}")
    if schedule == "average":
        c = np.full(timesteps, 1.0 / timesteps, dtype=np.float64)
    else:
        c = np.linspace(1, timesteps, timesteps, dtype=np.float64) / (0.5 * timesteps * (timesteps + 1))
        if schedule == "decreased":
            c = c[::-1].copy()
    return c * sum_scale


@dataclass(frozen=True)
class DiffusionConfig:
    """Diffusion settings a model was trained with (recorded in every artifact)."""

    timesteps: int = 1000
    sum_scale: float = 0.01
    objective: str = "pred_res_noise"
    alpha_schedule: str = "decreased"
    beta_schedule: str = "increased"
    condition: bool = True  # restoration (True) or generation from noise (False)
    # Explicit ᾱ_t, β̄²_t (and β̄_t, 1 − ᾱ_t) tables (length T) taken from a checkpoint's buffers, so
    # their float32 roundings are kept exactly; when set they replace alpha_schedule / beta_schedule,
    # and sum_scale only scales the starting noise.
    alphas_cumsum: tuple[float, ...] | None = None
    betas2_cumsum: tuple[float, ...] | None = None
    betas_cumsum: tuple[float, ...] | None = None
    one_minus_alphas_cumsum: tuple[float, ...] | None = None
    time_input: str = "index"  # one of TIME_INPUTS
    # Official experiment 0 / root src/ ddim_sample: K residual-only updates, then K noise-only updates
    # (2K network calls); rddm-train and experiments 2-6 take both in one update.
    two_pass: bool = False

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}; expected one of {OBJECTIVES}")
        if self.time_input not in TIME_INPUTS:
            raise ValueError(f"unknown time_input {self.time_input!r}; expected one of {TIME_INPUTS}")
        if not isinstance(self.two_pass, bool):
            raise ValueError(f"two_pass must be true or false, got {self.two_pass!r}")
        if self.timesteps < 1:
            raise ValueError("timesteps must be >= 1")
        if not self.sum_scale > 0:
            raise ValueError("sum_scale must be > 0")
        if (self.alphas_cumsum is None) != (self.betas2_cumsum is None) or (
                self.alphas_cumsum is None and (self.betas_cumsum, self.one_minus_alphas_cumsum) != (None, None)):
            raise ValueError("explicit schedule tables need both alphas_cumsum and betas2_cumsum")
        for name in TABLES:
            table = getattr(self, name)
            if table is None:
                continue
            table = tuple(float(v) for v in table)
            object.__setattr__(self, name, table)  # lists from JSON -> hashable tuples
            if len(table) != self.timesteps:
                raise ValueError(f"{name} has {len(table)} values, timesteps is {self.timesteps}")
            if not all(np.isfinite(table)):
                raise ValueError(f"{name} holds non-finite values")
        if self.betas2_cumsum is not None and (min(self.betas2_cumsum) < 0 or self.betas2_cumsum[-1] <= 0):
            raise ValueError("betas2_cumsum must be >= 0, and > 0 at t = T-1 (the sampler divides by it)")

    @property
    def explicit(self) -> bool:
        """True when the schedule is carried as tables rather than named."""
        return self.alphas_cumsum is not None

    @property
    def num_outputs(self) -> int:
        """Network outputs the objective reads (a two-output network may serve a one-output objective)."""
        return 1 if self.objective in SINGLE_OUTPUT else 2

    def to_dict(self) -> dict:
        d = asdict(self)
        for name in TABLES:  # named schedules stay lean (and compatible with older readers)
            if d[name] is None:
                del d[name]
            else:
                d[name] = list(d[name])
        return d

    def summary(self) -> dict:
        """to_dict() with each table shortened to its length and end values (for `info`-style display)."""
        d = self.to_dict()
        for name in TABLES:
            if name in d:
                d[name] = f"table[{len(d[name])}] {d[name][0]:.6g} .. {d[name][-1]:.6g}"
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DiffusionConfig":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


@dataclass(frozen=True)
class Schedule:
    """Full-length (T) coefficient tables, float64."""

    config: DiffusionConfig
    alphas: np.ndarray = field(repr=False)
    alphas_cumsum: np.ndarray = field(repr=False)
    betas2: np.ndarray = field(repr=False)
    betas2_cumsum: np.ndarray = field(repr=False)
    betas_cumsum: np.ndarray = field(repr=False)
    one_minus_alphas_cumsum: np.ndarray = field(repr=False)

    @classmethod
    def from_config(cls, config: DiffusionConfig) -> "Schedule":
        T = config.timesteps
        if config.explicit:
            alphas_cumsum = np.asarray(config.alphas_cumsum, dtype=np.float64)
            betas2_cumsum = np.asarray(config.betas2_cumsum, dtype=np.float64)
            alphas = np.diff(alphas_cumsum, prepend=0.0)
            betas2 = np.diff(betas2_cumsum, prepend=0.0)
            if config.betas_cumsum is not None or config.one_minus_alphas_cumsum is not None:
                s = cls._derived(config, alphas, alphas_cumsum, betas2, betas2_cumsum)
                return cls(config, alphas, alphas_cumsum, betas2, betas2_cumsum,
                           s.betas_cumsum if config.betas_cumsum is None else np.asarray(config.betas_cumsum),
                           s.one_minus_alphas_cumsum if config.one_minus_alphas_cumsum is None
                           else np.asarray(config.one_minus_alphas_cumsum))
        else:
            alphas = coefficients(T, config.alpha_schedule)
            alphas_cumsum = np.clip(np.cumsum(alphas), 0, 1)
            betas2 = coefficients(T, config.beta_schedule, config.sum_scale)
            betas2_cumsum = np.clip(np.cumsum(betas2), 0, 1)
        return cls._derived(config, alphas, alphas_cumsum, betas2, betas2_cumsum)

    @classmethod
    def _derived(cls, config, alphas, alphas_cumsum, betas2, betas2_cumsum) -> "Schedule":
        one_minus = 1.0 - alphas_cumsum
        one_minus[-1] = 1e-6  # the reference's guard: pred_noise divides by it
        return cls(config, alphas, alphas_cumsum, betas2, betas2_cumsum, np.sqrt(betas2_cumsum), one_minus)

    def q_sample(self, x0, x_res, t: int, noise):
        """Forward process I_t = I_0 + ᾱ_t·I_res + β̄_t·ε (works on numpy and torch)."""
        return x0 + float(self.alphas_cumsum[t]) * x_res + float(self.betas_cumsum[t]) * noise


def time_grid(timesteps: int, steps: int) -> list[int]:
    """The reference's grid: float32 ``linspace(-1, T-1, K+1)`` truncated to int, reversed.

    For T=1000, K=5: [999, 799, 599, 399, 199, -1].
    """
    if not 1 <= steps <= timesteps:
        raise ValueError(f"steps must be in [1, {timesteps}], got {steps}")
    grid = np.linspace(-1, timesteps - 1, steps + 1, dtype=np.float32)
    # torch's .int() truncates toward zero, as does astype on float -> int.
    return [int(v) for v in grid.astype(np.int32)[::-1]]


# Layout of one step's coefficient vector, shared by the torch sampler, the exported
# ``step`` graph (as an input) and the ``fused`` graph (as constants).
COEF_NAMES = (
    "t",  # integer time index fed to the network
    "alpha_bar",  # ᾱ_t
    "beta_bar",  # β̄_t
    "one_minus_alpha_bar",  # 1 - ᾱ_t (guarded at t = T-1)
    "c_res",  # α   = ᾱ_t - ᾱ_next          (update: x -= c_res·res)
    "c_eps",  # β̄_t - sqrt(β̄²_next - σ²)      (update: x -= c_eps·ε)
    "sigma",  # σ   = sqrt(η·β²·β̄²_next/β̄²_t)  (update: x += σ·z)
    "last",  # 1.0 on the final step: return the x₀ estimate
)
NUM_COEFS = len(COEF_NAMES)
_C_RES, _C_EPS = COEF_NAMES.index("c_res"), COEF_NAMES.index("c_eps")


def eta_problem(config: DiffusionConfig, eta: float, fixed_ok: bool = False) -> str:
    """Why η cannot be sampled with ('' when it can): it must be a finite number in [0, 1] (above 1 the reference's
    σ² can pass β̄²_next and the update takes the root of a negative number), and a restoration model's sampler
    is deterministic, η = 0 (the reference forces it), so another η would be silently ignored. ``fixed_ok``:
    accept any valid η there (it is then replaced by 0, as the reference does)."""
    if not (isinstance(eta, numbers.Real) and math.isfinite(eta) and 0.0 <= eta <= 1.0):
        return f"eta must be a finite number in [0, 1], got {eta}"
    if config.condition and eta != 0 and not fixed_ok:
        return (f"eta {eta} does not apply: this restoration model samples deterministically (eta 0, as the "
                "reference RDDM does for restoration); eta is a generation-model option")
    return ""


@dataclass(frozen=True)
class SamplingPlan:
    """Few-step reverse plan: one float64 coefficient row per step (see COEF_NAMES)."""

    config: DiffusionConfig
    steps: int
    eta: float
    times: tuple[int, ...]
    coefs: np.ndarray = field(repr=False)  # (steps, NUM_COEFS) float64; steps = network calls (2K if two_pass)

    @classmethod
    def create(cls, config: DiffusionConfig, steps: int = 5, eta: float = 0.0) -> "SamplingPlan":
        problem = eta_problem(config, eta, fixed_ok=True)
        if problem:
            raise ValueError(problem)
        if config.condition:
            eta = 0.0  # the reference forces a deterministic sampler for restoration
        s = Schedule.from_config(config)
        # The reference registers its tables as float32 buffers and steps in float32 arithmetic;
        # doing the same here makes every coefficient bit-identical to its values.
        ac, b2c, bc, om = (np.float32(a) for a in (s.alphas_cumsum, s.betas2_cumsum, s.betas_cumsum,
                                                    s.one_minus_alphas_cumsum))
        grid = time_grid(config.timesteps, steps)
        rows = []
        for t, t_next in zip(grid[:-1], grid[1:]):
            row = dict(t=t, alpha_bar=ac[t], beta_bar=bc[t], one_minus_alpha_bar=om[t],
                       c_res=0.0, c_eps=0.0, sigma=0.0, last=1.0)
            if t_next >= 0:
                b2, b2n = b2c[t], b2c[t_next]
                sigma2 = np.float32(eta) * ((b2 - b2n) * b2n / b2)
                row.update(c_res=ac[t] - ac[t_next], c_eps=bc[t] - np.sqrt(b2n - sigma2), sigma=np.sqrt(sigma2),
                           last=0.0)
            rows.append([float(row[n]) for n in COEF_NAMES])
        rows, times = np.asarray(rows, dtype=np.float64), tuple(grid[:-1])
        if config.two_pass:
            # Official experiment 0 / root src/: the K steps twice, the first pass moving x along the residual
            # only (c_eps = 0), the second along the noise only (c_res = 0); each pass ends on its x₀ estimate.
            res_only, noise_only = rows.copy(), rows.copy()
            res_only[:, _C_EPS] = 0.0
            noise_only[:, _C_RES] = 0.0
            rows, times = np.concatenate([res_only, noise_only]), times + times
        return cls(config, len(rows), float(eta), times, rows)

    @property
    def k(self) -> int:
        """The K asked for: ``steps`` counts the network calls, 2K for a two-pass plan."""
        return self.steps // 2 if self.config.two_pass else self.steps

    @property
    def stochastic(self) -> bool:
        return bool(np.any(self.coefs[:, COEF_NAMES.index("sigma")] > 0))

    def net_time(self, i: int) -> int | tuple[float, float]:
        """What step i feeds the network: the index t, or ("scaled") the pair (ᾱ_t·T, β̄_t·T) computed
        in float32 as the reference multiplies its float32 buffers by T."""
        if self.config.time_input == "index":
            return int(self.times[i])
        T = np.float32(self.config.timesteps)
        return tuple(float(np.float32(self.coefs[i, COEF_NAMES.index(n)]) * T) for n in ("alpha_bar", "beta_bar"))

    def row(self, i: int) -> dict[str, float]:
        return dict(zip(COEF_NAMES, (float(v) for v in self.coefs[i])))

    def init_scale(self) -> float:
        """Std of the starting noise: √sum_scale around I_in (restoration) or 1 (generation)."""
        return float(np.sqrt(self.config.sum_scale)) if self.config.condition else 1.0
