"""The Python API: load a model once, restore numpy images, files and folders.

>>> r = Restorer("model.onnx")                       # or Restorer() for the built-in model
>>> out = r.restore_array(cv2.imread("in.png"))      # same shape, dtype, channels as the input
>>> summary = r.restore_paths(["photos/"], "restored/")

Each image is reflect-padded to the model's size multiple and cropped back; images larger
than ``tile`` are cut into overlapping tiles blended without seams. Noise is drawn per
image over its padded size (seeded), so results do not depend on batching or tiling.
"""

from __future__ import annotations

import csv
import glob
import io
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from .backends import Choice, EngineSampler, Noise, Runner, load_runner
from .errors import CheckpointError, ImageError, OptionError, RDDMError
from .atomic import remove_stale_temps
from .imageio import (DEFAULT_MAX_PIXELS, IMAGE_EXTS, Image, check_float_range, encode_image, from_model,
                      is_complete_image, read_image, to_model, write_atomic)
from .metrics import psnr, ssim
from .onnx_external import check_external_data
from .tiling import DEFAULT_OVERLAP, DEFAULT_TILE, Tile, pad_to_multiple, run_tiled

DEFAULT_MODEL = Path(__file__).resolve().parent / "weights" / "default.onnx"
DEFAULT_CHECKPOINT = DEFAULT_MODEL.with_suffix(".safetensors")  # what the built-in ONNX model was exported from


def resolve_model(model: str | os.PathLike | None, backend: str = "auto") -> Path:
    """The given model path, or the built-in default (a clear error when none is installed): the
    checkpoint for a backend that loads only checkpoints (``--backend torch``), else the ONNX model."""
    if model is not None:
        path = Path(model)
        if not path.exists():
            raise CheckpointError(f"{path}: no such model file")
        if path.suffix.lower() == ".onnx" and path.is_file():
            check_external_data(path)  # before ONNX Runtime opens it: older releases follow any path
        return path
    from .backends.registry import BY_NAME

    if backend in BY_NAME and BY_NAME[backend].artifacts == ("checkpoint",):
        if not DEFAULT_CHECKPOINT.is_file():
            raise CheckpointError(f"no built-in checkpoint is installed ({DEFAULT_CHECKPOINT} is missing); "
                                  f"pass --model PATH")
        return DEFAULT_CHECKPOINT
    if not DEFAULT_MODEL.is_file():
        raise CheckpointError(f"no built-in model is installed ({DEFAULT_MODEL} is missing); "
                              f"pass --model PATH (an .onnx model, a TensorRT .engine or a checkpoint)")
    return DEFAULT_MODEL


# ------------------------------------------------------------------------------------------- jobs

@dataclass
class Job:
    src: Path
    dst: Path | None = None
    rel: Path | None = None  # path relative to the input folder (mirrored under the output folder)
    error: str = ""  # set when the job cannot even start (missing input, name clash)


@dataclass
class Result:
    job: Job
    status: str  # restored | failed | skipped
    error: str = ""
    seconds: float = 0.0
    metrics: dict | None = None


@dataclass
class Summary:
    results: list[Result] = field(default_factory=list)
    seconds: float = 0.0
    backend: str = ""

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)

    @property
    def images_per_s(self) -> float:
        n = self.count("restored")
        return n / self.seconds if self.seconds > 0 else 0.0

    def mean_metrics(self) -> dict[str, float]:
        rows = [r.metrics for r in self.results if r.metrics]
        return {k: float(np.mean([m[k] for m in rows])) for k in ("psnr", "ssim")} if rows else {}

    def line(self) -> str:
        return (f"restored {self.count('restored')}, failed {self.count('failed')}, "
                f"skipped {self.count('skipped')}")

    def to_dict(self) -> dict:
        return {"restored": self.count("restored"), "failed": self.count("failed"),
                "skipped": self.count("skipped"), "seconds": round(self.seconds, 3),
                "images_per_s": round(self.images_per_s, 3), "backend": self.backend,
                "errors": [{"file": str(r.job.src), "error": r.error} for r in self.results if r.status == "failed"],
                "outputs": [str(r.job.dst) for r in self.results if r.status == "restored"],
                **({"metrics": {"mean": self.mean_metrics(),
                                "images": {str(r.job.src): r.metrics for r in self.results if r.metrics}}}
                   if any(r.metrics for r in self.results) else {})}


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTS and not p.name.startswith(".")


