"""`rddm-infer restore` with overlapped decode, engine and encode: input-order lines, resuming after a kill."""

from __future__ import annotations

import re
import signal

import cv2
import numpy as np
import pytest

from helpers import models
from helpers.cli import py, run

RNG = np.random.default_rng(3)

_KILL_AT_NTH_RENAME = """
import os, signal, sys
real, count = os.replace, [0]
def replace(src, dst):
    if '.tmp' in os.fspath(src) and os.fspath(dst).endswith('.png'):  # an output's temp, renamed into place
        count[0] += 1
        if count[0] == {nth}:
            os.kill(os.getpid(), signal.SIGKILL)
    return real(src, dst)
os.replace = replace
from rddm_infer.cli import main
sys.argv[0] = 'rddm-infer'
main(sys.argv[1:])
"""


@pytest.fixture(scope="module")
def model():
    return models.onnx_model("step")


def folder(d, sizes):
    d.mkdir()
    for i, (h, w) in enumerate(sizes):
        cv2.imwrite(str(d / f"{i:02d}.png"), RNG.integers(0, 256, (h, w, 3), dtype=np.uint8))
    return d


def test_lines_come_in_input_order_although_small_images_finish_first(model, tmp_path):
    # big (tiled, slow) images first, small ones after: readers and writers finish them out of order
    d = folder(tmp_path / "in", [(160, 160), (24, 24), (24, 24), (150, 140), (24, 24), (20, 28)])
    r = run("rddm-infer", "restore", d, "-o", tmp_path / "out", "-m", model, "--io-workers", "3", "--batch", "2",
            "--tile", "64")
    assert r.returncode == 0, r.stderr
    assert "files: overlapped: 2 reader(s), 1 writer(s), at most 18 images" in r.stderr
    lines = re.findall(r"^\[(\d+)/6\] (\S+) ->", r.stderr, re.M)
    assert [int(k) for k, _ in lines] == list(range(1, 7))
    assert [src.rsplit("/", 1)[-1] for _, src in lines] == [f"{i:02d}.png" for i in range(6)]
    seq = run("rddm-infer", "restore", d, "-o", tmp_path / "seq", "-m", model, "--io-workers", "0", "--batch", "2",
              "--tile", "64", "-q")
    assert seq.returncode == 0, seq.stderr
    assert all((tmp_path / "seq" / p.name).read_bytes() == p.read_bytes() for p in (tmp_path / "out").iterdir())


def test_skip_existing_resumes_a_killed_overlapped_run_to_the_same_bytes(model, tmp_path):
    d = folder(tmp_path / "in", [(32, 32)] * 8)
    killed = py(_KILL_AT_NTH_RENAME.format(nth=4), "restore", d, "-o", tmp_path / "out", "-m", model,
                "--io-workers", "3", "-q")
    assert killed.returncode == -signal.SIGKILL
    written = sorted(p.name for p in (tmp_path / "out").iterdir() if not p.name.startswith("."))
    assert len(written) == 3  # the fourth rename never happened
    again = run("rddm-infer", "restore", d, "-o", tmp_path / "out", "-m", model, "--io-workers", "3",
                "--skip-existing")
    assert again.returncode == 0, again.stderr
    assert "restored 5, failed 0, skipped 3" in again.stdout
    clean = run("rddm-infer", "restore", d, "-o", tmp_path / "clean", "-m", model, "-q")
    assert clean.returncode == 0, clean.stderr
    out = sorted((tmp_path / "out").iterdir())
    assert [p.name for p in out] == sorted(p.name for p in (tmp_path / "clean").iterdir())  # temps cleaned too
    assert all(p.read_bytes() == (tmp_path / "clean" / p.name).read_bytes() for p in out)


@pytest.mark.parametrize("flag,value,message", [
    ("--io-workers", "many", "--io-workers 'many': must be auto or an integer"),
    ("--io-workers", "-2", "--io-workers -2: must be auto or an integer >= 0"),
    ("--in-flight", "1", "--in-flight 1: must be >= --batch 2"),
    ("--in-flight-mb", "0", "--in-flight-mb 0.0: must be > 0"),
])
def test_bad_flow_settings_are_one_line_before_the_model_loads(model, tmp_path, flag, value, message):
    d = folder(tmp_path / "in", [(16, 16)])
    r = run("rddm-infer", "restore", d, "-o", tmp_path / "out", "-m", model, "--batch", "2", flag, value)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
