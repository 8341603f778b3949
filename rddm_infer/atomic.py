"""Write-then-rename, so a file at its final path is always complete (stdlib only).

Every writer in the project (images, checkpoints, ONNX graphs, engines, configs, reports) goes
through :func:`atomic_path`: it hands out a temporary path beside the target, renames it into
place only if the block succeeds, and removes it in every case. The temporary name keeps the
target's suffix last (``.name.tmpPID.ext``) because some writers (OpenCV, ONNX Runtime) choose
their format from it.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_atomic(path: str | os.PathLike, data: bytes | memoryview) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)
