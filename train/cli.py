"""``rddm-train``: train an RDDM restorer from a TOML config plus command-line overrides.

Examples::

    rddm-train --config default_denoiser --data /data/train --val /data/val/kodak24 --out runs/dn
    rddm-train --out runs/dn --resume                        # continues from runs/dn/state.pt
    rddm-train --config my.toml --set optim.lr=1e-4 --set data.crop=96 --device cuda --bf16
    rddm-train --config real_pairs_denoiser --real-pairs ../shared/data/val/polyu_real --data /data/train --out runs/rp
"""

from __future__ import annotations

import inspect
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from rddm_infer import cli_options  # noqa: F401  (flags render as flags in --help)
from rddm_infer.io.atomic import ensure_folder
from rddm_infer.errors import RDDMError

from . import config as cfgmod

FLAGS = [  # (flag, config key, type, help)
    ("--data", "data.clean", str, "Folder or .flist of clean images, degraded on the fly."),
    ("--input", "data.input", str, "Paired mode: folder or .flist of degraded inputs."),
    ("--gt", "data.gt", str, "Paired mode: folder or .flist of ground truths (matched by file name)."),
    ("--val", "val.clean", str, "Clean validation images (degraded with fixed seeds)."),
    ("--val-input", "val.input", str, "Paired validation inputs."),
    ("--val-gt", "val.gt", str, "Paired validation ground truths."),
    ("--real-pairs", "real.pairs", str,
     "Real pairs: a folder with noisy/ and clean/ (same names; scene = name less its trailing _N), e.g. "
     "../shared/data/val/polyu_real. The config's real.held_out scenes (>= 3, >= 10 pairs) validate and are never "
     "trained on; the rest train, real.ratio of the samples."),
    ("--real-ratio", "real.ratio", float,
     "Share of training samples cut from the real pairs, the rest synthetic (1 needs --set real.real_only=true)."),
    ("--patience", "val.patience", int,
     "Early stopping: end the run when the best validation PSNR is this many validations old (0: off)."),
    ("--out", "run.out", str, "Run folder (checkpoints, logs, config)."),
    ("--steps", "run.steps", int, "Total optimizer steps."),
    ("--batch-size", "run.batch_size", int, "Images per micro-batch."),
    ("--lr", "optim.lr", float, "Adam learning rate."),
    ("--device", "run.device", str, "auto, cpu, cuda, cuda:N"),
    ("--seed", "run.seed", int, "Seed of weights, data and noise."),
    ("--threads", "run.threads", int, "torch CPU threads (0: torch's default)."),
    ("--workers", "data.num_workers", int, "Data loader worker processes (-1: chosen from the CPU count)."),
    ("--max-minutes", "run.max_minutes", float, "Wall-clock budget; a final checkpoint is saved when it ends."),
    ("--init", "run.init", str, "Start from a trained checkpoint's weights (fine-tune); fresh optimizer."),
    ("--checkpoint-every", "run.checkpoint_every", int, "Steps between checkpoints."),
    ("--val-every", "val.every", int, "Steps between validations."),
]
SWITCHES = [  # (flag, config key, value when given, help)
    ("--bf16", "run.bf16", True, "bfloat16 autocast."),
    ("--compile", "run.compile", True, "torch.compile the network."),
    ("--cuda-graph", "run.cuda_graph", True, "Replay forward/backward as CUDA graphs."),
    ("--channels-last", "run.channels_last", True, "Channels-last memory format."),
    ("--no-progress", "run.progress", False, "No progress bar (logs are still written)."),
]

app = typer.Typer(add_completion=True, pretty_exceptions_enable=False, context_settings={"help_option_names": ["-h", "--help"]})


