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


# BT.601 RGB -> YCbCr (luma row = _luma's weights) and back, for the in-camera chroma noise reduction.
_TO_YCC = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]], np.float32)
_FROM_YCC = np.linalg.inv(_TO_YCC).astype(np.float32)


def _luma(img: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma, the weights OpenCV (and most scanners) use to make a gray image from RGB."""
    return img @ _TO_YCC[0]


def saturate(img: np.ndarray, factor: float) -> np.ndarray:
    """Colour saturation scaled by ``factor`` around each pixel's luma (0: gray, 1: unchanged), clipped to [0, 1]."""
    luma = _luma(img)[..., None]
    return np.clip(luma + np.float32(factor) * (img - luma), 0.0, 1.0).astype(np.float32, copy=False)


def gray_gaussian(img: np.ndarray, rng: np.random.Generator,
                  sigma: Range = (0, 50)) -> tuple[np.ndarray, np.ndarray]:
    """A gray photo as the runtime sees one (luma copied into R, G and B) with ONE noise field for all three.

    Changes the target too (returns ``(noisy, clean)``): the model must learn to keep a gray image gray, and
    that noise identical across channels is noise, not content (trained only on i.i.d. per-channel noise,
    the model leaves it in).
    """
    gray = np.repeat(_luma(img)[..., None], img.shape[2], axis=2)
    noise = (draw(rng, sigma) / 255.0) * rng.standard_normal(img.shape[:2], dtype=np.float32)
    return gray + noise[..., None], gray


def random_covariance(rng: np.random.Generator, sigma: Range = (0, 50), channels: int = 3) -> np.ndarray:
    """A random channel covariance (0-1 units): ``A·Aᵀ`` of a Gaussian matrix, scaled so that the mean
    per-channel variance is σ² — correlations anywhere from none to nearly total, of either sign."""
    a = rng.standard_normal((channels, channels))
    cov = a @ a.T
    return cov * (draw(rng, sigma) / 255.0) ** 2 / (np.trace(cov) / channels)


def correlated_gaussian(img: np.ndarray, rng: np.random.Generator, sigma: Range = (0, 50)) -> np.ndarray:
    """Gaussian noise correlated across channels (a drawn 3×3 covariance, ``random_covariance``), white in space:
    what colour processing (the camera's colour matrix, YCbCr chroma handling) does to sensor noise."""
    cov = random_covariance(rng, sigma, img.shape[2])
    w, v = np.linalg.eigh(cov)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T  # symmetric square root: exact for rank-deficient draws too
    z = rng.standard_normal(img.shape, dtype=np.float32)
    return img + z @ root.astype(np.float32).T


# --- a simple camera (Brooks et al. 2019, "Unprocessing Images for Learned Raw Denoising") -----------------
# sRGB photo -> (inverse tone curve, inverse gamma, inverse colour matrix, inverse white balance) -> linear raw,
# mosaicked RGGB -> shot + read noise (variance read + shot·x) -> bilinear demosaic -> white balance, colour
# matrix, gamma, tone curve -> sRGB again. The noise ends up signal-dependent and correlated in space and colour,
# as in a real photo. Written from the paper's description.

GAMMA = 2.2


def _tone(x: np.ndarray) -> np.ndarray:
    """The paper's global tone curve, a smoothstep 3x² - 2x³."""
    x = np.clip(x, 0.0, 1.0)
    return 3 * x ** 2 - 2 * x ** 3


def _untone(y: np.ndarray) -> np.ndarray:
    """Inverse of the smoothstep on [0, 1]."""
    return 0.5 - np.sin(np.arcsin(1.0 - 2.0 * np.clip(y, 0.0, 1.0)) / 3.0)


@dataclass(frozen=True)
class Camera:
    """One drawn camera: colour matrix (camera RGB -> linear sRGB, rows sum to 1) and white-balance gains."""

    cam2rgb: np.ndarray  # 3×3
    gains: np.ndarray  # (r, g, b) multipliers applied to the raw channels (red, blue > 1; all × brightness)

    @classmethod
    def draw(cls, rng: np.random.Generator) -> "Camera":
        # Real colour matrices amplify saturation: diagonal > 1, negative off-diagonal terms, rows summing to 1
        # so that white stays white. Off-diagonals drawn in the range of common cameras' matrices.
        off = -rng.uniform(0.0, 0.5, (3, 3))
        np.fill_diagonal(off, 0.0)
        cam2rgb = off + np.diag(1.0 - off.sum(axis=1))
        # The paper's gains: red in [1.9, 2.4], blue in [1.5, 1.9], an overall brightness gain 1 / N(0.8, 0.1).
        bright = 1.0 / np.clip(rng.normal(0.8, 0.1), 0.5, 1.1)
        gains = np.array([rng.uniform(1.9, 2.4), 1.0, rng.uniform(1.5, 1.9)]) * bright
        return cls(cam2rgb, gains)

    def unprocess(self, img: np.ndarray) -> np.ndarray:
        """sRGB [0, 1] -> linear camera RGB (white balance removed), still H×W×3."""
        lin = np.power(np.maximum(_untone(img), 1e-8), GAMMA)
        cam = np.clip(lin @ np.linalg.inv(self.cam2rgb).T, 0.0, None)
        # Dividing by the gains would turn clipped whites grey-ish pink; keep the brightest pixels saturated by
        # fading the inverse gain to 1 above 0.9 (the paper's highlight-preserving inversion).
        inv = 1.0 / self.gains
        mask = (np.clip(cam.mean(axis=2, keepdims=True) - 0.9, 0.0, None) / 0.1) ** 2
        return cam * np.maximum(mask + (1.0 - mask) * inv, inv)

    def process(self, cam: np.ndarray) -> np.ndarray:
        """Linear camera RGB -> sRGB [0, 1]: white balance, colour matrix, gamma, tone curve."""
        lin = np.clip((cam * self.gains) @ self.cam2rgb.T, 0.0, 1.0)
        return _tone(np.power(np.maximum(lin, 1e-8), 1.0 / GAMMA))


def mosaic(rgb: np.ndarray) -> np.ndarray:
    """H×W×3 -> H×W RGGB Bayer plane (red at (0, 0), blue at (1, 1))."""
    raw = rgb[..., 1].copy()
    raw[0::2, 0::2] = rgb[0::2, 0::2, 0]
    raw[1::2, 1::2] = rgb[1::2, 1::2, 2]
    return raw


_RB_KERNEL = np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]], np.float32) / 4
_G_KERNEL = np.array([[0, 1, 0], [1, 4, 1], [0, 1, 0]], np.float32) / 4


