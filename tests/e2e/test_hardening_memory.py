"""Issue #26 case 13: a tile whose engine call cannot fit in memory is said before any image is read, instead of
the kernel's OOM killer ending the run with signal 9 and no message.

The model is the issue's: the trainer's `model.dim=8, model.dim_mults=[1,2]` (reference attention, 4 heads × 32),
full attention at half resolution: at the default tile 512 its bottleneck has 65,536 tokens and one call needs
well over 100 GB. No test here allocates more than about half a GB: the refused and shrunk tiles never run on
anything larger than a small image.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from helpers import models
from helpers.cli import cli
from rddm_infer.diffusion.metadata import ArtifactMeta
from rddm_infer.errors import CheckpointError, RDDMError
from rddm_infer.restore.memory import (AUTO_SHARE, ENV_LIMIT, available_memory, call_bytes, copies_per_node,
                                       derived_layout)

ORT = ("--backend", "onnxruntime", "--threads", "1")


@pytest.fixture(scope="module")
def user_model() -> Path:
    """The issue's model (dim 8, dim_mults [1, 2], 4 heads × 32), exported by the real exporter."""
    from rddm_export import export_onnx

    return export_onnx(models.tiny_loaded_model(), models.ROOT / "full_attention_half_res.onnx", kind="step",
                       steps=2, slim=False)


@pytest.fixture(scope="module")
def meta(user_model) -> ArtifactMeta:
    from rddm_infer.backends.onnxruntime import OnnxRuntimeRunner

    return OnnxRuntimeRunner(user_model).meta


def _no_override() -> dict:
    """The machine's own memory, whatever the environment running the tests sets."""
    env = dict(os.environ)
    env.pop(ENV_LIMIT, None)
    return env


def _free() -> int:
    free, where = available_memory() if not os.environ.get(ENV_LIMIT) else (None, "")
    if free is None:
        pytest.skip(f"this machine does not tell its free memory ({where or ENV_LIMIT + ' set'})")
    return free


def _image(path: Path, h: int, w: int) -> Path:
    rng = np.random.default_rng(0)
    cv2.imwrite(str(path), cv2.resize(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8), (w, h)))
    return path


def test_the_exported_metadata_records_every_attention_and_the_full_one_at_half_resolution(meta):
    full = [a for a in meta.attention if a["kind"] == "full"]
    assert full == [dict(kind="full", downscale=2, heads=4, dim_head=32, channels=16, count=1)]
    assert meta.attention == derived_layout(meta.unet)  # what an older artifact's estimate falls back to


@pytest.mark.parametrize("cfg", [dict(dim=8, dim_mults=(1, 2)), dict(dim=8, dim_mults=(1, 2), share_encoder=1),
                                 dict(dim=16, dim_mults=(1, 2, 4, 8), heads=2, dim_head=16, share_encoder=-1),
                                 dict(dim=8, dim_mults=(1,), heads=1, dim_head=8),
                                 dict(dim=8, dim_mults=(2, 4), heads=1, dim_head=8)])
def test_the_fallback_layout_of_older_artifacts_matches_the_network_measured(cfg):
    from rddm_infer.model import UNetConfig, UnetRes, attention_layout

    c = UNetConfig(**cfg)
    assert derived_layout(c.to_dict()) == attention_layout(UnetRes(c).eval(), c.size_multiple)


def test_info_shows_what_one_call_at_the_default_tile_needs(user_model, meta):
    r = cli("info", user_model)
    assert r.returncode == 0, r.stderr
    row = next(ln for ln in r.stdout.splitlines() if ln.strip().startswith("memory:"))
    assert f"about {call_bytes(meta, 512).bytes / 1e9:.1f} GB per engine call at tile 512, batch 1 (full attention " \
           f"over 65,536 tokens at 1/2 resolution" in row, row


