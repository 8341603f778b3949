"""Loading and saving RDDM checkpoints: ours (safetensors) and the reference's ``model-N.pt``.

Reference checkpoints are read with ``torch.load(weights_only=True)``: a file that
needs arbitrary pickle code is refused, never executed. The architecture is inferred
from tensor names and shapes; diffusion settings the file does not hold come from
options (the reference's restoration defaults otherwise).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from ..io.atomic import write_bytes_atomic
from ..errors import CheckpointError
from ..diffusion.schedule import TABLES, DiffusionConfig, Schedule
from .unet import UNetConfig, UnetRes

FORMAT = "rddm-infer/1"
META_KEY = "rddm"
_BUFFERS = ("alphas", "alphas_cumsum", "one_minus_alphas_cumsum", "betas2", "betas", "betas2_cumsum",
            "betas_cumsum", "posterior_mean_coef1", "posterior_mean_coef2", "posterior_mean_coef3",
            "posterior_variance", "posterior_log_variance_clipped",
            "alpha_res")  # experiment 3's learned auto_res_noise switch (a parameter, not a buffer)


# The official experiments 2, 3 and 6 feed the UNet the step index t; 0, 4, 5 and the root src/ feed it
# ᾱ_t·T / β̄_t·T, and nothing in their checkpoints tells the two apart (docs/OFFICIAL_VARIANTS.md): the
# option time_input decides, and every description of a reference checkpoint states the choice.
TIME_INPUT_NOTES = {
    "index": "step index t (time_input index, as the official experiments 2, 3 and 6; experiments 0, 4, 5 "
             "and the root src/ feed ᾱ_t·T / β̄_t·T: pass time_input scaled)",
    "scaled": "ᾱ_t·T to the residual UNet, β̄_t·T to the noise UNet (time_input scaled, as the official "
              "experiments 0, 4, 5 and the root src/; experiments 2, 3 and 6 feed the index t)",
}


def time_input_note(time_input: str) -> str:
    """The stated line: which time input a reference checkpoint is sampled with, and why it is a choice."""
    return "UNet time input = " + TIME_INPUT_NOTES[time_input]


TIME_INPUT_NOTE = time_input_note("index")  # the default


@dataclass
class LoadedModel:
    """A network ready for inference plus everything needed to sample from it."""

    net: UnetRes
    unet: UNetConfig
    diffusion: DiffusionConfig
    source: str
    info: dict = field(default_factory=dict)  # e.g. {"weights": "ema", "step": 80000}

    def metadata(self) -> dict:
        return {"format": FORMAT, "unet": self.unet.to_dict(), "diffusion": self.diffusion.to_dict(), **self.info}


def infer_unet_config(sd: dict[str, torch.Tensor]) -> UNetConfig:
    """Recover the reference ``UnetRes`` hyper-parameters from a state_dict's names and shapes."""
    if "unet1.init_conv.weight" in sd:
        share, p = 0, "unet0."
    elif "unet0.init_conv.weight" in sd:
        share, p = -1, "unet0."
    elif "init_conv.weight" in sd and "ups_no_skip.0.0.mlp.1.weight" in sd:
        share, p = 1, ""
    else:
        raise CheckpointError("no RDDM UNet found (expected keys like 'unet0.init_conv.weight')")
    try:
        init_w = sd[p + "init_conv.weight"]
        dim = sd[p + "time_mlp.1.weight"].shape[1]
        out_w = sd[p + ("final_conv_1.weight" if share == 1 else "final_conv.weight")]
        levels = sorted({int(m.group(1)) for k in sd if (m := re.match(re.escape(p) + r"downs\.(\d+)\.", k))})
        mults = tuple(sd[f"{p}downs.{i}.3.weight"].shape[0] // dim for i in levels)
        hidden = sd[f"{p}mid_attn.fn.fn.to_qkv.weight"].shape[0] // 3
    except KeyError as e:
        raise CheckpointError(f"incomplete RDDM UNet: missing tensor {e.args[0]!r}") from None
    channels = out_w.shape[0]
    ratio = init_w.shape[1] // channels
    if ratio not in (1, 2, 3) or init_w.shape[1] % channels:
        raise CheckpointError(f"unsupported input channels {init_w.shape[1]} for {channels} output channels")
    return UNetConfig(dim=dim, dim_mults=mults, channels=channels, share_encoder=share, condition=ratio >= 2,
                      input_condition=ratio == 3, init_dim=None if init_w.shape[0] == dim else init_w.shape[0],
                      heads=max(hidden // 32, 1), dim_head=hidden // max(hidden // 32, 1))


def _strip(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _unwrap_reference(obj, use_ema: bool) -> tuple[dict, dict]:
    """Reference trainer dict / EMA dict / plain state_dict -> (network state_dict, info)."""
    info: dict = {}
    if not isinstance(obj, dict):
        raise CheckpointError(f"expected a dict of tensors, found {type(obj).__name__}")
    if "model" in obj or "ema" in obj:
        info["step"] = int(obj["step"]) if isinstance(obj.get("step"), (int, torch.Tensor)) else None
        if use_ema and isinstance(obj.get("ema"), dict):
            sd, info["weights"] = _strip(obj["ema"], "ema_model."), "ema"
        elif isinstance(obj.get("model"), dict):
            sd, info["weights"] = obj["model"], "online"
        else:
            raise CheckpointError("checkpoint has neither usable 'ema' nor 'model' weights")
    elif any(k.startswith("ema_model.") for k in obj):
        sd, info["weights"] = _strip(obj, "ema_model." if use_ema else "online_model."), "ema" if use_ema else "online"
    else:
        sd, info["weights"] = obj, "state_dict"
    sd = {k.removeprefix("module."): v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if any(k.startswith("model.") for k in sd):  # ResidualDiffusion wraps the UNet as .model
        buffers = {k: v for k, v in sd.items() if k in _BUFFERS}
        sd = {**_strip(sd, "model."), **buffers}
    return sd, info


def _table(sd: dict, name: str):
    return sd[name].detach().double().flatten().numpy() if name in sd else None


def _schedule_from_buffers(sd: dict, path) -> dict:
    """What the registered buffers imply: T, sum_scale (gen_coefficients form only) and the tables.

    A schedule equal (to float32 rounding) to the named default is kept by name; any other
    (ratio / normal / average variants, DDIM-converted betas) is carried as explicit tables.
    """
    ac, b2c, b2 = _table(sd, "alphas_cumsum"), _table(sd, "betas2_cumsum"), _table(sd, "betas2")
    implied: dict = {}
    if "alphas" in sd:
        implied["timesteps"] = int(sd["alphas"].numel())
    if ac is None or b2c is None:  # an older/partial layout: only T and sum_scale can be read
        if b2 is not None:
            implied["sum_scale"] = float(f"{float(b2.sum()):.6g}")
        return implied
    T = len(ac)
    if len(b2c) != T or implied.get("timesteps", T) != T:
        raise CheckpointError(f"{path}: schedule buffers disagree on the number of timesteps")
    implied["timesteps"] = T
    bc, om = _table(sd, "betas_cumsum"), _table(sd, "one_minus_alphas_cumsum")
    if bc is not None and np.max(np.abs(bc - np.sqrt(b2c))) > 1e-5:
        raise CheckpointError(f"{path}: buffers betas_cumsum and betas2_cumsum disagree (betas_cumsum != sqrt)")
    if om is not None and T > 1 and np.max(np.abs(om[:-1] - (1 - ac[:-1]))) > 1e-5:
        raise CheckpointError(f"{path}: buffers one_minus_alphas_cumsum and alphas_cumsum disagree")
    # gen_coefficients form: β̄² is the clipped cumulative sum of betas2, which sums to sum_scale.
    # (DDIM-converted betas are not: there betas2[0] = 0 while β̄²_0 > 0, and sum_scale is not stored.)
    if b2 is not None and np.max(np.abs(np.clip(np.cumsum(b2), 0, 1) - b2c)) <= 1e-5:
        implied["sum_scale"] = float(f"{float(b2.sum()):.6g}")
    named = Schedule.from_config(DiffusionConfig(timesteps=T, sum_scale=implied.get("sum_scale", 1.0)))
    same = lambda ours, theirs: np.max(np.abs(ours.astype(np.float32) - theirs)) <= 1e-7  # noqa: E731
    if not ("sum_scale" in implied and same(named.alphas_cumsum, ac) and same(named.betas2_cumsum, b2c)):
        implied.update(alphas_cumsum=tuple(ac.tolist()), betas2_cumsum=tuple(b2c.tolist()))
        if bc is not None:
            implied["betas_cumsum"] = tuple(bc.tolist())
        if om is not None:
            implied["one_minus_alphas_cumsum"] = tuple(om.tolist())
    return implied


def _resolve_objective(sd: dict, given: str | None, path) -> str | None:
    """``auto_res_noise`` (experiment 3) samples as pred_res when its learned alpha_res > 0.5, else pred_noise."""
    if "alpha_res" in sd:
        a = float(sd["alpha_res"].flatten()[0])
        resolved = "pred_res" if a > 0.5 else "pred_noise"
        if given not in (None, "auto_res_noise", resolved):
            raise CheckpointError(f"{path}: --objective {given} contradicts the checkpoint (objective auto_res_noise "
                                  f"with alpha_res={a:.4g}, which samples as {resolved})")
        return resolved
    if given == "auto_res_noise":
        raise CheckpointError(f"{path}: objective auto_res_noise needs the checkpoint's alpha_res parameter, "
                              "which this file does not hold")
    return given


def _diffusion_from_buffers(sd: dict, given: dict, condition: bool, path="checkpoint") -> DiffusionConfig:
    implied = _schedule_from_buffers(sd, path)
    for k in ("timesteps", "sum_scale"):
        v = implied.get(k)
        if v is not None and given.get(k) is not None and abs(float(given[k]) - v) > 1e-6 * max(1.0, abs(v)):
            raise CheckpointError(f"{path}: --{k.replace('_', '-')} {given[k]} contradicts the checkpoint's "
                                  f"schedule ({v})")
    # What the file cannot tell, the options decide; then the reference's defaults
    # (sum_scale 0.01 for restoration, 1 for generation; objective pred_res_noise).
    defaults = {"timesteps": 1000, "sum_scale": 0.01 if condition else 1.0, "objective": "pred_res_noise",
                "time_input": "index", "two_pass": False}
    merged = {k: (given.get(k) if given.get(k) is not None else implied.get(k, defaults[k])) for k in defaults}
    merged["objective"] = _resolve_objective(sd, given.get("objective"), path) or merged["objective"]
    tables = {k: implied[k] for k in TABLES if k in implied}
    return _config(path, **merged, condition=condition, **tables)


def _config(path, **fields) -> DiffusionConfig:
    try:
        return DiffusionConfig(**fields)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None


TEST_MODES = ("res_noise", "res", "noise", "x0_noise", "x0")  # the reference's test_res_or_noise


def _test_mode(objective: str | None, mode: str | None, path) -> tuple[str | None, bool]:
    """The official ``test_res_or_noise`` (experiments 0, 3-6) -> (objective to sample with, whether the
    second UNet alone is read). "res": unet0's residual (pred_res); "noise": unet1's noise (the pred_noise
    formula on output 1); "res_noise" / "x0_noise": both outputs, as the objective reads them."""
    if mode is None:
        return objective, False
    if mode not in TEST_MODES:
        raise CheckpointError(f"{path}: unknown test_res_or_noise {mode!r}; expected one of {', '.join(TEST_MODES)}")
    trained = {"res_noise": ("pred_res_noise",), "x0_noise": ("pred_x0_noise",), "res": ("pred_res_noise", "pred_res"),
               "noise": ("pred_res_noise", "pred_x0_noise", "pred_noise")}.get(mode, ())
    if mode == "x0":
        raise CheckpointError(f"{path}: test_res_or_noise x0 is not supported (its x₀ is the clamped network output, "
                              "no objective here samples that way); use x0_noise")
    if objective is not None and objective not in trained:
        raise CheckpointError(f"{path}: test_res_or_noise {mode} does not apply to objective {objective} "
                              f"(it reads a model trained as {' / '.join(trained)})")
    return {"res": "pred_res", "noise": "pred_noise"}.get(mode, objective or trained[0]), mode == "noise"


def _second_unet(sd: dict, unet: UNetConfig, path) -> tuple[dict, UNetConfig, dict]:
    """unet1 alone, as a one-UNet model (test_res_or_noise "noise")."""
    if unet.share_encoder != 0:
        raise CheckpointError(f"{path}: test_res_or_noise noise reads the second of two UNets (num_unet 2); this "
                              f"network has share_encoder {unet.share_encoder}")
    sd = {"unet0." + k[len("unet1."):]: v for k, v in sd.items() if k.startswith("unet1.")}
    return sd, replace(unet, share_encoder=-1), {"unused_weights": "unet0"}


def _fit_outputs(sd: dict, unet: UNetConfig, diffusion: DiffusionConfig, path) -> tuple[dict, UNetConfig, dict]:
    """Match the network to what the objective reads; returns (state_dict, config, info)."""
    needs = diffusion.num_outputs
    if needs > unet.num_outputs:
        raise CheckpointError(f"{path}: objective {diffusion.objective} needs {needs} network outputs, "
                              f"the checkpoint has {unet.num_outputs}; pass --objective")
    if needs == 1 and unet.share_encoder == 0:
        # Two UNets but an objective that reads the first output only (the reference ignores
        # the second network): load unet0 alone, as a one-UNet model.
        sd = {k: v for k, v in sd.items() if not k.startswith("unet1.")}
        return sd, replace(unet, share_encoder=-1), {"unused_weights": "unet1"}
    return sd, unet, {}


def _check_time_input(unet: UNetConfig, diffusion: DiffusionConfig, path) -> None:
    if diffusion.time_input == "scaled" and unet.share_encoder == 1:
        raise CheckpointError(f"{path}: time_input scaled does not apply to a shared-encoder network "
                              "(share_encoder 1): the official modules that feed ᾱ_t·T / β̄_t·T build one or two "
                              "separate UNets (num_unet 1 / 2)")


def _translation(unet: UNetConfig, translation: bool | None, path) -> bool:
    """Sampled towards x_input (restoration form): a network that sees x_input, or an x_t-only one
    the user names an img2img translation network (reference img_to_img_translation, experiments 4, 5)."""
    if translation and unet.condition:
        raise CheckpointError(f"{path}: translation does not apply: this network takes x_input as an input "
                              "channel (an img2img translation network sees x_t only)")
    return unet.condition or bool(translation)


def load_checkpoint(path: str | os.PathLike, *, objective: str | None = None, sum_scale: float | None = None,
                    timesteps: int | None = None, time_input: str | None = None, translation: bool | None = None,
                    test_res_or_noise: str | None = None, two_pass: bool | None = None, use_ema: bool = True,
                    device: str = "cpu") -> LoadedModel:
    """Load our ``.safetensors`` or a reference ``model-N.pt`` into a ready (eval-mode) network.

    ``time_input`` ("index" | "scaled"), ``translation`` (an x_t-only network sampled towards the input
    image), ``test_res_or_noise`` (which UNet(s) to read) and ``two_pass`` (experiment 0's sampler) are
    what a reference file cannot tell (docs/OFFICIAL_VARIANTS.md)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    objective, second_unet = _test_mode(objective, test_res_or_noise, path)
    given = {"objective": objective, "sum_scale": sum_scale, "timesteps": timesteps, "time_input": time_input,
             "two_pass": two_pass}
    if path.suffix == ".safetensors" and test_res_or_noise is not None:
        raise CheckpointError(f"{path}: test_res_or_noise applies to official model-N.pt checkpoints only")
    if path.suffix == ".safetensors":
        sd, meta = _read_safetensors(path)
        unet = UNetConfig.from_dict(meta["unet"])
        for name, default in (("time_input", "index"), ("two_pass", False)):  # how the network was trained
            stored = meta["diffusion"].get(name, default)
            if given[name] is not None and given[name] != stored:
                raise CheckpointError(f"{path}: --{name.replace('_', '-')} {given[name]} contradicts the checkpoint "
                                      f"({name} {stored})")
        dmeta = {**meta["diffusion"], **{k: v for k, v in given.items() if v is not None}}
        if translation is not None and _translation(unet, translation, path) != dmeta.get("condition", True):
            raise CheckpointError(f"{path}: --translation contradicts the checkpoint (condition "
                                  f"{dmeta.get('condition')})")
        diffusion = _config(path, **{k: v for k, v in dmeta.items() if k in DiffusionConfig.__dataclass_fields__})
        info = {k: meta[k] for k in ("weights", "step") if k in meta}
        rec = meta.get("recommended_steps")
        if rec is not None and not (isinstance(rec, int) and not isinstance(rec, bool) and rec >= 1):
            raise CheckpointError(f"{path}: recommended_steps must be a positive integer, got {rec!r}")
        info["recommended_steps"] = rec  # measured on this network; export and the torch backend keep it
        mode = meta.get("correlated_noise_mode")
        if mode is not None and not isinstance(mode, str):
            raise CheckpointError(f"{path}: correlated_noise_mode must be a mode's name, got {mode!r}")
        info["correlated_noise_mode"] = mode  # measured on this network, kept like recommended_steps
    else:
        obj = _torch_load(path)
        sd, info = _unwrap_reference(obj, use_ema)
        unet = infer_unet_config(sd)
        diffusion = _diffusion_from_buffers(sd, given, _translation(unet, translation, path), path)
        sd = {k: v for k, v in sd.items() if k not in _BUFFERS}
        # the file cannot say; stated wherever the model is described
        info["time_input"] = time_input_note(diffusion.time_input)
    _check_float(sd, path)
    sd, unet, unused = _second_unet(sd, unet, path) if second_unet else _fit_outputs(sd, unet, diffusion, path)
    _check_time_input(unet, diffusion, path)
    info.update(unused)
    net = UnetRes(unet)
    try:
        net.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise CheckpointError(f"{path}: weights do not fit the inferred architecture ({first[0][:200]})") from None
    return LoadedModel(net.eval().to(device), unet, diffusion, str(path), {k: v for k, v in info.items() if v is not None})


def _check_float(sd: dict, path) -> None:
    """Refuse integer / bool / complex weights: casting them to float32 would load a truncated (often all-zero,
    identity-restoring) network that every later check agrees with."""
    for name, v in sd.items():
        if not v.is_floating_point():
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {str(v.dtype).removeprefix('torch.')}; "
                                  "RDDM weights must be floating point (float32 / float16 / bfloat16 / float64)")


def _torch_load(path: Path):
    with open(path, "rb") as f:
        head = f.read(4)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # torch's zip format, or a legacy pickle
        raise CheckpointError(f"{path}: not a torch checkpoint (" + ("empty file)" if not head else
                              "neither a zip archive nor a pickle)"))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for unsafe pickles, RuntimeError/EOFError for corrupt files
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise CheckpointError(f"{path}: refused, the file needs arbitrary code to unpickle "
                                  f"(only plain tensors are loaded): {msg[:160]}") from None
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {msg[:160]})") from None


def _read_safetensors(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0][:160]})") from None
    if raw is None:
        side = path.with_suffix(".json")
        if not side.is_file():
            raise CheckpointError(f"{path}: no RDDM settings (neither '{META_KEY}' metadata nor {side.name})")
        raw = side.read_text()
    try:
        meta = json.loads(raw)
        meta["unet"], meta["diffusion"]
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"{path}: RDDM settings are not valid JSON with 'unet' and 'diffusion'") from None
    return sd, meta


def save_checkpoint(path: str | os.PathLike, net: torch.nn.Module, unet: UNetConfig, diffusion: DiffusionConfig,
                    **info) -> Path:
    """Write weights + settings as one self-describing safetensors file (atomically), and a JSON beside it."""
    meta = {"format": FORMAT, "unet": unet.to_dict(), "diffusion": diffusion.to_dict(), **info}
    sd = {k: v.detach().float().contiguous().cpu() for k, v in net.state_dict().items()}
    return _write_safetensors(Path(path), sd, meta)


def stamp_checkpoint(path: str | os.PathLike, **info) -> Path:
    """Add measured facts (``recommended_steps``, ``correlated_noise_mode``) to one of our checkpoints; the weights
    are kept bit for bit."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: only rddm-train's .safetensors checkpoints can be stamped")
    sd, meta = _read_safetensors(path)
    return _write_safetensors(path, sd, {**meta, **info})


def _write_safetensors(path: Path, sd: dict, meta: dict) -> Path:
    from safetensors.torch import save

    # Serialised in memory and written by our own atomic writer: safetensors >= 0.7 writes through a private
    # `.tmpXXXXXX` file of its own, which a run killed mid-checkpoint would leave behind.
    write_bytes_atomic(path, save(sd, metadata={META_KEY: json.dumps(meta)}))
    write_bytes_atomic(path.with_suffix(".json"), (json.dumps(meta, indent=2) + "\n").encode())
    return path