def demosaic(raw: np.ndarray) -> np.ndarray:
    """Bilinear demosaic of an RGGB plane (float, negative values kept; same result as OpenCV's
    ``COLOR_BayerBG2RGB`` away from the border, which needs 8/16-bit input and would clip the noise)."""
    h, w = raw.shape
    masks = np.zeros((3, h, w), np.float32)
    masks[0, 0::2, 0::2] = masks[2, 1::2, 1::2] = 1
    masks[1] = 1 - masks[0] - masks[2]
    # Reflect-101 keeps the Bayer phase at the border (row -1 mirrors row 1, the same colour).
    chans = [cv2.filter2D(raw.astype(np.float32) * m, -1, k, borderType=cv2.BORDER_REFLECT_101)
             for m, k in zip(masks, (_RB_KERNEL, _G_KERNEL, _RB_KERNEL))]
    return np.stack(chans, axis=-1)


def raw_noise_levels(rng: np.random.Generator, shot: Range = (1e-4, 1.2e-2)) -> tuple[float, float]:
    """(shot, read) variance factors: shot log-uniform over ``shot``, log(read) = 2.18·log(shot) + 1.20 + N(0, 0.26)
    (the paper's fit to real sensors: darker scenes, higher ISO, more of both)."""
    lo, hi = (shot, shot) if not isinstance(shot, (list, tuple)) else shot
    s = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
    return s, float(np.exp(2.18 * np.log(s) + 1.20 + rng.normal(0.0, 0.26)))


def add_raw_noise(raw: np.ndarray, rng: np.random.Generator, shot: float, read: float) -> np.ndarray:
    """Heteroscedastic Gaussian approximation of Poisson-Gaussian noise: variance ``read + shot·x``."""
    std = np.sqrt(read + shot * np.clip(raw, 0.0, None))
    return raw + std * rng.standard_normal(raw.shape, dtype=np.float32)


def isp_smooth(noise: np.ndarray, rng: np.random.Generator, chroma: Range, luma: Range = 0.0) -> np.ndarray:
    """A camera ISP's noise reduction applied to a noise field: its YCbCr (BT.601) chroma Gaussian-blurred by a
    drawn σ in pixels, then its luma by another. Chroma NR leaves mostly luminance noise, correlated across R, G
    and B, as in the JPEGs cameras write; luma NR (and the wider demosaicking of real cameras) makes what is left
    spatially correlated beyond the bilinear demosaic's one pixel (0 = off; the luma σ is drawn only when its
    range is not 0, so older configs draw the same numbers)."""
    s = draw(rng, chroma)
    t = 0.0 if luma == 0 else draw(rng, luma)
    if s <= 0 and t <= 0:
        return noise
    ycc = noise.astype(np.float32) @ _TO_YCC.T
    for c, sig in ((0, t), (1, s), (2, s)):
        if sig > 0:
            ycc[..., c] = cv2.GaussianBlur(ycc[..., c], (0, 0), sig, borderType=cv2.BORDER_REFLECT_101)
    return ycc @ _FROM_YCC.T


