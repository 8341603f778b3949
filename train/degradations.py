"""Synthetic degradations for training on clean photos (numpy / opencv).

Every degradation is a pure function of the image and a ``numpy.random.Generator``:
the same seed gives the same degraded image in any process, which is what makes
validation sets fixed and resumed runs exact. Images are float32 HWC RGB in [0, 1].
Parameters given as ``[lo, hi]`` are drawn uniformly per image (blind training);
a scalar fixes them. Noise levels are in 0-255 units, as papers quote them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import cv2
import numpy as np

from rddm_infer.errors import RDDMError

Range = float | tuple[float, float] | list[float]


class DegradationError(RDDMError):
    """A degradation spec that names an unknown degradation or carries bad parameters."""


def draw(rng: np.random.Generator, value: Range, integer: bool = False) -> float:
    """A scalar as is, or a uniform draw from ``[lo, hi]`` (inclusive for integers)."""
    if isinstance(value, (list, tuple)):
        lo, hi = value
        return int(rng.integers(int(lo), int(hi) + 1)) if integer else float(rng.uniform(lo, hi))
    return int(value) if integer else float(value)


def _check_range(where: str, value: Range, lo: float, hi: float = np.inf) -> None:
    vals = list(value) if isinstance(value, (list, tuple)) else [value]
    if len(vals) not in (1, 2) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
        raise DegradationError(f"{where}: expected a number or [lo, hi], got {value!r}")
    if not all(lo <= v <= hi for v in vals) or (len(vals) == 2 and vals[0] > vals[1]):
        raise DegradationError(f"{where}: {value!r} must lie in [{lo}, {hi}] with lo <= hi")


def gaussian_noise(img: np.ndarray, rng: np.random.Generator, sigma: Range = (0, 50)) -> np.ndarray:
    """Additive white Gaussian noise, σ (0-255 units) drawn per image."""
    s = draw(rng, sigma) / 255.0
    return img + s * rng.standard_normal(img.shape, dtype=np.float32)


def poisson_gaussian_noise(img: np.ndarray, rng: np.random.Generator, peak: Range = (10, 200),
                           sigma: Range = (0, 10)) -> np.ndarray:
    """Shot noise (``peak`` photons at white) plus Gaussian read noise (0-255 units)."""
    k = draw(rng, peak)
    shot = rng.poisson(np.clip(img, 0, 1) * k).astype(np.float32) / k
    return shot + (draw(rng, sigma) / 255.0) * rng.standard_normal(img.shape, dtype=np.float32)


def jpeg(img: np.ndarray, rng: np.random.Generator, quality: Range = (30, 95)) -> np.ndarray:
    """JPEG compression at a drawn quality (opencv's libjpeg, 4:2:0)."""
    q = draw(rng, quality, integer=True)
    u8 = to_uint8(img)[..., ::-1]
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(u8), [cv2.IMWRITE_JPEG_QUALITY, q])
    return cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1].astype(np.float32) / 255.0


def _line_kernel(length: int, angle: float) -> np.ndarray:
    k = np.zeros((length, length), np.float32)
    c = (length - 1) / 2
    dx, dy = np.cos(np.deg2rad(angle)) * c, np.sin(np.deg2rad(angle)) * c
    cv2.line(k, (round(c - dx), round(c - dy)), (round(c + dx), round(c + dy)), 1.0, 1, cv2.LINE_AA)
    return k / k.sum()


def motion_blur(img: np.ndarray, rng: np.random.Generator, length: Range = (5, 21),
                angle: Range = (0, 180)) -> np.ndarray:
    """Linear camera shake: convolution with a line of drawn length (px) and angle (degrees)."""
    n = max(draw(rng, length, integer=True), 1) | 1
    return cv2.filter2D(img, -1, _line_kernel(n, draw(rng, angle)), borderType=cv2.BORDER_REFLECT)


