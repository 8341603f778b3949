"""Training data: pairing by name / .flist, per-index determinism with or without workers, fixed validation."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from helpers.train import write_photos
from rddm_infer.errors import ImageError
from rddm_train.data import (DataError, ImageBank, IndexBatches, TrainSet, list_images, make_loader, pair_files,
                             read_rgb, validation_set)
from rddm_train.degradations import Chain

NOISE = Chain.from_specs([{"name": "gaussian", "sigma": [0, 50]}])


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    write_photos(folder, n=5)
    return folder


def test_image_bank_round_trips_rgb(photos):
    files = list_images(photos)
    bank = ImageBank.load(files)
    assert len(bank) == 5 and bank.nbytes == 5 * 40 * 48 * 3
    for k, f in enumerate(files):
        assert np.array_equal(bank[k], cv2.imread(str(f))[..., ::-1])


def test_pairs_match_by_file_name_and_flist_by_line(tmp_path):
    a = write_photos(tmp_path / "in", n=3, seed=1)
    b = write_photos(tmp_path / "gt", n=3, seed=2)
    (tmp_path / "gt" / "extra.png").write_bytes(b[0].read_bytes())  # unpaired gts are fine
    assert [(p.name, q.name) for p, q in pair_files(tmp_path / "in", tmp_path / "gt")] == [(p.name, p.name) for p in a]
    (tmp_path / "in.flist").write_text("\n".join(f"in/{p.name}" for p in a) + "\n")
    (tmp_path / "gt.flist").write_text("\n".join(str(p) for p in reversed(b)) + "\n")
    pairs = pair_files(tmp_path / "in.flist", tmp_path / "gt.flist")
    assert [(p.name, q.name) for p, q in pairs] == list(zip([p.name for p in a], [p.name for p in reversed(b)]))

    (tmp_path / "in" / "lonely.png").write_bytes(a[0].read_bytes())
    with pytest.raises(DataError, match=r"in: 1 input image\(s\) have no ground truth .* e.g. lonely.png"):
        pair_files(tmp_path / "in", tmp_path / "gt")
    (tmp_path / "short.flist").write_text(f"{a[0]}\n")
    with pytest.raises(DataError, match="lists 1 images but .* lists 3"):
        pair_files(tmp_path / "short.flist", tmp_path / "gt.flist")
    (tmp_path / "bad.flist").write_text("nowhere/x.png\n")
    with pytest.raises(DataError, match=r"bad.flist: 1 listed file\(s\) do not exist"):
        list_images(tmp_path / "bad.flist")
    with pytest.raises(DataError, match="no such folder"):
        list_images(tmp_path / "missing")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG but not really")
    with pytest.raises(ImageError, match="broken.png: cannot be read"):
        read_rgb(tmp_path / "broken.png")


def test_samples_depend_only_on_seed_and_index(photos):
    bank = ImageBank.load(list_images(photos))
    ds = TrainSet(bank, 32, seed=5, chain=NOISE)
    inp, gt = ds[17]
    inp2, gt2 = TrainSet(bank, 32, seed=5, chain=NOISE)[17]
    assert inp.shape == gt.shape == (3, 32, 32) and inp.dtype == torch.float32
    assert torch.equal(inp, inp2) and torch.equal(gt, gt2)
    assert not torch.equal(inp, ds[18][0]) and not torch.equal(inp, TrainSet(bank, 32, seed=6, chain=NOISE)[17][0])
    # gt is an exact crop (maybe flipped) of one of the photos; the input is its noisy version
    crops = {bank[k][y:y + 32, x:x + 32, :].tobytes() for k in range(len(bank)) for y in range(9) for x in range(17)}
    crops |= {bank[k][y:y + 32, x:x + 32][:, ::-1].tobytes() for k in range(len(bank)) for y in range(9) for x in range(17)}
    g8 = (gt.numpy().transpose(1, 2, 0) * 255 + 0.5).astype(np.uint8)
    assert g8.tobytes() in crops
    assert 0 < (inp - gt).abs().mean() < 0.2


def test_saturation_scales_the_colours_of_input_and_target_and_is_drawn_only_when_on(photos):
    bank = ImageBank.load(list_images(photos))
    clean = Chain.from_specs([{"name": "gaussian", "sigma": 0}])
    plain = TrainSet(bank, 32, seed=5, chain=NOISE)
    off = TrainSet(bank, 32, seed=5, chain=NOISE, saturation=(1, 1))
    assert all(torch.equal(a, b) for i in (3, 17) for a, b in zip(plain[i], off[i]))  # old runs' streams unchanged

    def chroma(x):  # mean distance of a pixel's colour from its gray
        return float((x - x.mean(0, keepdim=True)).abs().mean())

    for i in range(4):
        base, gray = TrainSet(bank, 32, 5, clean)[i][1], TrainSet(bank, 32, 5, clean, saturation=(0, 0))[i][1]
        inp, vivid = TrainSet(bank, 32, 5, clean, saturation=(2, 2))[i]
        assert torch.equal(inp, vivid)  # no noise here: the input is the saturated target, to 8-bit-free floats
        assert torch.allclose(gray[0], gray[1], atol=1e-6) and torch.allclose(gray[1], gray[2], atol=1e-6)
        assert chroma(vivid) > 1.3 * chroma(base) and vivid.min() >= 0 and vivid.max() <= 1
    with pytest.raises(DataError, match="paired data is used as is"):
        TrainSet(bank, 32, 5, inputs=bank, saturation=(1, 2))


def test_loader_with_workers_yields_the_same_stream_and_resumes_mid_way(photos):
    ds = TrainSet(ImageBank.load(list_images(photos)), 32, seed=0, chain=NOISE)
    it0 = iter(make_loader(ds, 3, 0, num_workers=0))
    serial = [next(it0) for _ in range(4)]
    it2 = iter(make_loader(ds, 3, 0, num_workers=2))
    parallel = [next(it2) for _ in range(4)]
    resumed = next(iter(make_loader(ds, 3, 2, num_workers=0)))
    del it2
    for (a, b), (c, d) in zip(serial, parallel):
        assert torch.equal(a, c) and torch.equal(b, d)
    assert torch.equal(resumed[0], serial[2][0])
    assert list(IndexBatches(2, start=3, count=2)) == [[6, 7], [8, 9]]


def test_paired_crops_are_aligned_and_sizes_must_agree(tmp_path):
    write_photos(tmp_path / "gt", n=2, seed=3)
    (tmp_path / "in").mkdir()
    for p in sorted((tmp_path / "gt").iterdir()):  # input = gt + 40: alignment is visible in the difference
        cv2.imwrite(str(tmp_path / "in" / p.name), np.clip(cv2.imread(str(p)).astype(int) + 40, 0, 255).astype(np.uint8))
    pairs = pair_files(tmp_path / "in", tmp_path / "gt")
    ds = TrainSet(ImageBank.load([b for _, b in pairs]), 16, seed=0, inputs=ImageBank.load([a for a, _ in pairs]))
    for i in range(6):
        inp, gt = ds[i]
        expected = torch.clamp(torch.round(gt * 255) + 40, max=255) / 255
        assert torch.allclose(inp, expected, atol=1e-6)
    small = write_photos(tmp_path / "small", n=2, size=(24, 24), seed=3)
    with pytest.raises(DataError, match=r"small/img00.png: size 24x24 differs from its ground truth .*img00.png \(48x40\)"):
        TrainSet(ImageBank.load([b for _, b in pairs]), 16, seed=0, inputs=ImageBank.load(small))


def test_images_smaller_than_the_crop_are_padded(tmp_path):
    files = write_photos(tmp_path, n=1, size=(20, 24))
    inp, gt = TrainSet(ImageBank.load(files), 32, seed=0, chain=NOISE)[0]
    assert gt.shape == (3, 32, 32)


def test_validation_set_is_fixed(photos):
    a = validation_set(32, 3, seed=9, clean=str(photos), chain=NOISE)
    b = validation_set(32, 3, seed=9, clean=str(photos), chain=NOISE)
    c = validation_set(32, 3, seed=10, clean=str(photos), chain=NOISE)
    assert a[0].shape == a[1].shape == (3, 3, 32, 32) and a[2] == ["img00.png", "img01.png", "img02.png"]
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], c[1]) and not np.array_equal(a[0], c[0])
    gt0 = cv2.imread(str(photos / "img00.png"))[4:36, 8:40, ::-1].transpose(2, 0, 1) / 255.0
    assert np.allclose(a[1][0], gt0, atol=1e-6)  # centre crop of a 40×48 photo


def test_a_gray_step_grays_the_training_and_validation_targets_too(photos):
    gray = Chain.from_specs([{"name": "gray_gaussian", "sigma": 25}])
    inp, gt = TrainSet(ImageBank.load(list_images(photos)), 32, seed=0, chain=gray)[3]
    assert torch.equal(gt[0], gt[1]) and torch.equal(gt[0], gt[2])  # the model must keep a gray photo gray
    assert not torch.equal(inp, gt) and torch.equal(inp[0] - gt[0], inp[1] - gt[1])  # one noise field
    ins, gts, _ = validation_set(32, 2, seed=9, clean=str(photos), chain=gray)
    assert np.array_equal(gts[:, 0], gts[:, 2]) and not np.array_equal(ins, gts)
