"""A real `ray start --head` for the tests that need an external cluster, and the environment they run Ray in.

Loopback only (Ray otherwise listens on every interface), token auth with a token of our own (never
~/.ray/auth_token, which other users' clusters share), no usage reporting.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(16), "RAY_USAGE_STATS_ENABLED": "0"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def ray_head() -> Iterator[tuple[str, int]]:
    """A 2-CPU `ray start --head --block` on 127.0.0.1: yields (address, process group). `ray start` daemons ignore
    SIGTERM, so the whole group is killed at the end, whatever happened; with --block the death of one daemon
    stops the others (killing the raylet takes the GCS down too)."""
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'rddm-infer[cluster]')")
    port = free_port()
    temp = Path(tempfile.mkdtemp(prefix="rddm-ray-", dir="/tmp"))  # short: Ray's socket paths must fit 107 chars
    log = temp / "ray_start.log"
    cmd = [str(Path(sys.executable).with_name("ray")), "start", "--head", f"--port={port}",
           "--node-ip-address=127.0.0.1", "--num-cpus=2", "--num-gpus=0", "--include-dashboard=false",
           "--disable-usage-stats", f"--temp-dir={temp}", "--block"]
    with open(log, "w") as f:
        head = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **RAY_ENV},
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while "Ray runtime started" not in log.read_text():
            if head.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"ray start did not come up:\n{log.read_text()[-2000:]}")
            time.sleep(0.5)
        yield f"127.0.0.1:{port}", head.pid
    finally:
        try:
            os.killpg(head.pid, signal.SIGKILL)  # the group is ours: start_new_session above
        except ProcessLookupError:
            pass
        head.wait(timeout=30)
        shutil.rmtree(temp, ignore_errors=True)
