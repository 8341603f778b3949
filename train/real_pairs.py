"""Real noisy/clean pairs in training: split by scene, cut aligned, mixed with the synthetic degradations.

A folder ``real.pairs`` holds ``noisy/NAME`` and ``clean/NAME`` (a shot and its ground truth). A pair's
**scene** is NAME without its trailing ``_N`` (``Canon5D2_5_160_6400_desk_10.JPG`` -> ``Canon5D2_5_160_6400_desk``):
crops of one scene share content, so the split is by scene, never by pair. The config's ``real.held_out`` scenes
(at least 3, holding at least 10 pairs) are never trained on: they are the validation set, and early stopping
(``val.patience``) watches them. Every other pair is a real training pair. A split is refused when

- a held-out scene is unknown, or the held-out scenes are fewer than 3 or hold fewer than 10 pairs;
- a held-out scene overlaps training: a training scene shows the same *subject* (the scene's last ``_`` field,
  e.g. ``waterhouse``) shot by another camera or at another exposure, or ``data.clean`` holds a file of a held-out
  scene;
- a pair's noisy and clean images differ in size.

Real crops are cut at the same place from noisy and clean, with the same flip and quarter turn (the 8 symmetries of
the square): no resizing, scaling or interpolation, so the noise stays the camera's own. No synthetic degradation is
applied to them.

Transplanted noise (``real.transplant``): a training pair's noise, ``noisy - clean`` of one aligned crop (with its
symmetry), added to a clean photo's crop of ``data.clean``. The grain is the camera's own, with its correlation
between neighbours and channels; the content is new, so the model learns the grain rather than the few scenes'
pixels. The noise keeps the level it had at the pair's own brightness, not the photo's (the one thing it loses).

Mixing: sample ``i`` carries real noise when ``floor((i + 1) * s) > floor(i * s)``, ``s = ratio + transplant``, i.e.
exactly ``floor(n * s)`` of the first ``n`` samples, spread evenly (each batch holds ``s × batch`` ± 1), and the
``j``-th of those is a real pair's crop when ``floor((j + 1) * ratio / s)`` steps up, else transplanted noise: a
function of ``i`` alone like every sample (the same stream with any number of workers, and after a resume). Which
pair a sample's noise comes from is written to ``train_log.jsonl`` (:meth:`MixedSet.sources`).

At each validation a fixed subset of the *training* pairs (``real.gap_count``, spread over the training scenes) is
restored too; ``val_log`` then carries ``train_psnr`` / ``train_psnr_input`` and ``gap``, the gain over the input on
training pairs minus the gain on held-out pairs. Other scenes gain differently, so the gap starts where it starts;
one that grows from there while the held-out score stalls is memorisation.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from torch.utils.data import Dataset

from .config import TrainConfig
from .data import (DataError, ImageBank, TrainSet, check_pair_sizes, list_images, pair_files, read_all, stack_crops,
                   to_chw)
from .scenes import scene_of, subject_of

MIN_HELD_OUT_PAIRS = 10  # and config.MIN_HELD_OUT_SCENES scenes


class RealPairs:
    """A real-pair folder split by the config's held-out scenes; images decoded once."""

    def __init__(self, cfg: TrainConfig, threads: int | None = None):
        r, self.folder = cfg.real, Path(cfg.real.pairs)
        where = f"{cfg.source}: real.held_out"
        pairs = pair_files(self.folder / "noisy", self.folder / "clean")
        (noisy, clean), (nf, cf) = read_all([[p for p, _ in pairs], [q for _, q in pairs]], threads)
        check_pair_sizes(noisy, clean, [str(f) for f in nf], [str(f) for f in cf])
        scenes = [scene_of(f) for f in nf]
        held = set(r.held_out)
        unknown = sorted(held - set(scenes))
        if unknown:
            raise DataError(f"{where} names scene(s) with no pair in {self.folder}: {', '.join(unknown)} "
                            f"(its scenes: {', '.join(sorted(set(scenes)))})")
        out = [k for k, s in enumerate(scenes) if s in held]
        keep = [k for k, s in enumerate(scenes) if s not in held]
        if len(out) < MIN_HELD_OUT_PAIRS:
            raise DataError(f"{where}: its {len(held)} scenes hold {len(out)} pair(s) in {self.folder}; at least "
                            f"{MIN_HELD_OUT_PAIRS} are needed to validate on")
        if not keep:
            raise DataError(f"{where}: every pair in {self.folder} is held out; none is left to train on")
        subjects = {subject_of(s): s for s in sorted(held)}
        shared = sorted({scenes[k] for k in keep if subject_of(scenes[k]) in subjects})
        if shared:
            s = shared[0]
            raise DataError(f"{where} overlaps training: scene {s} shows the same subject as held-out "
                            f"{subjects[subject_of(s)]} ({subject_of(s)!r}, another camera or exposure): hold out "
                            f"both or neither")
        if cfg.data.clean:
            leaks = [f for f in list_images(cfg.data.clean) if scene_of(f) in held]
            if leaks:
                raise DataError(f"{where} overlaps training: data.clean ({cfg.data.clean}) holds {len(leaks)} "
                                f"image(s) of held-out scenes, e.g. {leaks[0].name}")
        self.held_out_scenes = sorted(held)
        self.train_scenes = sorted({scenes[k] for k in keep})
        self.noisy = ImageBank([noisy[k] for k in keep], [str(nf[k]) for k in keep])
        self.clean = ImageBank([clean[k] for k in keep], [str(cf[k]) for k in keep])
        crop, names = cfg.val.crop, [Path(nf[k]).name for k in out]
        self.held_out_set = (stack_crops([noisy[k] for k in out], crop), stack_crops([clean[k] for k in out], crop),
                             names)
        gap = _spread(scenes, keep, cfg.real.gap_count)
        self.gap_set = (stack_crops([noisy[k] for k in gap], crop), stack_crops([clean[k] for k in gap], crop),
                        [Path(nf[k]).name for k in gap]) if gap else None

    def describe(self) -> str:
        return (f"real pairs from {self.folder}: training on {len(self.clean)} pairs of {len(self.train_scenes)} "
                f"scenes; validating on {len(self.held_out_set[2])} pairs of the held-out scenes "
                f"{', '.join(self.held_out_scenes)}"
                + (f"; train/held-out gap on {len(self.gap_set[2])} training pairs" if self.gap_set else ""))

    def train_set(self, crop: int, seed: int, flip: bool) -> TrainSet:
        """Aligned crops of the training pairs with flips and quarter turns (``flip = false``: neither)."""
        return TrainSet(self.clean, crop, seed, inputs=self.noisy, flip=flip, rotate=flip)


