"""``rddm-export CHECKPOINT``: validated ONNX graphs (and TensorRT engines) plus a report."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from rddm_infer.cli_options import registry_flags
from rddm_infer.diffusion.graph_kinds import GRAPH_KINDS, graph_kind
from rddm_infer.errors import RDDMError

app = typer.Typer(add_completion=False, help=__doc__)
err = Console(stderr=True)


@app.command()
@registry_flags("model")
def export(
    checkpoint: Path = typer.Argument(..., help="Our .safetensors checkpoint or the reference's model-N.pt."),
    out_dir: Optional[Path] = typer.Option(None, "-o", "--out-dir",
                                           help="Output folder (default: ./<stem>_onnx/ in the current directory)."),
    graph: List[str] = typer.Option(["step", "fused"], "--graph", "-g", help=" | ".join(GRAPH_KINDS) + " (repeatable)."),
    fp16: bool = typer.Option(False, "--fp16", help="Also write mixed-precision fp16 graphs (for GPUs)."),
    int8: bool = typer.Option(False, "--int8", help="Also write int8 (VNNI) copies of the fp32 graphs, for CPUs."),
    calib: Optional[Path] = typer.Option(None, help="--int8 calibration photos (default: synthetic scenes)."),
    tensorrt: bool = typer.Option(False, "--tensorrt", help="Also build TensorRT engines (needs a GPU)."),
    steps: Optional[int] = typer.Option(None, "--steps", "-k", show_default=False,
                                        help="Sampling steps K (baked into fused; default for step) "
                                             "(default: the checkpoint's recommended steps, else 5)."),
    eta: float = typer.Option(0.0, help="DDIM η in [0, 1], generation models only (restoration models sample with 0; another value is an error)."),
    exporter: str = typer.Option("legacy", help="legacy (TorchScript) | dynamo (torch.export, opset ≥ 18)."),
    online: bool = typer.Option(False, "--online", help="Use the online weights instead of the EMA."),
    validate: bool = typer.Option(True, "--validate/--no-validate", help="Compare every artifact with PyTorch."),
    min_shape: str = typer.Option("1x64x64", help="TensorRT profile minimum, BxHxW."),
    opt_shape: str = typer.Option("1x512x512", help="TensorRT profile optimum, BxHxW."),
    max_shape: str = typer.Option("4x1024x1024", help="TensorRT profile maximum, BxHxW."),
    opt_level: int = typer.Option(3, help="TensorRT builder optimization level (0-5)."),
    timing_cache: Optional[Path] = typer.Option(None, help="TensorRT timing cache (default: in the output folder)."),
    workspace_gb: Optional[float] = typer.Option(None, help="TensorRT workspace limit in GiB."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
    report: bool = typer.Option(False, "--report", help="Also write report.html into the output folder."),
    options: dict = None,
):
    """Export CHECKPOINT to ONNX (unet / step / fused), validate each graph, optionally build TensorRT engines."""
    export_all = _import_export_all()
    for g in graph:
        try:
            graph_kind(g)
        except ValueError as e:
            raise RDDMError(str(e)) from None
    if exporter not in ("legacy", "dynamo"):
        raise RDDMError(f"unknown exporter {exporter!r}; expected legacy or dynamo")
    trt_opts = None
    if tensorrt:
        from .tensorrt_build import EngineProfile

        trt_opts = dict(profile=EngineProfile.parse(min_shape, opt_shape, max_shape), opt_level=opt_level,
                        timing_cache=timing_cache, workspace_gb=workspace_gb)
    load = dict(options, use_ema=not online)
    log = (lambda s: None) if json_out else (lambda s: err.print(f"[dim]{escape(s)}[/dim]"))
    artifacts = export_all(checkpoint, out_dir, graphs=tuple(dict.fromkeys(graph)), fp16=fp16, int8=int8, calib=calib,
                           steps=steps, eta=eta, exporter=exporter, validate=validate, tensorrt=trt_opts, load_options=load, log=log)
    if report and artifacts:
        from rddm_infer.report import write_export_report

        page = write_export_report([a.to_dict() for a in artifacts], artifacts[0].path.parent,
                                   checkpoint=str(checkpoint))
        log(f"report: {page}")
    if json_out:
        print(json.dumps([a.to_dict() for a in artifacts], indent=2))
        return
    folder = artifacts[0].path.parent if artifacts else out_dir
    table = Table(title=f"rddm-export {escape(str(checkpoint))} -> {escape(str(folder))}/")
    for col in ("artifact", "graph", "precision", "size", "build", "validation"):
        table.add_column(col)
    for a in artifacts:
        v = a.validation.summary() if a.validation else "; ".join(a.notes) or "-"
        table.add_row(escape(a.path.name), a.graph, a.precision, f"{a.size / 2**20:.1f} MiB", f"{a.build_s:.1f} s",
                      escape(v))
    Console().print(table)
    for a in artifacts:
        print(a.restore_command())


EXPORT_STACK = ("torch", "onnx", "onnxslim", "safetensors")  # the `export` extra (pyproject.toml)


def _import_export_all():
    """The exporter, or one line saying which extra to install (the base install has no torch or onnx)."""
    missing = [m for m in EXPORT_STACK if importlib.util.find_spec(m) is None]
    try:
        if missing:
            raise ImportError(f"No module named {missing[0]!r}", name=missing[0])
        from .exporter import export_all
    except ImportError as e:
        what = ", ".join(missing) or e.name or str(e)
        raise RDDMError(f"rddm-export needs the export extra (missing: {what}): pip install 'rddm-infer[export]'") \
            from None
    return export_all


def main(argv: Optional[list[str]] = None) -> None:
    """Console entry point: user errors are one red line on stderr and exit status 2 (as rddm-infer)."""
    try:
        app(args=argv, standalone_mode=True)
    except RDDMError as e:
        err.print(f"[red]error:[/red] {escape(str(e))}", soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("[red]error:[/red] interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
