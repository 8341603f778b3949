"""`rddm-infer` as users run it: real subprocesses, real files, real exported models."""

import csv
import json
import re
import struct
from pathlib import Path

import cv2
import numpy as np
import pytest

from helpers import models
from helpers.cli import cli

RNG = np.random.default_rng(0)


def _px(shape, dtype=np.uint8):
    hi = 255 if dtype == np.uint8 else 65535
    return RNG.integers(0, hi + 1, size=shape, dtype=np.int64).astype(dtype)


def _exif_jpeg(pix, orientation):
    jpg = cv2.imencode(".jpg", pix)[1].tobytes()
    tiff = b"II*\0" + struct.pack("<IH", 8, 1) + struct.pack("<HHIHH", 0x0112, 3, 1, orientation, 0) + b"\0" * 4
    payload = b"Exif\0\0" + tiff
    return jpg[:2] + b"\xff\xe1" + struct.pack(">H", 2 + len(payload)) + payload + jpg[2:]


GOOD = {  # name -> (pixels, expected output shape, dtype)
    "rgb8.png": (_px((20, 30, 3)), (20, 30, 3), np.uint8),
    "rgb16.png": (_px((18, 26, 3), np.uint16), (18, 26, 3), np.uint16),
    "gray.png": (_px((17, 23)), (17, 23), np.uint8),
    "rgba.png": (_px((21, 19, 4)), (21, 19, 4), np.uint8),
    "rgba16.tif": (_px((12, 16, 4), np.uint16), (12, 16, 4), np.uint16),
    "ñandú 雨.png": (_px((16, 16, 3)), (16, 16, 3), np.uint8),
}
BROKEN = {"empty.png": "empty file", "text.png": "not a readable image", "cut.png": "truncated PNG",
          "cut.jpg": "truncated JPEG"}


@pytest.fixture(scope="module")
def model():
    return models.onnx_model("step")


