"""Training configuration: a dataclass tree read from TOML, with ``key=value`` overrides.

One resolved config describes a run completely; it is written beside every checkpoint
(``config.toml``) so a run can be understood, reproduced or resumed from its folder alone.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from rddm_infer.io.atomic import write_bytes_atomic
from rddm_infer.errors import RDDMError
from rddm_infer.diffusion.schedule import OBJECTIVES, SCHEDULES, SINGLE_OUTPUT
from rddm_infer.diffusion.metadata import MAX_TIMESTEPS
from rddm_infer.restore.tiling import MAX_PIXEL_SHUFFLE

MAX_SATURATION = 4.0  # data.saturation's upper bound: beyond it nearly every colour clips


class ConfigError(RDDMError):
    """A training config (file, override or flag) that cannot be used."""


@dataclass
class ModelSection:
    """Architecture (rddm_infer.model.UNetConfig fields)."""

    dim: int = 32
    dim_mults: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    share_encoder: int = 1
    channels: int = 3
    resnet_block_groups: int = 8
    heads: int = 4
    dim_head: int = 32


@dataclass
class DiffusionSection:
    """Diffusion settings (rddm_infer.diffusion.schedule.DiffusionConfig fields)."""

    timesteps: int = 1000
    sum_scale: float = 0.01
    objective: str = "pred_res_noise"
    alpha_schedule: str = "decreased"
    beta_schedule: str = "increased"


@dataclass
class DataSection:
    """Where training pairs come from and how they are cut."""

    clean: str = ""  # folder (or .flist) of clean images, degraded on the fly
    input: str = ""  # paired mode: degraded inputs (folder or .flist) ...
    gt: str = ""  # ... and their ground truths, matched by file name (or line order for .flist)
    crop: int = 128
    flip: bool = True
    num_workers: int = 2
    bits: int = 0  # 8: clip and round degraded inputs to 8-bit levels, as saved photos are; 0: keep floats
    # colour saturation of each clean crop scaled by a factor drawn from [lo, hi] before it is degraded (input and
    # target alike): vivid photos' sharp colour edges are content, not chroma noise. [1, 1]: off
    saturation: list = field(default_factory=lambda: [1.0, 1.0])
    # [[data.degradations]] tables: {name = "gaussian", p = 1.0, sigma = [0, 50]} (see degradations.REGISTRY)
    degradations: list[dict] = field(default_factory=lambda: [{"name": "gaussian", "p": 1.0, "sigma": [0, 50]}])


@dataclass
class ValSection:
    """A fixed validation set: centre crops degraded with fixed seeds, restored with the few-step sampler."""

    clean: str = ""  # clean images degraded with the training degradations (fixed seeds) ...
    input: str = ""  # ... or a paired set
    gt: str = ""
    count: int = 8
    crop: int = 128
    every: int = 1000
    steps: int = 5
    seed: int = 1234
    pixel_shuffle: int = 1  # restore as `rddm-infer restore --pixel-shuffle` will (2 for real camera photos)
    # early stopping: the run ends once the best validation PSNR is `patience` validations old (patience × every
    # iterations); best_ema.safetensors holds the best weights. 0: off
    patience: int = 0


@dataclass
class RealSection:
    """Real noisy/clean pairs mixed into training, split by scene; the held-out scenes are the validation set.

    A pair's scene is its file name without the trailing ``_N`` (``Canon5D2_5_160_6400_desk_10.JPG`` is scene
    ``Canon5D2_5_160_6400_desk``), see :mod:`rddm_train.real_pairs`."""

    pairs: str = ""  # folder holding noisy/ and clean/ (the same file names); "" = no real pairs
    # scenes never trained on: the validation set, every pair of them (>= 3 scenes, >= 10 pairs; val.count not applied)
    held_out: list = field(default_factory=list)
    ratio: float = 0.25  # share of training samples cut from the real training pairs; the rest are synthetic
    # share of samples that carry a training pair's real noise (noisy - clean of one crop) on a clean photo's crop
    # (data.clean): the cameras' own grain on content the model has not seen with it, so it learns the grain and
    # not the few scenes (see rddm_train.real_pairs.NoiseTransplant); taken from the synthetic share
    transplant: float = 0.0
    real_only: bool = False  # ratio = 1 (no synthetic share) is refused unless this is true: the pairs are few
    gap_count: int = 10  # training pairs (centre crops) also scored at each validation: the train/held-out gap


@dataclass
class OptimSection:
    """Optimisation as the reference trains (Adam, EMA, accumulation, clipping)."""

    lr: float = 8e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    grad_accum: int = 1
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    ema_decay: float = 0.995
    ema_every: int = 10
    ema_start: int = 100  # EMA copies the online weights until this iteration, then warms up
    lr_schedule: str = "constant"  # constant | cosine (decays to lr·min_lr_ratio at run.steps)
    min_lr_ratio: float = 0.05
    # 0: t uniform over [0, T) as the reference trains. K: t drawn from the K-step sampling grid only
    # (999, 799, ... for K = 5): a small model spends its capacity on the steps it will actually run.
    t_grid: int = 0
    # With t_grid = K: x_t comes from the K-step sampler run by the network itself (no gradient through
    # the earlier steps) instead of q_sample, so training sees what inference sees. Costs ~K/2 extra forwards.
    rollout: bool = False


@dataclass
class RunSection:
    """How and where the run executes."""

    out: str = "runs/default"
    steps: int = 10000  # training iterations (optimizer updates); the key keeps its name for users' configs
    batch_size: int = 16
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    threads: int = 0  # torch CPU threads; 0 = torch's default (1 is fastest on a busy shared machine)
    bf16: bool = False
    compile: bool = False
    cuda_graph: bool = False  # capture forward+backward as CUDA graphs: no launch overhead, no compile time
    channels_last: bool = False
    checkpoint_every: int = 1000
    log_every: int = 10
    max_minutes: float = 0.0  # wall-clock budget; 0 = none. A final checkpoint is written when it runs out.
    init: str = ""  # start from these weights (a .safetensors/.pt checkpoint); optimizer and iterations start fresh
    progress: bool = True


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    diffusion: DiffusionSection = field(default_factory=DiffusionSection)
    data: DataSection = field(default_factory=DataSection)
    val: ValSection = field(default_factory=ValSection)
    optim: OptimSection = field(default_factory=OptimSection)
    run: RunSection = field(default_factory=RunSection)
    real: RealSection = field(default_factory=RealSection)
    source = "config"  # the file it was read from, for error messages (a plain attribute: not written, not compared)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def unet_config(self):
        from rddm_infer.model import UNetConfig

        return UNetConfig(**self.to_dict()["model"], condition=True)

    def diffusion_config(self):
        from rddm_infer.diffusion.schedule import DiffusionConfig

        return DiffusionConfig(**self.to_dict()["diffusion"], condition=True)

    def validate(self, source: str | None = None) -> "TrainConfig":
        source = source or self.source
        _check_ranges(self, source)  # every number in its range first: the checks below combine them
        d, m, o = self.diffusion, self.model, self.optim
        sat = self.data.saturation
        checks = [
            (d.objective in OBJECTIVES, f"diffusion.objective must be one of {OBJECTIVES}"),
            (d.alpha_schedule in SCHEDULES and d.beta_schedule in SCHEDULES, f"schedules must be one of {SCHEDULES}"),
            (m.share_encoder in (-1, 0, 1), "model.share_encoder must be -1, 0 or 1"),
            ((m.share_encoder == -1) == (d.objective in SINGLE_OUTPUT),
             f"objective {d.objective} needs {'1 output (share_encoder = -1)' if d.objective in SINGLE_OUTPUT else '2 outputs (share_encoder 0 or 1)'}"),
            (m.dim % m.resnet_block_groups == 0, "model.dim must be a positive multiple of resnet_block_groups"),
            (o.lr_schedule in ("constant", "cosine"), "optim.lr_schedule must be constant or cosine"),
            (o.t_grid <= d.timesteps, f"optim.t_grid must be 0 (uniform t) or 1-{d.timesteps} (sampling steps)"),
            (self.val.steps <= d.timesteps, f"val.steps must be in [1, {d.timesteps}] (diffusion.timesteps)"),
            (not o.rollout or o.t_grid > 0, "optim.rollout needs optim.t_grid = K (the sampler's step count)"),
            (len(sat) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in sat)
             and 0 <= sat[0] <= sat[1] <= MAX_SATURATION,
             f"data.saturation must be [lo, hi] with 0 <= lo <= hi <= {MAX_SATURATION} ([1, 1]: off)"),
            (sat == [1, 1] or not (self.data.input or self.data.gt),
             "data.saturation changes clean photos before they are degraded; paired data (--input/--gt) is "
             "used as it is: set it to [1, 1]"),
        ]
        mult, ps = 2 ** (len(m.dim_mults) - 1), self.val.pixel_shuffle
        checks += [(self.data.crop % mult == 0 and self.val.crop % mult == 0,
                    f"data.crop and val.crop must be multiples of {mult} (the UNet's size multiple)"),
                   (1 <= ps <= MAX_PIXEL_SHUFFLE, f"val.pixel_shuffle must be 1 (off) to {MAX_PIXEL_SHUFFLE}"),
                   (not 1 <= ps <= MAX_PIXEL_SHUFFLE or self.val.crop % (mult * ps) == 0,
                    f"val.crop must be a multiple of {mult * ps} (the size multiple × val.pixel_shuffle)")]
        checks += _real_checks(self)
        for ok, msg in checks:
            if not ok:
                raise ConfigError(f"{source}: {msg}")
        return self


MIN_HELD_OUT_SCENES = 3  # with MIN_HELD_OUT_PAIRS (checked on the files, rddm_train.real_pairs): the floor


def _real_checks(cfg: "TrainConfig") -> list[tuple[bool, str]]:
    """The [real] section's rules that need no files (those that do are :class:`rddm_train.real_pairs.RealPairs`')."""
    r, v, d = cfg.real, cfg.val, cfg.data
    names = [s for s in r.held_out if isinstance(s, str) and s]
    checks = [(r.ratio < 1 or r.real_only,
               "real.ratio = 1 leaves no synthetic share, and the real pairs are few enough to memorise: keep it "
               "below 1, or set real.real_only = true to train on them alone"),
              (r.transplant == 0 or r.ratio + r.transplant < 1,
               f"real.ratio + real.transplant = {r.ratio + r.transplant:g} leaves no synthetic share: keep the sum "
               f"below 1"),
              (r.transplant == 0 or bool(r.pairs), "real.transplant moves real pairs' noise: give real.pairs"),
              (v.patience == 0 or bool(v.clean or v.input or r.pairs),
               "val.patience stops on the validation PSNR: give a validation set (real.pairs, --val or --val-input)")]
    if not r.pairs:
        return checks
    return checks + [
        (len(set(names)) == len(r.held_out), f"real.held_out must list distinct scene names, got {r.held_out!r}"),
        (len(set(names)) >= MIN_HELD_OUT_SCENES,
         f"real.held_out names {len(set(names))} scene(s); at least {MIN_HELD_OUT_SCENES} are held out of training "
         f"to validate on"),
        (not (v.clean or v.input or v.gt),
         "real.pairs validates on its held-out scenes (real.held_out): drop val.clean / val.input / val.gt"),
        (not (d.input or d.gt), "real.pairs mixes real pairs into synthetic degradations of data.clean: drop "
                                "data.input / data.gt"),
    ]


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _ints_at_least_1(v) -> bool:
    return len(v) >= 1 and all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in v)


_AT_LEAST_1, _AT_LEAST_0, _POSITIVE = (lambda v: v >= 1, ">= 1"), (lambda v: v >= 0, ">= 0"), (lambda v: v > 0, "> 0")
# Every numeric key's range (types are checked when the value is read): a value outside it would fail later, deep in
# a convolution or a sampler, or train on silently (a zero crop, a negative learning rate, a NaN decay).
RANGES = {
    "model.dim": _AT_LEAST_1, "model.resnet_block_groups": _AT_LEAST_1, "model.heads": _AT_LEAST_1,
    "model.dim_head": _AT_LEAST_1, "model.channels": (lambda v: v in (1, 3), "1 or 3"),
    "model.dim_mults": (_ints_at_least_1, "a non-empty list of integers >= 1"),
    "diffusion.timesteps": (lambda v: 1 <= v <= MAX_TIMESTEPS, f"in [1, {MAX_TIMESTEPS}]"),
    "diffusion.sum_scale": _POSITIVE,
    "data.crop": _AT_LEAST_1, "data.num_workers": (lambda v: v >= -1, ">= 0, or -1 (from the CPU count)"),
    "data.bits": (lambda v: 0 <= v <= 16, "0 (float inputs) or 1-16"),
    "val.count": _AT_LEAST_1, "val.crop": _AT_LEAST_1, "val.every": _AT_LEAST_1, "val.steps": _AT_LEAST_1,
    "val.seed": _AT_LEAST_0, "val.patience": (lambda v: v >= 0, ">= 0 (0: no early stopping)"),
    "real.ratio": (lambda v: 0 <= v <= 1, "in [0, 1] (the share of real samples)"),
    "real.transplant": (lambda v: 0 <= v < 1, "in [0, 1) (the share of samples with transplanted real noise)"),
    "real.gap_count": _AT_LEAST_0,
    "optim.lr": _POSITIVE, "optim.grad_accum": _AT_LEAST_1, "optim.grad_clip": (lambda v: v >= 0, ">= 0 (0: off)"),
    "optim.betas": (lambda v: len(v) == 2 and all(_is_number(x) and 0 <= x < 1 for x in v), "two numbers in [0, 1)"),
    "optim.ema_decay": (lambda v: 0 <= v < 1, "in [0, 1)"), "optim.ema_every": _AT_LEAST_1,
    "optim.ema_start": _AT_LEAST_0, "optim.min_lr_ratio": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "optim.t_grid": (lambda v: v >= 0, ">= 0 (0: uniform t)"),
    "run.steps": _AT_LEAST_0, "run.batch_size": _AT_LEAST_1, "run.seed": _AT_LEAST_0,
    "run.threads": (lambda v: v >= 0, ">= 0 (0: torch's default)"), "run.checkpoint_every": _AT_LEAST_1,
    "run.log_every": _AT_LEAST_1, "run.max_minutes": (lambda v: v >= 0, ">= 0 (0: no limit)"),
}


def _check_ranges(cfg: "TrainConfig", source: str) -> None:
    """One line naming the first key whose value is out of its range (or not a finite number)."""
    for key, (ok, text) in RANGES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{source}: {key} must be a finite number, got {value!r}")
        if not ok(value):
            raise ConfigError(f"{source}: {key} must be {text}, got {value!r}")


SECTIONS = {"model": ModelSection, "diffusion": DiffusionSection, "data": DataSection, "val": ValSection,
            "optim": OptimSection, "run": RunSection, "real": RealSection}


def _coerce(value, default, where: str):
    """Match a TOML value to the field's type (ints where floats are expected are fine)."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, (int, float, str, list)) and not isinstance(value, type(default)):
        raise ConfigError(f"{where}: expected {type(default).__name__}, got {value!r}")
    return value


