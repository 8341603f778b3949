"""`restore` on a real Ray cluster: a `ray start --head` on loopback (stopped by its process group at the
end), the CLI as a subprocess attached to it, and the same files, bytes and error lines as one process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from helpers.cli import cli
from helpers.ray_head import RAY_ENV, ray_head
from rddm_infer.restore.ray_executor import size_pool
from rddm_infer.errors import RDDMError

pytestmark = pytest.mark.timeout(240)  # every test here talks to daemons: never let one hang CI

@pytest.fixture(scope="module")
def ray_cluster():
    """A 2-CPU Ray head on 127.0.0.1 (helpers.ray_head), shared by this module's tests."""
    with ray_head() as (address, _):
        yield address


def _cli(*args, timeout=180, cwd=None) -> subprocess.CompletedProcess:
    return cli("restore", *args, timeout=timeout, env=RAY_ENV, cwd=cwd)


def _images(folder: Path, n: int, size=(40, 40), seed=0) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        base = cv2.resize(rng.integers(0, 256, (5, 5, 3), dtype=np.uint8), size[::-1], interpolation=cv2.INTER_CUBIC)
        noisy = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
        cv2.imwrite(str(folder / f"img{i:02d}.png"), noisy)


def _outputs(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.startswith(".") and p.name != "metrics.csv"}


# ------------------------------------------------------------------------------------ sizing (no Ray)

def test_pool_leaves_a_cpu_for_ray_data_and_refuses_what_would_hang():
    assert size_pool(2) == size_pool(2, workers=1)
    assert (size_pool(2).workers, size_pool(2).cpus) == (1, 1.0)  # never both CPUs: the measured hang
    assert (size_pool(2, workers=2).workers, size_pool(2, workers=2).cpus) == (2, 0.5)  # the measured working split
    assert (size_pool(16).workers, size_pool(16).cpus) == (7, 2.0)
    assert (size_pool(16, 4, gpus_per_worker=1).workers, size_pool(16, 4, gpus_per_worker=1).cpus) == (4, 1.0)
    for kw, msg in [(dict(workers=2, cpus_per_worker=1), "must stay free"),  # 2 × 1 on 2 CPUs: hung
                    (dict(cpus_per_worker=2), "must stay free"),  # 1 × 2 on 2 CPUs: hung
                    (dict(gpus_per_worker=1), "has 0 GPUs"), (dict(workers=0), "--workers must be >= 1")]:
        with pytest.raises(RDDMError, match=msg):
            size_pool(2, **kw)
    with pytest.raises(RDDMError, match="does not fit a Ray node"):
        size_pool(32, workers=1, cpus_per_worker=8, node_cpus=4)


# ------------------------------------------------------------------------------------ on a real cluster

def test_same_files_bytes_errors_and_metrics_as_one_process(ray_cluster, tmp_path):
    src = tmp_path / "in"
    _images(src, 3)  # same size: batched together in one process, spread over two actors on Ray
    _images(src / "sub", 1, size=(48, 32), seed=1)
    cv2.imwrite(str(src / "sub" / "gray.png"), cv2.imread(str(src / "img00.png"), cv2.IMREAD_GRAYSCALE))
    cv2.imwrite(str(src / "deep.tif"), (cv2.imread(str(src / "img01.png")).astype(np.uint16) * 257))
    (src / "broken.png").write_bytes((src / "img02.png").read_bytes()[:200])  # truncated
    gt = tmp_path / "gt"
    shutil.copytree(src, gt)
    common = ["-r", "--gt", gt, "--batch", "2", "--seed", "7", "--json"]
    one = _cli(src, "-o", tmp_path / "one", *common)
    ray = _cli(src, "-o", tmp_path / "ray", *common, "--ray-address", ray_cluster, "--workers", "2")
    assert one.returncode == ray.returncode == 1, (one.stderr[-2000:], ray.stderr[-2000:])
    a, b = json.loads(one.stdout), json.loads(ray.stdout)  # stdout is the JSON alone, Ray's notices stay off it
    assert (b["restored"], b["failed"], b["skipped"]) == (a["restored"], a["failed"], a["skipped"]) == (6, 1, 0)
    assert b["errors"] == a["errors"] and "truncated PNG" in b["errors"][0]["error"]
    assert b["metrics"]["images"] == a["metrics"]["images"]
    out_one, out_ray = _outputs(tmp_path / "one"), _outputs(tmp_path / "ray")
    assert sorted(out_ray) == sorted(out_one) == ["deep.tif", "img00.png", "img01.png", "img02.png",
                                                  "sub/gray.png", "sub/img00.png"]
    assert out_ray == out_one  # same bytes: noise per image, whichever actor and batch ran it
    assert (tmp_path / "ray" / "metrics.csv").read_bytes() == (tmp_path / "one" / "metrics.csv").read_bytes()
    error_lines = [ln for ln in ray.stderr.splitlines() if ln.startswith("error:")]
    assert error_lines == [f"error: {a['errors'][0]['error']}"], ray.stderr[-2000:]
    assert "Traceback" not in ray.stderr


