"""The files a run writes beside its images (``metrics.csv``, ``run.json``, ``report.html``) describe that run only.

Why: a re-run without ``--gt`` or ``--report`` overwrites the images; left in place, the older run's files would
then claim a ground truth, a mode and PSNRs that the images no longer have. A run removes those it did not write
itself this time, and only files that are ours (recognised by their content; never through a symbolic link).
"""

from __future__ import annotations

import json
from pathlib import Path

METRICS_CSV, RUN_JSON, REPORT_HTML = "metrics.csv", "run.json", "report.html"
RUN_FILES = (METRICS_CSV, RUN_JSON, REPORT_HTML)


def _ours(path: Path) -> bool:
    """Whether a regular file (not a link) was written by rddm-infer, by its first bytes."""
    if path.is_symlink() or not path.is_file():
        return False
    try:
        with open(path, "rb") as f:
            head = f.read(4096).decode("utf-8", "replace")
    except OSError:
        return False
    if path.name == METRICS_CSV:
        return head.startswith("file,")
    if path.name == RUN_JSON:
        try:
            return str(json.loads(path.read_text(encoding="utf-8")).get("format", "")).startswith("rddm-infer")
        except (ValueError, OSError, AttributeError, RecursionError):
            return False
    return 'name="generator" content="rddm-infer' in head


def remove_stale(out_dir, wrote: set[str]) -> list[str]:
    """Remove the run files this run did not write (``wrote``: their names) from a local ``out_dir``;
    returns the names removed, for the log. Object-store outputs are left as they are (said by the caller)."""
    out = Path(out_dir)
    removed = []
    for name in RUN_FILES:
        path = out / name
        if name not in wrote and _ours(path):
            try:
                path.unlink()
                removed.append(name)
            except OSError:
                pass
    return removed