def _spread(scenes: list[str], keep: list[int], count: int) -> list[int]:
    """``count`` training pairs taken in turn from each training scene (first pairs first): a fixed subset."""
    by_scene: dict[str, list[int]] = {}
    for k in keep:
        by_scene.setdefault(scenes[k], []).append(k)
    queues = [by_scene[s] for s in sorted(by_scene)]
    order = [q[j] for j in range(max(map(len, queues))) for q in queues if j < len(q)]
    return sorted(order[:count])


class NoiseTransplant(Dataset):
    """Sample ``i``: a clean photo crop plus the real noise of the pair crop ``pairs`` cuts for ``i``; target the photo."""

    PHOTO_SEED = 7919  # the photo crops' stream, apart from the pair crops' (both functions of (seed, i))

    def __init__(self, pairs: TrainSet, photos: ImageBank, flip: bool):
        self.pairs = pairs
        self.photos = TrainSet(photos, pairs.crop, pairs.seed + self.PHOTO_SEED, inputs=photos, flip=flip,
                               rotate=flip)

    def sample(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        noisy, clean = self.pairs.sample(i)
        _, photo = self.photos.sample(i)
        # 8-bit values on both sides: the sum is rounded back onto the 8-bit grid float arithmetic may leave
        return np.rint(np.clip(photo + (noisy - clean), 0, 1) * 255).astype(np.float32) / 255, photo

    def __getitem__(self, i: int):
        inp, gt = self.sample(int(i))
        return to_chw(inp), to_chw(gt)


class MixedSet(Dataset):
    """Sample ``i``: a real pair's crop, transplanted real noise or the synthetic set's sample ``i`` (module doc)."""

    def __init__(self, real: TrainSet, synthetic: TrainSet | None, ratio: float, transplant: float = 0.0):
        if synthetic is None and ratio + transplant < 1:
            raise DataError("a real:synthetic mixture below real.ratio = 1 needs synthetic data (--data)")
        self.real, self.synthetic, self.ratio, self.seed = real, synthetic, ratio, real.seed
        self.noisy_share = ratio + transplant
        self.transplanted = NoiseTransplant(real, synthetic.gt, real.flip) if transplant > 0 else None

    def __len__(self) -> int:
        return 2 ** 62

    def kind(self, i: int) -> str:
        """``real`` (a pair's crop), ``transplant`` (its noise on a photo) or ``synthetic``."""
        s = self.noisy_share
        if not math.floor((i + 1) * s) > math.floor(i * s):
            return "synthetic"
        j, share = math.floor(i * s), self.ratio / s
        return "real" if math.floor((j + 1) * share) > math.floor(j * share) else "transplant"

    def is_real(self, i: int) -> bool:
        return self.kind(i) == "real"

    def source(self, i: int) -> str:
        """``synthetic``, or the file name of the noisy image sample ``i``'s noise is cut from."""
        return "synthetic" if self.kind(i) == "synthetic" else Path(self.real.inputs.names[self.real.image_of(i)]).name

    def sources(self, start: int, stop: int) -> dict:
        """Where samples ``start`` to ``stop - 1`` came from: {pair file: [sample indices]} for real crops (and for
        transplanted noise, under ``transplant``), the rest synthetic."""
        found: dict[str, dict[str, list[int]]] = {"real": {}, "transplant": {}}
        for i in range(start, stop):
            kind = self.kind(i)
            if kind != "synthetic":
                found[kind].setdefault(self.source(i), []).append(i)
        n_noisy = sum(len(v) for d in found.values() for v in d.values())
        rows = {"samples": [start, stop], "synthetic": stop - start - n_noisy, "real": found["real"]}
        return {**rows, "transplant": found["transplant"]} if self.transplanted is not None else rows

    def __getitem__(self, i):
        i = int(i)
        kind = self.kind(i)
        return (self.real if kind == "real" else self.transplanted if kind == "transplant" else self.synthetic)[i]
