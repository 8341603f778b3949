"""The Python API (Restorer): any size and layout in, same layout out; tiling, batching, metrics."""

import numpy as np
import pytest

from helpers import models
from rddm_infer.backends import select
from rddm_infer.errors import CheckpointError, ImageError, RDDMError
from rddm_infer.io.images import Image
from rddm_infer.metrics import psnr, ssim
from rddm_infer.restore.jobs import collect_inputs, list_inputs, plan_outputs
from rddm_infer.restore.local import Restorer

RNG = np.random.default_rng(0)


def _img(shape, dtype=np.uint8):
    hi = 255 if dtype == np.uint8 else 65535
    return RNG.integers(0, hi + 1, size=shape, dtype=np.int64).astype(dtype)


@pytest.fixture(scope="module")
def restorer():
    return Restorer(models.onnx_model("step"), providers="cpu")


@pytest.mark.parametrize("shape,dtype", [((13, 21), np.uint8), ((13, 21, 1), np.uint8), ((9, 14, 3), np.uint16),
                                         ((11, 7, 4), np.uint8), ((11, 7, 4), np.uint16), ((8, 8, 3), np.float32)])
def test_restore_array_keeps_layout_depth_and_alpha(restorer, shape, dtype):
    pix = _img(shape, dtype) if dtype != np.float32 else RNG.uniform(0, 1, shape).astype(np.float32)
    out = restorer.restore_array(pix)
    assert out.shape == pix.shape and out.dtype == pix.dtype
    if shape[-1] == 4 and len(shape) == 3:
        np.testing.assert_array_equal(out[..., 3], pix[..., 3])
    assert not np.array_equal(out, pix)  # it did run the model


