"""Any image size for a fixed-stride network: reflect padding, overlapping tiles, seamless blending.

Tiles overlap by ``overlap`` pixels; each tile's contribution is weighted by a
raised-cosine ramp across the overlap on the sides it shares with a neighbour
(flat elsewhere, so image borders are never darkened), and the weighted sum is
divided by the summed weights. Seams therefore fade instead of stepping.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

DEFAULT_TILE = 512  # the lead may tune this for the default model
DEFAULT_OVERLAP = 32
MAX_PIXEL_SHUFFLE = 4  # beyond 4 the sub-images lose the detail that tells noise from content


def pad_to_multiple(x: np.ndarray, multiple: int) -> np.ndarray:
    """Reflect-pad the last two axes (bottom/right) up to multiples of ``multiple``."""
    h, w = x.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    if not (ph or pw):
        return x
    pad = [(0, 0)] * (x.ndim - 2) + [(0, ph), (0, pw)]
    return np.pad(x, pad, mode="reflect" if min(h, w) > 1 else "edge")


def shuffle_index(s: int) -> list[tuple]:
    """Pixel-shuffle downsampling: the index of each of the s² sub-images of every s-th pixel (last two axes),
    row-major by offset (dy, dx). Real camera noise is correlated between neighbouring pixels, not s pixels apart."""
    return [(Ellipsis, slice(dy, None, s), slice(dx, None, s)) for dy in range(s) for dx in range(s)]


def shuffle_split(x: np.ndarray, s: int) -> list[np.ndarray]:
    """The s² sub-images of ``x`` (last two axes multiples of ``s``), each contiguous."""
    return [np.ascontiguousarray(x[i]) for i in shuffle_index(s)]


def shuffle_merge(parts: list[np.ndarray], s: int) -> np.ndarray:
    """The inverse of :func:`shuffle_split`: sub-images interleaved back into one array."""
    *lead, h, w = parts[0].shape
    out = np.empty((*lead, h * s, w * s), parts[0].dtype)
    for i, p in zip(shuffle_index(s), parts):
        out[i] = p
    return out


# Self-ensemble views (transpose, flip rows, flip columns): the first 1, 2, 4 or 8 (ENSEMBLE_SIZES) are used.
ENSEMBLE_VIEWS = [(t, fh, fw) for t in (False, True) for fh in (False, True) for fw in (False, True)]
ENSEMBLE_SIZES = (1, 2, 4, 8)


def to_view(a: np.ndarray, view: tuple[bool, bool, bool]) -> np.ndarray:
    """``a`` (last two axes spatial) seen in a self-ensemble view: transposed, then flipped."""
    t, fh, fw = view
    a = np.swapaxes(a, -1, -2) if t else a
    return np.ascontiguousarray(a[..., ::-1 if fh else 1, ::-1 if fw else 1])


def from_view(a: np.ndarray, view: tuple[bool, bool, bool]) -> np.ndarray:
    """The inverse of :func:`to_view`."""
    t, fh, fw = view
    a = a[..., ::-1 if fh else 1, ::-1 if fw else 1]
    return np.swapaxes(a, -1, -2) if t else a


def _starts(length: int, tile: int, overlap: int) -> list[int]:
    if length <= tile:
        return [0]
    stride = max(tile - overlap, 1)
    starts = list(range(0, length - tile, stride))
    return starts + [length - tile]


@dataclass(frozen=True)
class Tile:
    y: int
    x: int
    h: int
    w: int

    @property
    def slices(self) -> tuple[slice, slice]:
        return slice(self.y, self.y + self.h), slice(self.x, self.x + self.w)


def tile_grid(height: int, width: int, tile: int, overlap: int, multiple: int = 1) -> list[Tile]:
    """Tiles covering (height, width); tile sides are multiples of ``multiple`` (the input is padded)."""
    tile = max(multiple, tile - tile % multiple)
    overlap = min(overlap, tile // 2)
    th, tw = min(tile, height), min(tile, width)
    return [Tile(y, x, th, tw) for y in _starts(height, th, overlap) for x in _starts(width, tw, overlap)]


def _ramp(n: int, overlap: int, lead: bool, trail: bool) -> np.ndarray:
    w = np.ones(n, dtype=np.float32)
    if overlap <= 0:
        return w
    r = 0.5 - 0.5 * np.cos(np.pi * (np.arange(overlap, dtype=np.float32) + 0.5) / overlap)
    if lead:
        w[:overlap] = np.minimum(w[:overlap], r)
    if trail:
        w[n - overlap:] = np.minimum(w[n - overlap:], r[::-1])
    return w


def blend_weight(t: Tile, height: int, width: int, overlap: int) -> np.ndarray:
    """(h, w) weights: ramps only on the sides that touch another tile."""
    oy, ox = min(overlap, t.h // 2), min(overlap, t.w // 2)
    wy = _ramp(t.h, oy, t.y > 0, t.y + t.h < height)
    wx = _ramp(t.w, ox, t.x > 0, t.x + t.w < width)
    return wy[:, None] * wx[None, :]


def batched(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), max(size, 1)):
        yield items[i:i + max(size, 1)]


class TiledBlend:
    """The tiles of one padded (C, H, W) image and the blend of their outputs: ``add`` each tile's output, in tile
    order (the float sums then do not depend on how tiles were batched), then ``result``."""

    def __init__(self, x: np.ndarray, *, tile: int, overlap: int, multiple: int):
        self.x = x
        _, self.h, self.w = x.shape
        self.tiles = tile_grid(self.h, self.w, tile, overlap, multiple)
        self.overlap = min(overlap, max(multiple, tile - tile % multiple) // 2)
        self.acc = self.wsum = None
        self.done = 0

    def crop(self, t: Tile) -> np.ndarray:
        return self.x[(slice(None), *t.slices)]

    def add(self, t: Tile, y: np.ndarray) -> None:
        if self.acc is None:
            self.acc = np.zeros((y.shape[0], self.h, self.w), dtype=np.float32)
            self.wsum = np.zeros((self.h, self.w), dtype=np.float32)
        wt = blend_weight(t, self.h, self.w, self.overlap)
        self.acc[(slice(None), *t.slices)] += y * wt
        self.wsum[t.slices] += wt
        self.done += 1

    def result(self) -> np.ndarray:
        return self.acc / np.maximum(self.wsum, 1e-8)


def run_tiled(fn: Callable[[np.ndarray, list[Tile]], np.ndarray], x: np.ndarray, *, tile: int, overlap: int,
              multiple: int, batch: int = 1, on_tile: Callable[[int, int], None] | None = None) -> np.ndarray:
    """Apply ``fn(x_batch, tiles) -> y_batch`` (NCHW) to overlapping tiles of (C, H, W) ``x``, blended.

    ``fn`` also gets the tiles' positions, so it can crop per-pixel state (the full image's
    noise) and tiled and untiled runs see the same noise at every pixel. ``x`` must already
    be padded to ``multiple``.
    """
    blend = TiledBlend(x, tile=tile, overlap=overlap, multiple=multiple)
    for group in batched(blend.tiles, batch):
        for t, y in zip(group, fn(np.stack([blend.crop(t) for t in group]), group)):
            blend.add(t, y)
        if on_tile:
            on_tile(blend.done, len(blend.tiles))
    return blend.result()
