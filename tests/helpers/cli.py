"""The one way tests run a command-line tool: a real subprocess of the installed console script
(``python -m`` where the script is not installed), with wide, UTF-8 help output."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

MODULES = {"rddm-infer": "rddm_infer.cli", "rddm-export": "rddm_export.cli", "rddm-train": "rddm_train.cli"}
ENV = {"COLUMNS": "200", "PYTHONIOENCODING": "utf-8"}


def command(tool: str) -> list[str]:
    script = Path(sys.executable).parent / tool
    return [str(script)] if script.exists() else [sys.executable, "-m", MODULES[tool]]


def run(tool: str, *args, cwd=None, env: dict | None = None, inherit_env: bool = True, timeout: float = 300,
        **popen) -> subprocess.CompletedProcess:
    """``tool args...``; ``env`` adds to the environment (to ``PATH`` alone when ``inherit_env`` is False)."""
    base = dict(os.environ) if inherit_env else {"PATH": "/usr/bin:/bin"}
    return subprocess.run(command(tool) + [str(a) for a in args], capture_output=True, text=True, timeout=timeout,
                          cwd=cwd, env={**base, **ENV, **(env or {})}, **popen)


def cli(*args, **kw) -> subprocess.CompletedProcess:
    """``rddm-infer args...``"""
    return run("rddm-infer", *args, **kw)


def py(code: str, *args, timeout: float = 240, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -c code args...`` in the test's environment."""
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **ENV, **(env or {})})
