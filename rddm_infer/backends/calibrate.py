"""``rddm-infer bench --calibrate``: measure every candidate backend and precision, write the timing table.

One short probe per candidate (:func:`rddm_infer.backends.timings.candidates`), each checked against the
exact fp32 result; the table is written atomically under the user cache dir, where
:func:`rddm_infer.backends.select.load_runner` finds it.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ..diffusion.engine_sampler import EngineSampler
from ..errors import RDDMError
from ..io.atomic import write_bytes_atomic
from ..metrics import psnr
from .select import load_runner
from .timings import Entry, Table, candidates, cpu_model, probe_shape, table_path, time_restores


def calibrate(model: str | os.PathLike, *, size: int = 128, steps: int | None = None, threads: int | None = None,
              runs: int = 3, log=lambda s: None) -> tuple[Table, Path]:
    """Measure every candidate on one probe image; write and return the table."""
    path = Path(model)
    table = Table(str(path.resolve()), cpu_model(), threads, size, 0,
                  datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    ref = None
    for name, opts in candidates(path):
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
    write_bytes_atomic(out, table.to_json().encode())
    return table, out
