"""The local executor: one process restoring files and folders with one loaded model.

>>> r = Restorer("model.onnx")                       # or Restorer() for the built-in model
>>> out = r.restore_array(cv2.imread("in.png"))      # same shape, dtype, channels as the input
>>> summary = r.restore_paths(["photos/"], "restored/")

:class:`Restorer` has an array core (:class:`rddm_infer.restore.arrays.ImageRestorer`: plan, noise, tiles,
batches; owns the runner) and adds reading with a pixel limit, naming, atomic writing and metrics
(:mod:`rddm_infer.restore.jobs`). Files flow through reader threads, the engine and writer threads at once
(:mod:`rddm_infer.restore.overlapped`). The Ray executor (:mod:`rddm_infer.restore.ray_executor`) runs the same
``run_jobs`` loop in each actor.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from .arrays import ImageRestorer
from ..errors import ImageError, RDDMError
from ..io.images import (DEFAULT_MAX_PIXELS, Image, check_quality, decode_image_bytes, encode_image, is_lossy,
                         read_image, write_atomic)
from .mode import Mode
from .overlapped import Flow, run_overlapped
from .jobs import (Job, Result, Summary, find_gt, image_metrics,
                   prepare_jobs, write_metrics_csv)
from ..io.storage import location

__all__ = ["Restorer"]


def _read_through(name: str) -> property:
    return property(lambda self: getattr(self.arrays, name), lambda self, value: setattr(self.arrays, name, value),
                    doc=f"The array core's ``{name}`` (set through, e.g. another step count's plan).")


class Restorer:
    """An array core plus files and folders: decode (with a pixel limit checked before decoding),
    restore, write atomically under planned names, metrics; one bad file never stops a run."""

    def __init__(self, model=None, backend: str = "auto", *, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 quality: int | None = None, io_workers: int | str | None = "auto", in_flight: int | None = None,
                 in_flight_mb: float | None = None, **options):
        """``io_workers``, ``in_flight``, ``in_flight_mb``: how files flow through decode, engine and encode
        (:class:`rddm_infer.restore.overlapped.Flow`; ``io_workers=0`` is one image at a time)."""
        if max_pixels is not None and max_pixels < 1:
            raise RDDMError(f"--max-pixels {max_pixels}: must be >= 1")
        self.quality = check_quality(quality)  # JPEG / WebP outputs (None: JPEG 95, WebP lossless)
        self.flow = Flow.resolve(io_workers, options.get("batch", 1), in_flight, in_flight_mb)  # before the model loads
        self.arrays = ImageRestorer(model, backend, **options)
        self.max_pixels = max_pixels

    # The array core's settings, read through (the report and the CLI describe a run with them).
    runner, choice, sampler, plan, meta, engine, seed = map(
        _read_through, ("runner", "choice", "sampler", "plan", "meta", "engine", "seed"))
    tile, overlap, batch, pixel_shuffle, self_ensemble, memory_note, correlated_mode = map(
        _read_through, ("tile", "overlap", "batch", "pixel_shuffle", "self_ensemble", "memory_note",
                        "correlated_mode"))

    @property
    def backend(self) -> str:
        """Deprecated name of :attr:`engine`."""
        return self.arrays.backend

    def restore_array(self, pixels: np.ndarray, on_tile=None, *, noise=None) -> np.ndarray:
        """:meth:`ImageRestorer.restore_array`."""
        return self.arrays.restore_array(pixels, on_tile, noise=noise)

    def restore_images(self, images: Sequence[Image], ext: str | None = None, on_tile=None) -> list[np.ndarray]:
        """:meth:`ImageRestorer.restore_images`."""
        return self.arrays.restore_images(images, ext, on_tile)

    def close(self) -> None:
        self.arrays.close()

    def __enter__(self) -> "Restorer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def restore_file(self, src: str | os.PathLike, dst: str | os.PathLike) -> Path:
        """Restore one file into ``dst`` (written atomically); ``dst`` may not be ``src``."""
        dst = Path(dst)
        same = Path(src).resolve() == dst.resolve()
        if same or (dst.exists() and Path(src).exists() and os.path.samefile(src, dst)):
            raise ImageError(f"{dst}: the output would overwrite the input {src}; choose another name")
        img = read_image(src, self.max_pixels)
        y = self.restore_images([img], ext=dst.suffix)[0]
        return write_atomic(dst, encode_image(y, dst.suffix, self.quality))

    # -- folders
    def restore_paths(self, inputs: Sequence[str | os.PathLike], out_dir: str | os.PathLike, *, suffix: str = "",
                      ext: str | None = None, skip_existing: bool = False, recursive: bool = False,
                      gt_dir: str | os.PathLike | None = None,
                      on_start: Callable[[list[Job]], None] | None = None,
                      on_result: Callable[[Result], None] | None = None,
                      on_tile: Callable[[int, int], None] | None = None) -> Summary:
        """Restore files/folders/globs into ``out_dir``; one bad file never stops the run."""
        jobs = prepare_jobs(inputs, out_dir, recursive=recursive, suffix=suffix, ext=ext)
        if on_start:
            on_start(jobs)
        summary = Summary(engine=self.engine)
        t0 = time.perf_counter()
        def record(result: Result) -> None:
            summary.results.append(result)
            if on_result:
                on_result(result)

        results = self._run_jobs(jobs, skip_existing, location(gt_dir) if gt_dir else None, on_tile)
        try:
            for result in results:
                record(result)
        except KeyboardInterrupt:  # Ctrl-C here rather than in the executor: it still reports the writes it finished
            try:
                record(results.throw(KeyboardInterrupt()))
                for result in results:
                    record(result)
            except (KeyboardInterrupt, StopIteration):
                pass
            raise KeyboardInterrupt from None
        summary.seconds = time.perf_counter() - t0
        if gt_dir is not None and any(r.metrics for r in summary.results):
            write_metrics_csv(location(out_dir) / "metrics.csv", summary)
        return summary

    def run_jobs(self, jobs: list[Job], skip_existing: bool = False, gt_dir: str | os.PathLike | None = None,
                 on_tile: Callable[[int, int], None] | None = None) -> Iterator[Result]:
        """Planned jobs -> results, in order: the loop ``restore_paths`` and the Ray actors share."""
        return self._run_jobs(jobs, skip_existing, location(gt_dir) if gt_dir else None, on_tile)

    def _run_jobs(self, jobs: list[Job], skip_existing: bool, gt_dir: Path | None, on_tile) -> Iterator[Result]:
        return run_overlapped(self, jobs, self.flow, skip_existing=skip_existing, gt_dir=gt_dir, on_tile=on_tile)

    def save(self, job: Job, img: Image, y: np.ndarray, mode: Mode, gt_dir: Path | None, seconds: float) -> Result:
        t = time.perf_counter()
        try:
            data = encode_image(y, job.dst.suffix, self.quality)
            write_atomic(job.dst, data)
        except ImageError as e:
            return Result(job, "failed", f"{job.dst}: {e}" if str(job.dst) not in str(e) else str(e))
        metrics, err = None, ""
        if gt_dir is not None:
            gt = find_gt(gt_dir, job)
            try:
                if gt is None:
                    raise ImageError(f"{job.src}: no ground truth named {job.src.stem}.* in {gt_dir}")
                # the file as saved: a lossy format measures what a reader of the output gets
                saved = decode_image_bytes(data, job.dst) if is_lossy(job.dst.suffix, self.quality) else y
                metrics = image_metrics(saved, gt, noisy=img.pixels)
            except (RDDMError, ValueError) as e:
                err = str(e)
        return Result(job, "restored", err, seconds + time.perf_counter() - t, metrics,
                      mode.describe(self.arrays.plan_for(mode).k) if mode.why else "")  # chosen: say why