def camera_noise(img: np.ndarray, rng: np.random.Generator, shot: Range = (1e-4, 1.2e-2),
                 chroma_blur: Range = 0.0, luma_blur: Range = 0.0) -> np.ndarray:
    """Real-photo noise: the image taken back to a linear RGGB raw through a drawn camera, given shot + read
    noise there, then developed again (demosaic, white balance, colour matrix, gamma, tone curve).

    Only the noise is kept (developed noisy minus developed clean, through the same camera) and added to the
    input, so that noisy and clean differ by noise alone, as a real pair (one shot vs the mean of many) does —
    not by the bilinear demosaic's blur as well. ``shot``: the shot-noise factor's range (drawn log-uniformly;
    variance = read + shot·x in linear raw units), read noise follows from it. ``chroma_blur`` / ``luma_blur``:
    σ ranges (pixels) of the in-camera noise reduction (``isp_smooth``). Add a ``jpeg`` stage after it for
    compressed photos.
    """
    cam = Camera.draw(rng)
    raw = mosaic(cam.unprocess(img.astype(np.float64))).astype(np.float32)
    noisy = add_raw_noise(raw, rng, *raw_noise_levels(rng, shot))
    developed = [cam.process(demosaic(r).astype(np.float64)) for r in (noisy, raw)]
    noise = isp_smooth((developed[0] - developed[1]).astype(np.float32), rng, chroma_blur, luma_blur)
    return np.clip(img + noise, 0.0, 1.0).astype(np.float32)


# name -> (function, {param: (lo, hi)} bounds for validation)
REGISTRY: dict[str, tuple[Callable, dict[str, tuple[float, float]]]] = {
    "gaussian": (gaussian_noise, {"sigma": (0, 255)}),
    "poisson_gaussian": (poisson_gaussian_noise, {"peak": (1e-3, 1e6), "sigma": (0, 255)}),
    "jpeg": (jpeg, {"quality": (1, 100)}),
    "motion_blur": (motion_blur, {"length": (1, 255), "angle": (-360, 360)}),
    "defocus_blur": (defocus_blur, {"radius": (0, 64)}),
    "rain": (rain, {"density": (0, 1), "length": (1, 255), "angle": (-90, 90), "intensity": (0, 1)}),
    "low_light": (low_light, {"gamma": (0.05, 10), "scale": (0, 1), "sigma": (0, 255)}),
    "camera_noise": (camera_noise, {"shot": (1e-8, 1.0), "chroma_blur": (0, 64), "luma_blur": (0, 64)}),
    "correlated_gaussian": (correlated_gaussian, {"sigma": (0, 255)}),
    "gray_gaussian": (gray_gaussian, {"sigma": (0, 255)}),
}
# These return (degraded, clean): they change the target as well, so they may only come first in a chain.
CHANGES_TARGET = {"gray_gaussian"}


