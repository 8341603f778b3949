"""Where inputs and outputs live: local paths, or object-store URIs (``s3://``, ``gs://``, ...) through pyarrow.fs.

:func:`location` turns what the user typed into a :class:`pathlib.Path` (plain paths and ``file://``
URIs) or a :class:`Uri`, which answers the few questions the jobs layer asks of a path (name, stem,
suffix, parent, ``/``, exists, is_file, is_dir), so planning, naming and errors read the same for
both. Only :func:`read_bytes`, :func:`write_bytes` and :func:`list_files` touch the store.

Object stores have no rename: an output is written with one upload that the store makes visible only
when it completes (S3 PutObject/CompleteMultipartUpload, GCS finalize), so an object is whole or
absent, never half-written. Credentials and the endpoint come from the environment as pyarrow reads
them (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_REGION``/``AWS_ENDPOINT_URL``, instance
roles, ``GOOGLE_APPLICATION_CREDENTIALS``) or from the URI's query (``s3://b/k?endpoint_override=...``),
which travels with every path so remote Ray workers reach the same store.

pyarrow is imported on the first URI only: the plain install has no pyarrow, and a URI then is a
one-line error naming the extra to install.
"""

from __future__ import annotations

import fnmatch
import os
import posixpath
import re
import threading
from pathlib import Path, PurePosixPath
from typing import Iterator
from urllib.parse import unquote, urlsplit
from urllib.request import url2pathname

from ..errors import ImageError, RDDMError

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+)://")  # two letters at least: C:// is a drive
INSTALL = "pip install 'rddm-infer[storage]'"


class Uri:
    """An object in a store: ``scheme://bucket/key``. ``str()`` is what error lines show (no query);
    :attr:`uri` is the whole URI, query included. The key is kept exactly as given or listed (a store key
    is a name, not a path: ``a//b``, ``a/./b`` and ``a/../b`` are three other objects than ``a/b``);
    between processes a Uri travels as its fields (:func:`to_fields`), never as a string to re-parse."""

    __slots__ = ("scheme", "path", "query")

    def __init__(self, scheme: str, path: str, query: str = ""):
        self.scheme, self.query = scheme.lower(), query
        self.path = path.strip("/")

    # -- naming (pure)
    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.name).suffix

    @property
    def stem(self) -> str:
        return PurePosixPath(self.name).stem

    @property
    def parent(self) -> "Uri":
        return Uri(self.scheme, posixpath.dirname(self.path), self.query)

    def __truediv__(self, other: str | os.PathLike) -> "Uri":
        """``prefix/other``, joined as text (never normalised; the bucket stays the first segment)."""
        rel = PurePosixPath(other).as_posix() if not isinstance(other, str) else other
        if rel in ("", "."):
            return self
        return Uri(self.scheme, f"{self.path}/{rel.lstrip('/')}" if self.path else rel, self.query)

    def with_suffix(self, suffix: str) -> "Uri":
        return Uri(self.scheme, self.path[:len(self.path) - len(self.name)] + self.stem + suffix, self.query)

    def relative_to(self, base: "Uri") -> PurePosixPath:
        if not contains(base, self):
            raise ValueError(f"{self} is not under {base}")
        return PurePosixPath(posixpath.relpath(self.path, base.path))

    def resolve(self) -> "Uri":
        return self

    @property
    def uri(self) -> str:
        return f"{self}?{self.query}" if self.query else str(self)

    def __str__(self) -> str:
        return f"{self.scheme}://{self.path}"

    def __repr__(self) -> str:
        return f"Uri({self.uri!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Uri) and (self.scheme, self.path, self.query) == (other.scheme, other.path, other.query)

    def __hash__(self) -> int:
        return hash((self.scheme, self.path, self.query))

    def __lt__(self, other: "Uri") -> bool:
        return self.path < other.path

    # -- questions to the store
    def kind(self) -> str:
        """``file``, ``dir`` (a prefix with objects under it) or ``""`` (nothing there)."""
        fs = filesystem(self)  # first: without pyarrow, its one-line error
        from pyarrow.fs import FileType

        try:
            t = fs.get_file_info(self.path).type
        except OSError as e:
            raise RDDMError(f"{self}: {_cause(e)}") from None
        return {FileType.File: "file", FileType.Directory: "dir"}.get(t, "")

    def exists(self) -> bool:
        return self.kind() != ""

    def is_file(self) -> bool:
        return self.kind() == "file"

    def is_dir(self) -> bool:
        return self.kind() == "dir"

    def is_symlink(self) -> bool:
        return False