def test_killed_job_resumes_with_skip_existing(ray_cluster, tmp_path):
    from rddm_infer import restore_folder

    src, out, ref = tmp_path / "in", tmp_path / "out", tmp_path / "ref"
    n = 10
    _images(src, n, size=(80, 80), seed=2)
    assert restore_folder(src, ref, seed=3).count("restored") == n
    cmd = [sys.executable, "-m", "rddm_infer.cli", "restore", str(src), "-o", str(out), "--seed", "3", "-q",
           "--ray-address", ray_cluster, "--workers", "1"]
    driver = subprocess.Popen(cmd, env={**os.environ, **RAY_ENV}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 150
        while not (out.exists() and _outputs(out)):
            assert driver.poll() is None and time.monotonic() < deadline, "no output appeared"
            time.sleep(0.05)
    finally:
        driver.kill()  # SIGKILL: the driver cannot clean up; Ray ends its actors
        driver.wait(timeout=30)
    time.sleep(3)  # let Ray notice the dead driver and stop its actor
    before = _outputs(out)
    assert 1 <= len(before) < n, f"{len(before)} of {n} written before the kill"
    resumed = _cli(src, "-o", out, "--seed", "3", "--skip-existing", "--json", "--ray-address", ray_cluster,
                   "--workers", "1")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    s = json.loads(resumed.stdout)
    assert s["skipped"] >= len(before) and s["restored"] >= 1 and s["skipped"] + s["restored"] == n
    assert _outputs(out) == _outputs(ref)  # every image, identical to the single-process run


def test_workers_that_would_starve_ray_data_are_refused(ray_cluster, tmp_path):
    _images(tmp_path / "in", 1)
    r = _cli(tmp_path / "in", "-o", tmp_path / "out", "--ray-address", ray_cluster, "--workers", "2",
             "--cpus-per-worker", "1")
    assert r.returncode == 2 and "lower --workers or --cpus-per-worker" in r.stderr, r.stderr[-2000:]
    # the output folder is proven writable before anything runs (it may exist), but nothing is written in it
    assert "Traceback" not in r.stderr and not any((tmp_path / "out").glob("*"))


def test_local_runtime_same_bytes_relative_paths(tmp_path):
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'rddm-infer[cluster]')")
    _images(tmp_path / "in", 2, size=(32, 40), seed=4)
    one = _cli("in", "-o", "one", "--seed", "5", "-q", cwd=tmp_path)
    ray = _cli("in", "-o", "ray", "--seed", "5", "--ray", "--workers", "2", "--cpus-per-worker", "0.5", cwd=tmp_path)
    assert one.returncode == ray.returncode == 0, ray.stderr[-2000:]
    assert "2 workers × 0.5 CPU (1 engine thread each) on a local Ray runtime" in ray.stderr
    assert _outputs(tmp_path / "ray") == _outputs(tmp_path / "one") and len(_outputs(tmp_path / "one")) == 2


def test_ray_options_without_ray_are_refused(tmp_path):
    _images(tmp_path / "in", 1)
    r = _cli(tmp_path / "in", "-o", tmp_path / "out", "--workers", "2")
    assert r.returncode == 2 and "need --ray or --ray-address" in r.stderr and not (tmp_path / "out").exists()


def test_restore_folder_executor_ray_matches_the_local_executor(ray_cluster, tmp_path):
    _images(tmp_path / "in", 2, seed=6)
    code = ("import json, sys; from rddm_infer import restore_folder; src, one, ray, addr = sys.argv[1:]; "
            "a = restore_folder(src, one, seed=7, pixel_shuffle=2); "  # restore options reach the actors
            "b = restore_folder(src, ray, seed=7, pixel_shuffle=2, executor='ray', address=addr, workers=1, "
            "cpus_per_worker=0.5); "
            "print(json.dumps([a.line(), b.line()]))")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "in"), str(tmp_path / "one"), str(tmp_path / "ray"),
                        ray_cluster], capture_output=True, text=True, timeout=200, env={**os.environ, **RAY_ENV})
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == ["restored 2, failed 0, skipped 0"] * 2
    assert _outputs(tmp_path / "ray") == _outputs(tmp_path / "one") and len(_outputs(tmp_path / "one")) == 2


def test_restore_folder_refuses_an_unknown_executor_and_ray_options_without_ray(tmp_path):
    from rddm_infer import restore_folder
    from rddm_infer.errors import OptionError

    _images(tmp_path / "in", 1)
    with pytest.raises(OptionError, match="executor 'spark'"):
        restore_folder(tmp_path / "in", tmp_path / "out", executor="spark")
    with pytest.raises(RDDMError, match="workers"):
        restore_folder(tmp_path / "in", tmp_path / "out", workers=2)
    assert not any((tmp_path / "out").glob("*.png"))
