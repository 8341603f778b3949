"""The array core: one model on one backend turning decoded images into restored pixels.

It owns the runner and everything that decides pixels (the sampling plan, the seeded per-image
noise, padding, tiling and batching) and nothing about files. The jobs layer
(:mod:`rddm_infer.restore.jobs`, :class:`rddm_infer.restore.local.Restorer`) and the Ray actors
(:mod:`rddm_infer.restore.ray_executor`) run on it, so one seed gives the same pixels whichever executor,
batch or worker restored an image.

Each image is reflect-padded to the model's size multiple and cropped back; images larger
than ``tile`` are cut into overlapping tiles blended without seams. Noise is drawn per
image over its padded size (seeded), so results do not depend on batching or tiling.
With ``pixel_shuffle=s`` each image is restored as its s² sub-images of every s-th pixel,
interleaved back afterwards (pixel-shuffle downsampling, Zhou et al. 2020): real camera noise
is spatially correlated, which a denoiser keeps as texture; one pixel in s apart it is not.
With ``self_ensemble=n`` (2, 4 or 8) each image is also restored in n flipped / transposed views,
turned back and averaged (the "self-ensemble" of EDSR, Lim et al. 2017): n times the time.
"""

from __future__ import annotations

import os
import threading
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..backends.base import Runner
from ..backends.calibrate import measured_runner
from ..backends.select import Choice, resolve_model
from ..diffusion.engine_sampler import EngineSampler, Noise
from ..diffusion.schedule import COEF_NAMES
from ..errors import ImageError, OptionError, RDDMError
from ..io.images import Image, check_float_range, from_model, to_model
from .memory import fit_tile
from .mode import AUTO, Mode, choose_mode, correlated_mode
from .noise_estimate import estimate_noise
from .tiling import (DEFAULT_OVERLAP, DEFAULT_TILE, ENSEMBLE_SIZES, ENSEMBLE_VIEWS, MAX_PIXEL_SHUFFLE, from_view,
                     pad_to_multiple, shuffle_index, shuffle_merge, shuffle_split, to_view)
from .units import BatchQueue, Unit, Work

