"""Object-store URIs on a real S3 server (moto on loopback): s3→s3, local→s3 and s3→local restore the same
names and bytes as a local run, a broken object is one error line naming its URI, --skip-existing resumes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from helpers.cli import cli
from helpers.s3 import download, s3_server, s3fs, upload

from rddm_infer import restore_folder
from rddm_infer.errors import RDDMError
from rddm_infer.restore.jobs import collect_inputs, prepare_jobs
from rddm_infer.io.storage import Uri, location

pytestmark = pytest.mark.timeout(180)
RUN = dict(seed=7, recursive=True, batch=2)


@pytest.fixture(scope="module")
def s3():
    with s3_server() as env:
        fs = s3fs(env)
        fs.create_dir("bkt")
        yield env, fs


@pytest.fixture(scope="module")
def case(s3, tmp_path_factory):
    """Inputs on disk and in s3://bkt/in (one truncated), and the local run's outputs to compare with."""
    env, fs = s3
    root = tmp_path_factory.mktemp("s3case")
    src = root / "in"
    rng = np.random.default_rng(0)
    for name, size in [("img00.png", (40, 40)), ("img01.png", (40, 40)), ("img02.jpg", (40, 40)),
                       ("sub/img03.png", (32, 48))]:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(src / name), rng.integers(0, 256, (*size, 3), dtype=np.uint8))
    (src / "broken.png").write_bytes((src / "img00.png").read_bytes()[:200])  # truncated
    gt = root / "gt"
    shutil.copytree(src, gt)
    upload(fs, src, "bkt/in")
    ref = restore_folder(src, root / "ref", gt_dir=gt, **RUN)
    assert (ref.count("restored"), ref.count("failed")) == (4, 1)
    outputs = {p.relative_to(root / "ref").as_posix(): p.read_bytes() for p in (root / "ref").rglob("*")
               if p.is_file() and p.name != "metrics.csv"}
    assert sorted(outputs) == ["img00.png", "img01.png", "img02.jpg", "sub/img03.png"]
    return dict(root=root, src=src, gt=gt, ref=ref, outputs=outputs)


def _cli(*args, env) -> subprocess.CompletedProcess:
    return cli("restore", *args, timeout=120, env=env)


def test_s3_to_s3_same_bytes_one_error_line_csv_run_json_and_resume(s3, case):
    env, fs = s3
    r = _cli("s3://bkt/in", "-o", "s3://bkt/out", "-r", "--batch", "2", "--seed", "7", "--gt", case["gt"], "--json",
             "--report", env=env)
    assert r.returncode == 1, r.stderr[-2000:]
    s = json.loads(r.stdout)
    assert (s["restored"], s["failed"], s["skipped"]) == (4, 1, 0)
    err = "s3://bkt/in/broken.png: truncated PNG (no IEND chunk)"
    assert s["errors"] == [{"file": "s3://bkt/in/broken.png", "error": err}]
    assert [ln for ln in r.stderr.splitlines() if ln.startswith("error:")] == [f"error: {err}"]
    assert "Traceback" not in r.stderr
    assert download(fs, "bkt/out") == case["outputs"]  # same names, same bytes; no temporaries or test objects
    with fs.open_input_file("bkt/out/metrics.csv") as f:
        rows = [ln.split(",") for ln in f.readall().decode().splitlines()]
    local = [ln.split(",") for ln in (case["root"] / "ref" / "metrics.csv").read_text().splitlines()]
    assert [row[0] for row in rows[1:-1]] == ["s3://bkt/in/" + row[0][len(str(case["src"])) + 1:] for row in local[1:-1]]
    assert [row[1:] for row in rows] == [row[1:] for row in local]  # same PSNR/SSIM per image and mean
    with fs.open_input_file("bkt/out/run.json") as f:
        record = json.loads(f.readall())
    assert record["counts"] == {"restored": 4, "failed": 1, "skipped": 0}
    assert {im["dst"] for im in record["images"] if im["status"] == "restored"} == set(case["outputs"])
    assert "report.html is built for local output folders" in r.stderr

    # resume: one output gone, one cut to 0 bytes (not done), the rest skipped
    fs.delete_file("bkt/out/img01.png")
    with fs.open_output_stream("bkt/out/sub/img03.png") as f:
        f.write(b"")
    again = restore_folder("s3://bkt/in", "s3://bkt/out", skip_existing=True, **RUN)
    assert (again.count("restored"), again.count("skipped"), again.count("failed")) == (2, 2, 1)
    assert sorted(str(r.job.dst) for r in again.results if r.status == "restored") == \
        ["s3://bkt/out/img01.png", "s3://bkt/out/sub/img03.png"]
    assert download(fs, "bkt/out") == case["outputs"]


def test_local_to_s3_and_s3_to_local_match_the_local_run(s3, case):
    env, fs = s3
    up = restore_folder(case["src"], "s3://bkt/up", **RUN)
    down = restore_folder("s3://bkt/in", case["root"] / "down", **RUN)
    assert up.line() == down.line() == case["ref"].line()
    assert download(fs, "bkt/up") == case["outputs"]
    got = {p.relative_to(case["root"] / "down").as_posix(): p.read_bytes()
           for p in (case["root"] / "down").rglob("*") if p.is_file()}
    assert got == case["outputs"]
    assert [r.error for r in down.results if r.status == "failed"] == \
        ["s3://bkt/in/broken.png: truncated PNG (no IEND chunk)"]


