"""Real pairs in the trainer: the split by scene and its refusals, aligned crops without resampling, the
real:synthetic ratio, each sample's source in the log, early stopping on the held-out scenes, the gap."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from helpers.train import pair_pattern, tiny_config, write_photos, write_real_pairs
from rddm_train import config
from rddm_train.config import ConfigError
from rddm_train.data import DataError, ImageBank, list_images
from rddm_train.real_pairs import MixedSet, RealPairs
from rddm_train.scenes import scene_of
from rddm_train.trainer import Trainer
from rddm_train.validation import scores

# 17 pairs of 6 scenes; desk / ball / wall (11 pairs) are held out. "Sony_x_desk" is another camera's desk.
SCENES = {"CamA_5_160_3200_desk": 4, "CamA_5_160_6400_ball": 4, "CamB_8_125_800_wall": 3,
          "CamB_8_125_1600_tree": 2, "CamC_4_125_6400_lamp": 2, "Sony_4_125_1600_toy": 2}
HELD_OUT = ["CamA_5_160_3200_desk", "CamA_5_160_6400_ball", "CamB_8_125_800_wall"]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("real")
    write_real_pairs(folder, SCENES)
    return folder


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    write_photos(folder, n=4)
    return folder


def real_config(out, photos, pairs, *extra, held_out=HELD_OUT):
    return tiny_config(out, photos, f"real.pairs='{pairs}'", f"real.held_out={json.dumps(held_out)}", "val.steps=1",
                       *extra)


def u8(x) -> np.ndarray:
    """A CHW [0, 1] tensor back to the HWC uint8 values it was made from."""
    return np.rint(np.asarray(x).transpose(1, 2, 0) * 255).astype(np.int64)


def test_the_split_is_by_scene_and_held_out_scenes_are_never_trained_on(tmp_path, photos, pairs):
    rp = RealPairs(real_config(tmp_path / "run", photos, pairs))
    held = sorted(n for n in (p.name for p in list_images(pairs / "noisy")) if scene_of(n) in HELD_OUT)
    train = {Path(f).name for f in rp.noisy.names}
    assert sorted(rp.held_out_set[2]) == held and len(held) == 11
    assert {scene_of(n) for n in train} == set(SCENES) - set(HELD_OUT) and len(train) == 6
    assert rp.held_out_set[0].shape == (11, 3, 32, 32)  # every held-out pair validates (val.count is not applied)
    assert set(rp.gap_set[2]) <= train and len(rp.gap_set[2]) == 6  # gap_count 10 > the 6 training pairs
    ds = MixedSet(rp.train_set(32, 0, True), None, 1.0)
    seen = {ds.source(i) for i in range(400)}
    assert seen == train  # every training pair is drawn, no held-out one ever
    train_ids = {int(rp.clean[k][0, 0, 2]) for k in range(len(rp.clean))}  # the pair id is in the blue channel
    assert all(u8(ds[i][1])[0, 0, 2] in train_ids for i in range(40))  # the content agrees with the names


def test_splits_that_cannot_validate_honestly_are_refused_with_the_config_named(tmp_path, photos, pairs):
    cfg_file = tmp_path / "split.toml"
    cfg_file.write_text(f"[real]\npairs = '{pairs}'\nheld_out = {json.dumps(HELD_OUT[:2])}\n")
    with pytest.raises(ConfigError, match=r"split.toml: real.held_out names 2 scene\(s\); at least 3"):
        config.load(cfg_file)
    cfg_file.write_text(f"[real]\npairs = '{pairs}'\nheld_out = {json.dumps(HELD_OUT[:2] + HELD_OUT[:1])}\n")
    with pytest.raises(ConfigError, match="split.toml: real.held_out must list distinct scene names"):
        config.load(cfg_file)
    few = ["CamB_8_125_800_wall", "CamB_8_125_1600_tree", "CamC_4_125_6400_lamp"]  # 3 + 2 + 2 = 7 pairs
    cfg_file.write_text(f"[real]\npairs = '{pairs}'\nheld_out = {json.dumps(few)}\n[data]\nclean = '{photos}'\n")
    with pytest.raises(DataError, match=r"split.toml: real.held_out: its 3 scenes hold 7 pair\(s\) in .*; at least 10"):
        RealPairs(config.load(cfg_file))
    with pytest.raises(DataError, match="real.held_out names scene.* with no pair in .*: CamA_desk"):
        RealPairs(real_config(tmp_path / "r", photos, pairs, held_out=HELD_OUT[1:] + ["CamA_desk"]))
    with pytest.raises(ConfigError, match="real.ratio = 1 leaves no synthetic share"):
        real_config(tmp_path / "r", photos, pairs, "real.ratio=1.0")
    assert real_config(tmp_path / "r", photos, pairs, "real.ratio=1.0", "real.real_only=true").real.ratio == 1.0
    with pytest.raises(ConfigError, match="real.pairs validates on its held-out scenes.*drop val.clean"):
        real_config(tmp_path / "r", photos, pairs, f"val.clean='{photos}'")
    with pytest.raises(ConfigError, match="val.patience stops on the validation PSNR: give a validation set"):
        tiny_config(tmp_path / "r", photos, "val.patience=2")


def test_held_out_scenes_that_overlap_training_are_refused(tmp_path, photos, pairs):
    # another camera's shot of a held-out subject is the same content: held out alone, its twin would be trained on
    twin = tmp_path / "twin"
    write_real_pairs(twin, {**SCENES, "Sony_4_125_6400_desk": 1})
    with pytest.raises(DataError, match="overlaps training: scene Sony_4_125_6400_desk shows the same subject as "
                                        "held-out CamA_5_160_3200_desk .*hold out both or neither"):
        RealPairs(real_config(tmp_path / "r", photos, twin))
    both = RealPairs(real_config(tmp_path / "r", photos, twin, held_out=HELD_OUT + ["Sony_4_125_6400_desk"]))
    assert len(both.held_out_set[2]) == 12
    # a held-out image among the synthetic training photos
    leaky = tmp_path / "photos"
    write_photos(leaky, n=2)
    (leaky / "CamA_5_160_6400_ball_3.png").write_bytes((pairs / "clean" / "CamA_5_160_6400_ball_3.png").read_bytes())
    with pytest.raises(DataError, match=r"overlaps training: data.clean \(.*photos\) holds 1 image\(s\) of held-out "
                                        r"scenes, e.g. CamA_5_160_6400_ball_3.png"):
        RealPairs(real_config(tmp_path / "r", leaky, pairs))


def test_a_pair_whose_sizes_differ_is_refused_by_name(tmp_path, photos):
    folder = tmp_path / "real"
    write_real_pairs(folder, SCENES)
    bad = folder / "clean" / "CamB_8_125_1600_tree_2.png"
    cv2.imwrite(str(bad), cv2.imread(str(bad))[:, :40])
    with pytest.raises(DataError, match=r"noisy/CamB_8_125_1600_tree_2.png: size 48x40 differs from its ground "
                                        r"truth .*clean/CamB_8_125_1600_tree_2.png \(40x40\)"):
        RealPairs(real_config(tmp_path / "r", photos, folder))


def test_real_crops_stay_aligned_under_flips_and_quarter_turns_without_resampling(tmp_path, photos, pairs):
    rp = RealPairs(real_config(tmp_path / "run", photos, pairs))
    ds = rp.train_set(32, seed=3, flip=True)
    banks = {k: (rp.noisy[k].astype(np.int64), rp.clean[k].astype(np.int64)) for k in range(len(rp.clean))}
    pattern = pair_pattern(40, 48)
    transforms = set()
    for i in range(64):
        noisy, clean = (u8(t) for t in ds[i])
        src_noisy, src_clean = banks[ds.image_of(i)]
        # aligned: wherever each clean pixel came from (its x, y are encoded in R, G), noisy - clean is the pattern
        # at that very place
        x, y = (clean[..., 0] - 10) // 4, (clean[..., 1] - 10) // 5
        assert np.array_equal(noisy - clean, pattern[y, x]), i
        # no resampling: the crop is one of the 8 symmetries of an exact 32x32 window of the source pair
        found = [(f, r) for f in (False, True) for r in range(4) if _is_window(_undo(clean, f, r), src_clean)]
        assert len(found) == 1, i
        y0, x0 = int(_undo(y, *found[0])[0, 0]), int(_undo(x, *found[0])[0, 0])
        assert np.array_equal(_undo(noisy, *found[0]), src_noisy[y0:y0 + 32, x0:x0 + 32])
        assert {tuple(p) for p in noisy.reshape(-1, 3)} <= {tuple(p) for p in src_noisy.reshape(-1, 3)}
        transforms.add(found[0])
    assert len(transforms) == 8  # all flips and quarter turns occur
    plain = rp.train_set(32, seed=3, flip=False)
    assert all(_is_window(u8(plain[i][1]), banks[plain.image_of(i)][1]) for i in range(16))  # flip = false: neither


def _undo(crop: np.ndarray, flipped: bool, turns: int) -> np.ndarray:
    """The inverse of the trainer's augmentation (a flip, then ``turns`` quarter turns)."""
    back = np.rot90(crop, -turns)
    return back[:, ::-1] if flipped else back