def test_an_explicit_tile_that_cannot_fit_is_refused_in_one_line_before_any_image(user_model, meta, tmp_path):
    """The issue's run: 1600×1200 JPEGs at --tile 512 (24 GB RSS, then SIGKILL, no message)."""
    need = call_bytes(meta, 512).bytes
    if need <= _free():
        pytest.skip(f"this machine has {_free() / 1e9:.0f} GB free: tile 512 ({need / 1e9:.0f} GB) would fit")
    src = tmp_path / "in"
    src.mkdir()
    _image(src / "photo.jpg", 1200, 1600)
    out = tmp_path / "out"
    r = cli("restore", src, "-o", out, "--model", user_model, "--tile", 512, *ORT, env=_no_override())
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    m = re.search(r"--tile 512 needs about ([\d.]+) GB \(full attention over 65,536 tokens at 1/2 resolution\), "
                  r"more than the ([\d.]+) GB of (available memory|the cgroup's memory limit): use --tile (\d+) ",
                  lines[0])
    assert m, lines[0]
    assert abs(float(m[1]) * 1e9 - need) < 1e8
    suggested = int(m[4])
    assert 64 <= suggested < 512 and suggested % 32 == 0
    assert call_bytes(meta, suggested).bytes <= AUTO_SHARE * float(m[2]) * 1e9 + 1e8
    assert not out.exists() or not any(out.iterdir())  # nothing was restored or written


def test_bench_refuses_a_size_whose_one_call_cannot_fit(user_model, meta):
    if call_bytes(meta, 512).bytes <= _free():
        pytest.skip("this machine has room for one call at 512²")
    r = cli("bench", user_model, "--size", 512, *ORT, env=_no_override())
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert re.match(r"error: one engine call at --size 512 needs about [\d.]+ GB .*: use --size \d+ \(or smaller\)$",
                    r.stderr.strip()), r.stderr


def test_the_default_tile_shrinks_to_what_fits_and_says_so(user_model, meta, tmp_path):
    free = _free()
    if call_bytes(meta, 512).bytes <= AUTO_SHARE * free:
        pytest.skip(f"this machine has room for tile 512 ({free / 1e9:.0f} GB free)")
    src = _image(tmp_path / "small.png", 48, 64)  # smaller than any tile chosen: never allocates the tile's GBs
    out = tmp_path / "out"
    r = cli("restore", src, "-o", out, "--model", user_model, *ORT, env=_no_override())
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("tile: ")]
    assert len(lines) == 1, r.stderr
    m = re.match(r"tile: (\d+) instead of the default 512, to fit in memory \(one engine call at --tile 512 needs "
                 r"about [\d.]+ GB \(full attention over 65,536 tokens at 1/2 resolution\); [\d.]+ GB of .+\); "
                 r"--tile N sets it$", lines[0])
    assert m, lines[0]
    tile = int(m[1])
    # Free memory moves while other processes run: 1.3x either way is room for that, not for a wrong tile.
    assert tile % 32 == 0 and call_bytes(meta, tile).bytes <= AUTO_SHARE * free * 1.3
    assert call_bytes(meta, tile + 32).bytes > AUTO_SHARE * free / 1.3  # the largest that fits (steps of 32)
    assert cv2.imread(str(out / "small.png")).shape == (48, 64, 3)


def test_batch_and_model_copies_count_against_the_same_memory(monkeypatch):
    """RDDM_MEMORY_LIMIT (documented override) makes the budget exact: 1 copy of tile 128 fits, 4 do not,
    nor does --batch 4."""
    from rddm_infer.api import load_model

    path = models.onnx_model("step")
    with load_model(path, "onnxruntime", threads=1, tile=128) as probe:
        need = call_bytes(probe.meta, 128, 1, probe.runner.attention_matrices).bytes
    monkeypatch.setenv(ENV_LIMIT, str(2 * need))
    with load_model(path, "onnxruntime", threads=1, tile=128) as r:
        assert r.tile == 128 and r.memory_note == ""
    with pytest.raises(RDDMError, match=r"each of 4 model copies on this machine: use --tile \d+"):
        load_model(path, "onnxruntime", threads=1, tile=128, model_copies=4)
    with pytest.raises(RDDMError, match=r"--tile 128 --batch 4 needs about"):
        load_model(path, "onnxruntime", threads=1, tile=128, batch=4)
    with load_model(path, "onnxruntime", threads=1, model_copies=4) as auto:  # no tile given: shrunk instead
        assert auto.tile < 128 and auto.memory_note.startswith(f"tile: {auto.tile} instead of the default 512")


