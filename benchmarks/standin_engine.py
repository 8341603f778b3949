"""A stand-in engine of fixed latency, for measuring the file pipeline around the network.

On 2 CPU cores any real UNet dominates the wall time (a dim-8 model takes seconds per 2 MP image, against ~40 ms of
JPEG decode and encode), so the overlap of decode, engine and encode cannot show. This runner has the built-in
model's metadata (graph kind, size multiple, memory estimate) but each call only sleeps, releasing the GIL as a
GPU call does, and returns its input. Test and benchmark use only: its outputs are not restorations.
"""

from __future__ import annotations

import time

from rddm_infer.backends.base import Runner


class StandInRunner(Runner):
    """Sleeps ``latency_s + per_sample_s × batch`` per call; every output is the carried input (``x_t``)."""

    name = "stand-in"

    def __init__(self, meta, latency_s: float, per_sample_s: float = 0.0):
        super().__init__(meta)
        self.latency_s, self.per_sample_s = latency_s, per_sample_s
        self.calls: list[int] = []  # the batch size of every call

    @classmethod
    def like(cls, model=None, latency_s: float = 0.01, per_sample_s: float = 0.0) -> "StandInRunner":
        """With the metadata of ``model`` (default: the built-in one)."""
        from rddm_infer.backends import read_artifact_meta
        from rddm_infer.backends.select import resolve_model

        return cls(read_artifact_meta(resolve_model(model)), latency_s, per_sample_s)

    @property
    def description(self) -> str:
        return f"stand-in engine ({self.latency_s * 1e3:g} ms + {self.per_sample_s * 1e3:g} ms per sample, sleeping)"

    def infer(self, feeds):
        x = feeds[self.meta.kind.inputs[0]]
        self.calls.append(len(x))
        time.sleep(self.latency_s + self.per_sample_s * len(x))
        return {name: x for name in self.meta.kind.outputs}
