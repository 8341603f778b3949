"""Write-then-rename, so a file at its final path is always complete (stdlib only).

Every writer in the project (images, checkpoints, ONNX graphs, engines, configs, reports) goes
through :func:`atomic_path`: it hands out a temporary path beside the target, renames it into
place only if the block succeeds, and removes it in every case. The temporary name keeps the
target's suffix last (``.name.tmpPID-N.ext``) because some writers (OpenCV, ONNX Runtime) choose
their format from it; ``N`` is a per-process counter, so two threads writing the same target
never share a temporary file. A name too long for that (the limit is 255 bytes, not characters)
gets a temporary named by its cut-short start and a hash of the whole name instead. A run killed
between write and rename leaves its temporary behind; :func:`remove_stale_temps` deletes those of
processes that no longer exist.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from ..errors import RDDMError

_counter = itertools.count()  # next() on itertools.count is atomic under the GIL


# Bytes the ``.`` + ``.tmpPID-N`` parts of a temporary name may take (PID ≤ 10 digits, N ≤ 12), and the longest
# extension kept on it: a longer "extension" is no format any writer knows.
_RESERVE, _MAX_EXT = len("..tmp-") + 10 + 12, 32


def _name_max(folder: Path) -> int:
    """The file-name limit of ``folder``'s file system, in bytes (255 where it cannot be asked)."""
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        return 255


def _cut(text: str, nbytes: int) -> str:
    """The longest prefix of ``text`` that is at most ``nbytes`` bytes as a file name (whole characters)."""
    size = 0
    for i, ch in enumerate(text):
        size += len(os.fsencode(ch))
        if size > nbytes:
            return text[:i]
    return text


def _temp_key(name: str, limit: int) -> tuple[str, str]:
    """(the name part, the extension) of ``name``'s temporaries, such that ``.KEY.tmpPID-N.EXT`` fits in ``limit``
    bytes: ``name`` itself when it fits, else its cut-short start + a hash of the whole name + the extension."""
    ext = Path(name).suffix
    ext = ext if len(os.fsencode(ext)) <= _MAX_EXT else ""
    room = limit - _RESERVE - len(os.fsencode(ext))
    if len(os.fsencode(name)) <= room:
        return name, ext
    digest = hashlib.sha1(os.fsencode(name)).hexdigest()[:12]
    stem = name[: len(name) - len(ext)] if ext else name
    return f"{_cut(stem, room - len(os.fsencode(ext)) - 13)}~{digest}{ext}", ext


def temp_name(path: Path) -> Path:
    """A fresh temporary path beside ``path``: hidden, ending in ``path``'s extension, within the file-name limit."""
    key, ext = _temp_key(path.name, _name_max(path.parent))
    return path.with_name(f".{key}.tmp{os.getpid()}-{next(_counter)}{ext}")


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


_TEMP = re.compile(r"\.(?P<name>.+)\.tmp(?P<pid>\d+)(?:-\d+)?(?P<ext>\.[^./]*)?")


def remove_stale_temps(targets: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """Delete our own temporaries of ``targets`` (``.name.tmpPID[-N].ext``) whose process is gone.

    Each folder is listed once, however many targets it holds."""
    targets = [targets] if isinstance(targets, (str, os.PathLike)) else targets
    by_folder: dict[Path, set[str] | None] = {}
    for t in map(Path, targets):
        by_folder.setdefault(t.parent, set()).add(t.name)
    return _remove_stale(by_folder)


def remove_stale_temps_in(folder: str | os.PathLike) -> list[Path]:
    """Delete every temporary of ours in ``folder`` whose process is gone (a folder we write, e.g. an export's)."""
    return _remove_stale({Path(folder): None})


def _remove_stale(by_folder: dict[Path, set[str] | None]) -> list[Path]:
    removed = []
    for folder, names in by_folder.items():
        try:
            entries = [e.name for e in os.scandir(folder) if e.name.startswith(".") and ".tmp" in e.name]
        except OSError:
            continue
        # name part -> extension of each target's temporaries (a long name's is cut short: see _temp_key)
        keys = None if names is None else dict(_temp_key(n, _name_max(folder)) for n in names)
        for entry in entries:
            m = _TEMP.fullmatch(entry)
            ext = None if not m else Path(m["name"]).suffix if keys is None else keys.get(m["name"])
            if not m or (m["ext"] or "") != ext:
                continue
            p = folder / entry
            if not _alive(int(m["pid"])) and p.is_file() and not p.is_symlink():
                try:
                    p.unlink()
                    removed.append(p)
                except OSError:
                    pass
    return removed


def ensure_folder(path: str | os.PathLike, what: str = "output folder") -> Path:
    """Create ``path`` (with its parents) and check it is writable, before any work goes into it:
    a one-line error naming the folder and the cause otherwise."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise RDDMError(f"{path}: cannot create the {what} (a file of that name is in the way)") from None
    except OSError as e:
        raise RDDMError(f"{path}: cannot create the {what} ({e.strerror or type(e).__name__})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise RDDMError(f"{path}: the {what} is not writable")
    return path