def from_dict(raw: dict, source: str = "config") -> TrainConfig:
    """Build a config from nested dicts, refusing unknown sections and keys (typos are errors)."""
    cfg = TrainConfig()
    for section, values in raw.items():
        if section not in SECTIONS or not isinstance(values, dict):
            raise ConfigError(f"{source}: unknown section [{section}] (known: {', '.join(SECTIONS)})")
        fields = {f.name for f in dataclasses.fields(SECTIONS[section])}
        target = getattr(cfg, section)
        for key, value in values.items():
            if key not in fields:
                raise ConfigError(f"{source}: unknown key {section}.{key} (known: {', '.join(fields)})")
            setattr(target, key, _coerce(value, getattr(target, key), f"{source}: {section}.{key}"))
    cfg.source = source
    return cfg


def packaged_configs() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("rddm_train").joinpath("configs").iterdir()
                  if p.name.endswith(".toml"))


def read_file(path: str | os.PathLike) -> dict:
    """A TOML (or JSON) file, or the name of a packaged config such as ``default_denoiser``."""
    p = Path(path)
    if not p.is_file() and str(path) in packaged_configs():
        p = Path(str(resources.files("rddm_train").joinpath("configs", f"{path}.toml")))
    if not p.is_file():
        raise ConfigError(f"{path}: no such config file (packaged configs: {', '.join(packaged_configs())})")
    text = p.read_text()
    try:
        return json.loads(text) if p.suffix == ".json" else tomllib.loads(text)
    except (tomllib.TOMLDecodeError, ValueError) as e:
        raise ConfigError(f"{p}: not valid {'JSON' if p.suffix == '.json' else 'TOML'} ({e})") from None