@dataclass(frozen=True)
class Degradation:
    """One stage of a :class:`Chain`: applied with probability ``p``."""

    name: str
    p: float
    params: dict

    def __call__(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        return REGISTRY[self.name][0](img, rng, **self.params)

    @property
    def changes_target(self) -> bool:
        return self.name in CHANGES_TARGET


@dataclass(frozen=True)
class OneOf:
    """A mixture: with probability ``p``, exactly one of ``choices``, drawn with ``weights`` (blind training
    over several noise models, e.g. i.i.d. Gaussian or camera noise or a gray photo's noise)."""

    choices: tuple[Degradation, ...]
    weights: tuple[float, ...]
    p: float = 1.0

    def __call__(self, img: np.ndarray, rng: np.random.Generator):
        return self.choices[int(rng.choice(len(self.choices), p=self.weights))](img, rng)

    @property
    def changes_target(self) -> bool:
        return any(c.changes_target for c in self.choices)


def _parse_stage(spec, where: str) -> Degradation:
    if not isinstance(spec, dict) or "name" not in spec:
        raise DegradationError(f"{where}: expected a table with a 'name', got {spec!r}")
    spec = dict(spec)
    name, p = spec.pop("name"), spec.pop("p", 1.0)
    if name not in REGISTRY:
        raise DegradationError(f"{where}: unknown degradation {name!r} (known: {', '.join(REGISTRY)})")
    if not isinstance(p, (int, float)) or not 0 <= p <= 1:
        raise DegradationError(f"{where} {name}: p must be in [0, 1], got {p!r}")
    bounds = REGISTRY[name][1]
    for key, value in spec.items():
        if key not in bounds:
            raise DegradationError(f"{where} {name}: unknown parameter {key!r} (known: {', '.join(bounds)})")
        _check_range(f"{where} {name}.{key}", value, *bounds[key])
    return Degradation(name, float(p), spec)


def _parse_one_of(spec: dict, where: str) -> OneOf:
    """``{one_of = [{name = ...}, ...], weights = [...], p = 1.0}``: weights default to equal."""
    spec = dict(spec)
    choices, weights, p = spec.pop("one_of"), spec.pop("weights", None), spec.pop("p", 1.0)
    if spec:
        raise DegradationError(f"{where}: unknown key(s) {', '.join(map(repr, spec))} beside one_of "
                               f"(known: one_of, weights, p)")
    if not isinstance(choices, list) or not choices:
        raise DegradationError(f"{where}: one_of must be a non-empty list of degradation tables")
    stages = []
    for j, c in enumerate(choices):
        if isinstance(c, dict) and "p" in c:
            raise DegradationError(f"{where}.one_of[{j}]: a choice has no p of its own (use weights)")
        stages.append(_parse_stage(c, f"{where}.one_of[{j}]"))
    weights = [1.0] * len(stages) if weights is None else weights
    if (not isinstance(weights, list) or len(weights) != len(stages) or sum(weights) <= 0
            or not all(isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0 for w in weights)):
        raise DegradationError(f"{where}: weights must be {len(stages)} non-negative numbers with a positive sum, "
                               f"got {weights!r}")
    if not isinstance(p, (int, float)) or not 0 <= p <= 1:
        raise DegradationError(f"{where} one_of: p must be in [0, 1], got {p!r}")
    total = float(sum(weights))
    return OneOf(tuple(stages), tuple(float(w) / total for w in weights), float(p))


class Chain:
    """Degradations applied in order, each with its own probability; output clipped to [0, 1] float32.

    ``bits`` > 0 also rounds the output to that many bits per channel: inputs saved as 8-bit photos are
    clipped *and* quantised, and a model trained on float noise misreads the clipped shadows and highlights.
    A stage that changes the target (``CHANGES_TARGET``, e.g. a gray photo) must come first: ``apply`` then
    returns the target it made.
    """

    def __init__(self, stages: list[Degradation | OneOf], bits: int = 0):
        if not 0 <= bits <= 16:
            raise DegradationError(f"data.bits must be 0 (no rounding) or 1-16, got {bits!r}")
        self.stages, self.levels = list(stages), float(2 ** bits - 1) if bits else 0.0

    @classmethod
    def from_specs(cls, specs: list[dict], source: str = "data.degradations", bits: int = 0) -> "Chain":
        stages = [_parse_one_of(spec, f"{source}[{i}]") if isinstance(spec, dict) and "one_of" in spec
                  else _parse_stage(spec, f"{source}[{i}]") for i, spec in enumerate(specs)]
        for i, stage in enumerate(stages[1:], 1):
            if stage.changes_target:
                raise DegradationError(f"{source}[{i}]: {', '.join(sorted(CHANGES_TARGET))} change the clean "
                                       f"target too, so they must be the first step")
        return cls(stages, bits)

    def apply(self, img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(degraded input, target): the target is ``img`` unless the first stage changed it."""
        out, clean = img.astype(np.float32, copy=True), img
        for stage in self.stages:
            if rng.random() < stage.p:  # always drawn, so one stage's p never shifts another's randomness
                out = stage(out, rng)
                if isinstance(out, tuple):
                    out, clean = out
        out = np.clip(out, 0.0, 1.0)
        if self.levels:
            out = np.round(out * self.levels) / self.levels
        return out.astype(np.float32, copy=False), np.clip(clean, 0.0, 1.0).astype(np.float32, copy=False)

    def __call__(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return self.apply(img, rng)[0]

    def __len__(self) -> int:
        return len(self.stages)


Pipeline = Chain  # the old name, still imported by benchmarks/noise_stats.py


def to_uint8(img: np.ndarray) -> np.ndarray:
    return (np.clip(img, 0, 1) * 255.0 + 0.5).astype(np.uint8)