def _glob(pattern: str, recursive: bool) -> list[Path]:
    """``glob.glob`` follows symlinked folders under ``**`` and never ends in a symlink loop; pathlib's
    ``**`` does not descend into symlinks, so a recursive pattern is split into a plain root and a
    pathlib pattern below it."""
    if not recursive or "**" not in pattern:
        return [Path(m) for m in glob.glob(pattern, recursive=recursive)]
    parts = Path(pattern).parts
    k = _magic_index(parts)
    return list(_glob_root(pattern).glob(str(Path(*parts[k:]))))


def _within(p: Path, folder: Path) -> bool:
    try:
        p.resolve().relative_to(folder)
        return True
    except (ValueError, OSError, RuntimeError):
        return False


def _in_output(f: Path, root: Path, out: Path | None) -> bool:
    """True for a file under the output folder when that folder lies inside the input ``root``
    (``-o in/out``); when the output folder is the input folder itself (``-o in --suffix _r``) nothing is left out."""
    return out is not None and _within(f, out) and not _within(root, out)


def _magic_index(parts: tuple[str, ...]) -> int:
    return next((i for i, part in enumerate(parts) if glob.has_magic(part)), len(parts))


def _glob_root(pattern: str) -> Path:
    """The plain folder a glob pattern starts from (``a/b`` of ``a/b/**/*.png``)."""
    parts = Path(pattern).parts
    k = _magic_index(parts)
    return Path(*parts[:k]) if k else Path(".")


def collect_inputs(inputs: Sequence[str | os.PathLike], recursive: bool = False,
                   exclude: str | os.PathLike | None = None) -> list[Job]:
    """Files, folders (sorted; image extensions only) and globs -> jobs, in order, without repeats.

    Files that folders and globs find under ``exclude`` (the output folder) are left out, so
    restoring ``in/`` into ``in/out`` never picks up its own earlier outputs.
    """
    jobs: list[Job] = []
    seen: set[Path] = set()
    skip = Path(exclude).resolve() if exclude is not None else None

    def add(p: Path, rel: Path | None = None, error: str = ""):
        key = p.resolve() if not error else p
        if key not in seen:
            seen.add(key)
            jobs.append(Job(p, rel=rel, error=error))

    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files = p.rglob("*") if recursive else p.iterdir()
            found = sorted((f for f in files if _is_image(f) and not _in_output(f, p, skip)),
                           key=lambda f: f.relative_to(p).as_posix())
            if not found:
                add(p, error=f"{p}: no images found in this folder (extensions {', '.join(IMAGE_EXTS)}"
                             f"{'' if recursive else '; -r descends into subfolders'})")
            for f in found:
                add(f, f.relative_to(p))
        elif p.exists() or p.is_symlink():
            add(p)
        elif glob.has_magic(str(item)):
            matches = sorted(_glob(str(item), recursive))
            files = [m for m in matches if m.is_file() and not _in_output(m, _glob_root(str(item)), skip)]
            if not files:
                add(p, error=f"{item}: no images found (no files match this pattern)")
            for f in files:
                add(f)
        else:
            add(p, error=f"{p}: no such file or folder")
    return jobs


def plan_outputs(jobs: list[Job], out_dir: str | os.PathLike, suffix: str = "", ext: str | None = None) -> None:
    """Destination of each job: ``out_dir/[subfolders/]stem+suffix.ext``; never an input, never shared."""
    check_suffix(suffix)
    out_dir = Path(out_dir)
    inputs = {j.src.resolve() for j in jobs if not j.error}
    taken: dict[Path, Path] = {}
    for j in jobs:
        if j.error:
            continue
        e = (ext if ext.startswith(".") else "." + ext).lower() if ext else j.src.suffix.lower()
        if e not in IMAGE_EXTS:
            j.error = f"{j.src}: unsupported output format {e!r} (choose one of {', '.join(IMAGE_EXTS)})"
            continue
        parent = out_dir / j.rel.parent if j.rel is not None else out_dir
        j.dst = parent / f"{j.src.stem}{suffix}{e}"
        key = j.dst.resolve()
        if key in inputs:
            j.error = f"{j.src}: output {j.dst} would overwrite an input; choose another -o or a --suffix"
        elif key in taken:
            j.error = f"{j.src}: output {j.dst} is also the output of {taken[key]}; use --suffix or --ext"
        else:
            taken[key] = j.src