def _is_window(crop: np.ndarray, src: np.ndarray) -> bool:
    """Is ``crop`` the window of ``src`` that its top-left pixel's encoded (x, y) says, pixel for pixel?"""
    x0, y0 = (crop[0, 0, 0] - 10) // 4, (crop[0, 0, 1] - 10) // 5
    h, w = crop.shape[:2]
    return bool(y0 + h <= src.shape[0] and x0 + w <= src.shape[1] and np.array_equal(crop, src[y0:y0 + h, x0:x0 + w]))


def test_the_ratio_is_honoured_in_every_batch_and_sources_name_what_was_cut(tmp_path, photos, pairs):
    cfg = real_config(tmp_path / "run", photos, pairs, "real.ratio=0.3")
    ds = Trainer(cfg).dataset()
    flags = [ds.is_real(i) for i in range(4000)]
    assert sum(flags) == 1200  # exactly floor(n × 0.3) of the first n samples
    assert {sum(flags[b:b + 16]) for b in range(0, 4000, 16)} <= {4, 5}  # 0.3 × 16 = 4.8 per batch
    bank = ImageBank.load(list_images(photos))
    windows = {np.ascontiguousarray(v).tobytes() for k in range(len(bank)) for y in range(9) for x in range(17)
               for v in (bank[k][y:y + 32, x:x + 32], bank[k][y:y + 32, x:x + 32][:, ::-1])}
    real_ids = {p.name: int(cv2.imread(str(p))[0, 0, 0]) for p in list_images(pairs / "clean")}  # blue: the pair id
    for i in range(48):
        inp, gt = (u8(t) for t in ds[i])
        if ds.source(i) == "synthetic":  # a crop of one of the photos
            assert gt.astype(np.uint8).tobytes() in windows, i
        else:  # the named pair's own pixels, with its own noise and nothing added
            assert ds.source(i) in real_ids and gt[0, 0, 2] == real_ids[ds.source(i)], i
            assert np.array_equal(inp - gt, pair_pattern(40, 48)[(gt[..., 1] - 10) // 5, (gt[..., 0] - 10) // 4]), i
    rows = ds.sources(0, 160)
    assert rows["synthetic"] == 112 and sum(map(len, rows["real"].values())) == 48


def test_transplanted_noise_is_a_training_pairs_own_noise_on_a_clean_photo(tmp_path, photos, pairs):
    cfg = real_config(tmp_path / "run", photos, pairs, "real.ratio=0.2", "real.transplant=0.3")
    ds = Trainer(cfg).dataset()
    kinds = [ds.kind(i) for i in range(4000)]
    assert (kinds.count("real"), kinds.count("transplant")) == (800, 1200)  # floor(n × share) each
    assert {sum(k != "synthetic" for k in kinds[b:b + 16]) for b in range(0, 4000, 16)} == {8}  # 0.5 × 16
    bank = ImageBank.load(list_images(photos))
    photo_windows = {np.ascontiguousarray(v).tobytes() for k in range(len(bank)) for y in range(9)
                     for x in range(17) for v in _symmetries(bank[k][y:y + 32, x:x + 32])}
    pattern = pair_pattern(40, 48)
    noise_windows = [v for y in range(9) for x in range(17) for v in _symmetries(pattern[y:y + 32, x:x + 32])]
    train = {Path(f).name for f in Trainer(cfg).real_pairs.noisy.names}
    checked = 0
    for i in [i for i in range(200) if kinds[i] == "transplant"][:24]:
        inp, gt = (u8(t) for t in ds[i])
        assert gt.astype(np.uint8).tobytes() in photo_windows, i  # the target is a clean photo's crop, as it was
        assert ds.source(i) in train, i  # noise of training pairs only, never of a held-out scene
        kept = (inp > 0) & (inp < 255)  # where the sum was not clipped, the noise is a real pair's, unresampled
        assert kept.mean() > 0.5 and any(np.array_equal((inp - gt)[kept], w[kept]) for w in noise_windows), i
        checked += 1
    assert checked == 24
    rows = ds.sources(0, 160)
    assert (rows["synthetic"], sum(map(len, rows["real"].values())), sum(map(len, rows["transplant"].values()))) \
        == (80, 32, 48)
    assert not Trainer(real_config(tmp_path / "plain", photos, pairs)).dataset().sources(0, 16).get("transplant")
    with pytest.raises(ConfigError, match="no synthetic share"):
        real_config(tmp_path / "all", photos, pairs, "real.ratio=0.5", "real.transplant=0.5")


def _symmetries(crop: np.ndarray) -> list[np.ndarray]:
    return [np.rot90(c, r) for c in (crop, crop[:, ::-1]) for r in range(4)]


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_each_samples_source_is_in_the_train_log_and_the_gap_in_the_val_log(tmp_path, photos):
    pairs, out = tmp_path / "real", tmp_path / "run"
    write_real_pairs(pairs, SCENES, strength={s: 2 for s in SCENES if s not in HELD_OUT})  # noisier training pairs
    tr = Trainer(real_config(out, photos, pairs, "real.ratio=0.25", "run.steps=3", "val.every=3",
                             "optim.grad_accum=2"))
    lines = []
    tr.fit(log=lines.append)
    assert lines[0].startswith(f"real pairs from {pairs}: training on 6 pairs of 3 scenes; validating on 11 pairs")
    ds, rows = tr.dataset(), _rows(out / "train_log.jsonl")
    assert [r["sources"]["samples"] for r in rows] == [[0, 8], [8, 16], [16, 24]]  # batch 4 × 2 micro-batches
    for r in rows:
        start, stop = r["sources"]["samples"]
        logged = {i: name for name, idx in r["sources"]["real"].items() for i in idx}
        assert logged == {i: ds.source(i) for i in range(start, stop) if ds.is_real(i)}
        assert r["sources"]["synthetic"] == stop - start - len(logged) and len(logged) == 2
        assert not {scene_of(n) for n in logged.values()} & set(HELD_OUT)

    (val,) = _rows(out / "val_log.jsonl")
    assert (out / "val_log.csv").read_text().splitlines()[0] == \
        "step,psnr,ssim,psnr_input,train_psnr,train_psnr_input,gap"
    t_inp, t_gt, names = tr.real_pairs.gap_set
    assert val["train_psnr_input"] == pytest.approx(scores(t_inp, t_gt)[0], abs=1e-4)
    assert val["train_psnr"] == pytest.approx(scores(tr.validator.restore(tr.ema.model, t_inp), t_gt)[0], abs=1e-4)
    assert set(names) <= {Path(n).name for n in tr.real_pairs.noisy.names}
    h_inp, h_gt, _ = tr.real_pairs.held_out_set
    assert val["psnr_input"] == pytest.approx(scores(h_inp, h_gt)[0], abs=1e-4)
    assert val["train_psnr_input"] < val["psnr_input"] - 3  # the training pairs' twice-as-strong noise: not held-out
    assert val["gap"] == pytest.approx((val["train_psnr"] - val["train_psnr_input"])
                                       - (val["psnr"] - val["psnr_input"]), abs=3e-4)
    assert f"gap {val['gap']:+.2f} dB" in lines[-1] and lines[-1].startswith("step 3: val PSNR")


@pytest.mark.slow  # about 4 s on 2 cores
def test_early_stopping_on_the_held_out_pairs(tmp_path, photos, pairs):
    # lr 1e-12 leaves the float32 weights as they are: the held-out PSNR never improves after the first validation
    frozen = ["optim.lr=1e-12", "val.every=1", "run.steps=20"]
    lines = []
    result = Trainer(real_config(tmp_path / "a", photos, pairs, *frozen, "val.patience=2")).fit(log=lines.append)
    assert (result["stopped"], result["end_step"]) == ("early stop", 3)
    assert [r["step"] for r in _rows(tmp_path / "a" / "val_log.jsonl")] == [1, 2, 3]
    assert torch.load(tmp_path / "a" / "state.pt", weights_only=True)["step"] == 3  # a checkpoint at the stop
    assert "early stop at step 3: the validation PSNR has not beaten step 1's" in lines[-1]
    # not yet spent (3 - 1 < 3 validations): the run goes to its end
    assert Trainer(real_config(tmp_path / "b", photos, pairs, *frozen[:2], "run.steps=3", "val.patience=3")
                   ).fit()["stopped"] == "done"
    # the best is the record (best_ema.json): a resumed run stops at its first validation when patience is spent
    r = Trainer(real_config(tmp_path / "a", photos, pairs, *frozen, "val.patience=2")).fit(resume=True)
    assert (r["stopped"], r["start_step"], r["end_step"]) == ("early stop", 3, 4)


@pytest.mark.slow  # about 8 s on 2 cores
def test_a_run_on_real_pairs_resumes_bit_identically(tmp_path, photos, pairs):
    extra = ["optim.grad_accum=2", "run.checkpoint_every=3", "optim.lr=1e-3", "real.transplant=0.25", "real.ratio=0.5",
             "val.every=4"]
    Trainer(real_config(tmp_path / "whole", photos, pairs, *extra, "run.steps=6")).fit()
    Trainer(real_config(tmp_path / "split", photos, pairs, *extra, "run.steps=3")).fit()
    Trainer(real_config(tmp_path / "split", photos, pairs, *extra, "run.steps=6")).fit(resume=True)
    a, b = (torch.load(tmp_path / d / "state.pt", weights_only=True) for d in ("whole", "split"))
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    logged = [[(r["step"], r["loss"], r["sources"]) for r in _rows(tmp_path / d / "train_log.jsonl")]
              for d in ("whole", "split")]
    assert logged[0] == logged[1] and len(logged[0]) == 6
    assert sum(len(v) for r in logged[0] for v in r[2]["transplant"].values()) > 0  # transplanted noise trained on
    split_vals = [r for r in _rows(tmp_path / "split" / "val_log.jsonl") if r["step"] != 3]  # the first piece's end
    assert _rows(tmp_path / "whole" / "val_log.jsonl") == split_vals and len(split_vals) == 2
    lines = []  # another ratio draws other samples: allowed, and said
    changed = Trainer(real_config(tmp_path / "split", photos, pairs, *extra[:-2], "real.ratio=0.6", "run.steps=6"))
    changed.fit(resume=True, log=lines.append)
    assert changed.resume_notes == ["real_ratio 0.5 -> 0.6"] and "real_ratio 0.5 -> 0.6" in lines[0]


def test_the_packaged_real_pairs_config_names_a_valid_split():
    cfg = config.load("real_pairs_denoiser", ["real.pairs='anywhere'", "data.clean='photos'"])
    assert len(cfg.real.held_out) >= 3 and 0 < cfg.real.ratio < 1 and cfg.val.patience > 0
    assert {h.rsplit("_", 1)[-1] for h in cfg.real.held_out} == {"fruit", "ball", "wall", "waterhouse"}
