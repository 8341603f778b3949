"""The jobs layer's pieces: which files to restore, where each output goes, and what a run reports.

Pure bookkeeping (no model): inputs (files, folders, globs) become :class:`Job` s with planned,
never-clashing outputs outside the inputs, checked before any inference; results, summaries,
ground-truth metrics and the metrics CSV. Every executor (the single-process
:class:`rddm_infer.restore.local.Restorer`, the Ray actors of :mod:`rddm_infer.restore.ray_executor`) plans with these.
"""

from __future__ import annotations

import csv
import glob
import io
import os
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from ..io.atomic import remove_stale_temps
from ..errors import ImageError, RDDMError
from ..io.images import IMAGE_EXTS, Image, is_complete_image, read_image, to_model, write_atomic
from ..metrics import psnr, ssim
from ..io.storage import Uri, contains, delete, glob_uri, list_files, location, odd_key


@dataclass
class Job:
    src: Path | Uri  # a Uri for objects in a store (rddm_infer.io.storage): same naming, its own reads and writes
    dst: Path | Uri | None = None
    rel: Path | None = None  # path relative to the input folder (mirrored under the output folder)
    error: str = ""  # set when the job cannot even start (missing input, name clash)


@dataclass
class Result:
    job: Job
    status: str  # restored | failed | skipped
    error: str = ""
    seconds: float = 0.0
    metrics: dict | None = None  # psnr, ssim of the file as saved; psnr_in of the input (with --gt)
    mode: str = ""  # how this image was restored, when chosen per image (e.g. "pixel-shuffle 2, 1 step: ...")


@dataclass
class Summary:
    results: list[Result] = field(default_factory=list)
    seconds: float = 0.0
    engine: str = ""  # what ran the model, in words (the JSON summary's "backend")

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)

    @property
    def backend(self) -> str:
        """Deprecated name of :attr:`engine`."""
        warnings.warn("Summary.backend is deprecated: use .engine", DeprecationWarning, stacklevel=2)
        return self.engine

    @property
    def images_per_s(self) -> float:
        n = self.count("restored")
        return n / self.seconds if self.seconds > 0 else 0.0

    def mean_metrics(self) -> dict[str, float]:
        rows = [r.metrics for r in self.results if r.metrics]
        keys = [k for k in ("psnr", "ssim", "psnr_in") if all(k in m for m in rows)]
        return {k: float(np.mean([m[k] for m in rows])) for k in keys} if rows else {}

    def line(self) -> str:
        return (f"restored {self.count('restored')}, failed {self.count('failed')}, "
                f"skipped {self.count('skipped')}")

    def to_dict(self) -> dict:
        return {"restored": self.count("restored"), "failed": self.count("failed"),
                "skipped": self.count("skipped"), "seconds": round(self.seconds, 3),
                "images_per_s": round(self.images_per_s, 3), "backend": self.engine,
                "errors": [{"file": str(r.job.src), "error": r.error} for r in self.results if r.status == "failed"],
                "outputs": [str(r.job.dst) for r in self.results if r.status == "restored"],
                **({"metrics": {"mean": self.mean_metrics(),
                                "images": {str(r.job.src): r.metrics for r in self.results if r.metrics}}}
                   if any(r.metrics for r in self.results) else {})}


def _image_name(p: Path | Uri) -> bool:
    return p.suffix.lower() in IMAGE_EXTS and not p.name.startswith(".")


def _is_image(p: Path) -> bool:
    return p.is_file() and _image_name(p)


def _glob(pattern: str, recursive: bool) -> list[Path]:
    """``glob.glob`` follows symlinked folders under ``**`` and never ends in a symlink loop; pathlib's
    ``**`` does not descend into symlinks, so a recursive pattern is split into a plain root and a
    pathlib pattern below it."""
    if not recursive or "**" not in pattern:
        return [Path(m) for m in glob.glob(pattern, recursive=recursive)]
    parts = Path(pattern).parts
    k = _magic_index(parts)
    return list(_glob_root(pattern).glob(str(Path(*parts[k:]))))


def _in_output(f: Path | Uri, root: Path | Uri, out: Path | Uri | None) -> bool:
    """True for a file under the output folder when that folder lies inside the input ``root``
    (``-o in/out``); when the output folder is the input folder itself (``-o in --suffix _r``) nothing is left out."""
    return out is not None and contains(out, f) and not contains(out, root)


def _magic_index(parts: tuple[str, ...]) -> int:
    return next((i for i, part in enumerate(parts) if glob.has_magic(part)), len(parts))