def defocus_blur(img: np.ndarray, rng: np.random.Generator, radius: Range = (1, 5)) -> np.ndarray:
    """Out-of-focus blur: convolution with an anti-aliased disk of drawn radius (px)."""
    r = draw(rng, radius)
    n = 2 * int(np.ceil(r)) + 1
    k = np.zeros((n, n), np.float32)
    cv2.circle(k, (n // 2, n // 2), max(int(round(r)), 0), 1.0, -1, cv2.LINE_AA)
    return cv2.filter2D(img, -1, k / k.sum(), borderType=cv2.BORDER_REFLECT)


def rain(img: np.ndarray, rng: np.random.Generator, density: Range = (0.001, 0.006), length: Range = (10, 40),
         angle: Range = (-30, 30), intensity: Range = (0.5, 1.0)) -> np.ndarray:
    """Rain streaks: random drops smeared along one direction, screen-blended over the image."""
    h, w = img.shape[:2]
    drops = (rng.random((h, w)) < draw(rng, density)).astype(np.float32)
    drops *= rng.uniform(0.5, 1.0, (h, w)).astype(np.float32)
    n = max(draw(rng, length, integer=True), 1) | 1
    streaks = cv2.filter2D(drops, -1, _line_kernel(n, 90 + draw(rng, angle)), borderType=cv2.BORDER_CONSTANT)
    streaks = np.clip(streaks * n * 0.5 * draw(rng, intensity), 0, 1)[..., None]
    return 1 - (1 - img) * (1 - streaks)


def low_light(img: np.ndarray, rng: np.random.Generator, gamma: Range = (1.5, 3.0), scale: Range = (0.2, 0.6),
              sigma: Range = (0, 10)) -> np.ndarray:
    """Under-exposure: ``scale · img^gamma`` plus Gaussian sensor noise (0-255 units)."""
    dark = draw(rng, scale) * np.power(np.clip(img, 0, 1), draw(rng, gamma))
    return dark + (draw(rng, sigma) / 255.0) * rng.standard_normal(img.shape, dtype=np.float32)


# name -> (function, {param: (lo, hi)} bounds for validation)
REGISTRY: dict[str, tuple[Callable, dict[str, tuple[float, float]]]] = {
    "gaussian": (gaussian_noise, {"sigma": (0, 255)}),
    "poisson_gaussian": (poisson_gaussian_noise, {"peak": (1e-3, 1e6), "sigma": (0, 255)}),
    "jpeg": (jpeg, {"quality": (1, 100)}),
    "motion_blur": (motion_blur, {"length": (1, 255), "angle": (-360, 360)}),
    "defocus_blur": (defocus_blur, {"radius": (0, 64)}),
    "rain": (rain, {"density": (0, 1), "length": (1, 255), "angle": (-90, 90), "intensity": (0, 1)}),
    "low_light": (low_light, {"gamma": (0.05, 10), "scale": (0, 1), "sigma": (0, 255)}),
}


@dataclass(frozen=True)
class Degradation:
    """One step of a pipeline: applied with probability ``p``."""

    name: str
    p: float
    params: dict

    def __call__(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return REGISTRY[self.name][0](img, rng, **self.params)


class Pipeline:
    """Degradations applied in order, each with its own probability; output clipped to [0, 1] float32.

    ``bits`` > 0 also rounds the output to that many bits per channel: inputs saved as 8-bit photos are
    clipped *and* quantised, and a model trained on float noise misreads the clipped shadows and highlights.
    """

    def __init__(self, steps: list[Degradation], bits: int = 0):
        if not 0 <= bits <= 16:
            raise DegradationError(f"data.bits must be 0 (no rounding) or 1-16, got {bits!r}")
        self.steps, self.levels = list(steps), float(2 ** bits - 1) if bits else 0.0

    @classmethod
    def from_specs(cls, specs: list[dict], source: str = "data.degradations", bits: int = 0) -> "Pipeline":
        steps = []
        for i, spec in enumerate(specs):
            if not isinstance(spec, dict) or "name" not in spec:
                raise DegradationError(f"{source}[{i}]: expected a table with a 'name', got {spec!r}")
            spec = dict(spec)
            name, p = spec.pop("name"), spec.pop("p", 1.0)
            if name not in REGISTRY:
                raise DegradationError(f"{source}[{i}]: unknown degradation {name!r} (known: {', '.join(REGISTRY)})")
            if not isinstance(p, (int, float)) or not 0 <= p <= 1:
                raise DegradationError(f"{source}[{i}] {name}: p must be in [0, 1], got {p!r}")
            bounds = REGISTRY[name][1]
            for key, value in spec.items():
                if key not in bounds:
                    raise DegradationError(f"{source}[{i}] {name}: unknown parameter {key!r} "
                                           f"(known: {', '.join(bounds)})")
                _check_range(f"{source}[{i}] {name}.{key}", value, *bounds[key])
            steps.append(Degradation(name, float(p), spec))
        return cls(steps, bits)

    def __call__(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        out = img.astype(np.float32, copy=True)
        for step in self.steps:
            if rng.random() < step.p:  # always drawn, so one step's p never shifts another's randomness
                out = step(out, rng)
        out = np.clip(out, 0.0, 1.0)
        if self.levels:
            out = np.round(out * self.levels) / self.levels
        return out.astype(np.float32, copy=False)

    def __len__(self) -> int:
        return len(self.steps)


def to_uint8(img: np.ndarray) -> np.ndarray:
    return (np.clip(img, 0, 1) * 255.0 + 0.5).astype(np.uint8)
