"""The per-image restoration mode: pixel-shuffle and steps chosen from the image's own blind noise estimate.

Why: camera noise is spatially correlated, and a model trained on white noise keeps it as texture unless the image
is restored as pixel-shuffled sub-images, while white noise is restored best whole; a plain ``restore`` should not
need the user to know which one they have. How a model restores correlated noise best is a fact of the network
(one trained on real camera pairs restores it whole), measured on real pairs by ``benchmarks/noise_mode.py
--write-mode`` and stamped into the model (``correlated_noise_mode``); a model without it gets ``camera``, measured
on the synthetic-noise models (``benchmarks/results/noise_mode.json``). An explicit ``--pixel-shuffle`` or
``--steps`` always wins.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..errors import CheckpointError
from .noise_estimate import NoiseEstimate

# From benchmarks/results/noise_mode.json: real camera pairs have ρ̂ >= 0.34, white
# Gaussian noise of σ >= 15 ρ̂ <= 0.19; below, texture leaks into the estimate and either mode restores alike.
AUTO = "auto"  # pixel_shuffle="auto": chosen per image
CAMERA_CORRELATION = 0.5
CAMERA_MIN_SIGMA = 0.0
# models without a measured correlated_noise_mode (trained on synthetic noise): pixel-shuffled sub-images in 1 step
# (stage 9 on 45 real pairs: +1.362 dB vs +1.283 at the model's 2 steps and +0.67 whole), in half the time
CAMERA_STEPS = 1
UNMEASURED_CORRELATED_MODE = "camera"


@dataclass(frozen=True)
class Mode:
    label: str
    pixel_shuffle: int
    steps: int | None  # None: the model's default (its measured recommendation)
    why: str = ""

    @property
    def shape(self) -> str:
        return "whole" if self.pixel_shuffle == 1 else f"pixel-shuffle {self.pixel_shuffle}"

    def describe_how(self) -> str:
        """The mode as a rule states it: e.g. "pixel-shuffle 2, 1 step", "whole, the model's steps"."""
        return f"{self.shape}, " + (_steps(self.steps) if self.steps else "the model's steps")

    def describe(self, plan_steps: int) -> str:
        """For the log line, metrics.csv and the report: e.g. "pixel-shuffle 2, 1 step: correlated noise (...)"."""
        return f"{self.shape}, {_steps(plan_steps)}" + (f": {self.why}" if self.why else "")


def _steps(k: int) -> str:
    return f"{k} step{'s' * (k != 1)}"


# The candidates benchmarks/noise_mode.py measures for each image (the rule below picks among them).
MODES = {m.label: m for m in (Mode("whole", 1, None), Mode("whole-1", 1, 1), Mode("camera-2", 2, None),
                              Mode("camera", 2, CAMERA_STEPS))}


def correlated_mode(label: str | None, where: str = "model") -> Mode:
    """The mode a model's ``correlated_noise_mode`` names (None: :data:`UNMEASURED_CORRELATED_MODE`)."""
    label = UNMEASURED_CORRELATED_MODE if label is None else label
    if label not in MODES:
        raise CheckpointError(f"{where}: correlated_noise_mode {label!r} is not one of {', '.join(MODES)}")
    return MODES[label]


def choose_mode(est: NoiseEstimate, correlated: Mode | None = None) -> Mode:
    """The mode for an image with this noise estimate, and why (stated in the log line, metrics.csv, report);
    ``correlated``: the model's own mode for correlated noise (:func:`correlated_mode`)."""
    if est.correlation >= CAMERA_CORRELATION and est.sigma >= CAMERA_MIN_SIGMA:
        mode = correlated or correlated_mode(None)
        return replace(mode, why=f"correlated noise (σ̂ {est.sigma:.1f}, ρ̂ {est.correlation:.2f})")
    return Mode("whole", 1, None, f"white or little noise (σ̂ {est.sigma:.1f}, ρ̂ {est.correlation:.2f})")


def rule_text(correlated: Mode | None = None) -> str:
    """The rule in words, recorded beside its measurements."""
    mode = correlated or correlated_mode(None)
    how = mode.describe_how()
    return (f"{how} where the blind noise correlation ρ̂ >= {CAMERA_CORRELATION} (and σ̂ >= {CAMERA_MIN_SIGMA}); "
            f"else the whole image at the model's steps")