def parse_override(item: str) -> tuple[str, str, Any]:
    """``section.key=value`` with a TOML value; bare words are taken as strings."""
    if "=" not in item or "." not in item.split("=", 1)[0]:
        raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. optim.lr=1e-4")
    key, text = item.split("=", 1)
    section, name = key.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    return section, name, value


def load(path: str | os.PathLike | None = None, overrides: list[str] = (), **flags) -> TrainConfig:
    """Config file (optional) + ``--set`` overrides + first-class flags (``section.key`` -> value, None = unset)."""
    raw: dict = read_file(path) if path else {}
    merged = {s: dict(v) if isinstance(v, dict) else v for s, v in raw.items()}
    updates = [parse_override(o) for o in overrides]
    updates += [(*k.split(".", 1), v) for k, v in flags.items() if v is not None]
    for section, name, value in updates:
        if not isinstance(merged.setdefault(section, {}), dict):
            raise ConfigError(f"override {section}.{name}: [{section}] is not a section")
        merged[section][name] = value
    return from_dict(merged, str(path) if path else "config").validate(str(path) if path else "config")


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def to_toml(cfg: TrainConfig) -> str:
    lines = []
    for section, values in cfg.to_dict().items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
        lines.append("")
    return "\n".join(lines)


def save(cfg: TrainConfig, path: str | os.PathLike) -> Path:
    """Write the resolved config atomically (TOML that :func:`load` reads back to an equal config)."""
    return write_bytes_atomic(path, to_toml(cfg).encode())
