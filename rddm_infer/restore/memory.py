"""Memory you can see before it fails: the peak of one engine call, estimated from the model's architecture.

A model with full attention at a fine resolution needs batch·heads·tokens²·4 bytes for one attention matrix:
a 512² tile of a two-level UNet (dim_mults [1, 2]) has 65,536 tokens at its bottleneck, 17 GB per head. Left
alone, the kernel's OOM killer ends such a run with signal 9 and no message (issue #26, case 13). So before any
image is read, :func:`fit_tile` compares the estimate for ``batch`` tiles with the memory this process can still
have: a tile the user gave that does not fit is refused in one line; the default tile is shrunk to the largest
that fits, and the caller states that.

The estimate (:func:`call_bytes`) is an upper-ish bound of the peak resident memory one call adds, measured on
ONNX Runtime's and OpenVINO's CPU paths (1.1-1.8x over 24 runs of 7 architectures; the test
``tests/e2e/test_hardening_memory.py`` measures it again): each full attention's score and softmax matrices (the
runner's ``attention_matrices``), plus per-pixel activations of every level (its linear attention's q/k/v and its
feature maps), plus the image-sized inputs and outputs. GPU engines keep activations in GPU memory, which this
does not model (their out-of-memory is an error, not a kill): they are not checked.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from ..diffusion.metadata import ArtifactMeta
from ..errors import OptionError, RDDMError

ENV_LIMIT = "RDDM_MEMORY_LIMIT"  # bytes (or 512M, 8G, ...) to plan with instead of what the machine has free
BYTES = 4  # fp32 activations (fp16 graphs compute most in fp32 on CPU: an upper bound)
LINEAR_FLOATS = 3  # per pixel of a level, per head channel (q, k, v; their softmaxes reuse freed buffers)
FEATURE_FLOATS = 4  # per pixel of a level, per feature channel (the block's input, output, skip, concat)
IMAGE_FLOATS = 8  # per pixel, per image channel: x_t, x_input, noise, the outputs and the update's temporaries
AUTO_SHARE = 0.75  # a tile chosen here leaves a quarter for decoded images, blending buffers and other processes
MEMORY_SHARE = 0.25  # that quarter: the images in flight of the overlapped executor (restore/overlapped.py)
MAX_IN_FLIGHT_IMAGES = 16  # images decoded ahead of the engine (besides its batch) and waiting to be written
MIN_TILE = 64  # below this, overlap dominates: refuse rather than crawl
TILE_STEP = 32
UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.0f} MB"


# ----------------------------------------------------------------------------------------------- the estimate

def derived_layout(unet: dict) -> list[dict] | None:
    """The attention layout of a reference UnetRes from its config, for artifacts exported before the layout
    was measured into their metadata (``rddm_infer.model.attention_layout`` gives the same; a test checks it).
    None when the config lacks what it takes."""
    try:
        dim, mults = int(unet["dim"]), [int(m) for m in unet["dim_mults"]]
        heads, dim_head = int(unet.get("heads", 4)), int(unet.get("dim_head", 32))
        dims = [int(unet.get("init_dim") or dim), *(dim * m for m in mults)]
    except (KeyError, TypeError, ValueError):
        return None
    if not mults:
        return None
    share = unet.get("share_encoder", 0)
    encoders, decoders = {0: (2, 2), 1: (1, 2)}.get(share, (1, 1))
    last = len(mults) - 1
    layers = [("full", 2 ** last, dims[-1], encoders)]
    layers += [("linear", 2 ** i, dims[i], encoders) for i in range(len(mults))]
    layers += [("linear", 2 ** i, dims[i + 1], decoders) for i in range(len(mults))]
    merged: dict[tuple, int] = {}
    for kind, down, channels, count in layers:
        merged[kind, down, channels] = merged.get((kind, down, channels), 0) + count
    return [dict(kind=k, downscale=d, heads=heads, dim_head=dim_head, channels=c, count=n)
            for (k, d, c), n in sorted(merged.items())]


@dataclass(frozen=True)
class Estimate:
    """The peak one engine call adds, and its largest part in words."""

    bytes: int
    largest: str


def call_bytes(meta: ArtifactMeta, tile: int, batch: int = 1, matrices: float = 2.5) -> Estimate | None:
    """Peak memory one call on ``batch`` images of ``tile``² adds (None: the metadata lacks the architecture).
    ``matrices``: full-attention matrices alive at once (the runner's ``attention_matrices``)."""
    layout = meta.attention or derived_layout(meta.unet)
    if not layout:
        return None
    pixels = batch * tile * tile
    levels: dict[int, tuple[int, int]] = {}  # downscale -> (feature channels, head channels)
    attention, largest = 0, "activations"
    for layer in layout:
        down, hd = layer["downscale"], layer["heads"] * layer["dim_head"]
        c, h = levels.get(down, (0, 0))
        levels[down] = max(c, layer["channels"]), max(h, hd)
        if layer["kind"] == "full":
            tokens = (tile // down) ** 2
            matrix = matrices * batch * layer["heads"] * tokens * tokens * BYTES
            if matrix > attention:
                attention = matrix
                largest = f"full attention over {tokens:,} tokens at 1/{down} resolution"
    per_pixel = sum((FEATURE_FLOATS * c + LINEAR_FLOATS * h) / (d * d) for d, (c, h) in levels.items())
    activations = pixels * BYTES * (per_pixel + IMAGE_FLOATS * meta.channels)
    return Estimate(int(attention + activations), largest if attention > activations else "activations")


# ---------------------------------------------------------------------------------------- what there is to use

def parse_bytes(text: str, where: str = ENV_LIMIT) -> int:
    """``12G``, ``512M``, ``1000000`` -> bytes (binary units); a one-line error naming ``where`` otherwise."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = t[-1] if t and t[-1] in "KMGT" else ""
    try:
        value = float(t[:-1] if unit else t) * UNITS[unit]
    except ValueError:
        value = -1
    if not (math.isfinite(value) and value > 0):
        raise OptionError(f"{where}={text!r}: expected a size such as 8G, 512M or a number of bytes")
    return int(value)


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().split()[0]
    except (OSError, IndexError):
        return None
    return int(text) if text.isdigit() else None


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _cgroup_room() -> int | None:
    """Room left under this process's cgroup memory limits (v2: each level up to the root; v1: its limit),
    or None when no limit applies."""
    rooms = []
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) == 3 and parts[0] == "0":  # cgroup v2: the unified hierarchy
            here = Path("/sys/fs/cgroup") / parts[2].lstrip("/")
            for d in (here, *here.parents):
                if not str(d).startswith("/sys/fs/cgroup"):
                    break
                limit, used = _read_int(d / "memory.max"), _read_int(d / "memory.current")
                if limit is not None:
                    rooms.append(limit - (used or 0))
        elif len(parts) == 3 and "memory" in parts[1].split(","):  # cgroup v1
            for d in (Path("/sys/fs/cgroup/memory") / parts[2].lstrip("/"), Path("/sys/fs/cgroup/memory")):
                limit, used = _read_int(d / "memory.limit_in_bytes"), _read_int(d / "memory.usage_in_bytes")
                if limit is not None and limit < 1 << 60:  # v1 says "no limit" with a huge number
                    rooms.append(limit - (used or 0))
                    break
    return max(min(rooms), 0) if rooms else None


def available_memory() -> tuple[int | None, str]:
    """(bytes this process can still use, where that figure comes from); (None, why) when it cannot be told."""
    override = os.environ.get(ENV_LIMIT)
    if override:
        return parse_bytes(override), ENV_LIMIT
    free, room = _meminfo_available(), _cgroup_room()
    if room is not None and (free is None or room < free):
        return room, "the cgroup's memory limit"
    if free is not None:
        return free, "available memory"
    return None, "available memory unknown here"


# ------------------------------------------------------------------------------------------------ the decision

def _fits(runner, tile: int, batch: int, budget: float) -> bool:
    e = call_bytes(runner.meta, tile, batch, runner.attention_matrices)
    return e is None or e.bytes <= budget


def _step(multiple: int) -> int:
    """Tiles chosen here are multiples of TILE_STEP (rounded up to the model's size multiple): a little less
    free memory then rarely changes the tile, and so the pixels, from one run to the next."""
    return -(-TILE_STEP // multiple) * multiple


def min_tile(multiple: int) -> int:
    """The smallest tile chosen or suggested here: MIN_TILE rounded up to a tile step."""
    return -(-MIN_TILE // _step(multiple)) * _step(multiple)


def largest_fitting(runner, batch: int, budget: float, multiple: int, start: int) -> int | None:
    """The largest tile <= ``start`` (a tile step's multiple, >= ``min_tile``) whose call fits ``budget``."""
    step = _step(multiple)
    tile = start - start % step
    while tile >= min_tile(multiple):
        if _fits(runner, tile, batch, budget):
            return tile
        tile -= step
    return None


def fit_tile(runner, tile: int | None, default: int, *, batch: int = 1, copies: int = 1, multiple: int = 1,
             flag: str = "--tile") -> tuple[int, str]:
    """(the tile to run, a line saying why when it is not simply the one asked for; '' otherwise).

    ``tile`` None: ``default``, shrunk to the largest that fits AUTO_SHARE of the memory left (shared by
    ``copies`` model copies on this machine, e.g. Ray workers on one node). A ``tile`` given that does not fit
    the memory left is an error naming the estimate, the memory and the ``flag`` value that fits."""
    asked = default if tile is None else tile
    if runner.activations_on_gpu:
        return asked, ""
    run = max(asked - asked % multiple, multiple)  # what the tiler runs (tiling.tile_grid)
    estimate = call_bytes(runner.meta, run, batch, runner.attention_matrices)
    if estimate is None:
        return asked, f"memory: no estimate for this model (its metadata has no architecture); tile {asked}"
    free, source = available_memory()
    if free is None:
        return asked, (f"memory: not checked ({source}); one engine call at tile {run} needs about "
                       f"{gb(estimate.bytes)}")
    per_copy = free / max(copies, 1)
    if estimate.bytes <= (AUTO_SHARE if tile is None else 1.0) * per_copy:
        return asked, ""
    need = (f"one engine call at {flag} {asked}{f' --batch {batch}' if batch > 1 else ''} needs about "
            f"{gb(estimate.bytes)} ({estimate.largest})")
    have = f"{gb(per_copy)} of {source}" + (f" for each of {copies} model copies on this machine" if copies > 1 else "")
    fits = largest_fitting(runner, batch, AUTO_SHARE * per_copy, multiple, run)
    if fits is None:
        fix = "lower --batch" if batch > 1 else "free memory, or use a model without full attention this fine"
        raise RDDMError(f"{need}, more than the {have}; no {flag} down to {min_tile(multiple)} fits: {fix}")
    if tile is not None:
        raise RDDMError(f"{need}, more than the {have}: use {flag} {fits} (or smaller)")
    return fits, f"tile: {fits} instead of the default {default}, to fit in memory ({need}; {have}); --tile N sets it"


def copies_per_node(nodes: list[dict], workers: int, cpus: float, gpus: float = 0.0) -> int:
    """How many of ``workers`` actors (each reserving ``cpus`` / ``gpus``) may land on one node and share its
    memory, from Ray's ``nodes()`` (the largest live node): each actor's memory check divides it among them."""
    alive = [n.get("Resources", {}) for n in nodes if n.get("Alive")]
    key, each = ("GPU", gpus) if gpus else ("CPU", cpus)
    room = max((r.get(key, 0.0) for r in alive), default=0.0)
    return max(1, min(int(workers), int(room / each + 1e-9) if each > 0 else int(workers)))
