"""Issue 26: `rddm-infer report OUT` on a malformed or hostile output folder (one-line errors naming the file,
nothing linked, read or written outside OUT), and file names of 240-255 bytes restored under their own name.
Real files and real CLI subprocesses throughout."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from helpers import models
from helpers.cli import cli
from rddm_infer.io.atomic import _name_max, remove_stale_temps, remove_stale_temps_in, temp_name, write_bytes_atomic


def one_line(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    assert "Traceback" not in stderr and len(lines) == 1, stderr
    return lines[0]


def png(path: Path, seed: int = 0, shape=(16, 16, 3)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8))
    return path


def record(src: Path) -> dict:
    """A run.json as `restore --report` writes it, for one restored image ``a.png``."""
    return {
        "format": "rddm-infer-run/1", "kind": "restore", "created": "2025-01-01 00:00:00 UTC",
        "command": "rddm-infer restore in -o out --report", "cwd": str(src.parent),
        "model": {"path": "tiny.onnx", "graph": "step", "objective": "pred_res_noise", "steps": 5, "eta": 0.0,
                  "times": [4, 3, 2, 1, 0], "precision": "fp32", "size_multiple": 4, "channels": 3, "source": "t"},
        "backend": "onnxruntime (cpu)", "backend_reason": "test",
        "settings": {"seed": 3, "tile": None, "overlap": 32, "batch": 1, "pixel_shuffle": 1, "self_ensemble": 1,
                     "gt": None},
        "versions": {"rddm-infer": "0", "python": "3"}, "machine": {"cpu": "cpu", "cores": 2, "platform": "linux"},
        "seconds": 1.5, "images_per_s": 0.6667, "counts": {"restored": 1, "failed": 0, "skipped": 0}, "mean": {},
        "images": [{"src": str(src), "src_abs": str(src), "dst": "a.png", "status": "restored", "error": None,
                    "seconds": 1.5, "metrics": None}]}


@pytest.fixture
def out(tmp_path) -> Path:
    """An output folder with one input/output pair and a valid hand-made run.json."""
    src = png(tmp_path / "in" / "a.png", 1)
    png(tmp_path / "out" / "a.png", 2)
    (tmp_path / "out" / "run.json").write_text(json.dumps(record(src)))
    return tmp_path / "out"


def edit(out: Path, change) -> None:
    rec = json.loads((out / "run.json").read_text())
    change(rec)
    (out / "run.json").write_text(json.dumps(rec))


def refused(out: Path, *names: str) -> str:
    """`rddm-infer report OUT`: exit 2, one line naming each of ``names``, no page written."""
    r = cli("report", out)
    line = one_line(r.stderr)
    assert r.returncode == 2 and all(n in line for n in names), line
    assert not (out / "report.html").exists()
    return line


def test_the_hand_made_record_is_a_valid_run(out):
    r = cli("report", out)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    page = (out / "report.html").read_text()
    assert 'data-full="a.png"' in page and '<a href="a.png">output</a>' in page


@pytest.mark.parametrize("where, change, message", [
    ("model", lambda r: r.pop("model"), "model is missing"),
    ("images", lambda r: r.pop("images"), "images is missing"),
    ("counts", lambda r: r.pop("counts"), "counts is missing"),
    ("status", lambda r: r["images"][0].pop("status"), "images[0].status is missing"),
    ("counts", lambda r: r.update(counts="abc"), "counts is text, expected an object"),
    ("images", lambda r: r.update(images=None), "images is null, expected a list"),
    ("dst", lambda r: r["images"][0].update(dst=5), "images[0].dst is an integer, expected text or null"),
    ("seconds", lambda r: r.update(seconds="fast"), "seconds is text, expected a number"),
    ("status", lambda r: r["images"][0].update(status="done"), "images[0].status is 'done', expected one of"),
    ("pixel_shuffle", lambda r: r["settings"].update(pixel_shuffle="2"), "settings.pixel_shuffle is text"),
    ("metrics", lambda r: r["images"][0].update(metrics={"psnr": "x", "ssim": 1}), "images[0].metrics.psnr is text"),
    ("versions", lambda r: r["versions"].update(python=[[1]]), "versions.python is a list"),
    ("restored", lambda r: r["counts"].update(restored=True), "counts.restored is true/false, expected an integer"),
    ("src_abs", lambda r: r["images"][0].update(src_abs="a\0b"), "images[0].src_abs contains a NUL character"),
])
def test_missing_and_mistyped_entries_are_one_line_naming_them(out, where, change, message):
    edit(out, change)
    refused(out, f"{out / 'run.json'}: ", message)


@pytest.mark.parametrize("text, message", [
    ("[" * 100_000, "nested too deeply"),
    ('{"format": "rddm-infer-run/1", "x": ' + "[" * 100_000, "nested too deeply"),
    ("\xff", "not valid JSON"),
    ("[1, 2]", "not an rddm-infer run record"),
])
def test_undecodable_or_too_deep_run_json_is_one_line(out, text, message):
    (out / "run.json").write_bytes(text.encode("latin-1"))
    refused(out, str(out / "run.json"), message)


@pytest.mark.parametrize("data, message", [
    (b"file,psnr,ssim\n\xff,1,2\n", "not UTF-8 text (byte 0xff"),
    (b"file,psnr,ssim\nIN,fast,2\n", "malformed row for"),
    (b'file,psnr,ssim\n"IN,1,2\n' + b"x" * 200_000 + b"\n", "not a readable CSV file"),
])
def test_a_malformed_metrics_csv_is_one_line_naming_it(out, data, message):
    src = json.loads((out / "run.json").read_text())["images"][0]["src"]
    (out / "metrics.csv").write_bytes(data.replace(b"IN", src.encode()))
    refused(out, str(out / "metrics.csv"), message)


def test_metrics_csv_refreshes_the_page(out):
    src = json.loads((out / "run.json").read_text())["images"][0]["src"]
    (out / "metrics.csv").write_text(f"file,psnr,ssim\n{src},31.25,0.5\nmean,31.25,0.5\n")
    r = cli("report", out)
    assert r.returncode == 0, r.stderr
    assert "PSNR 31.25 dB · SSIM 0.5000" in (out / "report.html").read_text()


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink", "loop", "folder"])
def test_an_output_path_leaving_out_is_refused_never_linked_or_read(out, tmp_path, how):
    victim = png(tmp_path / "victim" / "secret.png", 7)
    if how in ("symlink", "loop"):  # OUT/a.png itself is a link out of OUT, or a loop of links
        (out / "a.png").unlink()
        (out / "a.png").symlink_to(victim if how == "symlink" else out / "b.png")
        (out / "b.png").symlink_to(out / "a.png")
        dst = "a.png"
    else:
        dst = {"dotdot": "../../../../../../../../etc/passwd", "absolute": str(victim), "folder": "."}[how]
        edit(out, lambda r: r["images"][0].update(dst=dst))
    refused(out, str(out / "run.json"), f"images[0].dst {dst!r} is outside the output folder")
    assert not (out / ".report").exists()  # nothing of it was read into a thumbnail either


def test_an_output_inside_out_through_a_link_inside_out_is_fine(out):
    (out / "sub").mkdir()
    os.replace(out / "a.png", out / "sub" / "real.png")
    (out / "a.png").symlink_to(Path("sub") / "real.png")
    r = cli("report", out)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr


def test_report_html_symlinked_outside_out_is_replaced_not_followed(out, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (out / "report.html").symlink_to(victim)
    r = cli("report", out)
    assert r.returncode == 0, r.stderr
    assert victim.read_text() == "keep me"
    assert not (out / "report.html").is_symlink() and "<!DOCTYPE html>" in (out / "report.html").read_text()


def test_restore_report_never_writes_through_links_out_of_out(tmp_path):
    """run.json, metrics.csv and report.html that are links to files outside OUT are replaced, not followed."""
    png(tmp_path / "in" / "a.png", 1)
    png(tmp_path / "gt" / "a.png", 2)
    out, victims = tmp_path / "out", tmp_path / "victims"
    out.mkdir(), victims.mkdir()
    for name in ("run.json", "metrics.csv", "report.html"):
        (victims / name).write_text("keep me")
        (out / name).symlink_to(victims / name)
    r = cli("restore", tmp_path / "in", "-o", out, "-m", models.onnx_model("step"), "--gt", tmp_path / "gt",
            "--report", "-q")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert all((victims / n).read_text() == "keep me" for n in ("run.json", "metrics.csv", "report.html"))
    assert not any((out / n).is_symlink() for n in ("run.json", "metrics.csv", "report.html"))
    assert json.loads((out / "run.json").read_text())["counts"]["restored"] == 1


def test_unknown_extra_keys_are_left_alone(out):
    """A run.json copied and edited keeps working: the schema check leaves unknown extra keys alone."""
    edit(out, lambda r: r.update(extra={"any": ["thing"]}, images=[copy.deepcopy(r["images"][0])]))
    assert cli("report", out).returncode == 0


# ------------------------------------------------------------------------------ names of 240-255 bytes

LONG_NAMES = ["a" * 246 + ".png", "é" * 125 + ".png", "日" * 83 + ".png", "😀" * 62 + ".png"]  # 250, 254, 253, 252


def test_long_names_are_restored_under_their_own_name(tmp_path):
    for i, name in enumerate(LONG_NAMES):
        png(tmp_path / "in" / name, i)
    r = cli("restore", tmp_path / "in", "-o", tmp_path / "out", "-m", models.onnx_model("step"), "-q")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert sorted(os.listdir(tmp_path / "out")) == sorted(LONG_NAMES)
    assert all(cv2.imread(str(tmp_path / "out" / n)).shape == (16, 16, 3) for n in LONG_NAMES)


@pytest.mark.parametrize("name", [
    "a" * 251 + ".png", "é" * 125 + "a.png", "日" * 83 + "ab.tif", "😀" * 62 + "aaa.png", "b" * 255, "x." + "c" * 253,
    "d" * 200 + ".safetensors", "short.png",
], ids=lambda n: f"{len(os.fsencode(n))}B-{n[0]}{Path(n).suffix[:5]}")
def test_temp_names_fit_the_limit_in_bytes_and_keep_the_extension(tmp_path, name):
    assert len(os.fsencode(name)) <= 255
    limit = _name_max(tmp_path)
    tmp = temp_name(tmp_path / name)
    assert tmp.parent == tmp_path and tmp.name.startswith(".") and len(os.fsencode(tmp.name)) <= limit
    ext = Path(name).suffix if len(Path(name).suffix) <= 32 else ""
    assert tmp.name.endswith(ext) and (tmp.suffix == ext or not ext)
    if len(os.fsencode(name)) < 100:
        assert tmp.name.startswith(f".{name}.tmp{os.getpid()}-")  # short names keep the readable form
    assert temp_name(tmp_path / (name[:-5] + "Z" + name[-4:])) != tmp  # the hash tells near names apart
    assert write_bytes_atomic(tmp_path / name, b"data").read_bytes() == b"data"
    assert os.listdir(tmp_path) == [name]  # exactly the intended name, and no temporary left


def test_temp_names_of_a_dead_process_are_removed_for_long_names(tmp_path):
    code = "import sys; from pathlib import Path; from rddm_infer.io.atomic import temp_name; " \
           "[print(temp_name(Path(a)).name) for a in sys.argv[1:]]"
    dead = subprocess.run([sys.executable, "-c", code, *(str(tmp_path / n) for n in LONG_NAMES)],
                          capture_output=True, text=True, check=True)  # its temp names, then it is gone
    stale = [tmp_path / n for n in dead.stdout.splitlines()]
    assert len(stale) == len(LONG_NAMES)
    for p in stale:
        p.write_bytes(b"half")
    live = temp_name(tmp_path / LONG_NAMES[0])
    live.write_bytes(b"writing")
    assert sorted(remove_stale_temps(tmp_path / n for n in LONG_NAMES[:2])) == sorted(stale[:2])
    assert sorted(remove_stale_temps_in(tmp_path)) == sorted(stale[2:])
    assert live.exists()

