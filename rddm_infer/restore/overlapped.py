"""The overlapped executor: reader threads decode ahead, the engine batches across images, writer threads encode.

On a GPU one image at a time leaves the device idle while the CPU decodes and encodes (a 1600×1200 JPEG takes
about 40 ms to decode and encode on one core; the network a few ms). Here the three stages overlap:

* **readers** (a thread pool) decode images in input order, choose each one's mode and prepare its network
  inputs and seeded noise (OpenCV and numpy release the GIL);
* **the engine** (the calling thread) runs same-shape units of the next ``batch`` images as one call
  (:class:`rddm_infer.restore.units.BatchQueue`), once those images are read: the calls are those of the
  sequential path, whatever the readers' timing;
* **writers** (a thread pool) finish, encode, write atomically and measure.

Memory is bounded: at most ``max_images`` images are in flight (submitted, not yet written) and a reader waits
before decoding while the images in flight hold ``max_bytes`` (estimated from the header's pixel count; one image
alone always runs). Results come back in input order, and the pixels are those of the sequential path
(``io_workers=0``: read, restore, write one after the other in the calling thread), byte for byte.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from ..errors import RDDMError
from ..io.images import read_image
from .jobs import Job, Result, is_done
from .memory import MAX_IN_FLIGHT_IMAGES, MEMORY_SHARE, available_memory
from .units import BatchQueue, Work


def local_cpus() -> int:
    """The CPUs this process may run on (a container's or taskset's limit, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def split_workers(io_workers: int) -> tuple[int, int]:
    """Readers and writers for ``io_workers`` threads: decoding costs about three times encoding."""
    readers = max(1, round(io_workers * 2 / 3))
    return readers, max(1, io_workers - readers)


@dataclass(frozen=True)
class Flow:
    """How the stages run: ``io_workers`` 0 is the sequential path; limits on what is in flight at once."""
    io_workers: int
    max_images: int
    max_bytes: int | None  # None: no byte limit

    @classmethod
    def resolve(cls, io_workers: int | str | None, batch: int, max_images: int | None = None,
                max_mb: float | None = None) -> "Flow":
        """``io_workers`` None/"auto": one per CPU this process may use. Limits not given: ``batch`` +
        MAX_IN_FLIGHT_IMAGES images, and MEMORY_SHARE of the memory available now."""
        if io_workers in (None, "auto"):
            io_workers = local_cpus()
        if isinstance(io_workers, bool) or not isinstance(io_workers, int) or io_workers < 0:
            raise RDDMError(f"--io-workers {io_workers}: must be auto or an integer >= 0 (0: one image at a time)")
        if max_images is not None and max_images < batch:
            raise RDDMError(f"--in-flight {max_images}: must be >= --batch {batch} (one engine call draws on that many "
                            f"images)")
        if max_mb is not None and not max_mb > 0:
            raise RDDMError(f"--in-flight-mb {max_mb}: must be > 0")
        if io_workers == 0:  # sequential: the images of one batch, read before the engine runs them
            if max_mb is not None:  # one thread cannot wait for memory that only it would free
                raise RDDMError(f"--in-flight-mb {max_mb:g} bounds the overlapped path: with --io-workers 0 at most "
                                f"--in-flight images (default --batch) are held; drop one of the two")
            return cls(0, max_images or batch, None)
        if max_mb is None:
            avail, _ = available_memory()
            max_bytes = int(avail * MEMORY_SHARE) if avail else None
        else:
            max_bytes = int(max_mb * 1e6)
        return cls(io_workers, max_images or batch + MAX_IN_FLIGHT_IMAGES, max_bytes)

    def describe(self) -> str:
        if self.io_workers == 0:
            return "sequential (--io-workers 0)"
        r, w = split_workers(self.io_workers)
        limit = f" or {self.max_bytes / 1e6:,.0f} MB" if self.max_bytes else ""
        return f"overlapped: {r} reader(s), {w} writer(s), at most {self.max_images} images{limit} in flight"


class _Budget:
    """Bytes held by the images in flight; a reader waits (before decoding) until its image fits, or nothing is held.
    A waiting reader tells the engine (an event), which then runs a partial batch rather than wait for it."""

    def __init__(self, limit: int | None, events: queue.Queue):
        self.limit, self.events = limit, events
        self.held: dict[int, int] = {}
        self.waiting = 0
        self.closed = False
        self.cond = threading.Condition()

    def acquire(self, i: int, n: int) -> None:
        with self.cond:
            if self.limit is not None and self.held and sum(self.held.values()) + n > self.limit:
                self.waiting += 1
                self.events.put(("waiting", i, None))
                while not self.closed and self.held and sum(self.held.values()) + n > self.limit:
                    self.cond.wait()
                self.waiting -= 1
            if self.closed:
                raise _Stopped
            self.held[i] = n

    def release(self, i: int) -> None:
        with self.cond:
            self.held.pop(i, None)
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()


class _Stopped(Exception):
    """The run ended (Ctrl-C, an error elsewhere): a reader gives up before decoding."""


class _Inline:
    """The sequential path's "pool": runs each task at once in the calling thread."""

    def submit(self, fn, *args) -> Future:
        fn(*args)
        return Future()

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        pass


def run_overlapped(restorer, jobs: list[Job], flow: Flow, *, skip_existing: bool, gt_dir: Path | None,
                   on_tile: Callable[[int, int], None] | None = None) -> Iterator[Result]:
    """Planned jobs -> results in input order, through the three stages (``restorer``: a
    :class:`rddm_infer.restore.local.Restorer`)."""
    arrays = restorer.arrays
    events: queue.Queue = queue.Queue()
    budget = _Budget(flow.max_bytes, events)
    per_pixel = arrays.bytes_per_pixel()
    if flow.io_workers:
        n_read, n_write = split_workers(flow.io_workers)
        readers = ThreadPoolExecutor(n_read, thread_name_prefix="rddm-read")
        writers = ThreadPoolExecutor(n_write, thread_name_prefix="rddm-write")
    else:
        n_read, readers = 1, _Inline()
        writers = readers

    def read(i: int, job: Job) -> None:
        try:
            if skip_existing and is_done(job):
                events.put(("read-result", i, Result(job, "skipped")))
                return
            t = time.perf_counter()
            img = read_image(job.src, restorer.max_pixels,
                             before_decode=lambda px: px is not None and budget.acquire(i, px * per_pixel))
            if i not in budget.held:  # the header did not say the size: count the decoded image
                budget.acquire(i, img.size[0] * img.size[1] * per_pixel)
            work = arrays.start(img)
            work.seconds = time.perf_counter() - t
            events.put(("work", i, work))
        except _Stopped:
            pass
        except RDDMError as e:
            budget.release(i)
            events.put(("read-result", i, Result(job, "failed", str(e))))
        except BaseException as e:  # a bug: the engine thread raises it
            events.put(("crash", i, e))

    def write(i: int, job: Job, work: Work) -> None:
        try:
            y = arrays.finish(work, ext=job.dst.suffix)
            result = (Result(job, "failed", str(y)) if isinstance(y, RDDMError) else
                      restorer.save(job, work.img, y, work.mode, gt_dir, work.seconds))
            events.put(("result", i, result))
        except BaseException as e:
            events.put(("crash", i, e))
        finally:
            budget.release(i)

    def can_run() -> bool:
        """Units to run, and every image of the next call's window read (or failed, or skipped): the call is then
        the one the sequential path makes. Only when every reader waits for memory does a call start without it."""
        if not batches:
            return False
        if all(i < submitted and i not in reading for i in batches.window() if i < len(jobs)):
            return True
        return bool(reading) and budget.waiting >= min(len(reading), n_read)

    batches = BatchQueue(arrays, on_tile)
    done: dict[int, Result] = {}
    reading: set[int] = set()
    submitted = in_flight = emitted = 0
    try:
        while emitted < len(jobs):
            while submitted < len(jobs) and in_flight < flow.max_images:
                job, i = jobs[submitted], submitted
                submitted += 1
                if job.error:
                    done[i] = Result(job, "failed", job.error)
                    continue
                reading.add(i)
                in_flight += 1
                readers.submit(read, i, job)
            while emitted in done:
                yield done.pop(emitted)
                emitted += 1
            if emitted >= len(jobs):
                break
            # Wait for an event unless the engine can make its next call now.
            block = not can_run()
            while True:
                try:
                    kind, i, payload = events.get(block=block)
                except queue.Empty:
                    break
                block = False
                if kind == "crash":
                    raise payload
                if kind == "work":
                    reading.discard(i)
                    batches.add(payload, i)
                elif kind in ("result", "read-result"):
                    done[i] = payload
                    in_flight -= 1
                    if kind == "read-result":
                        reading.discard(i)
            if can_run():
                for i, work in batches.run():
                    writers.submit(write, i, jobs[i], work)
    except KeyboardInterrupt:
        # Ctrl-C: nothing new starts, writes under way finish (each is atomic), and what they wrote is reported
        # (in input order) before the interrupt goes on, so "N restored" counts the files that exist.
        _stop(budget, readers, writers)
        while True:
            try:
                kind, i, payload = events.get_nowait()
            except queue.Empty:
                break
            if kind in ("result", "read-result"):
                done[i] = payload
        for i in sorted(k for k in done if k >= emitted):
            yield done[i]
        raise
    finally:
        _stop(budget, readers, writers)


def _stop(budget: _Budget, readers, writers) -> None:
    """End the stages: readers waiting for memory give up, queued tasks are cancelled, running ones finish."""
    budget.close()
    readers.shutdown(wait=True, cancel_futures=True)
    writers.shutdown(wait=True, cancel_futures=True)
