"""The trainer: learns, resumes bit-exactly, refuses bad checkpoints, stops on a diverging loss."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from helpers.train import tiny_config, write_photos
from rddm_infer.errors import CheckpointError, RDDMError
from rddm_infer.model import TorchRDDM, load_checkpoint
from rddm_train.trainer import Trainer, TrainingDiverged


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    write_photos(folder, n=6)
    return folder


def _losses(out):
    return [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.slow  # over 2 s on 2 cores
def test_a_few_dozen_steps_lower_the_loss_and_the_ema_checkpoint_loads(tmp_path, photos):
    cfg = tiny_config(tmp_path / "run", photos, "optim.lr=2e-3", "run.steps=40", "run.checkpoint_every=20",
                      "data.degradations=[{name = 'gaussian', sigma = [10, 40]}]")
    tr = Trainer(cfg)
    result = tr.fit()
    assert result["end_step"] == 40 and result["stopped"] == "done"
    losses = _losses(tmp_path / "run")
    assert len(losses) == 40 and all(np.isfinite(losses))
    first, last = np.mean(losses[:8]), np.mean(losses[-8:])
    # ε is unpredictable early (its L1 floor is ~0.8), so the fall comes from the residual term.
    assert last < 0.9 * first and last < losses[0] - 0.2, f"loss did not fall: {first:.3f} -> {last:.3f}"

    # The EMA file is what the exporter takes: load_checkpoint reads it as is, and it samples like the trainer's EMA.
    loaded = load_checkpoint(tmp_path / "run" / "ema.safetensors")
    assert loaded.unet == cfg.unet_config() and loaded.diffusion == cfg.diffusion_config()
    assert loaded.info == {"weights": "ema", "step": 40}
    for k, v in tr.ema.model.state_dict().items():
        assert torch.equal(loaded.net.state_dict()[k], v), k
    x = np.random.default_rng(0).uniform(0, 1, (1, 3, 16, 16)).astype(np.float32)
    a = TorchRDDM(loaded.net, loaded.diffusion).restore(x, 5, seed=3)
    b = TorchRDDM(tr.ema.model, tr.diffusion).restore(x, 5, seed=3)
    assert np.array_equal(a, b)
    online = load_checkpoint(tmp_path / "run" / "model.safetensors")
    assert online.info["weights"] == "online"
    assert any(not torch.equal(online.net.state_dict()[k], v) for k, v in tr.ema.model.state_dict().items())


def _state(out):
    return torch.load(out / "state.pt", weights_only=True)


def _assert_same_tensors(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.slow  # over 2 s on 2 cores
def test_interrupted_run_resumed_matches_an_uninterrupted_one_bit_for_bit(tmp_path, photos):
    extra = ["optim.grad_accum=2", "run.checkpoint_every=3", "optim.lr=1e-3"]
    whole = Trainer(tiny_config(tmp_path / "whole", photos, *extra, "run.steps=8"))
    whole.fit()
    first = Trainer(tiny_config(tmp_path / "split", photos, *extra, "run.steps=5"))
    first.fit()  # checkpoints at 3 and at the end (5)
    assert _state(tmp_path / "split")["step"] == 5
    second = Trainer(tiny_config(tmp_path / "split", photos, *extra, "run.steps=8"))
    result = second.fit(resume=True)
    assert result["start_step"] == 5 and result["end_step"] == 8
    a, b = _state(tmp_path / "whole"), _state(tmp_path / "split")
    for key in ("step", "model", "ema", "optimizer", "rng"):
        _assert_same_tensors(a[key], b[key], key)
    assert _losses(tmp_path / "whole") == _losses(tmp_path / "split")


def test_wall_clock_budget_saves_a_checkpoint_and_resume_picks_it_up(tmp_path, photos):
    out = tmp_path / "run"
    result = Trainer(tiny_config(out, photos, "run.steps=50", "run.max_minutes=1e-9", f"val.clean='{photos}'")).fit()
    assert result["stopped"] == "time budget" and result["end_step"] == 1
    assert result["val"]["step"] == 1 and (out / "val" / "step_0000001.png").is_file()  # a final score to report
    assert _state(out)["step"] == 1 and load_checkpoint(out / "ema.safetensors").info["step"] == 1
    result = Trainer(tiny_config(out, photos, "run.steps=3")).fit(resume=True)
    assert (result["start_step"], result["end_step"]) == (1, 3)


def test_corrupt_or_mismatched_checkpoints_are_refused_clearly(tmp_path, photos):
    out = tmp_path / "run"
    Trainer(tiny_config(out, photos, "run.steps=1")).fit()
    good = (out / "state.pt").read_bytes()

    with pytest.raises(RDDMError, match="already holds a run"):
        Trainer(tiny_config(out, photos, "run.steps=2")).fit()
    with pytest.raises(CheckpointError, match=r"does not match the config \(unet.dim: checkpoint 8, config 16"):
        Trainer(tiny_config(out, photos, "model.dim=16", "run.steps=2")).fit(resume=True)
    with pytest.raises(CheckpointError, match="does not match the config.*objective"):
        Trainer(tiny_config(out, photos, "diffusion.objective='pred_x0_noise'", "run.steps=2")).fit(resume=True)

    # A different batch size or seed is allowed (only the data stream changes), and said so.
    lines = []
    tr = Trainer(tiny_config(out, photos, "run.batch_size=2", "run.steps=2"))
    assert tr.fit(resume=True, log=lines.append)["end_step"] == 2
    assert tr.resume_notes == ["batch_size 4 -> 2"] and "changed data stream (batch_size 4 -> 2)" in lines[0]
    (out / "state.pt").write_bytes(good)

    (out / "state.pt").write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match=r"state.pt: not a readable training state"):
        Trainer(tiny_config(out, photos, "run.steps=2")).fit(resume=True)
    (out / "state.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match=r"state.pt: not a readable training state"):
        Trainer(tiny_config(out, photos, "run.steps=2")).fit(resume=True)
    torch.save({"format": "something-else/1", "step": 3}, out / "state.pt")
    with pytest.raises(CheckpointError, match="not an rddm-train state"):
        Trainer(tiny_config(out, photos, "run.steps=2")).fit(resume=True)
    (out / "state.pt").unlink()
    with pytest.raises(CheckpointError, match="no checkpoint to resume from"):
        Trainer(tiny_config(out, photos, "run.steps=2")).fit(resume=True)


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, photos):
    out = tmp_path / "run"
    Trainer(tiny_config(out, photos, "run.steps=2")).fit()
    good = (out / "state.pt").read_bytes()
    ema = (out / "ema.safetensors").read_bytes()
    wild = tiny_config(out, photos, "run.steps=20", "run.checkpoint_every=5", "optim.lr=1e10", "optim.grad_clip=0.0")
    with pytest.raises(TrainingDiverged, match=r"loss became nan by step [34]; .*last good checkpoint \(step 2\)"):
        Trainer(wild).fit(resume=True)
    assert (out / "state.pt").read_bytes() == good and (out / "ema.safetensors").read_bytes() == ema
    # Checkpointing every step: the step whose update blew the weights up is caught before it is written.
    with pytest.raises(TrainingDiverged, match=r"by step [34]; training stopped and the last good checkpoint"):
        Trainer(tiny_config(out, photos, "run.steps=20", "run.checkpoint_every=1", "optim.lr=1e30",
                            "optim.grad_clip=0.0")).fit(resume=True)
    assert all(torch.isfinite(v).all() for v in _state(out)["model"].values())


def test_cuda_graph_without_a_gpu_is_a_clear_error(tmp_path, photos):
    with pytest.raises(RDDMError, match="run.cuda_graph needs a CUDA device, not cpu"):
        Trainer(tiny_config(tmp_path / "run", photos, "run.cuda_graph=true"))


def test_cosine_schedule_and_fine_tuning_from_a_checkpoint(tmp_path, photos):
    base = tiny_config(tmp_path / "a", photos, "run.steps=4")
    Trainer(base).fit()
    cfg = tiny_config(tmp_path / "b", photos, "run.steps=100", "optim.lr=1e-3", "optim.lr_schedule='cosine'",
                      "optim.min_lr_ratio=0.1", f"run.init='{tmp_path / 'a' / 'ema.safetensors'}'")
    tr = Trainer(cfg)
    assert tr.lr_at(0) == pytest.approx(1e-3) and tr.lr_at(50) == pytest.approx(0.55e-3)
    assert tr.lr_at(100) == pytest.approx(1e-4) and tr.lr_at(500) == pytest.approx(1e-4)
    start = load_checkpoint(tmp_path / "a" / "ema.safetensors").net.state_dict()
    for k, v in tr.net.state_dict().items():  # online and EMA weights both start from the checkpoint
        assert torch.equal(v, start[k]) and torch.equal(tr.ema.model.state_dict()[k], start[k]), k
    other = tiny_config(tmp_path / "c", photos, "model.dim=16", f"run.init='{tmp_path / 'a' / 'ema.safetensors'}'")
    with pytest.raises(CheckpointError, match="architecture"):
        Trainer(other)


def test_t_grid_trains_only_on_the_sampling_steps(tmp_path, photos):
    uniform = Trainer(tiny_config(tmp_path / "u", photos)).sample_t(4000)
    assert uniform.min() >= 0 and uniform.max() <= 999 and len(uniform.unique()) > 900
    grid = Trainer(tiny_config(tmp_path / "g", photos, "optim.t_grid=5")).sample_t(4000)
    assert sorted(grid.unique().tolist()) == [199, 399, 599, 799, 999]  # the 5-step sampler's own indices
    with pytest.raises(RDDMError, match="optim.t_grid"):
        Trainer(tiny_config(tmp_path / "bad", photos, "optim.t_grid=1001"))


def test_rollout_trains_on_the_states_the_sampler_itself_reaches(tmp_path, photos):
    from rddm_infer.diffusion.sampler import sample
    from rddm_infer.diffusion.schedule import SamplingPlan

    tr = Trainer(tiny_config(tmp_path / "r", photos, "optim.t_grid=4", "optim.rollout=true", "run.steps=3"))
    tr.fit()  # a few optimizer steps through rollouts
    x_in = torch.rand(2, 3, 32, 32) * 2 - 1
    plan = SamplingPlan.create(tr.diffusion, 4)
    for k in range(4):
        tr.gen.manual_seed(11)
        x_t, t = tr.rollout(x_in, k)
        assert t.tolist() == [plan.times[k]] * 2
        seen = []  # the inference loop, on the same network and initial noise, recording each step's x_t
        model = TorchRDDM(tr.net, tr.diffusion).model_fn

        def spy(xt, xi, step_t):
            seen.append(xt.clone())
            return model(xt, xi, step_t)

        noise = torch.randn(x_in.shape, generator=torch.Generator().manual_seed(11))
        sample(spy, plan, x_in, x_in + plan.init_scale() * noise)
        assert torch.allclose(x_t, seen[k], atol=1e-5), k
    with pytest.raises(RDDMError, match="optim.rollout needs optim.t_grid"):
        Trainer(tiny_config(tmp_path / "bad", photos, "optim.rollout=true"))


@pytest.mark.slow  # over 2 s on 2 cores
def test_best_validation_weights_are_kept_and_a_resume_only_replaces_them_with_better(tmp_path, photos):
    out = tmp_path / "run"
    extra = [f"val.clean='{photos}'", "val.every=1", "val.steps=1", "run.checkpoint_every=2", "optim.lr=2e-3",
             "data.degradations=[{name = 'gaussian', sigma = [10, 40]}]"]

    def rows():
        return [json.loads(line) for line in (out / "val_log.jsonl").read_text().splitlines()]

    def best():
        return json.loads((out / "best_ema.json").read_text())

    Trainer(tiny_config(out, photos, *extra, "run.steps=4")).fit()
    top = max(rows(), key=lambda r: r["psnr"])
    assert (best()["step"], best()["val_psnr"]) == (top["step"], top["psnr"])
    assert load_checkpoint(out / "best_ema.safetensors").info["weights"] == "ema"
    if top["step"] == 4:  # the best is the last: then it is exactly the final EMA
        a, b = load_checkpoint(out / "best_ema.safetensors").net, load_checkpoint(out / "ema.safetensors").net
        assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())

    # Resumed: the file is the record, so a worse score later never replaces it.
    (out / "best_ema.json").write_text(json.dumps({**best(), "val_psnr": 99.0}))
    Trainer(tiny_config(out, photos, *extra, "run.steps=6")).fit(resume=True)
    assert [r["step"] for r in rows()] == [1, 2, 3, 4, 5, 6] and best()["val_psnr"] == 99.0
    (out / "best_ema.json").unlink()
    Trainer(tiny_config(out, photos, *extra, "run.steps=7")).fit(resume=True)
    assert best()["step"] == 7  # no record left: the next validation is the best so far


def test_validation_restores_as_pixel_shuffle_restore_does(tmp_path, photos):
    """val.pixel_shuffle = 2 scores the sub-images restored apart (what `restore --pixel-shuffle 2` will do)."""
    from rddm_infer.restore.tiling import shuffle_merge, shuffle_split
    from rddm_train.validation import scores

    extra = [f"val.clean='{photos}'", "val.steps=1", "val.crop=32", "run.steps=1"]
    plain = Trainer(tiny_config(tmp_path / "a", photos, *extra))
    split = Trainer(tiny_config(tmp_path / "b", photos, *extra, "val.pixel_shuffle=2"))
    val = plain.validation_data()
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    a, b = plain.validate(val), split.validate(val)
    assert a["psnr_input"] == b["psnr_input"] and a["psnr"] != b["psnr"]
    inp, gt, _ = val
    sampler = TorchRDDM(split.ema.model, split.diffusion)
    x = np.concatenate(shuffle_split(inp, 2))  # 2 images -> 8 sub-images of 16², restored 4 per batch (batch_size)
    assert x.shape == (8, 3, 16, 16)
    restored = np.concatenate([sampler.restore(x[i:i + 4], 1, seed=1234) for i in (0, 4)])
    assert b["psnr"] == pytest.approx(scores(shuffle_merge(np.split(restored, 4), 2), gt)[0], abs=1e-4)
    with pytest.raises(RDDMError, match="val.crop must be a multiple of 4"):
        tiny_config(tmp_path / "c", photos, *extra, "val.crop=30", "val.pixel_shuffle=2")
    with pytest.raises(RDDMError, match="val.pixel_shuffle must be 1 \\(off\\) to 4"):  # an error, not a crash
        tiny_config(tmp_path / "c", photos, *extra, "val.pixel_shuffle=0")
