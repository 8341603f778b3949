"""The self-description every exported artifact carries, so the runtime needs no other file.

Stored as one JSON string under the key ``rddm``: in ONNX ``metadata_props`` and in the
length-prefixed header of our TensorRT engine files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, asdict

from .errors import CheckpointError
from .graph_kinds import GRAPH_KINDS
from .schedule import DiffusionConfig, SamplingPlan

META_KEY = "rddm"
FORMAT = "rddm-infer/1"


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
        if self.graph not in GRAPH_KINDS:
            raise CheckpointError(f"unknown graph kind {self.graph!r}")
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
