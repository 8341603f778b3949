"""A real S3-compatible server on loopback (moto's ThreadedMotoServer) for the object-store tests."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Iterator

import pytest


@contextlib.contextmanager
def s3_server() -> Iterator[dict[str, str]]:
    """Start moto on 127.0.0.1 and yield the environment that points pyarrow (and the CLI) at it; stopped at exit."""
    pytest.importorskip("pyarrow.fs", reason="pyarrow is not installed (pip install 'rddm-infer[storage]')")
    moto_server = pytest.importorskip("moto.server", reason="moto is not installed (pip install 'moto[server]')")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # pyarrow reads these when a filesystem is made, in this process and in the CLI's
    try:
        yield env
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def s3fs(env: dict[str, str]):
    from pyarrow.fs import S3FileSystem

    return S3FileSystem(endpoint_override=env["AWS_ENDPOINT_URL"], access_key=env["AWS_ACCESS_KEY_ID"],
                        secret_key=env["AWS_SECRET_ACCESS_KEY"], region=env["AWS_REGION"], allow_bucket_creation=True)


def upload(fs, folder: Path, prefix: str) -> None:
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            with fs.open_output_stream(f"{prefix}/{p.relative_to(folder).as_posix()}") as f:
                f.write(p.read_bytes())


def download(fs, prefix: str, skip=("metrics.csv", "run.json")) -> dict[str, bytes]:
    """Every object under ``prefix`` (relative key -> bytes), but the run's CSV and record."""
    from pyarrow.fs import FileSelector, FileType

    out = {}
    for info in fs.get_file_info(FileSelector(prefix, recursive=True, allow_not_found=True)):
        rel = info.path[len(prefix) + 1:]
        if info.type == FileType.File and rel not in skip:
            with fs.open_input_file(info.path) as f:
                out[rel] = f.readall()
    return out
