"""The self-description every exported artifact carries, so the runtime needs no other file.

Stored as one JSON string under the key ``rddm``: in ONNX ``metadata_props`` and in the
length-prefixed header of our TensorRT engine files.
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass, field, asdict

from .errors import CheckpointError
from .schedule import DiffusionConfig, SamplingPlan

META_KEY = "rddm"
FORMAT = "rddm-infer/1"
GRAPH_KINDS = ("unet", "step", "fused")
MAX_TIMESTEPS = 100_000  # the schedule tables are this long; metadata beyond it is corrupt or hostile
MAX_STEPS = 1000
MAX_SIZE_MULTIPLE = 4096


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class ArtifactMeta:
    graph: str  # unet | step | fused
    unet: dict  # UNetConfig.to_dict()
    diffusion: dict  # DiffusionConfig.to_dict()
    steps: int = 5  # fused: baked in; unet/step: the default for run time
    eta: float = 0.0
    precision: str = "fp32"
    size_multiple: int = 8
    channel_order: str = "RGB"
    input_range: tuple = (-1.0, 1.0)
    source: str = ""
    format: str = FORMAT
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.graph, str) or self.graph not in GRAPH_KINDS:
            raise CheckpointError(f"unknown graph kind {self.graph!r}")
        problem = self._problem()
        if problem:
            raise CheckpointError(f"invalid '{META_KEY}' metadata: {problem}")
        self.input_range = tuple(self.input_range)
        try:
            self.plan()
        except (ValueError, TypeError, IndexError, OverflowError) as e:
            raise CheckpointError(f"invalid '{META_KEY}' metadata: {e}") from None

    def _problem(self) -> str:
        """The first field with a wrong type or an absurd value ('' when all are sane)."""
        for name in ("unet", "diffusion", "extra"):
            if not isinstance(getattr(self, name), dict):
                return f"{name} must be an object, got {type(getattr(self, name)).__name__}"
        for name in ("precision", "channel_order", "source", "format"):
            if not isinstance(getattr(self, name), str):
                return f"{name} must be a string, got {type(getattr(self, name)).__name__}"
        d = self.diffusion
        checks = [
            (_is_int(self.steps) and 1 <= self.steps <= MAX_STEPS, f"steps must be an integer in [1, {MAX_STEPS}]",
             self.steps),
            (_is_number(self.eta) and self.eta >= 0, "eta must be a finite number >= 0", self.eta),
            (_is_int(self.size_multiple) and 1 <= self.size_multiple <= MAX_SIZE_MULTIPLE,
             f"size_multiple must be an integer in [1, {MAX_SIZE_MULTIPLE}]", self.size_multiple),
            (isinstance(self.input_range, (list, tuple)) and len(self.input_range) == 2
             and all(_is_number(v) for v in self.input_range), "input_range must be two numbers", self.input_range),
            (_is_int(self.unet.get("channels", 3)) and self.unet.get("channels", 3) in (1, 3),
             "unet.channels must be 1 or 3", self.unet.get("channels")),
            (_is_int(d.get("timesteps", 1000)) and 1 <= d.get("timesteps", 1000) <= MAX_TIMESTEPS,
             f"diffusion.timesteps must be an integer in [1, {MAX_TIMESTEPS}]", d.get("timesteps")),
            (_is_number(d.get("sum_scale", 0.01)) and d.get("sum_scale", 0.01) > 0,
             "diffusion.sum_scale must be a finite number > 0", d.get("sum_scale")),
        ]
        checks += [(isinstance(d.get(k, ""), str), f"diffusion.{k} must be a string", d.get(k))
                   for k in ("objective", "alpha_schedule", "beta_schedule")]
        for ok, msg, value in checks:
            if not ok:
                return f"{msg}, got {value!r}"
        return ""

    @property
    def config(self) -> DiffusionConfig:
        return DiffusionConfig.from_dict(self.diffusion)

    @property
    def channels(self) -> int:
        return int(self.unet.get("channels", 3))

    @property
    def num_outputs(self) -> int:
        return 1 if self.unet.get("share_encoder") == -1 else 2

    def plan(self, steps: int | None = None, eta: float | None = None) -> SamplingPlan:
        return SamplingPlan.create(self.config, self.steps if steps is None else steps, self.eta if eta is None else eta)

    def to_json(self) -> str:
        d = asdict(self)
        d["input_range"] = list(self.input_range)
        d["times"] = list(self.plan().times)
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str = "artifact") -> "ArtifactMeta":
        try:
            d = json.loads(text)
        except ValueError:
            raise CheckpointError(f"{where}: '{META_KEY}' metadata is not valid JSON") from None
        if not isinstance(d, dict) or not str(d.get("format", "")).startswith("rddm-infer/"):
            raise CheckpointError(f"{where}: not an rddm-infer artifact (no '{META_KEY}' format tag)")
        d.pop("times", None)
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        try:
            return cls(**known)
        except TypeError as e:
            raise CheckpointError(f"{where}: incomplete '{META_KEY}' metadata ({e})") from None
        except CheckpointError as e:
            raise CheckpointError(f"{where}: {e}") from None