def test_an_endpoint_in_the_uri_query_needs_no_environment(s3, case):
    env, fs = s3
    host = env["AWS_ENDPOINT_URL"].removeprefix("http://")
    plain = {k: v for k, v in os.environ.items() if k != "AWS_ENDPOINT_URL"}
    r = subprocess.run([sys.executable, "-m", "rddm_infer.cli", "restore", "-q", "--seed", "7", "--batch", "2",
                        f"s3://bkt/in/img00.png?endpoint_override={host}&scheme=http", "-o", case["root"] / "query"],
                       capture_output=True, text=True, timeout=120, env=plain)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (case["root"] / "query" / "img00.png").read_bytes() == case["outputs"]["img00.png"]


def test_uri_inputs_globs_missing_objects_and_unwritable_buckets(s3, case):
    jobs = collect_inputs(["s3://bkt/in/img0*.png", "s3://bkt/in/img02.jpg", "s3://bkt/in/nope.png",
                           "s3://bkt/empty/*.png"])
    assert [str(j.src) for j in jobs] == ["s3://bkt/in/img00.png", "s3://bkt/in/img01.png", "s3://bkt/in/img02.jpg",
                                          "s3://bkt/in/nope.png", "s3://bkt/empty/*.png"]
    assert [j.error for j in jobs[3:]] == ["s3://bkt/in/nope.png: no such file or folder",
                                           "s3://bkt/empty/*.png: no images found (no files match this pattern)"]
    deep = collect_inputs(["s3://bkt/in/**/*.png"], recursive=True)
    assert [str(j.src) for j in deep] == ["s3://bkt/in/broken.png", "s3://bkt/in/img00.png", "s3://bkt/in/img01.png",
                                          "s3://bkt/in/sub/img03.png"]
    # an output folder inside the input folder is never read back as input
    planned = prepare_jobs(["s3://bkt/in"], "s3://bkt/in/sub", recursive=True)
    assert [j.rel.as_posix() for j in planned] == ["broken.png", "img00.png", "img01.png", "img02.jpg"]
    with pytest.raises(RDDMError, match=r"^s3://nobucket/out: output folder is not writable \(.*bucket"):
        prepare_jobs([case["src"]], "s3://nobucket/out")


def test_uri_naming_is_the_path_naming():
    u = location("s3://bkt/a/b/x.tar.png?endpoint_override=http://h:9000")
    assert isinstance(u, Uri) and str(u) == "s3://bkt/a/b/x.tar.png"  # error lines carry no query
    assert u.uri == "s3://bkt/a/b/x.tar.png?endpoint_override=http://h:9000" and location(u.uri) == u
    assert (u.name, u.stem, u.suffix, str(u.parent)) == ("x.tar.png", "x.tar", ".png", "s3://bkt/a/b")
    assert str(u.parent / Path("c/./d.jpg")) == "s3://bkt/a/b/c/d.jpg" and u.parent / "." == u.parent
    assert u.relative_to(location("s3://bkt/a?endpoint_override=http://h:9000")).as_posix() == "b/x.tar.png"
    assert location("file:///tmp/a%20b.png") == Path("/tmp/a b.png") and location("in/x.png") == Path("in/x.png")
    with pytest.raises(RDDMError, match=r"^s3://…@bkt/in: credentials in a URI would be printed"):
        location("s3://KEY:SECRET@bkt/in")


def test_a_uri_without_pyarrow_is_one_line_naming_the_extra(tmp_path):
    code = ("import sys; sys.modules['pyarrow'] = None; sys.modules['pyarrow.fs'] = None; "  # as if not installed
            "from rddm_infer.cli import main; main(['restore', 's3://bkt/in', '-o', sys.argv[1], '-q'])")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out")], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip() == ("error: s3://bkt/in: s3:// paths need pyarrow: pip install 'rddm-infer[storage]' "
                                "(the cluster extra includes it)")


def test_ray_s3_to_s3_same_bytes_and_error_line(s3, case):
    """A local Ray runtime: its workers inherit the driver's environment, so the store settings reach them."""
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'rddm-infer[cluster]')")
    env, fs = s3
    ray_env = {**env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    r = _cli("s3://bkt/in", "-o", "s3://bkt/ray", "-r", "--batch", "2", "--seed", "7", "--json", "--ray",
             "--workers", "2", "--cpus-per-worker", "0.5", env=ray_env)
    assert r.returncode == 1, r.stderr[-2000:]
    s = json.loads(r.stdout)
    err = "s3://bkt/in/broken.png: truncated PNG (no IEND chunk)"
    assert (s["restored"], s["failed"]) == (4, 1) and s["errors"] == [{"file": "s3://bkt/in/broken.png", "error": err}]
    assert [ln for ln in r.stderr.splitlines() if ln.startswith("error:")] == [f"error: {err}"]
    assert download(fs, "bkt/ray") == case["outputs"]
