"""Issue 11: safe and honest on every input. One test per defect, with real files, real CLI
subprocesses and the tiny real ONNX models; a fault-injection test kills a restore between its
temp write and its rename; a property-style test restores a folder of odd files."""

from __future__ import annotations

import json
import os
import re
import signal
import struct
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from helpers import models
from helpers.cli import py
from helpers.cli import run as run_tool
from rddm_infer.io.atomic import remove_stale_temps, write_bytes_atomic
from rddm_infer.errors import ImageError
from rddm_infer.io.images import read_image

RNG = np.random.default_rng(11)
ENV = {**os.environ, "COLUMNS": "200", "PYTHONIOENCODING": "utf-8"}


def run(tool: str, *args, timeout=240, **kw):
    return run_tool(tool, *args, timeout=timeout, **kw)


def one_line(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    assert "Traceback" not in stderr and len(lines) == 1, stderr
    return lines[0]


def px(shape, dtype=np.uint8):
    hi = 255 if dtype == np.uint8 else 65535
    return RNG.integers(0, hi + 1, size=shape, dtype=np.int64).astype(dtype)


def png_bytes(pix) -> bytes:
    return cv2.imencode(".png", pix)[1].tobytes()


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def huge_header_png(w=30000, h=30000) -> bytes:
    """A 100-byte PNG whose header claims w×h RGB pixels (a multi-GB decode)."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def tiff_2ch(h=4, w=5) -> bytes:
    """A little-endian uncompressed TIFF with SamplesPerPixel = 2 (gray + alpha)."""
    data = px((h, w, 2)).tobytes()
    tags = [(256, 3, 1, w), (257, 3, 1, h), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1), (273, 4, 1, 8),
            (277, 3, 1, 2), (278, 3, 1, h), (279, 4, 1, len(data)), (338, 3, 1, 2)]
    ifd = struct.pack("<H", len(tags)) + b"".join(
        struct.pack("<HHIHH", t, ty, n, v, 0) if ty == 3 else struct.pack("<HHII", t, ty, n, v) for t, ty, n, v in tags)
    return b"II*\0" + struct.pack("<I", 8 + len(data)) + data + ifd + b"\0\0\0\0"


GIF_1x1 = (b"GIF89a\x01\x00\x01\x00\x80\x00\x00\xff\xff\xff\x00\x00\x00", b",\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00")


def animated_gif(frames=3) -> bytes:
    head, image = GIF_1x1
    return head + b"!\xff\x0bNETSCAPE2.0\x03\x01\x00\x00\x00" + (b"!\xf9\x04\x00\x0a\x00\x00\x00" + image) * frames + b";"


def animated_webp(frames=2) -> bytes:
    vp8x = b"VP8X" + struct.pack("<I", 10) + bytes([0x02, 0, 0, 0]) + (15).to_bytes(3, "little") + (15).to_bytes(3, "little")
    anim = b"ANIM" + struct.pack("<I", 6) + b"\0\0\0\0\0\0"
    anmf = b"ANMF" + struct.pack("<I", 16) + b"\0" * 16
    body = b"WEBP" + vp8x + anim + anmf * frames
    return b"RIFF" + struct.pack("<I", len(body)) + body


def apng(frames=2) -> bytes:
    png = png_bytes(px((8, 8, 3)))
    return png[:33] + chunk(b"acTL", struct.pack(">II", frames, 0)) + png[33:]


@pytest.fixture(scope="module")
def model():
    return models.onnx_model("step")


@pytest.fixture(scope="module")
def restorer(model):
    from rddm_infer import Restorer

    with Restorer(model, "onnxruntime", threads=1) as r:
        yield r


@pytest.fixture(scope="module")
def nan_model(tmp_path_factory):
    """The tiny model with a NaN bias in its last convolution: every output pixel is NaN."""
    import copy

    import torch
    from rddm_export import export_onnx
    from rddm_infer.model import LoadedModel

    m = models.loaded_model()
    net = copy.deepcopy(m.net)
    with torch.no_grad():
        for name, mod in net.named_modules():
            if name.endswith("final_conv"):
                mod.bias.fill_(float("nan"))
    path = tmp_path_factory.mktemp("nan") / "nan_step.onnx"
    return export_onnx(LoadedModel(net, m.unet, m.diffusion, "nan"), path, kind="step", steps=2, slim=False)


# ------------------------------------------------------------------------- data loss / silent output

def test_restore_file_refuses_to_overwrite_its_input(restorer, tmp_path):
    src = tmp_path / "a.png"
    src.write_bytes(png_bytes(px((16, 16, 3))))
    before = src.read_bytes()
    os.link(src, tmp_path / "hard.png")
    for dst in (src, tmp_path / "." / "a.png", tmp_path / "hard.png"):
        with pytest.raises(ImageError, match="overwrite the input"):
            restorer.restore_file(src, dst)
    assert src.read_bytes() == before
    assert restorer.restore_file(src, tmp_path / "b.png").is_file()


def test_suffix_with_path_separators_is_refused(model, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(png_bytes(px((16, 16, 3))))
    r = run("rddm-infer", "restore", tmp_path / "in", "-o", tmp_path / "out", "-m", model, "--suffix", "/../../x")
    assert r.returncode == 2 and "must not contain path separators" in one_line(r.stderr)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.png", "in"]


def test_non_finite_model_output_fails_the_image_and_writes_nothing(nan_model, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(png_bytes(px((16, 16, 3))))
    r = run("rddm-infer", "restore", tmp_path / "in", "-o", tmp_path / "out", "-m", nan_model, "-q")
    assert r.returncode == 1, r.stderr
    assert "non-finite (NaN/Inf)" in r.stderr and "a.png" in r.stderr and "RuntimeWarning" not in r.stderr
    assert not list((tmp_path / "out").iterdir())


@pytest.mark.parametrize("name, data, message", [
    ("anim.gif", animated_gif(3), "animated GIF with 3 frames"),
    ("anim.webp", animated_webp(2), "animated WebP with 2 frames"),
    ("anim.png", apng(2), "animated PNG with 2 frames"),
    ("two.tif", tiff_2ch(), "2-channel (gray + alpha) TIFF"),
])
def test_animated_and_two_channel_files_are_refused_not_flattened(tmp_path, name, data, message):
    (tmp_path / name).write_bytes(data)
    with pytest.raises(ImageError, match=re.escape(message)):
        read_image(tmp_path / name)


def test_multipage_tiff_is_refused_in_a_run_that_goes_on(model, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    assert cv2.imwritemulti(str(d / "pages.tif"), [px((16, 16, 3)), px((16, 16, 3)), px((16, 16, 3))])
    (d / "ok.png").write_bytes(png_bytes(px((16, 16, 3))))
    r = run("rddm-infer", "restore", d, "-o", tmp_path / "out", "-m", model, "-q")
    assert r.returncode == 1 and "multi-page TIFF with 3 pages" in r.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ok.png"]


def test_float_images_outside_0_1_are_refused_and_in_range_kept_float(restorer, tmp_path):
    hdr = (RNG.random((12, 12, 3)) * 3).astype(np.float32)
    assert cv2.imwrite(str(tmp_path / "hdr.tif"), hdr)
    with pytest.raises(ImageError, match=r"outside \[0, 1\]"):
        read_image(tmp_path / "hdr.tif")
    with pytest.raises(ImageError, match=r"outside \[0, 1\]"):
        restorer.restore_array(hdr)
    nan = RNG.random((12, 12, 3)).astype(np.float32)
    nan[3, 3, 1] = np.nan
    with pytest.raises(ImageError, match="NaN"):
        restorer.restore_array(nan)
    for dtype in (np.float32, np.float64):
        out = restorer.restore_array(RNG.random((12, 12, 3)).astype(dtype))
        assert out.dtype == dtype and out.shape == (12, 12, 3) and 0 <= out.min() and out.max() <= 1


def test_restore_array_rejects_none_and_empty_arrays(restorer):
    with pytest.raises(ImageError, match="got None"):
        restorer.restore_array(None)
    for shape in ((0, 0), (0, 5, 3), (4, 0)):
        with pytest.raises(ImageError, match="empty image"):
            restorer.restore_array(np.zeros(shape, np.uint8))


def test_skip_existing_redoes_empty_and_corrupt_outputs(model, tmp_path):
    d, out = tmp_path / "in", tmp_path / "out"
    d.mkdir()
    out.mkdir()
    for name in ("a.png", "b.png", "c.png"):
        (d / name).write_bytes(png_bytes(px((16, 16, 3))))
    (out / "a.png").write_bytes(b"")
    good = png_bytes(px((16, 16, 3)))
    (out / "b.png").write_bytes(good[: len(good) // 2])
    (out / "c.png").write_bytes(good)
    r = run("rddm-infer", "restore", d, "-o", out, "-m", model, "--skip-existing", "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert (s["restored"], s["skipped"]) == (2, 1)
    assert (out / "c.png").read_bytes() == good
    for name in ("a.png", "b.png"):
        assert cv2.imread(str(out / name)).shape == (16, 16, 3)


# ----------------------------------------------------------------------------------- hangs, resources

@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this OS")
def test_a_fifo_named_directly_fails_in_one_line_without_hanging(model, tmp_path):
    os.mkfifo(tmp_path / "pipe.png")
    (tmp_path / "ok.png").write_bytes(png_bytes(px((16, 16, 3))))
    r = run("rddm-infer", "restore", tmp_path / "pipe.png", tmp_path / "ok.png", "-o", tmp_path / "out", "-m", model,
            "-q", timeout=120)
    assert r.returncode == 1 and "not a regular file" in r.stderr and "pipe.png" in r.stderr
    assert (tmp_path / "out" / "ok.png").is_file()


def test_recursive_glob_and_folder_through_a_symlink_loop_terminate(model, tmp_path):
    d = tmp_path / "in"
    (d / "a" / "b").mkdir(parents=True)
    (d / "a" / "b" / "loop").symlink_to("..")
    (d / "a" / "up").symlink_to("../..")
    (d / "a" / "b" / "x.png").write_bytes(png_bytes(px((16, 16, 3))))
    for inputs in ([f"{d}/**/*.png"], [d]):
        r = run("rddm-infer", "restore", *inputs, "-r", "-o", tmp_path / "out", "-m", model, "--json", timeout=120)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["restored"] == 1


def test_a_huge_image_header_is_refused_before_decoding_and_the_run_goes_on(model, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    (d / "a_huge.png").write_bytes(huge_header_png())
    (d / "b_ok.png").write_bytes(png_bytes(px((16, 16, 3))))
    r = run("rddm-infer", "restore", d, "-o", tmp_path / "out", "-m", model, "-q", timeout=120)
    assert r.returncode == 1 and "a_huge.png: PNG header claims 30000×30000 = 900 MP" in r.stderr
    assert "MemoryError" not in r.stderr and (tmp_path / "out" / "b_ok.png").is_file()
    r = run("rddm-infer", "restore", d / "b_ok.png", "-o", tmp_path / "out2", "-m", model, "-q", "--max-pixels", 100)
    assert r.returncode == 1 and "over the 0.0001 MP limit (raise it with --max-pixels)" in r.stderr


def test_bench_with_a_huge_size_is_a_clear_error(model):
    r = run("rddm-infer", "bench", model, "--size", 20000, timeout=120)
    assert r.returncode == 2 and "over bench's" in one_line(r.stderr)


def test_non_interactive_runs_print_one_line_per_image(model, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    for name in ("a.png", "b.png"):
        (d / name).write_bytes(png_bytes(px((16, 16, 3))))
    r = run("rddm-infer", "restore", d, "-o", tmp_path / "out", "-m", model)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("[")]
    assert len(lines) == 2 and lines[0].startswith("[1/2]") and "a.png ->" in lines[0] and "[2/2]" in lines[1]


# ------------------------------------------------------------------------------- one-line errors

def test_negative_seed_is_one_line(model, tmp_path):
    _one_image(tmp_path)
    r = run("rddm-infer", "restore", tmp_path, "-m", model, "--seed", -1)
    assert r.returncode == 2 and "--seed -1: must be an integer >= 0" in one_line(r.stderr)


def _with_meta(src: Path, dst: Path, **changes) -> Path:
    import onnx

    m = onnx.load(str(src))
    prop = next(p for p in m.metadata_props if p.key == "rddm")
    d = json.loads(prop.value)
    for k, v in changes.items():
        if isinstance(v, dict) and isinstance(d.get(k), dict):
            d[k] = {**d[k], **v}
        else:
            d[k] = v
    prop.value = json.dumps(d)
    onnx.save(m, str(dst))
    return dst


@pytest.mark.parametrize("changes, message", [
    ({"steps": "5"}, "steps must be an integer"),
    ({"steps": [5]}, "steps must be an integer"),
    ({"size_multiple": "8"}, "size_multiple must be an integer"),
    ({"eta": [0]}, "eta must be a finite number"),
    ({"unet": "tiny"}, "unet must be an object"),
    ({"steps": 10 ** 12}, "steps must be an integer in [1, 1000]"),
    ({"diffusion": {"timesteps": 10 ** 12}}, "diffusion.timesteps must be an integer"),
    ({"diffusion": {"sum_scale": -1}}, "diffusion.sum_scale must be a finite number > 0"),
])
def test_wrong_or_absurd_metadata_is_one_line_in_info_and_restore(model, tmp_path, changes, message):
    bad = _with_meta(model, tmp_path / "bad.onnx", **changes)
    (tmp_path / "in").mkdir()
    src = _one_image(tmp_path / "in")
    commands = [["info", bad]] + ([["restore", src, "-m", bad]] if "steps" in changes else [])  # restore: 3 cases
    for args in commands:
        r = run("rddm-infer", *args)
        line = one_line(r.stderr)
        assert r.returncode == 2 and message in line and "bad.onnx" in line, line


def test_rddm_train_into_an_uncreatable_folder_is_one_line(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    photos = tmp_path / "photos"
    from helpers.train import TINY_TRAIN, write_photos

    write_photos(photos, n=2)
    args = [a for item in TINY_TRAIN for a in ("--set", item)]
    r = run("rddm-train", *args, "--data", photos, "--out", tmp_path / "file" / "run", "--steps", 1)
    assert r.returncode == 2 and "cannot create the run folder" in one_line(r.stderr)


def test_rddm_train_without_torch_says_what_to_install(tmp_path):
    code = ("import sys; sys.modules['torch'] = None\n"
            "from rddm_train.cli import main\n"
            "sys.exit(main(sys.argv[1:]))")
    r = py(code, "--data", tmp_path, "--out", tmp_path / "run")
    assert r.returncode == 2 and "pip install 'rddm-infer[train]'" in one_line(r.stderr)


# ---------------------------------------------------------------------------------- wasted work

def test_an_unwritable_output_folder_fails_before_any_inference(model, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(png_bytes(px((16, 16, 3))))
    (tmp_path / "file").write_text("x")
    r = run("rddm-infer", "restore", tmp_path / "in", "-o", tmp_path / "file" / "out", "-m", model, "-q")
    assert r.returncode == 2 and "output folder is not writable" in one_line(r.stderr)


def test_outputs_inside_the_input_folder_are_not_inputs_next_time(model, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    (d / "a.png").write_bytes(png_bytes(px((16, 16, 3))))
    for _ in range(2):
        r = run("rddm-infer", "restore", d, "-o", d / "out", "-r", "-m", model, "--json")
        assert r.returncode == 0 and json.loads(r.stdout)["restored"] == 1, r.stderr
    assert sorted(p.relative_to(d).as_posix() for p in d.rglob("*")) == ["a.png", "out", "out/a.png"]
    # the output folder *is* the input folder (with a suffix): its images stay inputs
    r = run("rddm-infer", "restore", d / "out", "-o", d / "out", "--suffix", "_r", "-m", model, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["restored"] == 1, r.stderr


def _one_image(folder: Path) -> Path:
    """A real image in ``folder``: a test of an option or model error needs a run that would otherwise go ahead."""
    import cv2
    import numpy as np

    cv2.imwrite(str(folder / "one.png"), np.full((8, 8, 3), 128, np.uint8))
    return folder


def test_an_empty_folder_or_imageless_glob_is_a_failure_that_says_so(model, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    for item in (tmp_path / "empty", f"{tmp_path}/empty/*.png", tmp_path / "no-such-folder"):
        # before the model loads: a model that does not exist is not even opened
        r = run("rddm-infer", "restore", item, "-o", tmp_path / "out", "-m", tmp_path / "missing.onnx")
        assert r.returncode == 1 and ("no images found" in r.stderr or "no such" in r.stderr), r.stderr
        assert "restored 0, failed 1, skipped 0" in r.stdout and "missing.onnx" not in r.stderr


_KILL_AT_RENAME = """
import os, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # as on a terminal, even if started with SIGINT ignored
real = os.replace
count = [0]
def replace(src, dst):
    if '.tmp' in os.fspath(src) and os.fspath(dst).endswith('{target}'):
        count[0] += 1
        if count[0] == {nth}:
            os.kill(os.getpid(), signal.{sig})
            {after}
    return real(src, dst)
os.replace = replace
from rddm_infer.cli import main
sys.argv[0] = 'rddm-infer'
main(sys.argv[1:])
"""


def test_a_restore_killed_between_temp_write_and_rename_leaves_no_partial_file(model, tmp_path):
    d, out = tmp_path / "in", tmp_path / "out"
    d.mkdir()
    (d / "a.png").write_bytes(png_bytes(px((16, 16, 3))))
    code = _KILL_AT_RENAME.format(target="a.png", nth=1, sig="SIGKILL", after="")
    r = py(code, "restore", d, "-o", out, "-m", model, "-q")
    assert r.returncode == -signal.SIGKILL
    assert not (out / "a.png").exists()
    temps = list(out.glob(".a.png.tmp*"))
    assert len(temps) == 1 and cv2.imread(str(temps[0])) is not None  # the complete temp, never renamed
    r = run("rddm-infer", "restore", d, "-o", out, "-m", model, "-q")
    assert r.returncode == 0, r.stderr
    assert [p.name for p in out.iterdir()] == ["a.png"]


@pytest.mark.parametrize("io", ["0", "3"])
def test_ctrl_c_exits_130_with_the_summary(model, tmp_path, io):
    d = tmp_path / "in"
    d.mkdir()
    for i in range(6):
        (d / f"{i}.png").write_bytes(png_bytes(px((16, 16, 3))))
    # a real SIGINT, arriving as the second output is about to be renamed into place
    code = _KILL_AT_RENAME.format(target=".png", nth=2, sig="SIGINT", after="")
    r = py(code, "restore", d, "-o", tmp_path / "out", "-m", model, "--io-workers", io)
    assert r.returncode == 130, r.stderr
    assert "Traceback" not in r.stderr
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    if io == "0":  # one image at a time: the interrupt lands in the rename, whose temp is removed
        assert files == ["0.png"] and "interrupted: 1 restored; rerun with --skip-existing" in r.stderr
    else:  # writer threads finish the writes under way (each atomic) and every file written is counted
        assert not [f for f in files if f.startswith(".")]  # no temp file left
        assert 2 <= len(files) < 6 and all(cv2.imread(str(tmp_path / "out" / f)) is not None for f in files)
        assert f"interrupted: {len(files)} restored; rerun with --skip-existing" in r.stderr


def test_stale_temps_of_dead_processes_only_are_removed(tmp_path):
    target = tmp_path / "x.png"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    stale = [tmp_path / f".x.png.tmp{pid}.png", tmp_path / f".x.png.tmp{pid}-3.png"]
    live = tmp_path / f".x.png.tmp{os.getpid()}-0.png"
    other = [tmp_path / f".y.png.tmp{pid}.png", tmp_path / f".x.png.tmp{pid}.jpg", tmp_path / "x.png.tmp1.png"]
    for p in [*stale, live, *other]:
        p.write_bytes(b"half")
    assert sorted(remove_stale_temps(target)) == sorted(stale)
    assert all(p.exists() for p in [live, *other])


def test_threads_writing_one_target_never_share_a_temp_file(tmp_path):
    target, errors = tmp_path / "t.bin", []
    payloads = [bytes([i]) * 200_000 for i in range(8)]

    def write(data):
        try:
            for _ in range(20):
                write_bytes_atomic(target, data)
        except Exception as e:  # a shared temp name shows up as FileNotFoundError or a torn file
            errors.append(e)

    threads = [threading.Thread(target=write, args=(p,)) for p in payloads]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors and target.read_bytes() in payloads and [p.name for p in tmp_path.iterdir()] == ["t.bin"]


def test_library_log_lines_stay_off_stderr(model, tmp_path):
    png = png_bytes(px((16, 16, 3)))
    (tmp_path / "crc.png").write_bytes(png[:33] + chunk(b"tEXt", b"k\0v")[:-1] + b"\0" + png[33:])  # bad CRC: libpng warns
    r = run("rddm-infer", "restore", tmp_path / "crc.png", "-o", tmp_path / "out", "-m", model, "-q")
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_unreadable_training_images_are_skipped_with_a_warning_up_to_a_limit(tmp_path, capsys):
    from helpers.train import write_photos
    from rddm_train.data import MAX_BAD_IMAGES, DataError, ImageBank

    files = write_photos(tmp_path / "p", n=3)
    (tmp_path / "p" / "broken.png").write_text("not pixels")
    bank = ImageBank.load([*files, tmp_path / "p" / "broken.png"])
    assert len(bank) == 3 and "broken.png" not in " ".join(bank.names)
    err = capsys.readouterr().err
    assert "rddm-train: warning:" in err and "broken.png: cannot be read as an image; skipped" in err
    bad = []
    for i in range(MAX_BAD_IMAGES + 1):
        (tmp_path / f"bad{i}.png").write_bytes(b"")
        bad.append(tmp_path / f"bad{i}.png")
    with pytest.raises(DataError, match=f"{MAX_BAD_IMAGES + 1} of {MAX_BAD_IMAGES + 4} training images"):
        ImageBank.load([*files, *bad])
    ins, gts = ImageBank.load_pairs([(files[0], files[1]), (bad[0], files[2]), (files[2], files[0])])
    assert len(ins) == len(gts) == 2 and ins.names == [str(files[0]), str(files[2])]


# ------------------------------------------------------------------------------------ conventions

def test_cli_conventions_flags_completion_and_python_m():
    r = subprocess.run([sys.executable, "-m", "rddm_infer", "restore", "--help"], capture_output=True, text=True,
                       env=ENV, timeout=60)
    assert r.returncode == 0 and "--skip-existing" in r.stdout and "<bool>" not in r.stdout
    assert "Examples" in r.stdout
    r = run("rddm-infer", "--help")
    assert "--install-completion" in r.stdout and "<bool>" not in r.stdout
    r = run("rddm-train", "--help")
    assert r.returncode == 0 and "--bf16" in r.stdout and "<bool>" not in r.stdout and "--install-completion" in r.stdout


def test_packaged_config_chooses_workers_and_states_when_ema_starts(tmp_path):
    from helpers.train import TINY_TRAIN, write_photos

    write_photos(tmp_path / "p", n=2)
    args = [a for item in TINY_TRAIN for a in ("--set", item) if not item.startswith("data.num_workers")]
    r = run("rddm-train", "--config", "default_denoiser", *args, "--data", tmp_path / "p", "--out", tmp_path / "run",
            "--steps", 0)
    assert r.returncode == 0, r.stderr
    workers = max(0, min((os.cpu_count() or 1) - 1, 8))
    assert f"data.num_workers = -1: {workers} loader workers" in r.stdout
    assert "copies the online weights until step 2" in r.stdout and "this 0-step run ends before that" in r.stdout


# ------------------------------------------------------------------------------------- property

def test_restoring_a_folder_of_odd_files_never_touches_inputs_or_leaves_partial_outputs(model, tmp_path):
    d, out = tmp_path / "odd", tmp_path / "out"
    d.mkdir()
    good = png_bytes(px((24, 20, 3)))
    files = {
        "truncated.png": good[: len(good) // 2], "zero.png": b"", "text.png": b"just some text\n",
        "jpeg_named.png": cv2.imencode(".jpg", px((16, 16, 3)))[1].tobytes(),
        "deep16.png": png_bytes(px((9, 11, 3), np.uint16)), "gray.png": png_bytes(px((13, 7))),
        "rgba.png": png_bytes(px((10, 10, 4))), "one.png": png_bytes(px((1, 1, 3))),
        "huge.png": huge_header_png(), "anim.png": apng(3), "two.tif": tiff_2ch(),
        "hdr.tif": cv2.imencode(".tif", (RNG.random((6, 6, 3)) * 5).astype(np.float32))[1].tobytes(),
        "good.png": good,
    }
    for name, data in files.items():
        (d / name).write_bytes(data)
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    r = run("rddm-infer", "restore", d, "-o", out, "-m", model, "--json")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    summary = json.loads(r.stdout)
    assert summary["restored"] + summary["failed"] == len(files)
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before
    restored = {Path(o).name for o in summary["outputs"]}
    assert {"good.png", "jpeg_named.png", "deep16.png", "gray.png", "rgba.png", "one.png"} <= restored
    for p in out.iterdir():
        assert p.name in restored  # nothing else: no temp, no partial file
        pix = cv2.imdecode(np.fromfile(str(p), np.uint8), cv2.IMREAD_UNCHANGED)
        src = cv2.imdecode(np.frombuffer(files[p.name], np.uint8), cv2.IMREAD_UNCHANGED)
        assert pix is not None and pix.shape == src.shape and pix.dtype == src.dtype


def test_external_data_outside_the_model_folder_is_refused_before_onnx_runtime_reads_it(model, tmp_path):
    import onnx

    m = onnx.load(str(model))
    (tmp_path / "models").mkdir()
    onnx.save(m, str(tmp_path / "models" / "ext.onnx"), save_as_external_data=True, location="ext.data",
              size_threshold=0)
    (tmp_path / "secret.bin").write_bytes(b"\0" * (1 << 20))
    ok = run("rddm-infer", "info", tmp_path / "models" / "ext.onnx")
    assert ok.returncode == 0, ok.stderr  # external data beside the model is fine
    m = onnx.load(str(tmp_path / "models" / "ext.onnx"), load_external_data=False)
    entry = next(e for t in m.graph.initializer for e in t.external_data if e.key == "location")
    entry.value = "../secret.bin"
    (tmp_path / "models" / "evil.onnx").write_bytes(m.SerializeToString())
    for args in (["info", tmp_path / "models" / "evil.onnx"],
                 ["restore", _one_image(tmp_path), "-m", tmp_path / "models" / "evil.onnx"]):
        r = run("rddm-infer", *args)
        assert r.returncode == 2 and "'../secret.bin' lies outside the model's folder" in one_line(r.stderr)
