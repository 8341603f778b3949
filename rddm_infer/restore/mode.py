"""The per-image restoration mode: pixel-shuffle and steps chosen from the image's own blind noise estimate.

Why: camera noise is spatially correlated and the model keeps it as texture unless the image is restored as
pixel-shuffled sub-images, while white noise is restored best whole; a plain ``restore`` should not need the
user to know which one they have. The thresholds are read off ``benchmarks/noise_mode.py``'s measurements
(``benchmarks/results/noise_mode.json``); an explicit ``--pixel-shuffle`` or ``--steps`` always wins.
"""

from __future__ import annotations

from dataclasses import dataclass

from .noise_estimate import NoiseEstimate

# From benchmarks/results/noise_mode.json (see docs/DEFAULTS.md): real camera pairs have ρ̂ >= 0.34, white
# Gaussian noise of σ >= 15 ρ̂ <= 0.19; below, texture leaks into the estimate and either mode restores alike.
AUTO = "auto"  # pixel_shuffle="auto": chosen per image
CAMERA_CORRELATION = 0.5
CAMERA_MIN_SIGMA = 0.0
# pixel-shuffled sub-images restore best in 1 step (real pairs: +1.362 dB vs +1.283 at the model's 2), in half the time
CAMERA_STEPS = 1


@dataclass(frozen=True)
class Mode:
    label: str
    pixel_shuffle: int
    steps: int | None  # None: the model's default (its measured recommendation)
    why: str = ""

    def describe(self, plan_steps: int) -> str:
        """For the log line, metrics.csv and the report: e.g. "pixel-shuffle 2, 1 step: correlated noise (...)"."""
        what = "whole" if self.pixel_shuffle == 1 else f"pixel-shuffle {self.pixel_shuffle}"
        return f"{what}, {plan_steps} step{'s' * (plan_steps != 1)}" + (f": {self.why}" if self.why else "")


MODES = {m.label: m for m in (Mode("whole", 1, None), Mode("camera-2", 2, None), Mode("camera", 2, 1))}


def choose_mode(est: NoiseEstimate) -> Mode:
    """The mode for an image with this noise estimate, and why (stated in the log line, metrics.csv, report)."""
    if est.correlation >= CAMERA_CORRELATION and est.sigma >= CAMERA_MIN_SIGMA:
        return Mode("camera", 2, CAMERA_STEPS, f"correlated noise (σ̂ {est.sigma:.1f}, ρ̂ {est.correlation:.2f})")
    return Mode("whole", 1, None, f"white or little noise (σ̂ {est.sigma:.1f}, ρ̂ {est.correlation:.2f})")


def rule_text() -> str:
    """The rule in words, recorded beside its measurements."""
    return (f"pixel-shuffle 2 where the blind noise correlation ρ̂ >= {CAMERA_CORRELATION} "
            f"(and σ̂ >= {CAMERA_MIN_SIGMA}), {CAMERA_STEPS} step; else the whole image at the model's steps")
