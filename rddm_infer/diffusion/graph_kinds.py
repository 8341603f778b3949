"""The ONNX graph contract in one place: each graph kind's inputs, outputs and dynamic axes.

The exporter (names and axes it traces with), the validator and every runner read these
tables, so a new input or a renamed output is one edit here (docs/ARCHITECTURE.md shows
the same contract as a table).
"""

from __future__ import annotations

from dataclasses import dataclass

IMAGE_AXES = {0: "batch", 2: "height", 3: "width"}  # (B, C, H, W)
AXES = {"t": {0: "batch"}, "coef": {}, "step_noise": {1: "batch", 3: "height", 4: "width"}}  # others: IMAGE_AXES


@dataclass(frozen=True)
class GraphKind:
    name: str
    inputs: tuple[str, ...]  # in contract order
    outputs: tuple[str, ...]  # all possible outputs, in order
    carry: tuple[str, str] | None = None  # (input, output) fed back between calls of one run
    optional_inputs: tuple[str, ...] = ()  # present only in some graphs of the kind (e.g. η > 0)

    def input_names(self, stochastic: bool = False) -> tuple[str, ...]:
        """The inputs a graph of this kind has (``step_noise`` only when its plan is stochastic)."""
        return self.inputs + (self.optional_inputs if stochastic else ())

    def output_names(self, num_outputs: int = 2) -> tuple[str, ...]:
        """A ``unet`` graph has one output per network output; the others have fixed outputs."""
        return self.outputs[:num_outputs] if self.name == "unet" else self.outputs


KINDS = {
    "unet": GraphKind("unet", ("x_t", "x_input", "t"), ("out0", "out1")),
    "step": GraphKind("step", ("x_t", "x_input", "coef", "noise"), ("x_next", "x0"), carry=("x_t", "x_next")),
    "fused": GraphKind("fused", ("x_input", "noise"), ("x0",), optional_inputs=("step_noise",)),
}
GRAPH_KINDS = tuple(KINDS)


def graph_kind(name: str) -> GraphKind:
    try:
        return KINDS[name]
    except KeyError:
        raise ValueError(f"unknown graph kind {name!r}; expected one of {', '.join(GRAPH_KINDS)}") from None


def time_dims(time_input: str) -> tuple[int, ...]:
    """Trailing dims of a ``unet`` graph's ``t`` after the batch: none for the index t, (2,) for the
    "scaled" pair (ᾱ_t·T, β̄_t·T) (rddm_infer.diffusion.schedule.TIME_INPUTS)."""
    return (2,) if time_input == "scaled" else ()


def dynamic_axes(name: str) -> dict[int, str]:
    """Which axes of the input/output ``name`` are dynamic, and what they are called."""
    return dict(AXES.get(name, IMAGE_AXES))