def test_when_no_tile_fits_even_the_default_is_refused_with_what_to_change(monkeypatch):
    from rddm_infer.api import load_model

    monkeypatch.setenv(ENV_LIMIT, "1M")
    path = models.onnx_model("step")
    with pytest.raises(RDDMError, match=r"--tile 512 needs about .* more than the 1 MB of RDDM_MEMORY_LIMIT; "
                                        r"no --tile down to 64 fits: free memory, or use a model without full"):
        load_model(path, "onnxruntime", threads=1)
    with pytest.raises(RDDMError, match=r"--tile 64 --batch 2 needs about .*: lower --batch$"):
        load_model(path, "onnxruntime", threads=1, tile=64, batch=2)


def test_ray_workers_on_one_node_share_its_memory():
    nodes = [{"Alive": True, "Resources": {"CPU": 16.0}}, {"Alive": True, "Resources": {"CPU": 4.0}},
             {"Alive": False, "Resources": {"CPU": 64.0}}]
    assert copies_per_node(nodes, workers=10, cpus=2.0) == 8  # the largest live node holds 8 of them
    assert copies_per_node(nodes, workers=3, cpus=2.0) == 3
    assert copies_per_node([{"Alive": True, "Resources": {"CPU": 8.0, "GPU": 2.0}}], 4, 1.0, gpus=1.0) == 2


def test_a_bad_memory_override_is_one_line(tmp_path):
    r = cli("restore", _image(tmp_path / "a.png", 16, 16), "-o", tmp_path / "out", "--model",
            models.onnx_model("step"), *ORT, env={ENV_LIMIT: "lots"})
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"error: {ENV_LIMIT}='lots': expected a size such as 8G, 512M or a number of bytes"], r.stderr


def test_corrupt_attention_metadata_is_one_line(meta):
    d = json.loads(meta.to_json())
    d["attention"] = [{"kind": "full", "downscale": 0}]
    with pytest.raises(CheckpointError, match="invalid 'rddm' metadata: attention entries need kind"):
        ArtifactMeta.from_json(json.dumps(d), where="m.onnx")


# The peak is /proc's VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over exec from the parent
# (pytest with torch loaded), which would read as this call's peak.
MEASURE = r"""
import sys
import numpy as np
from rddm_infer.backends.onnxruntime import OnnxRuntimeRunner
from rddm_infer.diffusion.engine_sampler import EngineSampler, Noise

def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key + ":"))

runner = OnnxRuntimeRunner(sys.argv[1], threads=1)
sampler, tile = EngineSampler(runner), int(sys.argv[2])
plan = sampler.plan(1)
x = np.zeros((1, 3, 16, 16), np.float32)
sampler.run(x, plan, Noise.draw(plan, x.shape, 0))  # the session's own first-call allocations
x = np.random.default_rng(0).uniform(-1, 1, (1, 3, tile, tile)).astype(np.float32)
noise = Noise.draw(plan, x.shape, 0)
before = status("VmRSS")
sampler.run(x, plan, noise)
print(status("VmHWM") - before)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="measures resident memory from /proc")
@pytest.mark.parametrize("tile", [96, 128])
def test_the_estimate_bounds_the_measured_peak_within_2x(user_model, meta, tile):
    """One real engine call in a fresh process: the peak resident memory it added vs the estimate
    (measured 1.1-1.8x over 24 runs of 7 models, ONNX Runtime and OpenVINO; here ~1.2x, at most ~0.6 GB)."""
    r = subprocess.run([sys.executable, "-c", MEASURE, str(user_model), str(tile)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    measured = int(r.stdout.split()[-1])
    ratio = call_bytes(meta, tile).bytes / measured
    assert 1.0 <= ratio <= 2.0, (tile, measured, ratio)