def _glob_root(pattern: str) -> Path:
    """The plain folder a glob pattern starts from (``a/b`` of ``a/b/**/*.png``)."""
    parts = Path(pattern).parts
    k = _magic_index(parts)
    return Path(*parts[:k]) if k else Path(".")


@dataclass(frozen=True)
class Listing(Sequence):
    """Inputs already listed (the CLI checks them before the model loads): :func:`collect_inputs` hands out copies of
    these jobs instead of listing again, so a large folder or bucket is listed once and the run restores exactly
    the files that were checked. Iterated, it is the inputs as given."""
    inputs: tuple
    recursive: bool
    exclude: str | None
    jobs: tuple[Job, ...]

    def __getitem__(self, i):
        return self.inputs[i]

    def __len__(self) -> int:
        return len(self.inputs)


def list_inputs(inputs: Sequence[str | os.PathLike], recursive: bool = False,
                exclude: str | os.PathLike | None = None) -> Listing:
    """:func:`collect_inputs`, kept for the run (see :class:`Listing`)."""
    jobs = collect_inputs(inputs, recursive, exclude)
    return Listing(tuple(inputs), recursive, None if exclude is None else str(exclude), tuple(jobs))


def collect_inputs(inputs: Sequence[str | os.PathLike], recursive: bool = False,
                   exclude: str | os.PathLike | None = None) -> list[Job]:
    """Files, folders (sorted; image extensions only) and globs -> jobs, in order, without repeats.

    Files that folders and globs find under ``exclude`` (the output folder) are left out, so
    restoring ``in/`` into ``in/out`` never picks up its own earlier outputs. A :class:`Listing` made with the same
    ``recursive`` and ``exclude`` is not listed again.
    """
    if isinstance(inputs, Listing) and (inputs.recursive, inputs.exclude) == (
            recursive, None if exclude is None else str(exclude)):
        return [replace(j) for j in inputs.jobs]
    jobs: list[Job] = []
    seen: set[Path] = set()
    skip = location(exclude).resolve() if exclude is not None else None

    def add(p: Path | Uri, rel: Path | None = None, error: str = ""):
        error = error or (odd_key(p) if isinstance(p, Uri) else "")  # a listed key pyarrow cannot address exactly
        key = p.resolve() if not error else p
        if key not in seen:
            seen.add(key)
            jobs.append(Job(p, rel=rel, error=error))

    for item in inputs:
        p = location(item)
        kind, found = _find(p, str(item), recursive, skip)
        if kind == "file":
            add(p)
        elif kind == "dir":
            if not found:
                add(p, error=f"{p}: no images found in this folder (extensions {', '.join(IMAGE_EXTS)}"
                             f"{'' if recursive else '; -r descends into subfolders'})")
            for f in found:
                add(f, f.relative_to(p))  # a key kept (no empty, . or .. segment) has the same text as a path
        elif kind == "glob":
            if not found:
                add(p, error=f"{p if isinstance(p, Uri) else item}: no images found (no files match this pattern)")
            for f in found:
                add(f)
        else:
            add(p, error=f"{p}: no such file or folder")
    return jobs


def _find(p: Path | Uri, item: str, recursive: bool, skip: Path | Uri | None) -> tuple[str, list]:
    """What one input names: ``("file", [])``, ``("dir", its images)``, ``("glob", its matches)`` or ``("", [])``.
    A store folder is one listing (no request per object)."""
    if isinstance(p, Uri):
        kind = p.kind()
        if kind == "dir":
            return kind, sorted(f for f in list_files(p, recursive) if _image_name(f) and not _in_output(f, p, skip))
        if not kind and glob.has_magic(p.path):
            return "glob", sorted(f for f in glob_uri(p, recursive) if not _in_output(f, p.parent, skip))
        return kind, []
    if p.is_dir():
        files = p.rglob("*") if recursive else p.iterdir()
        return "dir", sorted((f for f in files if _is_image(f) and not _in_output(f, p, skip)),
                             key=lambda f: f.relative_to(p).as_posix())
    if p.exists() or p.is_symlink():
        return "file", []
    if glob.has_magic(item):
        return "glob", [m for m in sorted(_glob(item, recursive))
                        if m.is_file() and not _in_output(m, _glob_root(item), skip)]
    return "", []


