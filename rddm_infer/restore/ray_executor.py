"""Restore on a Ray cluster (Ray Data): the same files, names, pixels and error lines as one process.

The driver plans the jobs exactly as ``Restorer.restore_paths`` does (``prepare_jobs``:
inputs, names, writability, stale temps); Ray Data streams them through a pool of actors, each holding one ``Restorer``
(one runner, loaded once) and running the same ``Restorer.run_jobs`` loop on its share: read and
decode with opencv, restore, write atomically under the real name. Noise is drawn per image from
the seed, so which worker ran an image, and beside which others, changes no pixel.

>>> from rddm_infer.restore.ray_executor import restore_paths
>>> summary = restore_paths(["photos/"], "restored/", workers=2)       # a local Ray runtime
>>> summary = restore_paths(["/shared/in"], "/shared/out", address="auto", gpus_per_worker=1)

Inside your own Ray Data pipeline, map rows ``{"src", "dst"[, "rel", "index"]}`` (``job_rows``)
through :class:`RestoreBatch`. ``ray`` is imported here only, and only when a run starts.
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from ..backends.registry import BY_NAME
from ..errors import BackendUnavailable, RDDMError
from ..io.storage import location, to_str
from .jobs import Job, Result, Summary, is_done, prepare_jobs, write_metrics_csv
from .local import Restorer

RESULT_COLUMNS = ("index", "status", "error", "seconds", "psnr", "ssim", "backend")


# ------------------------------------------------------------------------------------ the actor

def job_rows(jobs: Sequence[Job]) -> list[dict]:
    """Planned jobs -> Ray Data rows (plain strings, so any node can rebuild the job)."""
    return [{"index": i, "src": to_str(j.src), "dst": to_str(j.dst), "rel": "" if j.rel is None else str(j.rel)}
            for i, j in enumerate(jobs)]


class RestoreBatch:
    """Callable class for ``Dataset.map_batches``: one Restorer per actor; rows in, one result row per job out.

    Each batch runs through ``Restorer.run_jobs``, the single-process loop, so reading, batching,
    writing (atomic, real names), ``skip_existing``, metrics and the one-line errors are the same.
    """

    def __init__(self, model: str | os.PathLike | None = None, backend: str = "auto", *,
                 skip_existing: bool = False, gt_dir: str | os.PathLike | None = None, cwd: str | None = None,
                 **options):
        if cwd:  # relative paths (and so the error lines) mean what they meant on the driver
            try:
                os.chdir(cwd)
            except OSError as e:
                raise RDDMError(f"{cwd}: the driver's working directory is not reachable on this Ray node "
                                f"({e.strerror or e}); pass absolute paths on a shared file system") from None
        self.restorer = Restorer(model, backend, **options)
        self.skip_existing, self.gt_dir = skip_existing, (str(gt_dir) if gt_dir else None)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["src"])
        rels = batch["rel"] if "rel" in batch else [""] * n
        jobs = [Job(location(s), location(d), Path(r) if r else None)
                for s, d, r in zip(batch["src"], batch["dst"], rels)]
        results = list(self.restorer.run_jobs(jobs, self.skip_existing, self.gt_dir))
        nan = float("nan")
        return {"index": np.asarray(batch["index"] if "index" in batch else np.arange(n), dtype=np.int64),
                "status": np.array([r.status for r in results], dtype=object),
                "error": np.array([r.error for r in results], dtype=object),
                "seconds": np.array([r.seconds for r in results], dtype=np.float64),
                "psnr": np.array([r.metrics["psnr"] if r.metrics else nan for r in results], dtype=np.float64),
                "ssim": np.array([r.metrics["ssim"] if r.metrics else nan for r in results], dtype=np.float64),
                "backend": np.array([self.restorer.engine] * n, dtype=object)}

    def __del__(self):
        restorer = getattr(self, "restorer", None)
        if restorer is not None:
            restorer.close()


# --------------------------------------------------------------------------------- resources

@dataclass(frozen=True)
class Pool:
    """How many actors, and what each reserves (Ray logical resources)."""

    workers: int
    cpus: float
    gpus: float
    threads: int | None = None  # engine threads per actor, when chosen here

    def describe(self) -> str:
        gpu = f", {self.gpus:g} GPU" if self.gpus else ""
        threads = f" ({self.threads} engine thread{'s' if self.threads != 1 else ''} each)" if self.threads else ""
        return f"{self.workers} worker{'s' if self.workers != 1 else ''} × {self.cpus:g} CPU{gpu}{threads}"


def size_pool(total_cpus: float, total_gpus: float = 0.0, *, workers: int | None = None,
              cpus_per_worker: float | None = None, gpus_per_worker: float | None = None,
              node_cpus: float | None = None, node_gpus: float | None = None) -> Pool:
    """Actors that can all start and still leave CPU for Ray Data's own tasks, or a clear error.

    Measured on 2 cores: actors reserving every CPU (1 × 2 or 2 × 1) starve Ray Data's tasks and
    the job hangs; 2 × 0.5 runs. So one CPU (half of a 1-CPU cluster) is always kept free.
    """
    keep = min(1.0, total_cpus / 2)
    budget = total_cpus - keep
    gpus = float(gpus_per_worker or 0.0)
    if workers is not None and workers < 1:
        raise RDDMError(f"--workers must be >= 1, got {workers}")
    if cpus_per_worker is not None and cpus_per_worker <= 0:
        raise RDDMError(f"--cpus-per-worker must be > 0, got {cpus_per_worker:g}")
    if gpus < 0:
        raise RDDMError(f"--gpus-per-worker must be >= 0, got {gpus:g}")
    if budget <= 0:
        raise RDDMError(f"the Ray cluster has {total_cpus:g} CPUs: nothing left for restore workers")
    if gpus > 0:
        if total_gpus < gpus:
            raise RDDMError(f"--gpus-per-worker {gpus:g}, but the Ray cluster has {total_gpus:g} GPUs")
        if node_gpus is not None and gpus > node_gpus:
            raise RDDMError(f"--gpus-per-worker {gpus:g}, but no Ray node has more than {node_gpus:g} GPUs")
        if workers is None:
            workers = max(1, int(total_gpus // gpus))
        if workers * gpus > total_gpus + 1e-9:
            raise RDDMError(f"{workers} workers × {gpus:g} GPUs need {workers * gpus:g} GPUs; the Ray cluster has "
                            f"{total_gpus:g}: lower --workers or --gpus-per-worker")
    if cpus_per_worker is None:  # GPU actors need little CPU; CPU actors take ~2 threads each
        per = 1.0 if gpus > 0 else 2.0
        cpus_per_worker = min(per, budget / workers) if workers is not None else min(per, budget)
    if workers is None:
        workers = max(1, int(budget // cpus_per_worker + 1e-9))
    if node_cpus is not None and cpus_per_worker > node_cpus - min(1.0, node_cpus / 2) + 1e-9:
        raise RDDMError(f"--cpus-per-worker {cpus_per_worker:g} does not fit a Ray node ({node_cpus:g} CPUs at most, "
                        f"one kept free for Ray Data's tasks)")
    if workers * cpus_per_worker > budget + 1e-9:
        raise RDDMError(f"{workers} workers × {cpus_per_worker:g} CPUs = {workers * cpus_per_worker:g} CPUs, but the "
                        f"Ray cluster has {total_cpus:g} and {keep:g} must stay free for Ray Data's read/write tasks "
                        f"(else the job hangs): lower --workers or --cpus-per-worker")
    return Pool(workers, round(float(cpus_per_worker), 4), gpus)


def _ray():
    try:
        import ray
    except ImportError:
        raise RDDMError("Ray is not installed: pip install 'rddm-infer[cluster]'") from None
    return ray


@contextmanager
def ray_runtime(address: str | None = None, num_cpus: int | None = None) -> Iterator[object]:
    """Connect to ``address`` (``auto``, ``host:port``, ``ray://host:port``) or start a local runtime
    (``address=None``); on exit disconnect, and stop the local runtime if this call started it.
    An already-initialised Ray session (the caller's own) is used as is and left running."""
    if address is None:  # a local runtime listens on loopback only (read when ray is first imported)
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray = _ray()
    if ray.is_initialized():
        yield ray
        return
    quiet = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    try:
        if address is None:
            ray.init(address="local", num_cpus=num_cpus, **quiet)
        else:
            ray.init(address=address, **{k: v for k, v in quiet.items() if k != "include_dashboard"})
    except (ConnectionError, RuntimeError, ValueError) as e:
        ray.shutdown()
        where = "a local Ray runtime" if address is None else f"the Ray cluster at {address}"
        hint = "" if address is None or os.environ.get("RAY_AUTH_MODE") else \
            " (a cluster with token authentication needs RAY_AUTH_MODE=token and its token in RAY_AUTH_TOKEN)"
        raise RDDMError(f"cannot start or reach {where}: {str(e).strip().splitlines()[0]}{hint}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def cluster_pool(ray, **sizes) -> Pool:
    """Size the actor pool from what the connected cluster has (totals and the largest node)."""
    res = ray.cluster_resources()
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    return size_pool(res.get("CPU", 0.0), res.get("GPU", 0.0),
                     node_cpus=max((n.get("CPU", 0.0) for n in nodes), default=None),
                     node_gpus=max((n.get("GPU", 0.0) for n in nodes), default=None), **sizes)


def _unwrap(e: BaseException) -> RDDMError | None:
    """The one line of an RDDMError an actor raised, out of Ray's wrappers (which keep only its text)."""
    todo, seen = [e], set()
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, RDDMError):
            return RDDMError(str(x))
        todo += [getattr(x, "cause", None), x.__cause__, x.__context__]
    found = re.findall(r"^rddm_infer\.errors\.\w+: (.+)$", str(e), re.M)
    return RDDMError(found[-1]) if found else None


def check_options(model, backend: str, options: dict) -> Restorer | None:
    """Load the model once here, so a bad model or option is one line before any actor starts
    (skipped where this machine lacks the backend, e.g. a TensorRT engine on a CPU head node).
    Returns the (closed) Restorer, whose settings describe the run."""
    try:
        probe = Restorer(model, backend, **options)
    except BackendUnavailable:
        return None
    probe.close()
    return probe


# ----------------------------------------------------------------------------------- the jobs

def restore_paths(inputs: Sequence[str | os.PathLike], out_dir: str | os.PathLike, *,
                  model: str | os.PathLike | None = None, backend: str = "auto", address: str | None = None,
                  workers: int | None = None, cpus_per_worker: float | None = None,
                  gpus_per_worker: float | None = None, suffix: str = "", ext: str | None = None,
                  skip_existing: bool = False, recursive: bool = False, gt_dir: str | os.PathLike | None = None,
                  on_start: Callable[[list[Job]], None] | None = None,
                  on_result: Callable[[Result], None] | None = None,
                  on_pool: Callable[[Pool], None] | None = None, check_first: bool = True, **options) -> Summary:
    """``Restorer.restore_paths`` on Ray: same jobs, outputs, errors, CSV and Summary (results in input order;
    ``on_result`` sees them as they finish). ``options`` go to each actor's Restorer (steps, seed, tile, ...).
    Paths must be visible to every node (local runtime, or a shared file system), or be store URIs
    (``s3://``, ``gs://``: :mod:`rddm_infer.io.storage`) that every node can reach."""
    if check_first:
        check_options(model, backend, options)
    jobs = prepare_jobs(inputs, out_dir, recursive=recursive, suffix=suffix, ext=ext)
    if on_start:
        on_start(jobs)
    summary = Summary()
    by_index: dict[int, Result] = {}

    def done(i: int, r: Result) -> None:
        by_index[i] = r
        if on_result:
            on_result(r)

    todo = []
    for i, j in enumerate(jobs):
        if j.error:
            done(i, Result(j, "failed", j.error))
        elif skip_existing and is_done(j):
            done(i, Result(j, "skipped"))
        else:
            todo.append(i)
    t0 = time.perf_counter()
    if todo:
        sizes = dict(workers=workers, cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker)
        with ray_runtime(address) as ray:
            pool = cluster_pool(ray, **sizes)
            spec = BY_NAME.get(backend)
            if not pool.gpus and options.get("threads") is None and (spec is None or spec.option("threads")):
                options["threads"] = max(1, math.ceil(pool.cpus))  # as many engine threads as CPUs reserved
                pool = replace(pool, threads=options["threads"])
            if on_pool:
                on_pool(pool)
            for row in _stream(ray, [dict(r, index=i) for i, r in zip(todo, job_rows([jobs[i] for i in todo]))],
                               pool, model, backend, skip_existing, gt_dir, options):
                j = jobs[row["index"]]
                summary.engine = summary.engine or str(row["backend"])
                metrics = None if math.isnan(row["psnr"]) else {"psnr": row["psnr"], "ssim": row["ssim"]}
                done(row["index"], Result(j, str(row["status"]), str(row["error"] or ""), row["seconds"], metrics))
    summary.seconds = time.perf_counter() - t0
    summary.results = [by_index[i] for i in range(len(jobs))]
    if gt_dir is not None and any(r.metrics for r in summary.results):
        write_metrics_csv(location(out_dir) / "metrics.csv", summary)
    return summary


def _stream(ray, rows: list[dict], pool: Pool, model, backend: str, skip_existing: bool, gt_dir,
            options: dict) -> Iterator[dict]:
    """Rows through the actor pool, results streamed back as they finish."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False  # the CLI draws its own
    ctx.wait_for_min_actors_s = 600  # an actor pool that cannot start is an error, not a hang
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # its notices (progress bars off, ...) are not the user's
    per_call = max(int(options.get("batch", 1) or 1), 1)  # one engine call's worth of images per actor call
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows) // per_call, 1000)))
    model = str(model) if model is not None else None
    ds = ds.map_batches(RestoreBatch, batch_size=per_call, batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=pool.workers),
                        num_cpus=pool.cpus, num_gpus=pool.gpus or None,
                        fn_constructor_kwargs=dict(model=model, backend=backend, skip_existing=skip_existing,
                                                   gt_dir=to_str(location(gt_dir)) if gt_dir else None,
                                                   cwd=os.getcwd(), **options))
    try:
        for row in ds.iter_rows():
            yield {k: row[k] for k in RESULT_COLUMNS}
    except Exception as e:  # an actor that could not start (bad model or option): its one line
        err = _unwrap(e)
        if err is None:
            raise
        raise err from None


class RayRestorer:
    """What the CLI needs of a Restorer (``restore_paths``, a context manager), running on Ray."""

    def __init__(self, model=None, backend: str = "auto", *, address: str | None = None, workers: int | None = None,
                 cpus_per_worker: float | None = None, gpus_per_worker: float | None = None, quiet: bool = False,
                 **options):
        self.model, self.requested_backend, self.options, self.quiet = model, backend, options, quiet
        self.sizes = dict(address=address, workers=workers, cpus_per_worker=cpus_per_worker,
                          gpus_per_worker=gpus_per_worker)
        probe = check_options(model, backend, options)
        # What the driver's own load saw, for the run's report (None where this machine lacks the backend).
        self.meta = self.plan = self.choice = None
        self.seed, self.tile, self.overlap, self.batch, self.pixel_shuffle, self.self_ensemble = (
            options.get(k) for k in ("seed", "tile", "overlap", "batch", "pixel_shuffle", "self_ensemble"))
        self.engine = f"{backend} in each Ray worker"
        if probe is not None:
            self.meta, self.plan, self.choice = probe.meta, probe.plan, probe.choice
            self.seed, self.tile, self.overlap, self.batch = probe.seed, probe.tile, probe.overlap, probe.batch
            self.pixel_shuffle, self.self_ensemble = probe.pixel_shuffle, probe.self_ensemble
            self.engine = f"{probe.engine} in each Ray worker"

    def _announce(self, pool: Pool) -> None:
        if not self.quiet:
            where = self.sizes["address"] or "a local Ray runtime"
            print(f"ray: {pool.describe()} on {where}; {self.requested_backend} backend in each worker", file=sys.stderr,
                  flush=True)

    def restore_paths(self, inputs, out_dir, *, on_tile=None, **kw) -> Summary:
        """As Restorer.restore_paths (``on_tile`` is not reported from remote workers)."""
        return restore_paths(inputs, out_dir, model=self.model, backend=self.requested_backend, on_pool=self._announce,
                             check_first=False,
                             **self.sizes, **kw, **self.options)

    def __enter__(self) -> "RayRestorer":
        return self

    def __exit__(self, *exc) -> None:
        pass
