"""Refuse ONNX models whose external data would be read from outside the model's folder.

A tensor may keep its bytes in another file (``external_data`` ``location``). Older ONNX
Runtime releases read whatever path a model names, ``../../etc/passwd`` included; recent ones
refuse it, but ``onnxruntime>=1.17`` is allowed. So the runtime checks first, with a small
schema-guided protobuf walk (no ``onnx`` package at run time): every tensor reachable from
the graph, its nodes' attributes, subgraphs, functions and training graphs.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import CheckpointError

# message kind -> {field number: message kind of that (length-delimited) field}
_SCHEMA = {
    "model": {7: "graph", 25: "function", 20: "training"},
    "training": {1: "graph", 2: "graph"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "function": {7: "node"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
    "tensor": {13: "entry"},
    "entry": {},
}


def _varint(buf: memoryview, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, i
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _fields(buf: memoryview):
    """(field number, wire type, payload) of one message's top-level fields."""
    i, n = 0, len(buf)
    while i < n:
        key, i = _varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _, i = _varint(buf, i)
            yield field, wire, None
        elif wire == 1:
            i += 8
        elif wire == 2:
            size, i = _varint(buf, i)
            if i + size > n:
                raise ValueError("field past the end")
            yield field, wire, buf[i:i + size]
            i += size
        elif wire == 5:
            i += 4
        else:
            raise ValueError(f"wire type {wire}")


def external_locations(data: bytes) -> list[str]:
    """Every external-data ``location`` named in a serialized ModelProto."""
    found: list[str] = []
    stack = [("model", memoryview(data))]
    while stack:
        kind, buf = stack.pop()
        if kind == "entry":
            entry = {f: bytes(p) for f, w, p in _fields(buf) if w == 2}
            if entry.get(1) == b"location":
                found.append(entry.get(2, b"").decode("utf-8", "replace"))
            continue
        children = _SCHEMA[kind]
        stack += [(children[f], p) for f, w, p in _fields(buf) if w == 2 and f in children]
    return found


def check_external_data(path: str | os.PathLike) -> None:
    """Raise CheckpointError if ``path``'s external data points outside its folder (or is unreadable)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        locations = external_locations(data)
    except (ValueError, IndexError):
        raise CheckpointError(f"{path}: not a valid ONNX model (malformed protobuf)") from None
    folder = path.resolve().parent
    for loc in locations:
        target = (folder / loc).resolve()
        if os.path.isabs(loc) or not target.is_relative_to(folder):
            raise CheckpointError(f"{path}: external data location {loc!r} lies outside the model's folder; "
                                  f"refusing to read it (a model must keep its data beside it)")