def check_suffix(suffix: str) -> None:
    """A suffix is part of a file name: a separator in it would write outside the output folder."""
    if any(c in suffix for c in ("/", "\\", "\0")) or (os.altsep and os.altsep in suffix):
        raise RDDMError(f"--suffix {suffix!r}: must not contain path separators (it is appended to file names)")


def check_writable(out_dir: Path) -> None:
    """Create the output folder and prove a file can be written there, before any inference."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(out_dir / ".rddm-write-test", b"")
        (out_dir / ".rddm-write-test").unlink()
    except (OSError, ImageError) as e:
        cause = e.strerror if isinstance(e, OSError) and e.strerror else str(e).split(": ")[-1]
        raise RDDMError(f"{out_dir}: output folder is not writable ({cause})") from None


def prepare_jobs(inputs: Sequence[str | os.PathLike], out_dir: str | os.PathLike, *, recursive: bool = False,
                 suffix: str = "", ext: str | None = None) -> list[Job]:
    """Inputs -> planned jobs, before any inference: the output tree is never an input, the output folder is
    writable, and temp files of runs killed between write and rename are cleaned (every executor calls this)."""
    jobs = collect_inputs(inputs, recursive, exclude=out_dir)
    plan_outputs(jobs, out_dir, suffix, ext)
    check_writable(Path(out_dir))
    remove_stale_temps(j.dst for j in jobs if j.dst is not None)
    return jobs


def is_done(job: Job) -> bool:
    """``--skip-existing``: an output counts as done only when it is a complete image (a 0-byte or cut file is redone)."""
    return job.dst is not None and job.dst.exists() and is_complete_image(job.dst)


def find_gt(gt_dir: Path, job: Job) -> Path | None:
    """Ground truth with the same relative name (any image extension)."""
    rel = job.rel if job.rel is not None else Path(job.src.name)
    for cand in [gt_dir / rel, *(gt_dir / rel.with_suffix(e) for e in IMAGE_EXTS)]:
        if cand.is_file():
            return cand
    return None


def image_metrics(restored: np.ndarray, gt_path: Path) -> dict[str, float]:
    a = (to_model(Image(restored)) + 1) * 0.5
    b = (to_model(read_image(gt_path)) + 1) * 0.5
    if a.shape != b.shape:
        raise ImageError(f"{gt_path}: ground truth is {b.shape[2]}×{b.shape[1]}, the output {a.shape[2]}×{a.shape[1]}")
    return {"psnr": psnr(a, b), "ssim": ssim(a, b)}


# --------------------------------------------------------------------------------------- restorer

class Restorer:
    """One model on one backend, with the sampling and tiling settings used for every image."""

    def __init__(self, model: str | os.PathLike | Runner | None = None, backend: str = "auto", *,
                 steps: int | None = None, eta: float | None = None, seed: int | None = 0, tile: int = DEFAULT_TILE,
                 overlap: int = DEFAULT_OVERLAP, batch: int = 1, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 **backend_options):
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
            raise RDDMError(f"--seed {seed}: must be an integer >= 0")
        if max_pixels is not None and max_pixels < 1:
            raise RDDMError(f"--max-pixels {max_pixels}: must be >= 1")
        if isinstance(model, Runner):
            given = [k for k, v in backend_options.items() if v is not None]
            if given:
                raise OptionError(f"option {given[0]!r} does not apply to an already loaded runner")
            self.runner, self.choice = model, Choice(model.name, Path(getattr(model, "path", "")), reason="given")
        else:
            self.runner, self.choice = load_runner(resolve_model(model, backend), backend, **backend_options)
        self.sampler = EngineSampler(self.runner)
        self.plan = self.sampler.plan(steps, eta)
        self.seed = seed
        self.multiple = max(int(self.meta.size_multiple), 1)
        if tile < self.multiple:
            raise RDDMError(f"--tile {tile} is smaller than the model's size multiple {self.multiple}")
        if overlap < 0 or batch < 1:
            raise RDDMError("--tile-overlap must be >= 0 and --batch >= 1")
        self.tile, self.overlap, self.batch = tile, overlap, batch
        self.max_pixels = max_pixels

    @property
    def meta(self):
        return self.runner.meta

    @property
    def backend(self) -> str:
        return self.runner.description

    def close(self) -> None:
        self.runner.deactivate()

    def __enter__(self) -> "Restorer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- model space
    def _prepare(self, img: Image) -> tuple[np.ndarray, Noise]:
        x = pad_to_multiple(to_model(img, self.meta.channels), self.multiple)
        return x, Noise.draw(self.plan, x.shape, self.seed)

    def _padded(self, img: Image) -> tuple[int, int]:
        return tuple(-(-s // self.multiple) * self.multiple for s in img.size)

    def _fits(self, x: np.ndarray) -> bool:
        return max(x.shape[-2:]) <= self.tile

    def _run(self, xb: np.ndarray, noises: list[Noise]) -> np.ndarray:
        return self.sampler.run(xb, self.plan, Noise.stack(noises))

    def _restore_tiled(self, x: np.ndarray, noise: Noise, on_tile=None) -> np.ndarray:
        def fn(xb: np.ndarray, tiles: list[Tile]) -> np.ndarray:
            return self._run(xb, [noise.crop((slice(None), *t.slices)) for t in tiles])

        return run_tiled(fn, x, tile=self.tile, overlap=self.overlap, multiple=self.multiple, batch=self.batch,
                         on_tile=on_tile)

    def _finish(self, y: np.ndarray, img: Image, ext: str | None) -> np.ndarray | ImageError:
        """Model output -> pixels; a non-finite output is an error for this image, never a black file."""
        h, w = img.size
        y = y[:, :h, :w]
        bad = int(np.count_nonzero(~np.isfinite(y)))
        if bad:
            return ImageError(f"{img.path or 'image'}: the model produced {bad} non-finite (NaN/Inf) values; "
                              f"nothing was written (a broken model or an fp16 overflow)")
        return from_model(y, img, ext)

    def _restore_each(self, images: Sequence[Image], ext: str | None = None,
                      on_tile: Callable[[int, int], None] | None = None) -> list[np.ndarray | ImageError]:
        """Restore several decoded images; same-size small ones run as one batch, large ones tiled.
        Each entry is the restored pixels or the error of that image alone."""
        prepared = [self._prepare(img) for img in images]
        out: list = [None] * len(images)
        groups: dict[tuple, list[int]] = {}
        for i, (x, noise) in enumerate(prepared):
            if self._fits(x):
                groups.setdefault(x.shape, []).append(i)
            else:
                out[i] = self._finish(self._restore_tiled(x, noise, on_tile), images[i], ext)
        for idx in groups.values():
            for k in range(0, len(idx), self.batch):
                part = idx[k:k + self.batch]
                ys = self._run(np.stack([prepared[i][0] for i in part]), [prepared[i][1] for i in part])
                for i, y in zip(part, ys):
                    out[i] = self._finish(y, images[i], ext)
        return out

    def restore_images(self, images: Sequence[Image], ext: str | None = None,
                       on_tile: Callable[[int, int], None] | None = None) -> list[np.ndarray]:
        """Restore several decoded images; raises the first image's error (see ``_restore_each``)."""
        out = self._restore_each(images, ext, on_tile)
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
        like the padded model-space image (C, H', W') with H', W' rounded up to ``size_multiple``;
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
        if noise is not None:
            x, _ = self._prepare(img)
            if not self._fits(x):
                raise RDDMError(f"explicit noise needs an untiled image: {x.shape[1:]} exceeds tile {self.tile}")
            noise.check(self.plan, x.shape)
            out = self._finish(self._run(x[None], [noise])[0], img, ext)
            if isinstance(out, ImageError):
                raise out
        else:
            out = self.restore_images([img], ext=ext, on_tile=on_tile)[0]
        return out[..., None] if pixels.ndim == 3 and pixels.shape[2] == 1 else out

    def restore_file(self, src: str | os.PathLike, dst: str | os.PathLike) -> Path:
        """Restore one file into ``dst`` (written atomically); ``dst`` may not be ``src``."""
        dst = Path(dst)
        same = Path(src).resolve() == dst.resolve()
        if same or (dst.exists() and Path(src).exists() and os.path.samefile(src, dst)):
            raise ImageError(f"{dst}: the output would overwrite the input {src}; choose another name")
        img = read_image(src, self.max_pixels)
        y = self.restore_images([img], ext=dst.suffix)[0]
        return write_atomic(dst, encode_image(y, dst.suffix))

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
        summary = Summary(backend=self.backend)
        t0 = time.perf_counter()
        for result in self._run_jobs(jobs, skip_existing, Path(gt_dir) if gt_dir else None, on_tile):
            summary.results.append(result)
            if on_result:
                on_result(result)
        summary.seconds = time.perf_counter() - t0
        if gt_dir is not None and any(r.metrics for r in summary.results):
            write_metrics_csv(Path(out_dir) / "metrics.csv", summary)
        return summary

    def run_jobs(self, jobs: list[Job], skip_existing: bool = False, gt_dir: str | os.PathLike | None = None,
                 on_tile: Callable[[int, int], None] | None = None) -> Iterator[Result]:
        """Planned jobs -> results, in order: the loop ``restore_paths`` and the Ray actors share."""
        return self._run_jobs(jobs, skip_existing, Path(gt_dir) if gt_dir else None, on_tile)

    def _run_jobs(self, jobs: list[Job], skip_existing: bool, gt_dir: Path | None, on_tile) -> Iterator[Result]:
        pending: list[tuple[Job, Image, float]] = []  # consecutive same-size small images, batched
        pending_key: list = [None]

        def flush() -> Iterator[Result]:
            if not pending:
                return
            batch = list(pending)
            pending.clear()
            t = time.perf_counter()
            try:
                ys = self._restore_each([img for _, img, _ in batch], ext=batch[0][0].dst.suffix, on_tile=on_tile)
            except RDDMError as e:
                for job, _, _ in batch:
                    yield Result(job, "failed", str(e))
                return
            share = (time.perf_counter() - t) / len(batch)
            for (job, _, t_read), y in zip(batch, ys):
                if isinstance(y, ImageError):
                    yield Result(job, "failed", str(y))
                else:
                    yield self._save(job, y, gt_dir, t_read + share)

        for job in jobs:
            if job.error:
                yield from flush()
                yield Result(job, "failed", job.error)
                continue
            if skip_existing and is_done(job):
                yield Result(job, "skipped")
                continue
            t = time.perf_counter()
            try:
                img = read_image(job.src, self.max_pixels)
            except RDDMError as e:
                yield from flush()
                yield Result(job, "failed", str(e))
                continue
            key = (self._padded(img), job.dst.suffix)
            small = max(key[0]) <= self.tile
            if pending and (not small or key != pending_key[0]):
                yield from flush()
            pending.append((job, img, time.perf_counter() - t))
            pending_key[0] = key
            if not small or len(pending) >= self.batch:
                yield from flush()
        yield from flush()

    def _save(self, job: Job, y: np.ndarray, gt_dir: Path | None, seconds: float) -> Result:
        t = time.perf_counter()
        try:
            write_atomic(job.dst, encode_image(y, job.dst.suffix))
        except ImageError as e:
            return Result(job, "failed", f"{job.dst}: {e}" if str(job.dst) not in str(e) else str(e))
        metrics, err = None, ""
        if gt_dir is not None:
            gt = find_gt(gt_dir, job)
            try:
                if gt is None:
                    raise ImageError(f"{job.src}: no ground truth named {job.src.stem}.* in {gt_dir}")
                metrics = image_metrics(y, gt)
            except (RDDMError, ValueError) as e:
                err = str(e)
        return Result(job, "restored", err, seconds + time.perf_counter() - t, metrics)


