"""Restore on a Ray cluster (Ray Data): the same files, names, pixels and error lines as one process.

The driver plans the jobs exactly as ``Restorer.restore_paths`` does (``prepare_jobs``:
inputs, names, writability, stale temps); Ray Data streams them through a pool of actors, each holding one ``Restorer``
(one runner, loaded once) and running the same ``Restorer.run_jobs`` loop on its share: read and
decode with opencv, restore, write atomically under the real name. Noise is drawn per image from
the seed, so which worker ran an image, and beside which others, changes no pixel.

>>> from rddm_infer.restore.ray_executor import restore_paths
>>> summary = restore_paths(["photos/"], "restored/", workers=2)       # a local Ray runtime
>>> summary = restore_paths(["/shared/in"], "/shared/out", address="auto", gpus_per_worker=1)

The Ray driver runs in a child process (:func:`_driver_main`): Ray ends a driver process whose raylet or GCS
died (its C++ core exits it, no Python exception), so the process the user started stays outside and reports
what was restored, what was left, and exits 3 (:class:`~rddm_infer.errors.ClusterLost`). Connecting is bounded:
the address must answer within ``connect_timeout`` seconds (:func:`reach`), else one line.

Inside your own Ray Data pipeline (or your own ``ray.init`` session, which runs in your process), map rows
``job_rows(jobs)`` through :class:`RestoreBatch`. ``ray`` is imported here only, and only when a run starts.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from ..backends.registry import BY_NAME
from ..errors import BackendUnavailable, ClusterLost, RDDMError
from ..io.images import is_complete_image
from ..io.storage import from_fields, location, modified, to_fields
from .jobs import Job, Result, Summary, is_done, prepare_jobs, write_metrics_csv
from .local import Restorer
from .memory import copies_per_node
from .overlapped import local_cpus

RESULT_COLUMNS = ("index", "status", "error", "seconds", "psnr", "ssim", "psnr_in", "mode", "backend")
CONNECT_TIMEOUT = 30.0  # seconds: --ray-connect-timeout's default


# ------------------------------------------------------------------------------------ the actor

def job_rows(jobs: Sequence[Job]) -> list[dict]:
    """Planned jobs -> Ray Data rows of plain fields (scheme, path, query per location): a worker rebuilds each
    job from its fields, never by parsing a printed URI (a listed key may hold ``?`` or ``#``)."""
    rows = []
    for i, j in enumerate(jobs):
        row = {"index": i, "rel": "" if j.rel is None else j.rel.as_posix()}
        for side, loc in (("src", j.src), ("dst", j.dst)):
            fields = to_fields(loc) if loc is not None else ("", "", "")  # no output: a job that failed planning
            row[f"{side}_scheme"], row[f"{side}_path"], row[f"{side}_query"] = fields
        rows.append(row)
    return rows


def row_jobs(batch: dict) -> list[Job]:
    """The inverse of :func:`job_rows` for one batch. Rows with plain ``src``/``dst`` strings (typed by hand in
    your own pipeline) are parsed as a user's paths are."""
    n = len(batch["src_path"] if "src_path" in batch else batch["src"])
    rels = batch["rel"] if "rel" in batch else [""] * n
    if "src_path" not in batch:
        return [Job(location(s), location(d), Path(r) if r else None)
                for s, d, r in zip(batch["src"], batch["dst"], rels)]
    jobs = []
    for k in range(n):
        src, dst = (from_fields(str(batch[f"{side}_scheme"][k]), str(batch[f"{side}_path"][k]),
                                str(batch[f"{side}_query"][k])) if batch[f"{side}_path"][k] else None
                    for side in ("src", "dst"))
        jobs.append(Job(src, dst, Path(str(rels[k])) if rels[k] else None))
    return jobs


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
        self.skip_existing, self.gt_dir = skip_existing, (location(gt_dir) if gt_dir else None)  # a Path or Uri as is

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        jobs = row_jobs(batch)
        n = len(jobs)
        results = list(self.restorer.run_jobs(jobs, self.skip_existing, self.gt_dir))
        nan = float("nan")
        return {"index": np.asarray(batch["index"] if "index" in batch else np.arange(n), dtype=np.int64),
                "status": np.array([r.status for r in results], dtype=object),
                "error": np.array([r.error for r in results], dtype=object),
                "seconds": np.array([r.seconds for r in results], dtype=np.float64),
                "psnr": np.array([r.metrics["psnr"] if r.metrics else nan for r in results], dtype=np.float64),
                "ssim": np.array([r.metrics["ssim"] if r.metrics else nan for r in results], dtype=np.float64),
                "psnr_in": np.array([(r.metrics or {}).get("psnr_in", nan) for r in results], dtype=np.float64),
                "mode": np.array([r.mode for r in results], dtype=object),
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


def check_sizes(workers=None, cpus_per_worker=None, gpus_per_worker=None, connect_timeout=None) -> None:
    """The Ray numbers the user typed: finite, and > 0 (GPUs: >= 0), each a one-line error naming its flag."""
    for flag, value, zero in (("--workers", workers, False), ("--cpus-per-worker", cpus_per_worker, False),
                              ("--gpus-per-worker", gpus_per_worker, True),
                              ("--ray-connect-timeout", connect_timeout, False)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise RDDMError(f"{flag} must be a finite number, got {value!r}")
        if value < 0 or (value == 0 and not zero):
            raise RDDMError(f"{flag} must be {'>= 0' if zero else '> 0'}, got {value:g}")
    if workers is not None and workers != int(workers):
        raise RDDMError(f"--workers must be a whole number, got {workers:g}")


def size_pool(total_cpus: float, total_gpus: float = 0.0, *, workers: int | None = None,
              cpus_per_worker: float | None = None, gpus_per_worker: float | None = None,
              node_cpus: float | None = None, node_gpus: float | None = None,
              where: str = "the Ray cluster") -> Pool:
    """Actors that can all start and still leave CPU for Ray Data's own tasks, or a clear error.

    Measured on 2 cores: actors reserving every CPU (1 × 2 or 2 × 1) starve Ray Data's tasks and
    the job hangs; 2 × 0.5 runs. So one CPU (half of a 1-CPU cluster) is always kept free.
    CPU actors are at most one per CPU: each loads its own model and keeps a core busy, so more would only
    share the cores (100 on 2 cores: 100 model loads); asking for more is refused, never capped silently.
    """
    if workers is not None and workers < 1:
        raise RDDMError(f"--workers must be >= 1, got {workers}")
    check_sizes(workers, cpus_per_worker, gpus_per_worker)
    keep = min(1.0, total_cpus / 2)
    budget = total_cpus - keep
    gpus = float(gpus_per_worker or 0.0)
    if workers is not None and not gpus and workers > max(1, int(total_cpus + 1e-9)):
        most = max(1, int(total_cpus + 1e-9))
        raise RDDMError(f"--workers {workers}: {where} has {total_cpus:g} CPUs, so at most {most} restore "
                        f"worker{'s' if most != 1 else ''} (each loads the model and keeps a core busy): lower "
                        f"--workers or leave it out to size the pool from the cluster")
    if budget <= 0:
        raise RDDMError(f"{where} has {total_cpus:g} CPUs: nothing left for restore workers")
    if gpus > 0:
        if total_gpus < gpus:
            raise RDDMError(f"--gpus-per-worker {gpus:g}, but {where} has {total_gpus:g} GPUs")
        if node_gpus is not None and gpus > node_gpus:
            raise RDDMError(f"--gpus-per-worker {gpus:g}, but no Ray node has more than {node_gpus:g} GPUs")
        if workers is None:
            workers = max(1, int(total_gpus // gpus))
        if workers * gpus > total_gpus + 1e-9:
            raise RDDMError(f"{workers} workers × {gpus:g} GPUs need {workers * gpus:g} GPUs; {where} has "
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
        raise RDDMError(f"{workers} workers × {cpus_per_worker:g} CPUs = {workers * cpus_per_worker:g} CPUs, but "
                        f"{where} has {total_cpus:g} and {keep:g} must stay free for Ray Data's read/write tasks "
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
        num_cpus = num_cpus or local_cpus()
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


def _causes(e: BaseException) -> Iterator[BaseException]:
    """``e`` and every exception in its chain of causes (Ray's ``.cause`` too), each once."""
    todo, seen = [e], set()
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        yield x
        todo += [getattr(x, "cause", None), x.__cause__, x.__context__]


def _unwrap(e: BaseException) -> RDDMError | None:
    """The one line of an RDDMError an actor raised, out of Ray's wrappers (which keep only its text)."""
    for x in _causes(e):
        if isinstance(x, RDDMError):
            return RDDMError(str(x))
    found = re.findall(r"^rddm_infer\.errors\.\w+: (.+)$", str(e), re.M)
    return RDDMError(found[-1]) if found else None


# ---------------------------------------------------------------------------------- connecting

H2_HELLO = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])  # client preface + empty SETTINGS


def reach(address: str, timeout: float) -> None:
    """Before ``ray.init``, which retries an address that does not answer for ten minutes and more: the address
    (``auto`` resolved as Ray resolves it) must accept a TCP connection and answer the HTTP/2 handshake that every
    gRPC server (Ray's GCS, a Ray Client server) answers, within ``timeout`` seconds; else one line naming it."""
    target = _dial_address(address)
    if target is None:
        return
    shown = address if target == address else f"{address} ({target})"
    host, _, port = target.rpartition(":")
    deadline = time.monotonic() + timeout
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as s:
            s.settimeout(max(0.05, deadline - time.monotonic()))
            s.sendall(H2_HELLO)
            head = b""
            while len(head) < 9:
                chunk = s.recv(9 - len(head))
                if not chunk:
                    break
                head += chunk
    except socket.timeout:
        raise RDDMError(f"cannot reach the Ray cluster at {shown}: no answer within {timeout:g} s "
                        f"(--ray-connect-timeout)") from None
    except (OSError, ValueError) as e:
        raise RDDMError(f"cannot reach the Ray cluster at {shown}: {getattr(e, 'strerror', None) or e}") from None
    if len(head) < 9 or head[3] != 0x4:  # a server's first HTTP/2 frame is its SETTINGS (type 4)
        raise RDDMError(f"{shown} is not a Ray cluster: something listens there but does not answer as Ray's GCS "
                        f"does (give the head node's GCS port: 6379 unless `ray start --head --port` chose another)")


def _dial_address(address: str) -> str | None:
    """``host:port`` that ``ray.init(address)`` will dial (``auto``: RAY_ADDRESS, the last ``ray start``'s file,
    a running GCS), or None where it starts a local runtime."""
    if address.startswith("ray://"):
        rest = address[len("ray://"):].rstrip("/")
        return rest if ":" in rest.rsplit("]", 1)[-1] else f"{rest}:10001"
    _ray()
    try:
        from ray._private import services

        return services.canonicalize_bootstrap_address(address)
    except (ConnectionError, ValueError) as e:
        raise RDDMError(f"cannot reach the Ray cluster at {address}: {_first_line(e)}") from None
    except (ImportError, AttributeError):  # Ray moved its private helper: probe what was typed
        return address if address not in ("auto", "local") else None


def _first_line(e: BaseException | str) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


# ----------------------------------------------------------------------------- a lost cluster

def is_cluster_lost(e: BaseException) -> bool:
    """Whether an exception out of Ray means the cluster (its GCS, a node, this driver's raylet) is gone,
    as opposed to a bad image or option: Ray's system, node-death, lost-object and timeout errors, and
    ConnectionError, anywhere in the chain of causes."""
    try:
        from ray import exceptions as rx
    except ImportError:
        return False
    lost = (rx.RaySystemError, rx.NodeDiedError, rx.LocalRayletDiedError, rx.ObjectLostError, rx.GetTimeoutError,
            rx.RpcError, ConnectionError)
    return any(isinstance(x, lost) for x in _causes(e))


def _lost(e: ClusterLost, jobs: list[Job], todo: list[int], by_index: dict[int, Result], done, since: float,
          where: str) -> ClusterLost:
    """The run's account after a loss: an output found complete and written during this run counts as restored
    (its worker wrote it, its report never came back); the rest are left for ``--skip-existing``."""
    for i in todo:
        dst = jobs[i].dst
        if i not in by_index and (modified(dst) or 0) >= since and is_complete_image(dst):
            done(i, Result(jobs[i], "restored", f"{dst}: written before the Ray cluster was lost "
                                                f"(its worker's report never arrived)"))
    summary = Summary(results=[by_index[i] for i in sorted(by_index)])
    left = sum(i not in by_index for i in range(len(jobs)))
    return ClusterLost(f"lost the Ray cluster at {where} ({e}): {summary.count('restored')} restored, "
                       f"{summary.count('failed')} failed, {left} not run; rerun with --skip-existing to continue",
                       summary)


# -------------------------------------------------------------------------- the driver process

def _drive(ray, spec: dict) -> Iterator[tuple[str, object]]:
    """Size the pool, then stream the rows: ``("pool", Pool)``, then ``("row", result row)`` per job."""
    pool = cluster_pool(ray, **spec["sizes"])
    options = dict(spec["options"])
    row = BY_NAME.get(spec["backend"])
    if not pool.gpus and options.get("threads") is None and (row is None or row.option("threads")):
        options["threads"] = max(1, math.ceil(pool.cpus))  # as many engine threads as CPUs reserved
        pool = replace(pool, threads=options["threads"])
    # Actors on one node share its memory: each one's tile check (restore.memory) counts the others.
    options.setdefault("model_copies", copies_per_node(ray.nodes(), pool.workers, pool.cpus, pool.gpus))
    yield "pool", pool
    try:
        for out in _stream(ray, spec["rows"], pool, spec["model"], spec["backend"], spec["skip_existing"],
                           spec["gt_dir"], options):
            yield "row", {k: (v.item() if isinstance(v, np.generic) else v) for k, v in out.items()}
    except RDDMError:
        raise
    except Exception as e:
        if is_cluster_lost(e):
            raise ClusterLost(f"{type(e).__name__}: {_first_line(e)}") from None
        raise


def _drive_here(spec: dict) -> Iterator[tuple[str, object]]:
    """In this process: for a caller's own ``ray.init`` session, which is used as is and left running."""
    with ray_runtime(spec["address"]) as ray:
        yield from _drive(ray, spec)


def _verdict(e: BaseException) -> tuple[str, str]:
    if isinstance(e, ClusterLost):
        return "lost", str(e)
    if isinstance(e, RDDMError):
        return "error", str(e)
    if isinstance(e, KeyboardInterrupt):
        return "interrupted", ""
    return "crash", traceback.format_exc()


def _driver_main(spec_fd: int, msg_fd: int) -> None:
    """The child process's side: read the spec, run the driver, send each event; leave at once when the parent
    goes (its pipe closes), so Ray ends this job's actors instead of restoring for nobody."""
    from multiprocessing.connection import Connection

    for fd in (spec_fd, msg_fd):
        os.set_inheritable(fd, False)  # never into Ray's own processes: the parent reads EOF when this one ends
    inbox, outbox = Connection(spec_fd, writable=False), Connection(msg_fd, readable=False)
    spec = inbox.recv()

    def orphaned() -> None:
        try:
            inbox.recv()
        except (EOFError, OSError):
            pass
        os._exit(1)

    threading.Thread(target=orphaned, daemon=True).start()
    try:
        _ray()  # imported before the connect deadline starts
        outbox.send(("ready", None))
        with ray_runtime(spec["address"]) as ray:
            try:
                for event in _drive(ray, spec):
                    outbox.send(event)
            except BaseException as e:  # before ray.shutdown, which may wait on a cluster that is gone
                outbox.send(_verdict(e))
                os._exit(1)
            outbox.send(("done", None))
    except BaseException as e:
        try:
            outbox.send(_verdict(e))
        finally:
            os._exit(1)


_DRIVER = ("import json, sys; sys.path[:] = json.loads(sys.argv[1]); "
           "from rddm_infer.restore.ray_executor import _driver_main; _driver_main(int(sys.argv[2]), int(sys.argv[3]))")


def _driver_events(spec: dict, timeout: float) -> Iterator[tuple[str, object]]:
    """Run the driver in a child process (Ray may end a driver whose cluster went away without a Python
    exception) and yield its events. Connecting must finish within ``timeout`` seconds; a child that ends
    without a word after connecting means Ray ended it: :class:`ClusterLost`."""
    from multiprocessing.connection import Connection

    address = spec["address"]
    spec_r, spec_w = os.pipe()
    msg_r, msg_w = os.pipe()
    env = dict(os.environ)
    env.setdefault("RAY_gcs_rpc_server_reconnect_timeout_s", str(max(1, math.ceil(timeout))))  # Ray's default: 60
    proc = subprocess.Popen([sys.executable, "-c", _DRIVER, json.dumps(sys.path), str(spec_r), str(msg_w)],
                            pass_fds=(spec_r, msg_w), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=env)
    os.close(spec_r)
    os.close(msg_w)
    noise: deque[str] = deque(maxlen=40)  # Ray's own log lines: the user sees our account, these explain a crash
    reader = threading.Thread(target=lambda: noise.extend(ln.decode(errors="replace").rstrip() for ln in proc.stdout),
                              daemon=True)
    reader.start()
    outbox, inbox = Connection(spec_w, readable=False), Connection(msg_r, writable=False)
    finished = connected = False
    try:
        try:
            outbox.send(spec)
        except OSError:
            pass  # the child is already gone: the reason follows below
        deadline = None
        while True:
            wait = 1.0 if deadline is None else min(1.0, max(0.0, deadline - time.monotonic()))
            if not inbox.poll(wait):
                if deadline is not None and time.monotonic() >= deadline:
                    raise RDDMError(f"cannot reach the Ray cluster at {address}: no answer within {timeout:g} s "
                                    f"(--ray-connect-timeout)")
                if proc.poll() is None or inbox.poll(0):
                    continue
                kind, value = "", None
            else:
                try:
                    kind, value = inbox.recv()
                except (EOFError, OSError):
                    kind, value = "", None
            if kind == "ready":
                deadline = time.monotonic() + timeout if address is not None else None
            elif kind in ("pool", "row"):
                connected, deadline = True, None
                yield kind, value
            elif kind == "done":
                finished = True
                return
            elif kind == "error":
                raise RDDMError(value)
            elif kind == "lost":
                raise ClusterLost(value)
            elif kind == "interrupted":
                raise KeyboardInterrupt
            elif kind == "crash":
                raise RuntimeError(f"the Ray driver process failed:\n{value}")
            else:
                raise _ended(proc, connected, noise)
    finally:
        if finished:
            try:
                proc.wait(timeout=30)  # ray.shutdown in the child
            except subprocess.TimeoutExpired:
                pass
        outbox.close()  # the child leaves at once if it is still there
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        inbox.close()
        reader.join(timeout=1)  # EOF once the child (and anything that shared its output) is gone


def _ended(proc: subprocess.Popen, connected: bool, noise: deque) -> RDDMError:
    """The driver process ended without a word: Ray ended it (its raylet or the GCS went away)."""
    try:
        code = proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        code = None
    said = [m[1] for m in (re.match(r"^\[[^\]]* [EF] \d+ \d+\] \S+:\d+: (.+)$", ln) for ln in noise)
            if m and not m[1].startswith((":info_message:", "Failed to push error"))]  # Ray's chatter, not a cause
    why = f" after: {said[-1].split('. ')[0][:200]}" if said else ""
    status = f"exit status {code}" if code is not None else "still running"
    if connected:
        return ClusterLost(f"Ray ended this run's driver process ({status}){why}")
    return RDDMError(f"the Ray driver process ended ({status}) before the run started{why}"
                     + ("" if said else "; its last output: " + " | ".join(list(noise)[-3:])))


def _own_session() -> bool:
    """The caller already called ``ray.init`` in this process: run there."""
    ray = sys.modules.get("ray")
    return ray is not None and getattr(ray, "is_initialized", lambda: False)()


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
                  gpus_per_worker: float | None = None, connect_timeout: float | None = None, suffix: str = "",
                  ext: str | None = None, skip_existing: bool = False, recursive: bool = False,
                  gt_dir: str | os.PathLike | None = None, on_start: Callable[[list[Job]], None] | None = None,
                  on_result: Callable[[Result], None] | None = None,
                  on_pool: Callable[[Pool], None] | None = None, check_first: bool = True, **options) -> Summary:
    """``Restorer.restore_paths`` on Ray: same jobs, outputs, errors, CSV and Summary (results in input order;
    ``on_result`` sees them as they finish). ``options`` go to each actor's Restorer (steps, seed, tile, ...).
    Paths must be visible to every node (local runtime, or a shared file system), or be store URIs
    (``s3://``, ``gs://``: :mod:`rddm_infer.io.storage`) that every node can reach.
    ``connect_timeout`` (default 30 s) bounds reaching ``address``; a cluster lost mid-run raises
    :class:`~rddm_infer.errors.ClusterLost`, whose ``summary`` counts what was done."""
    sizes = dict(workers=workers, cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker)
    check_sizes(**sizes, connect_timeout=connect_timeout)
    if options.get("io_workers", "auto") in (None, "auto"):  # actors restore one image at a time unless told
        options["io_workers"] = 0
    timeout = CONNECT_TIMEOUT if connect_timeout is None else float(connect_timeout)
    if not _own_session():
        if address is not None:
            reach(address, timeout)  # before anything is planned or written
        elif not gpus_per_worker:  # a local runtime's CPUs are known now
            size_pool(local_cpus(), **sizes, where="this machine (a local Ray runtime)")
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
    t0, started = time.perf_counter(), time.time() - 2  # 2 s: a file system's coarse or skewed clock
    if todo:
        spec = dict(address=address, sizes=sizes, model=str(model) if model is not None else None, backend=backend,
                    skip_existing=skip_existing, gt_dir=location(gt_dir) if gt_dir else None, options=options,
                    rows=[dict(r, index=i) for i, r in zip(todo, job_rows([jobs[i] for i in todo]))])
        try:
            for kind, value in _drive_here(spec) if _own_session() else _driver_events(spec, timeout):
                if kind == "pool":
                    if on_pool:
                        on_pool(value)
                    continue
                j = jobs[value["index"]]
                summary.engine = summary.engine or str(value["backend"])
                metrics = None if math.isnan(value["psnr"]) else {"psnr": value["psnr"], "ssim": value["ssim"]}
                if metrics is not None and not math.isnan(value.get("psnr_in", math.nan)):
                    metrics["psnr_in"] = value["psnr_in"]
                done(value["index"], Result(j, str(value["status"]), str(value["error"] or ""), value["seconds"],
                                            metrics, str(value.get("mode") or "")))
        except ClusterLost as e:
            lost = _lost(e, jobs, todo, by_index, done, started, address or "the local Ray runtime")
            lost.summary.engine, lost.summary.seconds = summary.engine, time.perf_counter() - t0
            raise lost from None
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
                                                   gt_dir=location(gt_dir) if gt_dir else None,  # pickled as is
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
                 cpus_per_worker: float | None = None, gpus_per_worker: float | None = None,
                 connect_timeout: float | None = None, quiet: bool = False, **options):
        self.model, self.requested_backend, self.options, self.quiet = model, backend, options, quiet
        self.sizes = dict(address=address, workers=workers, cpus_per_worker=cpus_per_worker,
                          gpus_per_worker=gpus_per_worker, connect_timeout=connect_timeout)
        check_sizes(workers, cpus_per_worker, gpus_per_worker, connect_timeout)  # before the model loads
        if address is None and not gpus_per_worker and not _own_session():  # a local runtime's CPUs are known now
            size_pool(local_cpus(), workers=workers, cpus_per_worker=cpus_per_worker,
                      where="this machine (a local Ray runtime)")
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
