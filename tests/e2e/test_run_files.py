"""A run folder tells the truth: files an earlier run wrote (metrics.csv, run.json, report.html) and this one did
not are removed (ours only, never through a link), and `report` refuses a run.json older than its images."""

import os

import cv2
import numpy as np

from helpers import models
from helpers.cli import cli


def _folders(tmp_path):
    src, gt = tmp_path / "in", tmp_path / "gt"
    src.mkdir(), gt.mkdir()
    rng = np.random.default_rng(1)
    for i in range(2):
        clean = cv2.GaussianBlur(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8), (5, 5), 2)
        cv2.imwrite(str(gt / f"im{i}.png"), clean)
        cv2.imwrite(str(src / f"im{i}.png"), np.clip(clean + rng.normal(0, 12, clean.shape), 0, 255).astype(np.uint8))
    return src, gt


def _restore(*args):
    return cli("restore", *args, "--model", models.onnx_model("step"), "--backend", "onnxruntime")


def test_a_rerun_without_gt_or_report_removes_the_earlier_run_files(tmp_path):
    src, gt = _folders(tmp_path)
    out = tmp_path / "out"
    r = _restore(src, "-o", out, "--gt", gt, "--report")
    assert r.returncode == 0, r.stderr
    assert all((out / n).is_file() for n in ("metrics.csv", "run.json", "report.html"))
    r = _restore(src, "-o", out, "--report")  # no --gt: the old metrics.csv would claim PSNRs of other pixels
    assert r.returncode == 0, r.stderr
    assert "removed the earlier run's metrics.csv" in r.stderr and not (out / "metrics.csv").exists()
    assert (out / "run.json").is_file() and (out / "report.html").is_file()
    r = _restore(src, "-o", out)
    assert r.returncode == 0 and "removed the earlier run's run.json, report.html" in r.stderr, r.stderr
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["im0.png", "im1.png"]


def test_files_that_are_not_ours_and_links_stay(tmp_path):
    src, _ = _folders(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.csv").write_text("my,own,table\n")
    victim = tmp_path / "victim.html"
    victim.write_text('<meta name="generator" content="rddm-infer 0">')
    (out / "report.html").symlink_to(victim)
    r = _restore(src, "-o", out)
    assert r.returncode == 0 and "removed" not in r.stderr, r.stderr
    assert (out / "metrics.csv").read_text() == "my,own,table\n" and (out / "report.html").is_symlink()
    assert victim.read_text().startswith("<meta")


def test_report_refuses_a_run_json_older_than_its_images(tmp_path):
    src, gt = _folders(tmp_path)
    out = tmp_path / "out"
    assert _restore(src, "-o", out, "--gt", gt, "--report").returncode == 0
    assert cli("report", out).returncode == 0
    later = (out / "run.json").stat().st_mtime + 60
    os.utime(out / "im1.png", (later, later))  # as another run without --report would leave it
    r = cli("report", out)
    assert r.returncode == 2 and "older than 1 of its images (e.g. im1.png)" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