class ImageRestorer:
    """One model on one backend, with the sampling and tiling settings used for every image."""

    def __init__(self, model: str | os.PathLike | Runner | None = None, backend: str = "auto", *,
                 steps: int | None = None, eta: float | None = None, seed: int | None = 0, tile: int | None = None,
                 overlap: int = DEFAULT_OVERLAP, batch: int = 1, pixel_shuffle: int | str = "auto", self_ensemble: int = 1,
                 model_copies: int = 1, **backend_options):
        """``tile`` None: DEFAULT_TILE, or the largest tile that fits in memory (``memory_note`` says so); a
        ``tile`` given that does not fit is refused (:mod:`rddm_infer.restore.memory`). ``model_copies``: how many
        copies of this model share this machine's memory (Ray workers on one node). ``pixel_shuffle="auto"``:
        chosen per image from its own noise (:mod:`rddm_infer.restore.mode`), with the steps that mode restores
        best in unless ``steps`` is given."""
        if pixel_shuffle != AUTO and (isinstance(pixel_shuffle, bool) or
                                      not isinstance(pixel_shuffle, (int, np.integer)) or
                                      not 1 <= pixel_shuffle <= MAX_PIXEL_SHUFFLE):
            raise RDDMError(f"--pixel-shuffle {pixel_shuffle}: must be auto or an integer from 1 (off) to "
                            f"{MAX_PIXEL_SHUFFLE}")
        if isinstance(self_ensemble, bool) or self_ensemble not in ENSEMBLE_SIZES:
            raise RDDMError(f"--self-ensemble {self_ensemble}: must be 1 (off), 2, 4 or 8")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
            raise RDDMError(f"--seed {seed}: must be an integer >= 0")
        if isinstance(model, Runner):
            given = [k for k, v in backend_options.items() if v is not None]
            if given:
                raise OptionError(f"option {given[0]!r} does not apply to an already loaded runner")
            self.runner, self.choice = model, Choice(model.name, Path(getattr(model, "path", "")), reason="given")
        else:
            self.runner, self.choice = measured_runner(resolve_model(model, backend), backend, **backend_options)
        self.sampler = EngineSampler(self.runner)
        self.plan = self.sampler.plan(steps, eta)
        self.steps_given = steps is not None
        self._plans: dict[int, object] = {}  # a mode's own step count -> its plan
        self._plans_lock = threading.Lock()
        self.seed = seed
        self.multiple = max(int(self.meta.size_multiple), 1)
        if tile is not None and tile < self.multiple:
            raise RDDMError(f"--tile {tile} is smaller than the model's size multiple {self.multiple}")
        if overlap < 0 or batch < 1 or model_copies < 1:
            raise RDDMError("--tile-overlap must be >= 0, --batch >= 1 and model_copies >= 1")
        # Before any image is read: a tile whose engine call would not fit in memory ends in the OOM killer.
        tile, self.memory_note = fit_tile(self.runner, tile, DEFAULT_TILE, batch=batch, copies=model_copies,
                                          multiple=self.multiple)
        self.tile, self.overlap, self.batch = tile, overlap, batch
        self.pixel_shuffle = AUTO if pixel_shuffle == AUTO else int(pixel_shuffle)
        # how this network restores correlated (camera) noise, as measured and stamped into it (or the default)
        self.correlated_mode = correlated_mode(self.meta.correlated_noise_mode, where=str(self.meta.source or "model"))
        self.self_ensemble = int(self_ensemble)

    @property
    def meta(self):
        return self.runner.meta

    @property
    def engine(self) -> str:
        """What runs the model, in words (e.g. "onnxruntime (CPUExecutionProvider)")."""
        return self.runner.description

    @property
    def backend(self) -> str:
        """Deprecated name of :attr:`engine` (``backend`` names a registry row everywhere else)."""
        warnings.warn("ImageRestorer.backend is deprecated: use .engine (the description) or .choice.backend "
                      "(the registry name)", DeprecationWarning, stacklevel=2)
        return self.engine

    def close(self) -> None:
        self.runner.deactivate()

    def __enter__(self) -> "ImageRestorer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the mode of one image
    def mode_for(self, img: Image) -> Mode:
        """How this image is restored: the settings given, or (``pixel_shuffle="auto"``) the mode its own blind
        noise estimate calls for; ``steps`` given always wins, and so does a step count baked into the graph."""
        if self.pixel_shuffle != AUTO:
            return Mode("given", self.pixel_shuffle, None)
        mode = choose_mode(estimate_noise(img.pixels), self.correlated_mode)
        if self.steps_given or self.meta.kind.bakes_plan:
            mode = replace(mode, steps=None)
        return mode

    def plan_for(self, mode: Mode):
        """The sampling plan of a mode: its own step count, else the run's plan."""
        if mode.steps is None or mode.steps == self.plan.k:
            return self.plan
        with self._plans_lock:  # readers of the overlapped executor ask from several threads
            if mode.steps not in self._plans:
                self._plans[mode.steps] = self.sampler.plan(mode.steps, self.plan.eta)
            return self._plans[mode.steps]

    # -- model space
    def _prepare(self, img: Image, mode: Mode, draw: bool = True) -> tuple[np.ndarray, Noise | None]:
        x = pad_to_multiple(to_model(img, self.meta.channels), self.multiple * mode.pixel_shuffle)
        return x, Noise.draw(self.plan_for(mode), x.shape, self.seed) if draw else None

    def padded_size(self, img: Image, mode: Mode | None = None) -> tuple[int, int]:
        m = self.multiple * (mode or self.mode_for(img)).pixel_shuffle
        return tuple(-(-s // m) * m for s in img.size)

    def _parts(self, x: np.ndarray, noise: Noise, s: int) -> list[tuple[np.ndarray, Noise]]:
        """What the network runs on for one padded image (and its noise): per self-ensemble view, the s² sub-images
        of every s-th pixel; just the image when both are off."""
        out = []
        for view in ENSEMBLE_VIEWS[:self.self_ensemble]:
            xv, nv = to_view(x, view), noise.map(lambda a, v=view: to_view(a, v))
            out += [(xv, nv)] if s == 1 else list(zip(shuffle_split(xv, s), (nv.crop(i) for i in shuffle_index(s))))
        return out

    def _merge(self, ys: list[np.ndarray], s: int) -> np.ndarray:
        """The inverse of ``_parts``: sub-images interleaved back, views turned back and averaged."""
        n = s ** 2
        views = [from_view(y[0] if n == 1 else shuffle_merge(y, s), v)
                 for v, y in zip(ENSEMBLE_VIEWS, (ys[k:k + n] for k in range(0, len(ys), n)))]
        return views[0] if len(views) == 1 else np.mean(views, axis=0, dtype=np.float32)

    def _finish(self, y: np.ndarray, img: Image, ext: str | None) -> np.ndarray | ImageError:
        """Model output -> pixels; a non-finite output is an error for this image, never a black file."""
        h, w = img.size
        y = y[:, :h, :w]
        bad = int(np.count_nonzero(~np.isfinite(y)))
        if bad:
            return ImageError(f"{img.path or 'image'}: the model produced {bad} non-finite (NaN/Inf) values; "
                              f"nothing was written (a broken model or an fp16 overflow)")
        return from_model(y, img, ext)

    def bytes_per_pixel(self) -> int:
        """Host memory one image pixel holds while in flight: decoded samples (at most 4 × 16 bit), and per
        self-ensemble view its float32 network input, noise (ε, and z per stochastic step) and output."""
        z = int(np.count_nonzero(self.plan.coefs[:, COEF_NAMES.index("sigma")] > 0))
        return 8 + 4 * self.meta.channels * ((3 + z) * self.self_ensemble + 1)

    def start(self, img: Image, mode: Mode | None = None, *, noise: Noise | None = None) -> Work:
        """An image on its way through the engine: its network inputs, ready to be queued (:class:`BatchQueue`).
        Thread-safe (the overlapped executor's readers call it)."""
        mode = mode or self.mode_for(img)
        x, drawn = self._prepare(img, mode, noise is None)
        if noise is not None:
            noise.check(self.plan_for(mode), x.shape)
        return Work(img, mode, self.plan_for(mode), self._parts(x, noise or drawn, mode.pixel_shuffle),
                    tile=self.tile, overlap=self.overlap, multiple=self.multiple)

    def finish(self, work: Work, ext: str | None = None) -> np.ndarray | ImageError:
        """A work whose every unit ran -> the restored pixels, or that image's error. The work's network inputs,
        noise and outputs are let go here (not when the garbage collector next finds the work-unit cycle: images in
        flight would then outgrow --in-flight-mb)."""
        outputs = None if work.error is not None else work.outputs()
        work.release()
        if outputs is None:
            return work.error
        return self._finish(self._merge(outputs, work.mode.pixel_shuffle), work.img, ext)

    def run_units(self, units: list[Unit]) -> np.ndarray:
        """One engine call for same-shape units of one plan (of one image or several)."""
        return self.sampler.run(np.stack([u.x for u in units]), units[0].work.plan, Noise.stack([u.noise for u in units]))

    def restore_each(self, images: Sequence[Image], ext: str | None = None,
                     on_tile: Callable[[int, int], None] | None = None,
                     modes: Sequence[Mode] | None = None) -> list[np.ndarray | ImageError]:
        """Restore several decoded images (in ``modes``, default: :meth:`mode_for` each); same-shape network inputs
        (small images, tiles, sub-images) run as batches of up to ``batch`` across images. Each entry is the restored
        pixels or the error of that image alone."""
        modes = list(modes) if modes is not None else [self.mode_for(img) for img in images]
        works = [self.start(img, m) for img, m in zip(images, modes)]
        queue = BatchQueue(self, on_tile)
        for w in works:
            queue.add(w)
        while queue:
            queue.run()
        return [self.finish(w, ext) for w in works]

    def restore_images(self, images: Sequence[Image], ext: str | None = None,
                       on_tile: Callable[[int, int], None] | None = None) -> list[np.ndarray]:
        """Restore several decoded images; raises the first image's error (see ``restore_each``)."""
        out = self.restore_each(images, ext, on_tile)
        for y in out:
            if isinstance(y, ImageError):
                raise y
        return out

    def restore_array(self, pixels: np.ndarray, on_tile: Callable[[int, int], None] | None = None, *,
                      noise: Noise | None = None) -> np.ndarray:
        """H×W gray, H×W×3 BGR or H×W×4 BGRA -> the restored image in the same layout and dtype
        (alpha untouched). Samples are uint8, uint16, or float32/float64 in [0, 1] (as cv2 reads
        float TIFFs); floats outside [0, 1] or not finite are refused, never clipped.

        ``noise``: explicit noise instead of the seed (``Noise.given(restorer.plan, eps)``), shaped
        like the padded model-space image (C, H', W') with H', W' rounded up to ``size_multiple`` (times
        ``pixel_shuffle``; with ``pixel_shuffle="auto"`` the image is restored whole with the run's plan);
        only for images that are not tiled."""
        if pixels is None:
            raise ImageError("expected an image array, got None (did cv2.imread fail to read the file?)")
        pixels = np.asarray(pixels)
        if pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[2] not in (1, 3, 4)):
            raise ImageError(f"expected an H×W, H×W×3 or H×W×4 image, got shape {pixels.shape}")
        if pixels.shape[0] == 0 or pixels.shape[1] == 0:
            raise ImageError(f"empty image (shape {pixels.shape})")
        if pixels.dtype not in (np.uint8, np.uint16, np.float32, np.float64):
            raise ImageError(f"unsupported dtype {pixels.dtype} (uint8, uint16, or float32/float64 in [0, 1])")
        check_float_range(pixels, "restore_array")
        img = Image(pixels[..., 0] if pixels.ndim == 3 and pixels.shape[2] == 1 else pixels)
        ext = ".png" if pixels.dtype != np.float32 else ".tif"
        if noise is not None:  # another run's noise: its plan, and no per-image mode to second-guess it
            work = self.start(img, self.mode_for(img) if self.pixel_shuffle != AUTO else Mode("given", 1, None),
                              noise=noise)
            if work.tiled:
                raise RDDMError(f"explicit noise needs an untiled image: {work.parts[0].x.shape[1:]} exceeds tile "
                                f"{self.tile}")
            queue = BatchQueue(self)
            queue.add(work)
            while queue:
                queue.run()
            out = self.finish(work, ext)
            if isinstance(out, ImageError):
                raise out
        else:
            out = self.restore_images([img], ext=ext, on_tile=on_tile)[0]
        return out[..., None] if pixels.ndim == 3 and pixels.shape[2] == 1 else out