def _param(name: str, annotation, default) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def _key(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def train(**kw) -> None:
    """Train an RDDM restorer from a TOML config plus command-line overrides.

    Examples:

      rddm-train --config default_denoiser --data /data/train --val /data/val/kodak24 --out runs/dn

      rddm-train --out runs/dn --resume

      rddm-train --config my.toml --set optim.lr=1e-4 --set data.crop=96 --device cuda --bf16

      rddm-train --config real_pairs_denoiser --real-pairs ../shared/data/val/polyu_real --data /data/train --out runs/rp

      (real pairs mixed into training, split by scene as the config names it; validation and early stopping on the
      held-out scenes)
    """
    flags = {key: kw[_key(flag)] for flag, key, _, _ in FLAGS}
    flags.update({key: value if kw[_key(flag)] else None for flag, key, value, _ in SWITCHES})
    raise typer.Exit(run(kw["config"], kw["set"] or [], flags, resume=kw["resume"], print_config=kw["print_config"]))


train.__signature__ = inspect.Signature([
    _param("config", Optional[str], typer.Option(
        None, "--config", help=f"TOML/JSON config file or a packaged name ({', '.join(cfgmod.packaged_configs())}).")),
    _param("set", Optional[List[str]], typer.Option(
        None, "--set", metavar="SECTION.KEY=VALUE", help="Override any config value (TOML syntax), repeatable.")),
    *(_param(_key(flag), Optional[typ], typer.Option(None, flag, help=help_)) for flag, _, typ, help_ in FLAGS),
    *(_param(_key(flag), bool, typer.Option(False, flag, help=help_)) for flag, _, _, help_ in SWITCHES),
    _param("resume", bool, typer.Option(False, "--resume", help="Continue the run in --out from its state.pt.")),
    _param("print_config", bool, typer.Option(False, "--print-config", help="Print the resolved config and exit.")),
])
app.command(no_args_is_help=False)(train)


def resolve(config: str | None, overrides: list[str], flags: dict, resume: bool = False) -> cfgmod.TrainConfig:
    path = config
    if path is None and resume:  # a resumed run defaults to the config saved beside its checkpoint
        out = flags.get("run.out") or cfgmod.RunSection().out
        saved = Path(out) / "config.toml"
        path = str(saved) if saved.is_file() else None
    return cfgmod.load(path, overrides, **flags)


def _say(msg: str) -> None:
    print(f"rddm-train: {msg}", flush=True)  # flushed: a long run's log is read while it runs


def _prepare(cfg: cfgmod.TrainConfig) -> None:
    """Choices made for the user are stated (stdout); the run folder must be creatable before any work."""
    from .data import auto_workers  # data imports torch: run() has checked that it is installed

    if cfg.data.num_workers < 0:
        cfg.data.num_workers = auto_workers()
        _say(f"data.num_workers = -1: {cfg.data.num_workers} loader workers ({os.cpu_count()} CPUs)")
    o = cfg.optim
    warm = o.ema_start + int((1 - o.ema_decay) ** -1.5) if o.ema_decay > 0 else o.ema_start
    _say(f"EMA (the weights validated and exported) copies the online weights until step {o.ema_start}, then "
         f"averages every {o.ema_every} steps, its decay reaching {o.ema_decay} near step {warm}"
         + (f"; this {cfg.run.steps}-step run ends before that (--set optim.ema_start=N to move it)"
            if cfg.run.steps < warm else ""))
    ensure_folder(cfg.run.out, "run folder")


def run(config: str | None, overrides: list[str], flags: dict, *, resume: bool, print_config: bool) -> int:
    try:
        cfg = resolve(config, overrides, flags, resume)
        if print_config:
            print(cfgmod.to_toml(cfg), end="")
            return 0
        try:
            from .trainer import Trainer  # torch is imported only when training
        except ModuleNotFoundError as e:
            if e.name and e.name.split(".")[0] in ("torch", "safetensors"):
                raise RDDMError(f"training needs {e.name.split('.')[0]}, which is not installed: "
                                f"pip install 'rddm-infer[train]'") from None
            raise
        _prepare(cfg)
        result = Trainer(cfg).fit(resume=resume, log=_say)
    except RDDMError as e:
        print(f"rddm-train: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rddm-train: interrupted; resume with --resume from the last checkpoint", file=sys.stderr)
        return 130
    val = result.get("val")
    tail = f", val PSNR {val['psnr']:.2f} dB SSIM {val['ssim']:.4f}" if val else ""
    print(f"rddm-train: step {result['end_step']}/{cfg.run.steps} ({result['stopped']}){tail}; run in {cfg.run.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point; returns the exit status (2: usage or data errors, 130: interrupted)."""
    try:
        app(args=argv, prog_name="rddm-train", standalone_mode=True)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
