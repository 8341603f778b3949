"""Padding and tiling: coverage, exact reassembly of local functions, no seams."""

import cv2
import numpy as np
import pytest

from rddm_infer.restore.tiling import blend_weight, pad_to_multiple, run_tiled, tile_grid

RNG = np.random.default_rng(0)


def test_pad_to_multiple_reflects_bottom_right_and_crops_back():
    x = RNG.standard_normal((3, 13, 10)).astype(np.float32)
    p = pad_to_multiple(x, 8)
    assert p.shape == (3, 16, 16)
    np.testing.assert_array_equal(p[:, :13, :10], x)
    np.testing.assert_array_equal(p[:, 13, :10], x[:, 11])  # reflect (edge not repeated)
    np.testing.assert_array_equal(p[:, :13, 10], x[:, :, 8])
    assert pad_to_multiple(x[:, :8, :8], 8) is not None and pad_to_multiple(x[:, :8, :8], 8).shape == (3, 8, 8)


def test_pad_tiny_images():
    assert pad_to_multiple(np.ones((3, 1, 1), np.float32), 8).shape == (3, 8, 8)
    assert pad_to_multiple(np.ones((3, 2, 3), np.float32), 8).shape == (3, 8, 8)


@pytest.mark.parametrize("h,w,tile,overlap,m", [(64, 64, 32, 8, 8), (40, 100, 32, 16, 4), (24, 24, 64, 8, 8),
                                                (50, 30, 17, 5, 1)])
def test_tiles_cover_every_pixel_with_valid_sizes(h, w, tile, overlap, m):
    tiles = tile_grid(h, w, tile, overlap, m)
    cover = np.zeros((h, w), int)
    for t in tiles:
        assert t.y >= 0 and t.x >= 0 and t.y + t.h <= h and t.x + t.w <= w
        assert t.h % m == 0 or t.h == h
        cover[t.slices] += 1
    assert cover.min() >= 1
    if h <= tile and w <= tile:
        assert len(tiles) == 1


def test_blend_weights_are_flat_at_image_borders():
    h = w = 64
    for t in tile_grid(h, w, 32, 8, 8):
        wt = blend_weight(t, h, w, 8)
        assert wt.min() > 0
        if t.y == 0:
            np.testing.assert_array_equal(wt[0, 8:-8], 1.0)


def test_pointwise_function_is_reassembled_exactly():
    x = RNG.uniform(-1, 1, (3, 48, 72)).astype(np.float32)
    seen = []

    def fn(xb, tiles):
        seen.append(len(tiles))
        return np.tanh(3 * xb) * 0.5

    y = run_tiled(fn, x, tile=32, overlap=8, multiple=8, batch=4)
    np.testing.assert_allclose(y, np.tanh(3 * x) * 0.5, atol=1e-6)
    assert max(seen) <= 4 and sum(seen) == len(tile_grid(48, 72, 32, 8, 8))


def test_local_filter_has_no_seams():
    """A 5×5 blur per tile (reflect-padded at tile edges) vs on the whole image: the blend hides the edges."""
    x = RNG.uniform(-1, 1, (3, 64, 64)).astype(np.float32)

    def blur(a):
        return np.stack([cv2.blur(c, (5, 5), borderType=cv2.BORDER_REFLECT) for c in a])

    whole = blur(x)
    tiled = run_tiled(lambda xb, _: np.stack([blur(t) for t in xb]), x, tile=32, overlap=16, multiple=8)
    naive = run_tiled(lambda xb, _: np.stack([blur(t) for t in xb]), x, tile=32, overlap=0, multiple=8)
    err_blend, err_naive = np.abs(tiled - whole).max(), np.abs(naive - whole).max()
    assert err_blend < 0.05 < err_naive  # hard seams without overlap, near-invisible with it


def test_progress_callback_counts_tiles():
    calls = []
    run_tiled(lambda xb, _: xb, np.zeros((3, 64, 64), np.float32), tile=32, overlap=8, multiple=8, batch=3,
              on_tile=lambda n, total: calls.append((n, total)))
    assert calls[-1][0] == calls[-1][1] == len(tile_grid(64, 64, 32, 8, 8))
