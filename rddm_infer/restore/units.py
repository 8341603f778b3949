"""Network inputs of images in flight, batched across images.

An image becomes a :class:`Work`: its network inputs ("parts": the padded image, or its pixel-shuffle sub-images
and self-ensemble views), each either whole or cut into overlapping tiles. Every whole part or tile is one
:class:`Unit`. A :class:`BatchQueue` groups units of the same shape and sampling plan, from any number of images,
and runs them ``batch`` at a time, so a GPU sees full batches even when each image has one or two tiles.

Each unit carries its own crop of its image's seeded noise, and a tiled part blends its tiles' outputs in tile
order, so pixels depend on which units share a call only through the engine's own rounding (none for the built-in
model on ONNX Runtime; about 1e-6 at batch 1 on some graphs). Which units share a call depends on the inputs and
settings alone (:class:`BatchQueue`), so the sequential and overlapped executors give the same bytes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..diffusion.engine_sampler import Noise
from ..errors import RDDMError
from .tiling import Tile, TiledBlend


@dataclass
class Part:
    """One network input of an image (whole, or tiled when larger than the tile) and its output(s) once run. Tile
    outputs are kept and blended by ``output`` (in the writer thread of the overlapped executor, not the engine's)."""
    x: np.ndarray  # (C, H, W), padded
    noise: Noise
    blend: TiledBlend | None = None
    ys: list | None = None  # per unit: the whole output, or one per tile in tile order

    def output(self) -> np.ndarray:
        if self.blend is None:
            return self.ys[0]
        for t, y in zip(self.blend.tiles, self.ys):  # tile order: the float sums of batch 1
            self.blend.add(t, y)
        self.ys = None
        return self.blend.result()


@dataclass(eq=False)
class Unit:
    """One sample of an engine call: a whole part, or one tile of it."""
    work: "Work"
    part: Part
    tile: Tile | None
    slot: int = 0  # this unit's place in ``part.ys``

    @property
    def x(self) -> np.ndarray:
        return self.part.x if self.tile is None else self.part.blend.crop(self.tile)

    @property
    def noise(self) -> Noise:
        return self.part.noise if self.tile is None else self.part.noise.crop((slice(None), *self.tile.slices))

    @property
    def key(self) -> tuple:
        """Units with one key can share an engine call: same input shape, same sampling plan."""
        return self.x.shape, id(self.work.plan)

    def put(self, y: np.ndarray) -> None:
        self.part.ys[self.slot] = y


class Work:
    """One image between decoding and finishing: its mode, plan and parts, and how many of its units are left.
    ``seconds`` is its share of the engine calls it was in; ``error`` an engine error that failed it."""

    def __init__(self, img, mode, plan, parts: list[tuple[np.ndarray, Noise]], *, tile: int, overlap: int,
                 multiple: int):
        self.img, self.mode, self.plan = img, mode, plan  # an io.images.Image, a restore.mode.Mode, a SamplingPlan
        self.seconds, self.error = 0.0, None
        self.parts: list[Part] = []
        self.units: list[Unit] = []
        for x, noise in parts:
            if max(x.shape[-2:]) <= tile:
                part = Part(x, noise, ys=[None])
                self.units.append(Unit(self, part, None))
            else:
                part = Part(x, noise, TiledBlend(x, tile=tile, overlap=overlap, multiple=multiple))
                part.ys = [None] * len(part.blend.tiles)
                self.units += [Unit(self, part, t, j) for j, t in enumerate(part.blend.tiles)]
            self.parts.append(part)
        self.left = len(self.units)

    @property
    def tiled(self) -> bool:
        return any(p.blend is not None for p in self.parts)

    @property
    def done(self) -> bool:
        return self.left == 0

    def outputs(self) -> list[np.ndarray]:
        return [p.output() for p in self.parts]

    def release(self) -> None:
        """Drop the parts and units (which point back here): what is left is the decoded image and the result."""
        self.parts, self.units = [], []


class BatchQueue:
    """Works with units left to run, by input index. ``run`` makes one engine call: the oldest work's next unit, and
    after it the next units of the same key from the works of the window (that work and the ``batch - 1`` after it),
    up to ``batch``. Which units share a call thus depends on the inputs and settings only, never on which reader
    finished first, so the sequential and overlapped paths make the same calls, and give the same bytes even on an
    engine whose batch-1 kernels round differently from its batched ones."""

    def __init__(self, restorer, on_tile: Callable[[int, int], None] | None = None):
        self.restorer = restorer  # rddm_infer.restore.arrays.ImageRestorer: the engine call and the batch size
        self.on_tile = on_tile
        self.works: dict[int, Work] = {}  # index -> a work with units left
        self.pending: dict[int, list[Unit]] = {}

    def __len__(self) -> int:
        return len(self.works)

    def add(self, work: Work, index: int | None = None) -> None:
        index = max(self.works, default=-1) + 1 if index is None else index
        self.works[index], self.pending[index] = work, list(work.units)

    def window(self) -> range:
        """The input indices the next call may draw from (call only when not empty)."""
        first = min(self.works)
        return range(first, first + self.restorer.batch)

    def _next_call(self) -> list[tuple[int, Unit]]:
        first = min(self.works)
        key = self.pending[first][0].key
        picked = [(i, u) for i in sorted(i for i in self.works if i < first + self.restorer.batch)
                  for u in self.pending[i] if u.key == key]
        return picked[:self.restorer.batch]

    def run(self) -> list[tuple[int, Work]]:
        """One engine call; returns the works it finished, with their indices (or failed: an engine error fails every
        image in the call, and their other units leave the queue)."""
        picked = self._next_call()
        units = [u for _, u in picked]
        taken = {id(u) for u in units}
        for i in dict.fromkeys(i for i, _ in picked):
            self.pending[i] = [u for u in self.pending[i] if id(u) not in taken]
        works = {i: self.works[i] for i, _ in picked}
        t = time.perf_counter()
        try:
            ys = self.restorer.run_units(units)
        except RDDMError as e:
            for i, w in works.items():
                w.error, w.left = e, 0
                self._remove(i)
            return list(works.items())
        share = (time.perf_counter() - t) / len(units)
        for u, y in zip(units, ys):
            u.put(y)
            u.work.left -= 1
            u.work.seconds += share
        for i, w in works.items():
            if self.on_tile and len(w.units) > 1:
                self.on_tile(len(w.units) - w.left, len(w.units))
            if w.done:
                self._remove(i)
        return [(i, w) for i, w in works.items() if w.done]

    def _remove(self, i: int) -> None:
        del self.works[i], self.pending[i]
