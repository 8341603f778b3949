"""``rddm-train``: train an RDDM restorer from a TOML config plus command-line overrides.

Examples::

    rddm-train --config default_denoiser --data /data/train --val /data/val/kodak24 --out runs/dn
    rddm-train --out runs/dn --resume                        # continues from runs/dn/state.pt
    rddm-train --config my.toml --set optim.lr=1e-4 --set data.crop=96 --device cuda --bf16
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rddm_infer.errors import RDDMError

from . import config as cfgmod


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rddm-train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help=f"TOML/JSON config file or a packaged name ({', '.join(cfgmod.packaged_configs())})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any config value (TOML syntax), repeatable")
    flags = [  # (flag, config key, type, help)
        ("--data", "data.clean", str, "folder or .flist of clean images, degraded on the fly"),
        ("--input", "data.input", str, "paired mode: folder or .flist of degraded inputs"),
        ("--gt", "data.gt", str, "paired mode: folder or .flist of ground truths (matched by file name)"),
        ("--val", "val.clean", str, "clean validation images (degraded with fixed seeds)"),
        ("--val-input", "val.input", str, "paired validation inputs"),
        ("--val-gt", "val.gt", str, "paired validation ground truths"),
        ("--out", "run.out", str, "run folder (checkpoints, logs, config)"),
        ("--steps", "run.steps", int, "total optimizer steps"),
        ("--batch-size", "run.batch_size", int, "images per micro-batch"),
        ("--lr", "optim.lr", float, "Adam learning rate"),
        ("--device", "run.device", str, "auto, cpu, cuda, cuda:N"),
        ("--seed", "run.seed", int, "seed of weights, data and noise"),
        ("--threads", "run.threads", int, "torch CPU threads (0: torch's default)"),
        ("--workers", "data.num_workers", int, "data loader worker processes"),
        ("--max-minutes", "run.max_minutes", float, "wall-clock budget; a final checkpoint is saved when it ends"),
        ("--init", "run.init", str, "start from a trained checkpoint's weights (fine-tune); fresh optimizer"),
        ("--checkpoint-every", "run.checkpoint_every", int, "steps between checkpoints"),
        ("--val-every", "val.every", int, "steps between validations"),
    ]
    for flag, key, typ, help_ in flags:
        p.add_argument(flag, dest=key, type=typ, default=None, help=help_)
    for flag, key, help_ in [("--bf16", "run.bf16", "bfloat16 autocast"), ("--compile", "run.compile", "torch.compile"),
                             ("--cuda-graph", "run.cuda_graph", "replay forward/backward as CUDA graphs"),
                             ("--channels-last", "run.channels_last", "channels-last memory format")]:
        p.add_argument(flag, dest=key, action="store_const", const=True, default=None, help=help_)
    p.add_argument("--no-progress", dest="run.progress", action="store_const", const=False, default=None,
                   help="no progress bar (logs are still written)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its state.pt")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return p


def resolve(args: argparse.Namespace) -> cfgmod.TrainConfig:
    flags = {k: v for k, v in vars(args).items() if "." in k}
    path = args.config
    if path is None and args.resume:  # a resumed run defaults to the config saved beside its checkpoint
        out = flags.get("run.out") or cfgmod.RunSection().out
        saved = Path(out) / "config.toml"
        path = str(saved) if saved.is_file() else None
    return cfgmod.load(path, args.overrides, **flags)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        cfg = resolve(args)
        if args.print_config:
            print(cfgmod.to_toml(cfg), end="")
            return 0
        from .trainer import Trainer  # torch is imported only when training

        result = Trainer(cfg).fit(resume=args.resume)
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


if __name__ == "__main__":
    sys.exit(main())
