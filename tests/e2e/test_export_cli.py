"""The rddm-export command line, as a real subprocess: reference checkpoints, report, refusals."""

import json
import os
import subprocess
import sys

import numpy as np

from helpers.cli import run
from helpers.export import reference_checkpoint, run_fused_and_torch
from rddm_infer.model import load_checkpoint
from rddm_export.artifact import read_metadata


def _cli(*args, cwd=None):
    return run("rddm-export", *args, cwd=cwd, timeout=600)


def test_reference_checkpoint_exports_validated_graphs(tmp_path):
    ckpt = reference_checkpoint(tmp_path, name="model-3.pt")
    work = tmp_path / "work"
    work.mkdir()
    r = _cli(ckpt, "--graph", "fused", "--steps", "2", "--json", cwd=work)
    assert r.returncode == 0, r.stderr
    (report,) = json.loads(r.stdout)
    path = work / "model-3_onnx" / "fused2_fp32.onnx"  # default: <stem>_onnx/ in the current directory
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model-3.pt", "work"]  # nothing beside the checkpoint
    assert report["path"] == str(path) and path.is_file() and report["bytes"] == path.stat().st_size
    assert report["validated"] and {c["what"] for c in report["checks"]} == {"image"}
    assert all(c["value"] <= c["limit"] for c in report["checks"])
    assert report["command"] == f"rddm-infer restore INPUT -o restored --model {path} --backend onnxruntime"
    meta = read_metadata(path)
    assert meta.source == ckpt.name and meta.extra["weights"] == "ema" and meta.diffusion["sum_scale"] == 0.01
    assert [p.name for p in path.parent.iterdir()] == ["fused2_fp32.onnx"]  # no temp files left

    # the file the report points at really restores like the torch sampler
    got, ref = run_fused_and_torch(path, load_checkpoint(ckpt), 2, (1, 3, 24, 40), seed=1)
    assert np.abs(got - ref).max() <= 1e-3


def test_table_report_lists_each_artifact_and_its_command(tmp_path):
    ckpt = reference_checkpoint(tmp_path, name="model-7.pt")
    out = tmp_path / "out"
    r = _cli(ckpt, "-o", out, "--graph", "unet", "--report")
    assert r.returncode == 0, r.stderr
    assert "unet_fp32.onnx" in r.stdout and "MiB" in r.stdout and "max_abs" in r.stdout
    command = f"rddm-infer restore INPUT -o restored --model {out / 'unet_fp32.onnx'} --backend onnxruntime"
    assert command in r.stdout
    # --report: the same rows as a page (test_report checks the page shape)
    from test_report import Page

    page = Page(out / "report.html").check()
    assert [a["href"] for a in page.all("a")] == ["unet_fp32.onnx"] and command in page.texts("code")
    row = " ".join(page.texts("td") + page.texts("span"))
    assert "passed" in row and "max_abs" in row and "MiB" in row


def test_corrupt_checkpoints_are_refused_in_one_line(tmp_path):
    ckpt = reference_checkpoint(tmp_path, name="model-1.pt")
    truncated = tmp_path / "model-2.pt"
    truncated.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    garbage = tmp_path / "weights.safetensors"
    garbage.write_bytes(b"\x00\x01not a safetensors file")
    for bad in (truncated, garbage, tmp_path / "missing.pt"):
        r = _cli(bad, "-o", tmp_path / "never")
        assert r.returncode == 2
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {bad}:"), r.stderr
        assert "Traceback" not in r.stderr
    assert not (tmp_path / "never").exists()


def test_bad_options_are_refused_before_exporting(tmp_path):
    ckpt = reference_checkpoint(tmp_path)
    r = _cli(ckpt, "--steps", "0", "-o", tmp_path / "x")
    assert r.returncode == 2 and "steps must be in [1, 1000], got 0" in r.stderr
    r = _cli(ckpt, "--graph", "whole", "-o", tmp_path / "x")
    assert r.returncode == 2 and "unknown graph kind 'whole'" in r.stderr


def test_int8_option_writes_a_validated_int8_graph_beside_the_fp32_one(tmp_path):
    import cv2

    ckpt = reference_checkpoint(tmp_path, name="model-5.pt")
    calib = tmp_path / "calib"
    calib.mkdir()
    for i in range(2):
        cv2.imwrite(str(calib / f"c{i}.png"), np.random.default_rng(i).integers(0, 256, (40, 48, 3), dtype=np.uint8))
    r = _cli(ckpt, "-o", tmp_path / "out", "--graph", "step", "--int8", "--calib", calib, "--json")
    assert r.returncode == 0, r.stderr
    fp32, int8 = json.loads(r.stdout)
    assert (fp32["precision"], int8["precision"]) == ("fp32", "int8")
    assert int8["path"].endswith("step_int8.onnx") and int8["validated"]
    assert {c["metric"] for c in int8["checks"] if c["what"] == "image"} == {"psnr"}
    assert all(c["value"] >= c["limit"] for c in int8["checks"] if c["metric"] == "psnr")
    assert read_metadata(int8["path"]).precision == "int8"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["step_fp32.onnx", "step_int8.onnx"]
    bad = _cli(ckpt, "-o", tmp_path / "out2", "--graph", "step", "--int8", "--calib", tmp_path / "nothing-here")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "nothing-here" in bad.stderr


def test_output_folder_that_cannot_be_created_is_one_line(tmp_path):
    ckpt = reference_checkpoint(tmp_path)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for out in (blocker, blocker / "sub"):
        r = _cli(ckpt, "-o", out, "--graph", "unet")
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {out}: cannot create the output folder"), r.stderr
    assert blocker.read_text() == "not a folder"


def test_without_the_export_extra_says_what_to_install(tmp_path):
    """The base install has no torch/onnx: one line naming the extra, even before the checkpoint is looked at."""
    code = ("import sys; sys.modules['torch'] = None; sys.modules['onnx'] = None\n"
            "from rddm_export.cli import main; main(sys.argv[1:])")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "model-1.pt")], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip() == ("error: rddm-export needs the export extra (missing: torch, onnx): "
                                "pip install 'rddm-infer[export]'")
    help_ = subprocess.run([sys.executable, "-c", code, "--help"], capture_output=True, text=True, timeout=120)
    assert help_.returncode == 0 and "--out-dir" in help_.stdout  # help needs no torch either


def test_temp_files_of_a_killed_export_are_cleaned_on_the_next_one(tmp_path):
    ckpt = reference_checkpoint(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = out / f".unet_fp32.onnx.tmp{int(dead.stdout)}.onnx"  # what atomic_path leaves when killed mid-write
    stale.write_bytes(b"half a graph")
    live = out / f".other.onnx.tmp{os.getpid()}.onnx"  # a writer that is still running: not touched
    live.write_bytes(b"in progress")
    keep = out / "notes.txt"
    keep.write_text("mine")
    r = _cli(ckpt, "-o", out, "--graph", "unet", "--no-validate")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted([live.name, "notes.txt", "unet_fp32.onnx"])
