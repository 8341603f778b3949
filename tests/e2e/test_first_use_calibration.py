"""``--backend auto`` with no timing table for the model on this CPU times the exact paths once, caches the table
and says so; later runs read it; a cache that cannot be written is a stated fallback, never an error."""

import json

import cv2
import numpy as np

from helpers import models
from helpers.cli import cli


def _input(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    cv2.imwrite(str(src / "a.png"), np.random.default_rng(0).integers(0, 255, (24, 32, 3), dtype=np.uint8))
    return src


def _tables(cache):
    return sorted((cache / "rddm-infer" / "calibration").glob("*.json"))


def test_first_use_times_the_exact_paths_caches_them_and_later_runs_read_the_cache(tmp_path):
    src, cache, step = _input(tmp_path), tmp_path / "cache", models.onnx_model("step")
    env = {"XDG_CACHE_HOME": str(cache)}
    r = cli("restore", src, "-o", tmp_path / "o1", "--model", step, env=env)
    assert r.returncode == 0, r.stderr
    assert "timed now, first use" in r.stderr and "cached" in r.stderr and "fastest exact path on this CPU" in r.stderr
    (table,) = _tables(cache)
    saved = json.loads(table.read_text())
    assert saved["exact_only"] and saved["entries"] and all(not e["reduced"] for e in saved["entries"])
    r = cli("restore", src, "-o", tmp_path / "o2", "--model", step, env=env)
    assert r.returncode == 0 and "timed now" not in r.stderr and "fastest exact path on this CPU" in r.stderr, r.stderr
    assert np.array_equal(cv2.imread(str(tmp_path / "o1" / "a.png")), cv2.imread(str(tmp_path / "o2" / "a.png")))
    # --precision auto opts in to reduced precision: a table of exact paths only is measured again, in full
    r = cli("restore", src, "-o", tmp_path / "o3", "--model", step, "--precision", "auto", env=env)
    assert r.returncode == 0 and "timed now" in r.stderr, r.stderr
    assert not json.loads(table.read_text())["exact_only"]


def test_a_named_backend_is_never_timed(tmp_path):
    src, cache = _input(tmp_path), tmp_path / "cache"
    r = cli("restore", src, "-o", tmp_path / "o", "--model", models.onnx_model("step"), "--backend", "onnxruntime",
            env={"XDG_CACHE_HOME": str(cache)})
    assert r.returncode == 0 and "timed now" not in r.stderr, r.stderr
    assert not _tables(cache)


def test_an_unwritable_cache_is_a_stated_fallback(tmp_path):
    src, blocked = _input(tmp_path), tmp_path / "a-file"
    blocked.write_text("not a folder")
    r = cli("restore", src, "-o", tmp_path / "o", "--model", models.onnx_model("step"),
            env={"XDG_CACHE_HOME": str(blocked)})
    assert r.returncode == 0, r.stderr
    assert "not cached (again next run)" in r.stderr and "Traceback" not in r.stderr
    assert (tmp_path / "o" / "a.png").is_file() and blocked.read_text() == "not a folder"