def write_metrics_csv(path: Path, summary: Summary) -> Path:
    """file, psnr, ssim per image, then the means (written atomically)."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["file", "psnr", "ssim"])
    for r in summary.results:
        if r.metrics:
            w.writerow([str(r.job.src), f"{r.metrics['psnr']:.4f}", f"{r.metrics['ssim']:.6f}"])
    mean = summary.mean_metrics()
    w.writerow(["mean", f"{mean['psnr']:.4f}", f"{mean['ssim']:.6f}"])
    return write_atomic(path, buf.getvalue().encode())


def load_model(model: str | os.PathLike | None = None, backend: str = "auto", **options) -> Restorer:
    """Load a model (default: the built-in one) for restoring arrays, files and folders.

    ``options``: Restorer settings (steps, eta, seed, tile, overlap, batch), model options
    (objective, sum_scale, timesteps) and the backend's own options (``rddm_infer.backends.registry``);
    an unknown option, or one that does not apply, is an error naming it."""
    return Restorer(model, backend, **options)


def restore_folder(inputs: str | os.PathLike | Iterable[str | os.PathLike], out_dir: str | os.PathLike,
                   model: str | os.PathLike | None = None, **options) -> Summary:
    """One-call folder restore with the given (or built-in) model."""
    keys = ("suffix", "ext", "skip_existing", "recursive", "gt_dir")
    run_opts = {k: options.pop(k) for k in keys if k in options}
    items = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    with Restorer(model, **options) as r:
        return r.restore_paths(items, out_dir, **run_opts)
