"""The exported graph of one kind around a network: the kind's own wrapper, built for one sampling plan.

The wrappers themselves (unet / step / fused) live with their kinds (:mod:`rddm_infer.diffusion.graph_kinds`
names each one; the torch modules are in :mod:`rddm_infer.model.graphs`), so nothing here depends on the kind.
"""

from __future__ import annotations

from torch import nn

from rddm_infer.diffusion.graph_kinds import graph_kind
from rddm_infer.diffusion.schedule import DiffusionConfig, SamplingPlan


def build_graph(net: nn.Module, diffusion: DiffusionConfig, kind: str, num_outputs: int, steps: int = 5,
                eta: float = 0.0, concat: bool | None = None) -> nn.Module:
    """The wrapper module for one graph kind (``concat``: the network takes x_input as channels;
    default ``diffusion.condition``); ``steps`` / ``eta`` make the plan a kind that bakes it in is built for."""
    return graph_kind(kind).build(net, SamplingPlan.create(diffusion, steps, eta), num_outputs, concat)