def plan_outputs(jobs: list[Job], out_dir: str | os.PathLike, suffix: str = "", ext: str | None = None) -> None:
    """Destination of each job: ``out_dir/[subfolders/]stem+suffix.ext``; never an input, never shared."""
    check_suffix(suffix)
    out_dir = location(out_dir)
    # Compared without case: on a case-insensitive file system (macOS, Windows) x.JPG and x.jpg are one file.
    inputs = {_fold(j.src.resolve()) for j in jobs if not j.error}
    taken: dict[str, Path] = {}
    for j in jobs:
        if j.error:
            continue
        e = (ext if ext.startswith(".") else "." + ext) if ext else j.src.suffix  # the input's case is kept
        if e.lower() not in IMAGE_EXTS:
            j.error = f"{j.src}: unsupported output format {e!r} (choose one of {', '.join(IMAGE_EXTS)})"
            continue
        parent = out_dir / j.rel.parent if j.rel is not None else out_dir
        j.dst = parent / f"{j.src.stem}{suffix}{e}"
        key = _fold(j.dst.resolve())
        if key in inputs:
            j.error = f"{j.src}: output {j.dst} would overwrite an input; choose another -o or a --suffix"
        elif key in taken:
            j.error = f"{j.src}: output {j.dst} is also the output of {taken[key]}; use --suffix or --ext"
        else:
            taken[key] = j.src


def _fold(p) -> str:
    return str(p).casefold()


def check_suffix(suffix: str) -> None:
    """A suffix is part of a file name: a separator in it would write outside the output folder."""
    if any(c in suffix for c in ("/", "\\", "\0")) or (os.altsep and os.altsep in suffix):
        raise RDDMError(f"--suffix {suffix!r}: must not contain path separators (it is appended to file names)")


def check_writable(out_dir: Path | Uri) -> None:
    """Create the output folder and prove a file can be written there, before any inference
    (in a store: write and delete a test object, which proves the bucket and the credentials)."""
    if isinstance(out_dir, Uri):
        try:
            write_atomic(out_dir / ".rddm-write-test", b"")
            delete(out_dir / ".rddm-write-test")
        except ImageError as e:
            raise RDDMError(f"{out_dir}: output folder is not writable ({str(e).split(': ', 1)[-1]})") from None
        return
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
    check_writable(location(out_dir))
    remove_stale_temps(j.dst for j in jobs if isinstance(j.dst, Path))  # a store has no temporaries
    return jobs


def is_done(job: Job) -> bool:
    """``--skip-existing``: an output counts as done only when it is a complete image (a 0-byte or cut file is redone)."""
    return job.dst is not None and job.dst.exists() and is_complete_image(job.dst)


def find_gt(gt_dir: Path | Uri, job: Job) -> Path | Uri | None:
    """Ground truth with the same relative name (any image extension)."""
    rel = job.rel if job.rel is not None else Path(job.src.name)
    for cand in [gt_dir / rel, *(gt_dir / rel.with_suffix(e) for e in IMAGE_EXTS)]:
        if cand.is_file():
            return cand
    return None


def image_metrics(restored: np.ndarray, gt_path: Path | Uri, noisy: np.ndarray | None = None) -> dict[str, float]:
    """PSNR / SSIM of ``restored`` against the ground truth, and the input's PSNR (``psnr_in``) when given."""
    a = (to_model(Image(restored)) + 1) * 0.5
    b = (to_model(read_image(gt_path)) + 1) * 0.5
    if a.shape != b.shape:
        raise ImageError(f"{gt_path}: ground truth is {b.shape[2]}×{b.shape[1]}, the output {a.shape[2]}×{a.shape[1]}")
    out = {"psnr": psnr(a, b), "ssim": ssim(a, b)}
    if noisy is not None:
        out["psnr_in"] = psnr((to_model(Image(noisy)) + 1) * 0.5, b)
    return out


def _num(v: float | None, digits: int) -> str:
    return "" if v is None else f"{v:.{digits}f}"


def write_metrics_csv(path: Path | Uri, summary: Summary) -> Path | Uri:
    """Per image: file, psnr, ssim (of the file as saved), psnr_in (the input's), gain_db, mode (when chosen per
    image); then the means. Written atomically."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["file", "psnr", "ssim", "psnr_in", "gain_db", "mode"])
    for r in summary.results:
        if r.metrics:
            m = r.metrics
            gain = m["psnr"] - m["psnr_in"] if "psnr_in" in m else None
            w.writerow([str(r.job.src), _num(m["psnr"], 4), _num(m["ssim"], 6), _num(m.get("psnr_in"), 4),
                        _num(gain, 4), r.mode])
    mean = summary.mean_metrics()
    gain = mean["psnr"] - mean["psnr_in"] if "psnr_in" in mean else None
    w.writerow(["mean", _num(mean["psnr"], 4), _num(mean["ssim"], 6), _num(mean.get("psnr_in"), 4), _num(gain, 4), ""])
    return write_atomic(path, buf.getvalue().encode())