def location(item: str | os.PathLike | Uri) -> Path | Uri:
    """A path the user typed -> ``Path`` (plain paths, ``file://`` URIs) or :class:`Uri` (any other scheme).
    In a typed URI ``?`` starts the store options (``?endpoint_override=...``); ``#`` is part of the key."""
    if isinstance(item, (Path, Uri)):
        return item
    s = os.fspath(item)
    m = _SCHEME.match(s)
    if not m:
        return Path(s)
    parts = urlsplit(s, allow_fragments=False)
    if m[1].lower() == "file":
        return Path(url2pathname(unquote(parts.path)))
    if "@" in parts.netloc:  # error lines, --json and run.json print locations: keep secrets out of them
        shown = f"{m[1]}://…@{parts.netloc.rsplit('@', 1)[1]}{parts.path}"
        raise RDDMError(f"{shown}: credentials in a URI would be printed with every file name; give them in the "
                        f"environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)")
    uri = Uri(m[1], parts.netloc + parts.path, parts.query)
    bad = odd_key(uri)
    if bad:
        raise RDDMError(bad)
    return uri


def odd_key(uri: Uri) -> str:
    """Why pyarrow cannot address this key exactly ("" when it can). Its S3 client refuses an empty segment
    (``a//b``) and rewrites ``.`` and ``..`` segments in every request (measured: reading ``in/sub/../x.png``
    reads ``in/x.png``, writing ``out/./x.png`` writes ``out/x.png``), so such a key would read or overwrite
    another object: it is refused, never normalised."""
    segments = uri.path.split("/")[1:]  # the bucket is the first
    odd = next((s for s in segments if s in ("", ".", "..")), None)
    if odd is None:
        return ""
    what = "an empty" if odd == "" else f"a {odd!r}"
    return (f"{uri}: the key has {what} path segment, which the store client (pyarrow) would turn into another "
            f"key; rename the object")


def to_fields(loc: Path | Uri) -> tuple[str, str, str]:
    """``(scheme, path, query)``; a local path is ``("", path, "")``. With :func:`from_fields`, how a location
    crosses a process boundary (a Ray row) without being printed and parsed again."""
    return (loc.scheme, loc.path, loc.query) if isinstance(loc, Uri) else ("", os.fspath(loc), "")


def from_fields(scheme: str, path: str, query: str = "") -> Path | Uri:
    return Uri(scheme, path, query) if scheme else Path(path)


def to_str(loc: str | os.PathLike | Uri) -> str:
    """What :func:`location` parses back (a Uri keeps its query): for a command line or a record. A listed key
    may hold ``?`` or ``#``, which a parse would split off: between processes use :func:`to_fields`."""
    return loc.uri if isinstance(loc, Uri) else str(loc)


def contains(folder: Path | Uri, p: Path | Uri) -> bool:
    """``p`` is ``folder`` or lies under it (a local ``folder`` is given resolved; ``p`` is resolved here)."""
    if isinstance(folder, Uri) or isinstance(p, Uri):
        return (isinstance(folder, Uri) and isinstance(p, Uri) and (folder.scheme, folder.query) == (p.scheme, p.query)
                and (not folder.path or p.path == folder.path or p.path.startswith(folder.path + "/")))
    try:
        p.resolve().relative_to(folder)
        return True
    except (ValueError, OSError, RuntimeError):
        return False


# ------------------------------------------------------------------------------------ the stores

_filesystems: dict[tuple[str, str, str], object] = {}
_lock = threading.Lock()


def filesystem(uri: Uri):
    """The pyarrow filesystem of a URI's bucket, made once per process (it resolves region and credentials)."""
    bucket = uri.path.split("/", 1)[0]
    key = (uri.scheme, bucket, uri.query)
    with _lock:
        fs = _filesystems.get(key)
        if fs is None:
            try:
                from pyarrow.fs import FileSystem
            except ImportError:
                raise RDDMError(f"{uri}: {uri.scheme}:// paths need pyarrow: {INSTALL} "
                                f"(the cluster extra includes it)") from None
            base = f"{uri.scheme}://{bucket}" + (f"?{uri.query}" if uri.query else "")
            try:
                fs = FileSystem.from_uri(base)[0]
            except (OSError, ValueError) as e:  # ArrowInvalid is a ValueError: unknown scheme, bad query
                raise RDDMError(f"{uri}: cannot open this store ({_cause(e)})") from None
            _filesystems[key] = fs
    return fs


