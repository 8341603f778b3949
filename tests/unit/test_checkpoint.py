"""Checkpoints: the reference trainer's model-N.pt layout, our safetensors, and refusal of bad files."""

import os
import pickle

import numpy as np
import pytest
import torch

from helpers.models import tiny_loaded_model
from rddm_infer.errors import CheckpointError
from rddm_infer.model import TorchRDDM, load_checkpoint, save_checkpoint
from rddm_infer.model.checkpoint import TIME_INPUT_NOTE
from rddm_infer.diffusion.schedule import Schedule


def reference_buffers(sum_scale=0.01, T=1000):
    """The schedule buffers ResidualDiffusion registers (float32), as its state_dict holds them."""
    s = Schedule.from_config(__import__("rddm_infer").DiffusionConfig(timesteps=T, sum_scale=sum_scale))
    return {"alphas": s.alphas, "alphas_cumsum": s.alphas_cumsum, "one_minus_alphas_cumsum": s.one_minus_alphas_cumsum,
            "betas2": s.betas2, "betas": np.sqrt(s.betas2), "betas2_cumsum": s.betas2_cumsum,
            "betas_cumsum": s.betas_cumsum}


def save_reference_checkpoint(path, online, ema, step=1234, sum_scale=0.01):
    """Write a file the way the reference Trainer.save does (ema-pytorch 0.0.10 layout)."""
    bufs = {k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in reference_buffers(sum_scale).items()}
    model_sd = {**{f"model.{k}": v for k, v in online.state_dict().items()}, **bufs}
    ema_model_sd = {**{f"model.{k}": v for k, v in ema.state_dict().items()}, **bufs}
    ema_sd = {"initted": torch.tensor([True]), "step": torch.tensor([step]),
              **{f"online_model.{k}": v for k, v in model_sd.items()},
              **{f"ema_model.{k}": v for k, v in ema_model_sd.items()}}
    opt = torch.optim.Adam(online.parameters(), lr=8e-5, betas=(0.9, 0.99))
    torch.save({"step": step, "model": model_sd, "opt": opt.state_dict(), "ema": ema_sd, "scaler": None}, path)


@pytest.mark.parametrize("share", [0, 1, -1])
@pytest.mark.slow  # over 2 s on 2 cores
def test_reference_checkpoint_round_trip_loads_ema_and_samples(tmp_path, share, rng):
    objective = "pred_res" if share == -1 else "pred_res_noise"
    online = tiny_loaded_model(share, objective, seed=1).net
    ema = tiny_loaded_model(share, objective, seed=2).net
    path = tmp_path / "model-7.pt"
    save_reference_checkpoint(path, online, ema)
    m = load_checkpoint(path, objective=objective)
    assert m.info == {"weights": "ema", "step": 1234, "time_input": TIME_INPUT_NOTE}  # the unknowable, stated
    assert m.diffusion.timesteps == 1000 and m.diffusion.sum_scale == pytest.approx(0.01)
    assert m.unet.share_encoder == share and m.unet.dim == 8 and m.unet.dim_mults == (1, 2)
    for k, v in ema.state_dict().items():
        assert torch.equal(m.net.state_dict()[k], v), k
    x = rng.uniform(0, 1, (1, 3, 16, 16)).astype(np.float32)
    out = TorchRDDM(m.net, m.diffusion).restore(x, steps=5, seed=0)
    ref = TorchRDDM(ema, m.diffusion).restore(x, steps=5, seed=0)
    assert np.array_equal(out, ref)
    online_m = load_checkpoint(path, objective=objective, use_ema=False)
    assert online_m.info["weights"] == "online"
    k = next(iter(online.state_dict()))
    assert torch.equal(online_m.net.state_dict()[k], online.state_dict()[k])


def test_reference_sum_scale_comes_from_buffers_and_conflicts_are_refused(tmp_path):
    net = tiny_loaded_model().net
    path = tmp_path / "model-1.pt"
    save_reference_checkpoint(path, net, net, sum_scale=1.0)
    assert load_checkpoint(path).diffusion.sum_scale == pytest.approx(1.0)
    with pytest.raises(CheckpointError, match="sum-scale 0.01 contradicts"):
        load_checkpoint(path, sum_scale=0.01)


def test_objective_must_fit_the_number_of_outputs(tmp_path):
    path = tmp_path / "model-1.pt"
    net = tiny_loaded_model(share_encoder=-1, objective="pred_res").net
    save_reference_checkpoint(path, net, net)
    with pytest.raises(CheckpointError, match="needs 2 network output"):
        load_checkpoint(path)  # default objective pred_res_noise needs two outputs


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['RDDM_PWNED']}",))


def test_malicious_pickle_is_refused_without_running_it(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("RDDM_PWNED", str(marker))
    path = tmp_path / "model-666.pt"
    with open(path, "wb") as f:
        pickle.dump({"model": _Payload()}, f)
    torch.save({"model": {"x": torch.zeros(1)}, "evil": _Payload()}, tmp_path / "zip.pt")
    for p in (path, tmp_path / "zip.pt"):
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(p)
        assert str(p) in str(e.value) and "\n" not in str(e.value)
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"\x00garbage" * 10, b"PK\x03\x04truncated zip"])
def test_corrupt_files_are_refused_clearly(tmp_path, content):
    for name in ("model-1.pt", "bad.safetensors"):
        p = tmp_path / name
        p.write_bytes(content)
        with pytest.raises(CheckpointError, match=name):
            load_checkpoint(p)
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(tmp_path / "missing.pt")


def test_safetensors_round_trip_is_self_describing(tmp_path, rng):
    m = tiny_loaded_model(share_encoder=0, objective="pred_x0_noise", sum_scale=0.05)
    path = save_checkpoint(tmp_path / "ckpt" / "ema.safetensors", m.net, m.unet, m.diffusion, weights="ema", step=9)
    assert path.with_suffix(".json").is_file()
    path.with_suffix(".json").unlink()  # the metadata inside the file is enough
    back = load_checkpoint(path)
    assert back.unet == m.unet and back.diffusion == m.diffusion and back.info == {"weights": "ema", "step": 9}
    x = rng.uniform(0, 1, (1, 3, 16, 16)).astype(np.float32)
    assert np.array_equal(TorchRDDM(back.net, back.diffusion).restore(x), TorchRDDM(m.net, m.diffusion).restore(x))
    assert not list((tmp_path / "ckpt").glob(".*tmp*"))


def test_mismatched_weights_are_refused(tmp_path):
    a = tiny_loaded_model(share_encoder=0)
    path = save_checkpoint(tmp_path / "a.safetensors", a.net, a.unet, a.diffusion)
    # Same file, but settings claiming another architecture.
    from safetensors.torch import load_file, save_file
    import json

    meta = {"format": "rddm-infer/1", "unet": {**a.unet.to_dict(), "dim": 16}, "diffusion": a.diffusion.to_dict()}
    save_file(load_file(str(path)), str(tmp_path / "b.safetensors"), metadata={"rddm": json.dumps(meta)})
    with pytest.raises(CheckpointError, match="do not fit"):
        load_checkpoint(tmp_path / "b.safetensors")
