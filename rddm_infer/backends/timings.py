"""The timing table ``--backend auto`` reads: every installed backend and precision, timed on this machine.

``rddm-infer bench --calibrate`` runs one short probe per candidate (each row of the backend
table that runs the model, at each precision it offers), checks its accuracy against the
exact fp32 result (>= ``MIN_PSNR`` dB on the probe) and writes a per-machine table, keyed by
the model file's hash and the CPU model, under the user cache dir. ``auto`` then takes the
fastest accurate entry. Reduced precision is taken only when the user opted in
(``precision="auto"`` / ``--precision auto``); the choice and why are always stated.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..diffusion.engine_sampler import EngineSampler, Noise
from .registry import BACKENDS, artifact_kind, user_cache_dir

MIN_PSNR = 40.0  # dB vs the exact fp32 result on the probe
EXACT = (None, "fp32")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def file_hash(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def table_path(model: str | os.PathLike, cpu: str | None = None) -> Path:
    cpu = cpu or cpu_model()
    key = hashlib.sha256(cpu.encode()).hexdigest()[:12]
    return user_cache_dir("calibration", f"{file_hash(model)[:24]}-{key}.json")


@dataclass
class Entry:
    backend: str
    options: dict  # e.g. {"precision": "bf16"}
    median_ms: float | None = None
    psnr_db: float | None = None  # vs the exact fp32 reference (inf: identical)
    error: str | None = None

    @property
    def reduced(self) -> bool:
        return self.options.get("precision") not in EXACT

    @property
    def ok(self) -> bool:
        return self.error is None and self.psnr_db is not None and self.psnr_db >= MIN_PSNR

    def label(self) -> str:
        return self.backend + "".join(f" {v}" for v in self.options.values())


@dataclass
class Table:
    model: str
    cpu: str
    threads: int | None
    size: int
    steps: int
    date: str
    entries: list[Entry] = field(default_factory=list)
    exact_only: bool = False  # a first-use table: reduced precisions were not timed

    def best(self, allow_reduced: bool, usable=lambda e: True) -> Entry | None:
        ok = [e for e in self.entries if e.ok and (allow_reduced or not e.reduced) and usable(e)]
        return min(ok, key=lambda e: e.median_ms) if ok else None

    def to_json(self) -> str:
        d = asdict(self)
        for e, row in zip(self.entries, d["entries"]):
            row.update(reduced=e.reduced, ok=e.ok)
            if row["psnr_db"] == float("inf"):
                row["psnr_db"] = "inf"
        return json.dumps(d, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "Table":
        d = json.loads(text)
        entries = []
        for e in d.pop("entries"):
            psnr = float("inf") if e.get("psnr_db") == "inf" else e.get("psnr_db")
            entries.append(Entry(e["backend"], dict(e["options"]), e.get("median_ms"), psnr, e.get("error")))
        return cls(**{k: d[k] for k in ("model", "cpu", "threads", "size", "steps", "date")}, entries=entries,
                   exact_only=bool(d.get("exact_only", False)))


def candidates(model: str | os.PathLike) -> list[tuple[str, dict]]:
    """(backend, options) for every installed CPU-capable row that runs ``model``, at each precision it offers;
    exact ones first (the first is the reference)."""
    kind = artifact_kind(model)
    out = []
    for spec in BACKENDS:
        if kind in spec.artifacts and "cpu" in spec.devices and spec.available():
            prec = spec.option("precision")
            precs = [p for p in prec.choices if p not in prec.gpu_choices] if prec else [None]
            out += [(spec.name, {"precision": p} if p else {}) for p in precs]
    return sorted(out, key=lambda c: c[1].get("precision") not in EXACT)


def probe_shape(meta, size: int, batch: int = 1) -> tuple[int, int, int, int]:
    """A square ``size``² batch rounded up to the artifact's size multiple."""
    m = max(int(meta.size_multiple), 1)
    side = -(-size // m) * m
    return batch, meta.channels, side, side


def time_restores(sampler, plan, shape: tuple, runs: int, warmup: int = 1) -> tuple[list[float], np.ndarray]:
    """Seeded random input and noise of ``shape``; ``warmup`` untimed restores (first-call allocations, lazy
    compilation), then ``runs`` timed ones: their seconds and the last output."""
    x = np.random.default_rng(0).uniform(-1, 1, shape).astype(np.float32)
    noise = Noise.draw(plan, shape, 0)
    times, y = [], None
    for i in range(warmup + runs):
        t = time.perf_counter()
        y = sampler.run(x, plan, noise)
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return times, y


def time_variants(make_runner, variants, size: int, batch: int, runs: int, warmup: int = 1, steps: int | None = None,
                  log=lambda s: None, around=None, baseline: dict | None = None) -> list[dict]:
    """Each ``(label, options)`` of ``variants`` built by ``make_runner(options)`` and timed in turn (one runner
    alive at a time: GPU memory) by :func:`time_restores` on the same seeded ``batch`` × ``size``² input and noise;
    speedup and PSNR are against the first variant that ran (the baseline), or against ``baseline`` when that dict
    already holds one from an earlier call (an empty dict is filled in, for the next call). ``around()``, when given,
    is a context manager around each variant's runs that yields a dict for extra fields (e.g. peak GPU memory). A
    variant that cannot be built or run here is a row with its ``error``; ``log`` gets one line per variant
    (:func:`variant_line`)."""
    from ..metrics import psnr

    rows = []
    base = baseline if baseline is not None else {}
    for label, options in variants:
        row: dict = {"variant": label, "options": dict(options), "error": None}
        try:
            with make_runner(options) as runner:
                sampler = EngineSampler(runner)
                plan = sampler.plan(steps)
                shape = probe_shape(runner.meta, size, batch)
                row.update(backend=runner.description, steps=plan.steps, shape=list(shape))
                with (around() if around is not None else nullcontext({})) as extra:
                    t0 = time.perf_counter()
                    times, y = time_restores(sampler, plan, shape, runs, warmup)
                    total = time.perf_counter() - t0
                row.update(extra)
        except Exception as e:  # one lever that cannot run here (no bf16, a failed capture) is a row, not the end
            row["error"] = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
            rows.append(row)
            log(variant_line(row))
            continue
        med = float(np.median(times))
        if not base:
            base.update(median_s=med, out=y)
        row.update(median_ms=med * 1e3, min_ms=min(times) * 1e3, images_per_s=batch / med,
                   first_runs_s=total - sum(times), speedup=base["median_s"] / med,
                   psnr_db=psnr((y + 1) / 2, (base["out"] + 1) / 2))
        rows.append(row)
        log(variant_line(row))
    return rows


def json_safe(obj):
    """``obj`` with every infinite or NaN float written as "inf" / "-inf" / "nan" (strict JSON has none)."""
    if isinstance(obj, float) and not np.isfinite(obj):
        return "nan" if np.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def variant_line(row: dict) -> str:
    """One row of :func:`time_variants` as a line: median, images/s, speedup, PSNR vs the baseline."""
    if row.get("error"):
        return f"{row['variant']}: not run: {row['error']}"
    db = "identical" if row["psnr_db"] == float("inf") else f"{row['psnr_db']:.1f} dB"
    return (f"{row['variant']}: median {row['median_ms']:.1f} ms, {row['images_per_s']:.2f} images/s, "
            f"×{row['speedup']:.2f} vs the first, {db} (first runs {row['first_runs_s']:.1f} s)")


_MEASURED: dict[Path, Table] = {}  # tables measured in this process (the one that could not be saved, too)


def remember(path: Path, table: Table) -> None:
    _MEASURED[path] = table


def load_table(model: str | os.PathLike) -> tuple[Table | None, Path]:
    """This machine's table for ``model`` (None when it was never calibrated here)."""
    path = table_path(model)
    if path in _MEASURED:
        return _MEASURED[path], path
    if not path.is_file():
        return None, path
    try:
        return Table.from_json(path.read_text()), path
    except (OSError, ValueError, KeyError, TypeError):
        return None, path  # unreadable (no permission, corrupt): as if absent (calibrating again rewrites it)
