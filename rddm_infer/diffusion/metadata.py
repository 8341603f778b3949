"""The self-description every exported artifact carries, so the runtime needs no other file.

Stored as one JSON string under the key ``rddm``: in ONNX ``metadata_props`` and in the
length-prefixed header of our TensorRT engine files.
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass, field, asdict, replace

from ..errors import CheckpointError, OptionError
from .graph_kinds import GRAPH_KINDS, GraphKind, graph_kind
from .schedule import DiffusionConfig, SamplingPlan, eta_problem

META_KEY = "rddm"
FORMAT = "rddm-infer/1"
MAX_TIMESTEPS = 100_000  # the schedule tables are this long; metadata beyond it is corrupt or hostile
MAX_STEPS = 1000
MAX_SIZE_MULTIPLE = 4096


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def metadata_problem(d: dict) -> str:
    """The first field of a metadata dict with a wrong type or an absurd value ('' when all are sane):
    artifacts come from files, and a list where a number belongs must be one line, not a traceback."""
    for name in ("unet", "diffusion", "extra"):
        if name in d and not isinstance(d[name], dict):
            return f"{name} must be an object, got {type(d[name]).__name__}"
    for name in ("graph", "precision", "channel_order", "source", "format"):
        if name in d and not isinstance(d[name], str):
            return f"{name} must be a string, got {type(d[name]).__name__}"
    unet, diff = d.get("unet", {}), d.get("diffusion", {})
    steps, eta, multiple = d.get("steps", 5), d.get("eta", 0.0), d.get("size_multiple", 8)
    in_range, channels = d.get("input_range", (-1.0, 1.0)), unet.get("channels", 3)
    timesteps, sum_scale = diff.get("timesteps", 1000), diff.get("sum_scale", 0.01)
    checks = [
        (_is_int(steps) and 1 <= steps <= MAX_STEPS, f"steps must be an integer in [1, {MAX_STEPS}]", steps),
        (_is_number(eta) and eta >= 0, "eta must be a finite number >= 0", eta),
        (_is_int(multiple) and 1 <= multiple <= MAX_SIZE_MULTIPLE,
         f"size_multiple must be an integer in [1, {MAX_SIZE_MULTIPLE}]", multiple),
        (isinstance(in_range, (list, tuple)) and len(in_range) == 2 and all(_is_number(v) for v in in_range),
         "input_range must be two numbers", in_range),
        (_is_int(channels) and channels in (1, 3), "unet.channels must be 1 or 3", channels),
        (_is_int(timesteps) and 1 <= timesteps <= MAX_TIMESTEPS,
         f"diffusion.timesteps must be an integer in [1, {MAX_TIMESTEPS}]", timesteps),
        (_is_number(sum_scale) and sum_scale > 0, "diffusion.sum_scale must be a finite number > 0", sum_scale),
    ]
    checks += [(isinstance(diff.get(k, ""), str), f"diffusion.{k} must be a string", diff.get(k))
               for k in ("objective", "alpha_schedule", "beta_schedule", "time_input")]
    for ok, msg, value in checks:
        if not ok:
            return f"{msg}, got {value!r}"
    return attention_problem(d.get("attention"))


ATTENTION_KINDS = ("full", "linear")  # full: a tokens² matrix per head; linear: tokens × dim_head only
ATTENTION_FIELDS = ("downscale", "heads", "dim_head", "channels", "count")


def attention_problem(layers) -> str:
    """What is wrong with an ``attention`` layout ('' when nothing or absent): a list of
    {kind, downscale, heads, dim_head, channels, count}, as ``rddm_infer.model.attention_layout`` measures it."""
    if layers is None:
        return ""
    if not isinstance(layers, list):
        return f"attention must be a list, got {type(layers).__name__}"
    for layer in layers:
        if not isinstance(layer, dict) or layer.get("kind") not in ATTENTION_KINDS or not all(
                _is_int(layer.get(k)) and 1 <= layer[k] <= 1 << 20 for k in ATTENTION_FIELDS):
            return (f"attention entries need kind (full|linear) and positive integers "
                    f"{', '.join(ATTENTION_FIELDS)}, got {repr(layer)[:120]}")
    return ""


@dataclass
class ArtifactMeta:
    graph: str  # a graph kind: unet | step | fused (rddm_infer.diffusion.graph_kinds)
    unet: dict  # UNetConfig.to_dict()
    diffusion: dict  # DiffusionConfig.to_dict()
    steps: int = 5  # built in where the kind bakes the plan in (fused); else the default for run time
    eta: float = 0.0
    precision: str = "fp32"
    size_multiple: int = 8
    channel_order: str = "RGB"
    input_range: tuple = (-1.0, 1.0)
    source: str = ""
    format: str = FORMAT
    extra: dict = field(default_factory=dict)
    # unet/step: the fewest steps within 0.05 dB of the best, measured (benchmarks.eval_denoise --steps);
    # the run-time default when set. None: not measured (older artifacts), ``steps`` is the default.
    recommended_steps: int | None = None
    # How this network restores correlated (camera) noise best, measured on real pairs (benchmarks.noise_mode
    # --write-mode): a label of rddm_infer.restore.mode.MODES. None: not measured; the runtime's default applies.
    correlated_noise_mode: str | None = None
    # Every attention layer, measured at export (ATTENTION_FIELDS): what the memory estimate of a tile reads
    # (rddm_infer.restore.memory). None: an older artifact; the estimate then derives it from ``unet``.
    attention: list | None = None

    def __post_init__(self):
        if self.graph not in GRAPH_KINDS:
            raise CheckpointError(f"unknown graph kind {self.graph!r}")
        if self.recommended_steps is not None and not (isinstance(self.recommended_steps, int)
                                                       and self.recommended_steps >= 1):
            raise CheckpointError(f"recommended_steps must be a positive integer, got {self.recommended_steps!r}")
        if self.correlated_noise_mode is not None and not isinstance(self.correlated_noise_mode, str):
            raise CheckpointError(f"correlated_noise_mode must be a mode's name, got {self.correlated_noise_mode!r}")
        self.input_range = tuple(self.input_range)

    @property
    def config(self) -> DiffusionConfig:
        return DiffusionConfig.from_dict(self.diffusion)

    @property
    def channels(self) -> int:
        return int(self.unet.get("channels", 3))

    @property
    def num_outputs(self) -> int:
        return 1 if self.unet.get("share_encoder") == -1 else 2

    @property
    def kind(self) -> GraphKind:
        """The artifact's graph kind (its contract, its facts and its driver)."""
        return graph_kind(self.graph)

    @property
    def steps_recommended(self) -> bool:
        """Whether the default step count is the measured recommendation (set, and the kind does not bake
        its steps in); otherwise it is ``steps``."""
        return self.recommended_steps is not None and not self.kind.bakes_plan

    @property
    def default_steps(self) -> int:
        """Steps when none are asked for: the measured recommendation, except where the kind bakes them in."""
        return self.recommended_steps if self.steps_recommended else self.steps

    def contract_problem(self, inputs: dict, outputs: dict) -> str:
        """What a loaded graph with these inputs / outputs ({name: (rank or None, dtype)}) breaks of its kind's
        contract ('' when nothing): :meth:`GraphKind.contract_problem` with this artifact's facts."""
        kind = self.kind
        return kind.contract_problem(inputs, outputs, bool(kind.optional_inputs) and self.plan().stochastic,
                                     self.num_outputs, self.diffusion.get("time_input", "index"))

    def plan(self, steps: int | None = None, eta: float | None = None) -> SamplingPlan:
        return SamplingPlan.create(self.config, self.default_steps if steps is None else steps,
                                   self.eta if eta is None else eta)

    def with_sampling(self, steps: int | None = None, eta: float | None = None) -> "ArtifactMeta":
        """This artifact with run-time steps / η (a kind that bakes the plan in, fused, refuses others).
        A step count asked for replaces the measured recommendation as the default."""
        if steps is None and eta is None:
            return self
        if eta is not None and (problem := eta_problem(self.config, eta)):
            raise OptionError(f"--{problem}")
        if self.kind.bakes_plan and ((steps is not None and steps != self.steps) or
                                     (eta is not None and eta != self.eta)):
            raise OptionError(f"this {self.graph} model has steps={self.steps} and eta={self.eta} built in; "
                              f"export a 'step' graph to choose them at run time")
        try:
            self.plan(steps, eta)
        except ValueError as e:
            raise OptionError(str(e)) from None
        if steps is None:
            return replace(self, eta=eta)
        return replace(self, steps=steps, eta=self.eta if eta is None else eta, recommended_steps=None)

    def to_json(self) -> str:
        d = asdict(self)
        d["input_range"] = list(self.input_range)
        d["times"] = list(self.plan(self.steps).times)
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
        problem = metadata_problem(known)
        if problem:
            raise CheckpointError(f"{where}: invalid '{META_KEY}' metadata: {problem}")
        try:
            meta = cls(**known)
            meta.plan()  # the schedule and time grid must exist for these values
        except TypeError as e:
            raise CheckpointError(f"{where}: incomplete '{META_KEY}' metadata ({e})") from None
        except (ValueError, IndexError, OverflowError) as e:
            raise CheckpointError(f"{where}: invalid '{META_KEY}' metadata: {e}") from None
        except CheckpointError as e:
            raise CheckpointError(f"{where}: {e}") from None
        return meta
