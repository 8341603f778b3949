"""The overlapped executor (readers, engine, writers) against the sequential path: same bytes, same order, bounded."""

from __future__ import annotations

import threading
import time

import cv2
import numpy as np
import pytest

from benchmarks.standin_engine import StandInRunner
from helpers import models
from rddm_infer.backends.base import RunnerWrapper
from rddm_infer.errors import RDDMError
from rddm_infer.io.images import Image
from rddm_infer.restore.arrays import ImageRestorer
from rddm_infer.restore.local import Restorer
from rddm_infer.restore.overlapped import Flow, split_workers

RNG = np.random.default_rng(7)


def mixed_folder(d):
    """Sizes (small, tiled at tile 32, odd), gray, RGBA, 16-bit and a broken file."""
    d.mkdir()
    u8 = lambda *s: RNG.integers(0, 256, s, dtype=np.uint8)  # noqa: E731
    files = {"a_small.png": u8(24, 24, 3), "b_small.png": u8(24, 24, 3), "c_big.png": u8(70, 90, 3),
             "d_gray.png": u8(40, 33), "e_rgba.png": u8(30, 30, 4), "g_small.png": u8(24, 24, 3),
             "h16.png": RNG.integers(0, 65536, (36, 28, 3), dtype=np.uint16), "i_big.jpg": u8(64, 80, 3)}
    for name, pix in files.items():
        cv2.imwrite(str(d / name), pix)
    (d / "f_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    return d


@pytest.fixture(scope="module")
def model():
    return models.onnx_model("step")


def _run(model, src, out, **kw):
    with Restorer(model, providers="cpu", tile=32, overlap=8, **kw) as r:
        s = r.restore_paths([src], out)
    return s, {p.name: p.read_bytes() for p in out.iterdir()}


def test_overlapped_outputs_are_byte_identical_to_the_sequential_path(model, tmp_path):
    src = mixed_folder(tmp_path / "in")
    for kw in (dict(io_workers=3, batch=4), dict(io_workers=1, batch=3, in_flight=3), dict(io_workers=2)):
        seq, seq_files = _run(model, src, tmp_path / f"seq{kw['io_workers']}", io_workers=0, batch=kw.get("batch", 1))
        ovl, files = _run(model, src, tmp_path / f"ovl{kw['io_workers']}", **kw)
        assert files == seq_files, kw
        assert [(r.job.src, r.status, r.error) for r in ovl.results] == \
               [(r.job.src, r.status, r.error) for r in seq.results]  # input order, same per-file errors
    assert seq.line() == "restored 8, failed 1, skipped 0"
    assert "f_broken.png" in next(r.error for r in seq.results if r.status == "failed")


class Recorder(RunnerWrapper):
    """Records the batch of every engine call (the step graph makes K calls per batch)."""

    def __init__(self, inner):
        super().__init__(inner)
        self.batches: list[int] = []

    def infer(self, feeds):
        self.batches.append(len(feeds["x_t"]))
        return super().infer(feeds)


def test_tiles_batch_across_images_with_the_pixels_of_batch_1():
    """The built-in model on ONNX Runtime gives a sample the same output alone or in a batch, so tiles batched across
    images restore to the very pixels of batch 1. (Some graphs round differently at batch 1, by about 1e-6: the
    sequential and overlapped paths make the same calls, so they still agree byte for byte.)"""
    images = [Image(RNG.integers(0, 256, (112, 112, 3), dtype=np.uint8)) for _ in range(3)]  # 4 tiles each at 64
    one = ImageRestorer(None, "onnxruntime", tile=64, overlap=16, pixel_shuffle=1)
    ref = one.restore_each(images)
    rec = Recorder(ImageRestorer(None, "onnxruntime").runner)
    many = ImageRestorer(rec, tile=64, overlap=16, batch=8, pixel_shuffle=1)
    got = many.restore_each(images)
    assert all(np.array_equal(a, b) for a, b in zip(ref, got))
    assert rec.batches[::many.plan.k] == [8, 4]  # 12 tiles of 3 images in 2 calls; image by image would take 3


class SlowWriter(Restorer):
    """A writer slower than the engine (a network share): counts the images in flight meanwhile."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.lock, self.alive, self.peak = threading.Lock(), 0, 0
        start = self.arrays.start

        def counted(img, *args, **kwargs):
            with self.lock:
                self.alive += 1
                self.peak = max(self.peak, self.alive)
            return start(img, *args, **kwargs)

        self.arrays.start = counted

    def save(self, *a, **kw):
        time.sleep(0.05)
        try:
            return super().save(*a, **kw)
        finally:
            with self.lock:
                self.alive -= 1


def _folder(d, n, shape=(32, 32, 3)):
    d.mkdir()
    for i in range(n):
        cv2.imwrite(str(d / f"{i:02d}.png"), RNG.integers(0, 256, shape, dtype=np.uint8))
    return d


def test_images_in_flight_are_bounded_by_count_and_by_bytes(tmp_path):
    src = _folder(tmp_path / "in", 12)
    engine = StandInRunner.like(models.onnx_model("step"), latency_s=0.0)
    r = SlowWriter(engine, io_workers=3, in_flight=3, pixel_shuffle=1)
    s = r.restore_paths([src], tmp_path / "a")
    assert s.count("restored") == 12 and r.alive == 0
    assert 2 <= r.peak <= 3  # overlapped, never more than --in-flight
    # bytes: each image needs about 32·32·bytes_per_pixel; a bound below two images lets one in at a time
    one = 32 * 32 * r.arrays.bytes_per_pixel() / 1e6
    r = SlowWriter(engine, io_workers=3, in_flight_mb=one * 1.5, pixel_shuffle=1)
    s = r.restore_paths([src], tmp_path / "b")
    assert s.count("restored") == 12 and r.peak == 1
    # an image over the bound alone still runs (never a deadlock), one at a time
    r = SlowWriter(engine, io_workers=2, in_flight_mb=one / 10, pixel_shuffle=1)
    assert r.restore_paths([src], tmp_path / "c").count("restored") == 12 and r.peak == 1


def test_flow_settings_are_checked_and_stated():
    assert split_workers(2) == (1, 1) and split_workers(3) == (2, 1) and split_workers(16) == (11, 5)
    assert Flow.resolve(0, batch=4).describe() == "sequential (--io-workers 0)"
    f = Flow.resolve(3, batch=2, max_mb=100)
    assert (f.max_images, f.max_bytes) == (18, 100_000_000)
    assert f.describe() == "overlapped: 2 reader(s), 1 writer(s), at most 18 images or 100 MB in flight"
    assert Flow.resolve("auto", batch=1).io_workers >= 1
    for bad in (dict(io_workers=-1), dict(io_workers=1.5), dict(io_workers=2, max_images=0),
                dict(io_workers=2, max_mb=0), dict(io_workers=0, max_mb=100)):  # the last: not honoured, so refused
        with pytest.raises(RDDMError, match="--io-workers|--in-flight"):
            Flow.resolve(batch=1, **bad)
