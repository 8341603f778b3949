"""``rddm-infer bench --calibrate``: measure every candidate backend and precision, write the timing table;
and the same, briefly and for the exact paths only, the first time ``--backend auto`` meets a model on a CPU.

One short probe per candidate (:func:`rddm_infer.backends.timings.candidates`), each checked against the
exact fp32 result; the table is written atomically under the user cache dir, where
:func:`rddm_infer.backends.select.load_runner` finds it.
"""

from __future__ import annotations

import os
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ..diffusion.engine_sampler import EngineSampler
from ..errors import RDDMError
from ..io.atomic import write_bytes_atomic
from ..metrics import psnr
from .base import Runner
from .select import Choice, load_runner, wants_calibration
from .timings import EXACT, Entry, Table, candidates, cpu_model, probe_shape, remember, table_path, time_restores


def calibrate(model: str | os.PathLike, *, size: int = 128, steps: int | None = None, threads: int | None = None,
              runs: int = 3, exact_only: bool = False, log=lambda s: None) -> tuple[Table, Path]:
    """Measure every candidate (``exact_only``: the exact ones) on one probe image; write and return the table.
    A table that cannot be written is an :class:`RDDMError` carrying it (``.table``): the caller may use it."""
    path = Path(model)
    table = Table(str(path.resolve()), cpu_model(), threads, size, 0,
                  datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), exact_only=exact_only)
    ref = None
    for name, opts in candidates(path):
        if exact_only and opts.get("precision") not in EXACT:
            continue
        entry = Entry(name, dict(opts))
        table.entries.append(entry)
        try:
            runner, _ = load_runner(path, name, device="cpu", threads=threads, **opts)
            with runner:
                sampler = EngineSampler(runner)
                plan = sampler.plan(steps)
                times, y = time_restores(sampler, plan, probe_shape(runner.meta, size), runs, warmup=1)
            table.steps = plan.k
            if ref is None:
                ref = y
            entry.median_ms = round(float(np.median(times)) * 1e3, 2)
            entry.psnr_db = psnr((y + 1) / 2, (ref + 1) / 2)
        except RDDMError as e:  # e.g. bf16 on a CPU without it: a row of the table, not the end
            entry.error = str(e)
        log(f"{entry.label()}: " + (entry.error or f"{entry.median_ms:.1f} ms, "
                                    f"{'identical' if entry.psnr_db == float('inf') else f'{entry.psnr_db:.1f} dB'}"))
    if ref is None:
        raise RDDMError(f"{path}: no backend could run the probe: " + "; ".join(
            f"{e.label()}: {e.error}" for e in table.entries))
    out = table_path(path, table.cpu)
    remember(out, table)
    try:
        write_bytes_atomic(out, table.to_json().encode())
    except (OSError, RDDMError) as e:
        error = RDDMError(f"{out.parent}: cannot save the timing table ({getattr(e, 'strerror', None) or e})")
        error.table = table
        raise error from None
    return table, out


FIRST_USE_SIZE, FIRST_USE_RUNS = 128, 2  # about 1-3 s for the exact paths of the built-in model on 2 cores


def measured_runner(model: str | os.PathLike, backend: str = "auto", **options) -> tuple[Runner, Choice]:
    """:func:`load_runner`, after timing the installed exact paths once when ``auto`` has no table for this
    model on this CPU (first use; cached for later runs). The backend line says it was measured now, and a cache
    that cannot be written is said too (measured again next time), never an error."""
    if backend != "auto" or not wants_calibration(model, options):
        return load_runner(model, backend, **options)
    exact_only = options.get("precision") != "auto"  # reduced precision stays opt-in: then it is timed as well
    t0 = time.perf_counter()
    try:
        _, where = calibrate(model, size=FIRST_USE_SIZE, runs=FIRST_USE_RUNS, threads=options.get("threads"),
                             exact_only=exact_only)
        note = f"timed now, first use, {time.perf_counter() - t0:.1f} s, cached"
    except RDDMError as e:
        if getattr(e, "table", None) is None:
            raise
        note = f"timed now, {time.perf_counter() - t0:.1f} s, not cached (again next run): {e}"
    runner, choice = load_runner(model, backend, **options)
    choice.reason += f"; {note}"
    return runner, choice