@pytest.fixture()
def folder(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    for name, (pix, _, _) in GOOD.items():
        assert cv2.imencode(Path(name).suffix, pix)[0]
        (d / name).write_bytes(cv2.imencode(Path(name).suffix, pix)[1].tobytes())
    (d / "rot.jpg").write_bytes(_exif_jpeg(_px((10, 24, 3)), 6))  # displayed as 24×10
    (d / "empty.png").write_bytes(b"")
    (d / "text.png").write_text("definitely not pixels")
    png = cv2.imencode(".png", _px((32, 32, 3)))[1].tobytes()
    (d / "cut.png").write_bytes(png[: len(png) // 2])
    jpg = cv2.imencode(".jpg", _px((32, 32, 3)))[1].tobytes()
    (d / "cut.jpg").write_bytes(jpg[: len(jpg) // 2])
    (d / "notes.txt").write_text("not an image extension: ignored in folders")
    return d


def _snapshot(d: Path) -> dict:
    return {p.name: p.read_bytes() for p in d.iterdir()}


def test_folder_with_good_and_broken_files(folder, model, tmp_path):
    before = _snapshot(folder)
    out = tmp_path / "out"
    r = cli("restore", folder, "-o", out, "--model", model, "--tile", 16, "--tile-overlap", 4, "--batch", 2)
    assert r.returncode == 1, r.stderr
    assert "restored 7, failed 4, skipped 0" in r.stdout
    assert "Traceback" not in r.stderr + r.stdout
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 4
    for name, reason in BROKEN.items():
        assert any(name in e and reason in e for e in errors), (name, errors)
    assert re.search(r"backend: (onnxruntime \(CPUExecutionProvider|openvino \(CPU)", r.stderr), r.stderr  # timed
    for name, (pix, shape, dtype) in GOOD.items():
        got = cv2.imdecode(np.fromfile(str(out / name), np.uint8), cv2.IMREAD_UNCHANGED)
        assert got.shape == shape and got.dtype == dtype, name
        if shape[-1] == 4 and len(shape) == 3:
            np.testing.assert_array_equal(got[..., 3], pix[..., 3])  # alpha bit for bit
    rot = cv2.imread(str(out / "rot.jpg"), cv2.IMREAD_UNCHANGED)
    assert rot.shape == (24, 10, 3)  # EXIF orientation applied, then written upright
    assert sorted(p.name for p in out.iterdir()) == sorted([*GOOD, "rot.jpg"])  # no temp files, no broken outputs
    assert _snapshot(folder) == before  # inputs untouched

    # resume: everything already there is skipped, nothing rewritten
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    (out / "gray.png").unlink()
    r2 = cli("restore", folder, "-o", out, "--model", model, "--skip-existing", "--quiet")
    assert r2.returncode == 1
    assert "restored 1, failed 4, skipped 6" in r2.stdout
    assert (out / "gray.png").is_file()
    assert all(p.stat().st_mtime_ns == stamps[p.name] for p in out.iterdir() if p.name != "gray.png")


def test_json_summary_metrics_and_output_naming(tmp_path, model):
    inp, gt = tmp_path / "in", tmp_path / "gt"
    inp.mkdir()
    gt.mkdir()
    for i in range(3):
        clean = cv2.GaussianBlur(_px((24, 24, 3)), (5, 5), 1.5)
        cv2.imwrite(str(gt / f"im{i}.png"), clean)
        noisy = np.clip(clean.astype(int) + RNG.integers(-20, 21, clean.shape), 0, 255).astype(np.uint8)
        cv2.imwrite(str(inp / f"im{i}.png"), noisy)
    out = tmp_path / "out"
    r = cli("restore", inp / "im*.png", "-o", out, "--model", model, "--gt", gt, "--suffix", "_r", "--ext", "jpg",
            "--steps", 3, "--json", "--batch", 3)
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert (s["restored"], s["failed"], s["skipped"]) == (3, 0, 0)
    assert s["images_per_s"] > 0 and s["backend"].startswith(("onnxruntime", "openvino"))  # auto: timed on first use
    assert sorted(Path(p).name for p in s["outputs"]) == ["im0_r.jpg", "im1_r.jpg", "im2_r.jpg"]
    means = s["metrics"]["mean"]
    rows = list(csv.reader((out / "metrics.csv").open()))
    assert rows[0] == ["file", "psnr", "ssim", "psnr_in", "gain_db", "mode"] and len(rows) == 5
    assert rows[-1][0] == "mean" and float(rows[-1][1]) == pytest.approx(means["psnr"], abs=1e-3)
    per = [float(row[1]) for row in rows[1:4]]
    assert np.mean(per) == pytest.approx(means["psnr"], abs=1e-3) and 0 < means["ssim"] <= 1
    assert cv2.imread(str(out / "im0_r.jpg")).shape == (24, 24, 3)
    for row in rows[1:4]:  # the PSNR of the JPEG as saved, and of the input, both against the ground truth
        name = Path(row[0]).stem
        want = [cv2.PSNR(cv2.imread(str(d / f)), cv2.imread(str(gt / f"{name}.png")))
                for d, f in ((out, f"{name}_r.jpg"), (inp, f"{name}.png"))]
        assert [float(row[1]), float(row[3])] == pytest.approx(want, abs=1e-3)
        assert float(row[4]) == pytest.approx(float(row[1]) - float(row[3]), abs=2e-4)
    assert "→" in r.stderr or s["metrics"]["mean"]["psnr_in"] > 0


def test_quality_sets_the_jpeg_and_the_printed_psnr_is_the_saved_files(tmp_path, model):
    inp, gt = tmp_path / "in", tmp_path / "gt"
    inp.mkdir(), gt.mkdir()
    clean = cv2.GaussianBlur(_px((32, 40, 3)), (5, 5), 1.5)
    cv2.imwrite(str(gt / "a.png"), clean)
    cv2.imwrite(str(inp / "a.JPG"), np.clip(clean.astype(int) + RNG.integers(-20, 21, clean.shape), 0, 255)
                .astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 100])
    got = {}
    for q in (30, 95):
        r = cli("restore", inp, "-o", tmp_path / f"q{q}", "--model", model, "--gt", gt, "--quality", q,
                "--pixel-shuffle", 1)
        assert r.returncode == 0, r.stderr
        saved = tmp_path / f"q{q}" / "a.JPG"  # the input's extension, in its case
        want = cv2.PSNR(cv2.imread(str(saved)), clean)
        assert f"→ {want:.2f} dB" in r.stdout and "measured on the saved .jpg files (quality" in r.stdout, r.stdout
        got[q] = saved.stat().st_size, want
    assert got[30][0] < got[95][0] and got[30][1] != got[95][1]  # the tiny test model is random: no order of PSNRs
    r = cli("restore", inp, "-o", tmp_path / "bad", "--model", model, "--quality", 0)
    assert r.returncode == 2 and "--quality 0: must be an integer from 1 to 100" in r.stderr
    assert not (tmp_path / "bad").exists()


def test_never_overwrites_inputs(tmp_path, model):
    d = tmp_path / "d"
    d.mkdir()
    cv2.imwrite(str(d / "a.png"), _px((8, 8, 3)))
    before = (d / "a.png").read_bytes()
    r = cli("restore", d / "a.png", "-o", d, "--model", model)
    assert r.returncode == 1 and "would overwrite an input" in r.stderr
    assert (d / "a.png").read_bytes() == before
    r = cli("restore", d / "a.png", "-o", d, "--model", model, "--suffix", "_x", "-q")
    assert r.returncode == 0 and (d / "a_x.png").is_file() and r.stdout == ""


def test_model_and_usage_errors_are_one_line(tmp_path, monkeypatch):
    img = tmp_path / "a.png"
    cv2.imwrite(str(img), _px((8, 8, 3)))
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"nope")
    r = cli("restore", img, "--model", junk)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "junk.onnx" in r.stderr
    r = cli("restore", img, "--model", tmp_path / "missing.onnx")
    assert r.returncode == 2 and "no such model file" in r.stderr
    r = cli("restore", img, "--model", models.onnx_model("step"), "--backend", "nonsense")
    assert r.returncode == 2 and "unknown backend" in r.stderr
    r = cli("restore", img, "--bogus-option")
    assert r.returncode == 2


def test_default_model_message_when_none_is_installed(tmp_path):
    from rddm_infer.api import DEFAULT_MODEL

    if DEFAULT_MODEL.exists():
        pytest.skip(f"a built-in model is installed at {DEFAULT_MODEL}")
    img = tmp_path / "a.png"
    cv2.imwrite(str(img), _px((8, 8, 3)))
    r = cli("restore", img, "-o", tmp_path / "o")
    assert r.returncode == 2 and "no built-in model is installed" in r.stderr and "--model" in r.stderr


def test_info_and_version(model):
    r = cli("info", model)
    assert r.returncode == 0, r.stderr
    assert "graph: step" in r.stdout and "steps: 5" in r.stdout and "size multiple: 2" in r.stdout
    assert "pred_res_noise" in r.stdout and "[999, 799, 599, 399, 199]" in r.stdout
    from rddm_infer import __version__

    r = cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"rddm-infer {__version__}"


def test_torch_backend_from_the_cli_matches_onnxruntime(tmp_path, model):
    img = tmp_path / "a.png"
    cv2.imwrite(str(img), _px((16, 16, 3)))
    r1 = cli("restore", img, "-o", tmp_path / "ort", "--model", model, "-q")
    r2 = cli("restore", img, "-o", tmp_path / "pt", "--model", models.checkpoint(), "--backend", "torch", "-q")
    assert r1.returncode == r2.returncode == 0, r1.stderr + r2.stderr
    a = cv2.imread(str(tmp_path / "ort" / "a.png")).astype(int)
    b = cv2.imread(str(tmp_path / "pt" / "a.png")).astype(int)
    assert np.abs(a - b).max() <= 1


def test_bench_reports_latency_and_throughput(model):
    r = cli("bench", model, "--size", 15, "--batch", 2, "--runs", 2, "--warmup", 1, "--steps", 2, "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["shape"] == [2, 3, 16, 16] and res["steps"] == 2 and res["graph"] == "step"
    assert res["median_ms"] > 0 and res["images_per_s"] == pytest.approx(2000 / res["median_ms"], rel=1e-2)
    r = cli("bench", model, "--runs", 0)
    assert r.returncode == 2 and "--runs" in r.stderr


def test_pixel_shuffle_and_self_ensemble_are_stated_recorded_and_checked(tmp_path, model):
    d = tmp_path / "in"
    d.mkdir()
    cv2.imwrite(str(d / "a.png"), _px((21, 30, 3)))
    r = cli("restore", d, "-o", tmp_path / "out", "--model", model, "--pixel-shuffle", 2, "--self-ensemble", 2,
            "--report")
    assert r.returncode == 0, r.stderr
    assert "pixel-shuffle 2: the 4 sub-images of every 2nd pixel restored separately" in r.stderr
    assert "self-ensemble 2: 2 flipped / transposed views averaged (2x the time)" in r.stderr
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["settings"]["pixel_shuffle"] == 2 and run["settings"]["self_ensemble"] == 2
    assert "pixel-shuffle 2, self-ensemble 2" in (tmp_path / "out" / "report.html").read_text()
    assert cv2.imread(str(tmp_path / "out" / "a.png")).shape == (21, 30, 3)
    r = cli("restore", d, "-o", tmp_path / "out2", "--model", model, "--pixel-shuffle", 9)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "--pixel-shuffle 9" in r.stderr
    from rddm_infer.cli import _pixel_shuffle_note

    assert "the 9 sub-images of every 3rd pixel" in _pixel_shuffle_note(3)
    r = cli("restore", d, "-o", tmp_path / "out2", "--model", model, "--self-ensemble", 3)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "--self-ensemble 3" in r.stderr