def _cause(e: BaseException) -> str:
    """pyarrow's message on one line, without the request id that changes on every call."""
    text = " ".join(str(e).split())
    text = re.sub(r"^\[Errno \d+\] ", "", text)
    return re.sub(r" \(Request ID: [^)]*\)", "", text) or type(e).__name__


def read_bytes(uri: Uri) -> bytes:
    """One object's bytes; ImageError naming the URI (missing, a folder, unreadable)."""
    fs = filesystem(uri)
    try:
        with fs.open_input_file(uri.path) as f:
            return f.readall()
    except FileNotFoundError:
        raise ImageError(f"{uri}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{uri}: is a directory") from None
    except OSError as e:
        raise ImageError(f"{uri}: cannot read ({_cause(e)})") from None


def write_bytes(uri: Uri, data: bytes | memoryview) -> Uri:
    """Upload ``data`` as one object. The bytes go in one ``write`` and the upload completes on ``close``;
    until then the store shows no object, so a failure or a kill leaves none (never a part). pyarrow closes
    (completes) a stream it drops, so a ``write`` that failed part-way is followed by deleting the key."""
    fs = filesystem(uri)
    try:
        stream = fs.open_output_stream(uri.path)
    except OSError as e:
        raise ImageError(f"{uri}: cannot write ({_cause(e)})") from None
    try:
        stream.write(data)
    except BaseException as e:
        stream = None  # dropped, pyarrow completes the upload with the parts sent so far: remove that object
        try:
            fs.delete_file(uri.path)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise ImageError(f"{uri}: cannot write ({_cause(e)})") from None
        raise
    try:
        stream.close()
    except OSError as e:
        raise ImageError(f"{uri}: cannot write ({_cause(e)})") from None
    return uri


def modified(loc: Path | Uri) -> float | None:
    """When a file or object was last written (seconds since the epoch), or None where there is none."""
    try:
        if isinstance(loc, Path):
            return loc.stat().st_mtime
        t = filesystem(loc).get_file_info(loc.path).mtime
    except (OSError, RDDMError):
        return None
    return t.timestamp() if t is not None else None


def delete(uri: Uri) -> None:
    try:
        filesystem(uri).delete_file(uri.path)
    except OSError as e:
        raise ImageError(f"{uri}: cannot delete ({_cause(e)})") from None


def list_files(folder: Uri, recursive: bool) -> list[Uri]:
    """Objects directly in ``folder`` (or anywhere below it), one listing, no per-object requests."""
    fs = filesystem(folder)
    from pyarrow.fs import FileSelector, FileType

    try:
        infos = fs.get_file_info(FileSelector(folder.path, recursive=recursive, allow_not_found=True))
    except OSError as e:
        raise RDDMError(f"{folder}: cannot list ({_cause(e)})") from None
    return [Uri(folder.scheme, i.path, folder.query) for i in infos if i.type == FileType.File]


def glob_uri(pattern: Uri, recursive: bool) -> Iterator[Uri]:
    """Objects matching a glob (``*``, ``?``, ``[...]`` within one name; ``**`` any depth with ``recursive``),
    listed from the plain prefix before the first wildcard."""
    parts = pattern.path.split("/")
    k = next((i for i, p in enumerate(parts) if any(c in p for c in "*?[")), len(parts))
    root = Uri(pattern.scheme, "/".join(parts[:k]), pattern.query)
    deep = recursive and "**" in parts[k:]
    for f in list_files(root, recursive=deep or len(parts) - k > 1):
        if _match(f.path.split("/")[k:], parts[k:], deep):
            yield f


def _match(names: list[str], pats: list[str], deep: bool) -> bool:
    if not pats:
        return not names
    if pats[0] == "**" and deep:
        return any(_match(names[i:], pats[1:], deep) for i in range(len(names) + 1))
    return bool(names) and fnmatch.fnmatchcase(names[0], pats[0]) and _match(names[1:], pats[1:], deep)
