"""Write-then-rename, so a file at its final path is always complete (stdlib only).

Every writer in the project (images, checkpoints, ONNX graphs, engines, configs, reports) goes
through :func:`atomic_path`: it hands out a temporary path beside the target, renames it into
place only if the block succeeds, and removes it in every case. The temporary name keeps the
target's suffix last (``.name.tmpPID-N.ext``) because some writers (OpenCV, ONNX Runtime) choose
their format from it; ``N`` is a per-process counter, so two threads writing the same target
never share a temporary file. A run killed between write and rename leaves its temporary
behind; :func:`remove_stale_temps` deletes those of processes that no longer exist.
"""

from __future__ import annotations

import glob
import itertools
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

_counter = itertools.count()  # next() on itertools.count is atomic under the GIL


def temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}-{next(_counter)}{path.suffix}")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_atomic(path: str | os.PathLike, data: bytes | memoryview) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's) or cannot tell: leave its file alone
    return True


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Delete our own temporaries of ``path`` (``.name.tmpPID[-N].ext``) whose process is gone."""
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.tmp(\d+)(?:-\d+)?{re.escape(path.suffix)}")
    removed = []
    try:
        entries = list(path.parent.glob(f".{glob.escape(path.name)}.tmp*"))
    except OSError:
        return removed
    for p in entries:
        m = pattern.fullmatch(p.name)
        if m and not _alive(int(m.group(1))) and p.is_file() and not p.is_symlink():
            try:
                p.unlink()
                removed.append(p)
            except OSError:
                pass
    return removed