def test_restore_array_rejects_bad_layouts(restorer):
    with pytest.raises(ImageError, match="shape"):
        restorer.restore_array(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(ImageError, match="dtype"):
        restorer.restore_array(np.zeros((4, 4, 3), np.int32))


def test_tiled_equals_untiled_on_a_per_pixel_model():
    """Pointwise network: any tiling error (placement, blending, per-tile noise) would show."""
    pix = _img((40, 44, 3))
    whole = Restorer(models.pointwise_onnx(), tile=64).restore_array(pix)
    ticks = []
    tiled = Restorer(models.pointwise_onnx(), tile=16, overlap=4, batch=3).restore_array(
        pix, on_tile=lambda n, t: ticks.append((n, t)))
    assert ticks and ticks[-1][0] == ticks[-1][1] > 4
    assert np.abs(whole.astype(int) - tiled.astype(int)).max() <= 1
    assert np.abs(whole.astype(int) - pix.astype(int)).max() > 10  # and the model does change the image


def test_tiled_close_to_untiled_on_a_real_network(restorer):
    """Random UNet (GroupNorm and attention see the whole tile, so tiles differ somewhat): seams stay small."""
    import cv2

    pix = cv2.GaussianBlur(_img((48, 48, 3)), (7, 7), 2)
    whole = restorer.restore_array(pix).astype(float)
    tiled = Restorer(models.onnx_model("step"), tile=32, overlap=16).restore_array(pix).astype(float)
    other_seed = Restorer(models.onnx_model("step"), tile=64, seed=1).restore_array(pix).astype(float)
    assert np.abs(whole - tiled).mean() < 0.5 * np.abs(whole - other_seed).mean()


def test_batching_and_seed(restorer):
    imgs = [Image(_img((10, 12, 3))) for _ in range(3)]
    one = [restorer.restore_images([im])[0] for im in imgs]
    batched = Restorer(models.onnx_model("step"), batch=3).restore_images(imgs)
    for a, b in zip(one, batched):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    again = restorer.restore_images(imgs[:1])[0]
    np.testing.assert_array_equal(again, one[0])


def test_pixel_shuffle_restores_each_sub_image_as_an_image_of_its_own(restorer):
    """Sub-image (dy, dx) of a pixel-shuffle-2 restore is exactly the restore of that sub-image with the same
    noise at its pixels; the interleaving is the inverse of the split (every pixel lands where it came from)."""
    from rddm_infer.backends import Noise

    pix = cv2_blur(_img((64, 96, 3)))
    eps = np.random.default_rng(5).standard_normal((3, 64, 96)).astype(np.float32)
    ps = Restorer(models.onnx_model("step"), pixel_shuffle=2, providers="cpu")
    whole = ps.restore_array(pix, noise=Noise.given(ps.plan, eps))
    for dy in (0, 1):
        for dx in (0, 1):
            sub = np.ascontiguousarray(pix[dy::2, dx::2])
            alone = restorer.restore_array(sub, noise=Noise.given(restorer.plan, eps[:, dy::2, dx::2]))
            assert np.abs(whole[dy::2, dx::2].astype(int) - alone.astype(int)).max() <= 1, (dy, dx)
    assert np.abs(whole.astype(int) - restorer.restore_array(pix, noise=Noise.given(restorer.plan, eps))).max() > 1

    # Odd sizes pad to 2 × the size multiple; batching, tiling of large sub-images and the seed as without it.
    odd = cv2_blur(_img((45, 70, 3)))
    one = ps.restore_array(odd)
    assert one.shape == odd.shape
    batched = Restorer(models.onnx_model("step"), pixel_shuffle=2, batch=4).restore_images([Image(odd)])[0]
    assert np.abs(one.astype(int) - batched.astype(int)).max() <= 1
    np.testing.assert_array_equal(ps.restore_array(odd), one)
    untiled = Restorer(models.pointwise_onnx(), pixel_shuffle=2, tile=64).restore_array(odd)
    tiled = Restorer(models.pointwise_onnx(), pixel_shuffle=2, tile=16, overlap=4).restore_array(odd)
    assert np.abs(untiled.astype(int) - tiled.astype(int)).max() <= 1  # pointwise: tiling must not show
    for bad in (0, 5, 1.5, True):
        with pytest.raises(RDDMError, match="--pixel-shuffle"):
            Restorer(models.onnx_model("step"), pixel_shuffle=bad)


def cv2_blur(pix):
    import cv2

    return cv2.GaussianBlur(pix, (5, 5), 1.5)


def test_default_model_missing_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(select, "DEFAULT_MODEL", tmp_path / "weights" / "default.onnx")
    with pytest.raises(CheckpointError, match="no built-in model is installed.*--model"):
        Restorer()


def test_bad_settings(tmp_path):
    with pytest.raises(RDDMError, match="size multiple"):
        Restorer(models.onnx_model("step"), tile=1)
    with pytest.raises(RDDMError, match="steps must be"):
        Restorer(models.onnx_model("step"), steps=0)


def test_inputs_and_output_names(tmp_path):
    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    for name in ("b.png", "a.jpg", "sub/c.png", "notes.txt", ".hidden.png"):
        (d / name).write_bytes(b"x")
    jobs = collect_inputs([d], recursive=False)
    assert [j.src.name for j in jobs] == ["a.jpg", "b.png"]
    jobs = collect_inputs([d, str(d / "*.png"), tmp_path / "missing.png"], recursive=True)
    assert [j.src.name for j in jobs] == ["a.jpg", "b.png", "c.png", "missing.png"]
    assert "no such file" in jobs[-1].error
    assert "no files match" in collect_inputs([str(d / "*.tif")])[0].error
    plan_outputs(jobs, tmp_path / "out", suffix="_r", ext="png")
    assert [str(j.dst.relative_to(tmp_path / "out")) for j in jobs[:3]] == ["a_r.png", "b_r.png", "sub/c_r.png"]
    clash = collect_inputs([d / "a.jpg", d / "b.png"])
    (d / "a.png").write_bytes(b"x")
    clash = collect_inputs([d / "a.jpg", d / "a.png"])
    plan_outputs(clash, tmp_path / "o2", ext="png")
    assert not clash[0].error and "also the output of" in clash[1].error
    same = collect_inputs([d / "b.png"])
    plan_outputs(same, d)
    assert "would overwrite an input" in same[0].error


def test_a_listing_is_used_as_listed_and_planning_leaves_it_untouched(tmp_path):
    """The CLI lists the inputs once (its early check); the run restores exactly those files."""
    d = tmp_path / "in"
    d.mkdir()
    (d / "a.png").write_bytes(b"x")
    listing = list_inputs([d], exclude=tmp_path / "out")
    assert list(listing) == [d] and len(listing) == 1  # iterated: the inputs as given
    (d / "b.png").write_bytes(b"x")  # arrives after the check
    jobs = collect_inputs(listing, exclude=tmp_path / "out")
    assert [j.src.name for j in jobs] == ["a.png"]
    plan_outputs(jobs, tmp_path / "out")
    assert jobs[0].dst == tmp_path / "out" / "a.png" and listing.jobs[0].dst is None  # copies were planned
    assert [j.src.name for j in collect_inputs(listing, recursive=True, exclude=tmp_path / "out")] == ["a.png", "b.png"]
    assert [j.src.name for j in collect_inputs(listing)] == ["a.png", "b.png"]  # another exclude: listed again


def test_psnr_and_ssim_values():
    a = RNG.uniform(0, 1, (3, 32, 32))
    assert psnr(a, a) == float("inf") and ssim(a, a) == pytest.approx(1.0)
    b = a + 0.1
    assert psnr(a, b) == pytest.approx(20.0)
    # SSIM of two constant images: luminance term only, (2μxμy + C1) / (μx² + μy² + C1)
    x, y = np.full((16, 16), 0.2), np.full((16, 16), 0.6)
    c1 = 0.01 ** 2
    assert ssim(x, y) == pytest.approx((2 * 0.2 * 0.6 + c1) / (0.04 + 0.36 + c1), rel=1e-6)
    noisy = np.clip(a + RNG.normal(0, 0.2, a.shape), 0, 1)
    assert 0 < ssim(a, noisy) < ssim(a, np.clip(a + RNG.normal(0, 0.05, a.shape), 0, 1)) < 1


def test_ssim_matches_a_direct_windowed_computation():
    import cv2

    a, b = RNG.uniform(0, 1, (14, 15)), RNG.uniform(0, 1, (14, 15))
    g = cv2.getGaussianKernel(11, 1.5)
    w = g @ g.T
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    vals = []
    for i in range(a.shape[0] - 10):
        for j in range(a.shape[1] - 10):
            pa, pb = a[i:i + 11, j:j + 11], b[i:i + 11, j:j + 11]
            ma, mb = (w * pa).sum(), (w * pb).sum()
            va, vb = (w * pa * pa).sum() - ma ** 2, (w * pb * pb).sum() - mb ** 2
            cov = (w * pa * pb).sum() - ma * mb
            vals.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
    assert ssim(a, b) == pytest.approx(np.mean(vals), abs=1e-9)


def test_restore_folder_api_and_engine_errors_are_per_image(tmp_path):
    import cv2
    from rddm_infer import restore_folder

    d = tmp_path / "in"
    d.mkdir()
    cv2.imwrite(str(d / "a.png"), _img((10, 10, 3)))
    cv2.imwrite(str(d / "b.png"), _img((9, 13)))
    s = restore_folder(d, tmp_path / "out", model=models.onnx_model("step"), suffix="_r", batch=2)
    assert s.line() == "restored 2, failed 0, skipped 0"
    assert cv2.imread(str(tmp_path / "out" / "b_r.png"), cv2.IMREAD_UNCHANGED).shape == (9, 13)
    r = Restorer(models.onnx_model("step"))
    with pytest.raises(RDDMError, match="inference failed"):
        r.runner.infer({"x_t": np.zeros((1, 3, 4, 4), np.float32)})  # missing inputs: ORT error, one line


def test_self_ensemble_averages_the_flipped_and_transposed_views(restorer):
    """A pointwise network gives the same pixels in every view, so the ensemble equals the plain restore; on a real
    UNet each view differs, and the ensemble is their mean (checked against views restored by hand)."""
    from rddm_infer.backends import Noise
    from rddm_infer.restore.tiling import ENSEMBLE_VIEWS, from_view, to_view

    pix = _img((24, 40, 3))
    eps = np.random.default_rng(1).standard_normal((3, 24, 40)).astype(np.float32)
    plain = Restorer(models.pointwise_onnx())
    for n in (2, 4, 8):
        ens = Restorer(models.pointwise_onnx(), self_ensemble=n, pixel_shuffle=2)
        np.testing.assert_allclose(ens.restore_array(pix, noise=Noise.given(ens.plan, eps)).astype(int),
                                   plain.restore_array(pix, noise=Noise.given(plain.plan, eps)).astype(int), atol=1)
    ens = Restorer(models.onnx_model("step"), self_ensemble=4, providers="cpu")
    f = pix.astype(np.float32) / 255
    got = ens.restore_array(f, noise=Noise.given(ens.plan, eps))
    views = []
    for v in ENSEMBLE_VIEWS[:4]:
        fv = np.moveaxis(to_view(np.moveaxis(f, -1, 0), v), 0, -1)
        out = restorer.restore_array(np.ascontiguousarray(fv), noise=Noise.given(restorer.plan, to_view(eps, v)))
        views.append(np.moveaxis(from_view(np.moveaxis(out, -1, 0), v), 0, -1))
    assert np.abs(views[0] - views[1]).max() > 1e-3  # the views really differ
    np.testing.assert_allclose(got, np.mean(views, axis=0), atol=2e-5)
    for bad in (0, 3, 16, True):
        with pytest.raises(RDDMError, match="--self-ensemble"):
            Restorer(models.onnx_model("step"), self_ensemble=bad)
