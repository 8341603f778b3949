"""`rddm-infer`: restore images from the command line, inspect artifacts.

User errors (bad model, bad option values, unreadable images) are one red line each,
never a traceback. Exit status: 0 all restored (or skipped), 1 some images failed,
2 usage or model errors (an unreachable Ray cluster too), 3 the Ray cluster was lost mid-run (a summary line
says how many were restored and left; rerun with --skip-existing to continue), 130 interrupted. Heavy modules
are imported inside the commands so ``--version`` and ``--help`` stay instant.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape

from . import __version__
from .cli_options import registry_flags
from .backends.registry import backend_help
from .errors import RDDMError
from .io.formats import QUALITY_HELP, check_quality, is_lossy
from .restore.memory import MAX_IN_FLIGHT_IMAGES, MEMORY_SHARE
from .restore.tiling import DEFAULT_OVERLAP, DEFAULT_TILE
from .restore.mode import correlated_mode

app = typer.Typer(add_completion=True, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fast image restoration with Residual Denoising Diffusion Models.")
err = Console(stderr=True, highlight=False, soft_wrap=True)
out = Console(highlight=False, soft_wrap=True)


def _version(value: bool):
    if value:
        print(f"rddm-infer {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")):
    """Fast image restoration with Residual Denoising Diffusion Models."""


BACKEND_HELP = backend_help()
PIXEL_SHUFFLE_HELP = ("auto: chosen per image from its own noise: where it is spatially correlated, as in camera "
                      "photos, the model's measured mode for such noise (the built-in model: whole, 1 step; a model "
                      "without one: 2 and 1 step, as a model trained on white noise keeps correlated noise as "
                      "texture); else 1 (the whole image). s: restore the s² sub-images of every s-th pixel "
                      "separately for every image; 1: off.")
RAY_PANEL, FILES_PANEL, FLOW_PANEL = "Ray cluster", "Output files", "Throughput"
SELF_ENSEMBLE_HELP = ("Restore each image in 2, 4 or 8 flipped / transposed views and average them: a little "
                      "more quality for 2-8x the time (held-out real camera pairs, built-in model: +0.07 / +0.11 / "
                      "+0.15 dB at 2 / 4 / 8). 1: off.")

def _error(msg: str) -> None:
    err.print(f"[red]error:[/red] {escape(msg)}")


def _quiet_onnxruntime() -> None:
    """ONNX Runtime logs warnings (e.g. unused initializers) straight to stderr: keep errors only."""
    try:
        import onnxruntime

        onnxruntime.set_default_logger_severity(3)
    except (ImportError, AttributeError):
        pass


@app.command()
@registry_flags("sampling", "backend", "model")
def restore(
    inputs: List[str] = typer.Argument(..., help="Image files, folders (sorted) or glob patterns."),
    output: str = typer.Option("restored", "-o", "--output",
                               help="Output folder, or a store URI (s3://bucket/prefix, gs://...)."),
    model: Optional[str] = typer.Option(None, "--model", "-m",
                                        help="ONNX model, TensorRT engine or checkpoint (default: built-in)."),
    backend: str = typer.Option("auto", help=BACKEND_HELP),
    seed: int = typer.Option(0, help="Noise seed (same seed, same result on every backend)."),
    tile: Optional[int] = typer.Option(None, show_default=False,
                                       help=f"Tile size for large images (default: {DEFAULT_TILE}, or the largest "
                                            f"that fits in memory, said when smaller; a tile that does not fit is "
                                            f"refused before any image is read)."),
    tile_overlap: int = typer.Option(DEFAULT_OVERLAP, help="Overlap between tiles, in pixels."),
    batch: int = typer.Option(1, help="Tiles / same-size images per engine call."),
    pixel_shuffle: str = typer.Option("auto", help=PIXEL_SHUFFLE_HELP),
    self_ensemble: int = typer.Option(1, help=SELF_ENSEMBLE_HELP),
    gt: Optional[str] = typer.Option(None, help="Ground-truth folder (or URI): PSNR/SSIM per image, saved as CSV."),
    suffix: str = typer.Option("", help="Appended to output file names.", rich_help_panel=FILES_PANEL),
    ext: Optional[str] = typer.Option(None, help="Output format, e.g. png (default: the input's, in its case).",
                                      rich_help_panel=FILES_PANEL),
    quality: Optional[int] = typer.Option(None, help=QUALITY_HELP, show_default=False, rich_help_panel=FILES_PANEL),
    skip_existing: bool = typer.Option(False, "--skip-existing", rich_help_panel=FILES_PANEL,
                                       help="Skip inputs whose output exists and decodes (resumes a stopped run)."),
    max_pixels: int = typer.Option(100_000_000, "--max-pixels",
                                   help="Refuse images whose header claims more pixels (checked before decoding)."),
    recursive: bool = typer.Option(False, "--recursive", "-r", help="Descend into subfolders."),
    io_workers: str = typer.Option(
        "auto", "--io-workers", rich_help_panel=FLOW_PANEL,
        help="Threads that decode (2/3) and encode (1/3) while the engine runs; auto: one per CPU this process may "
             "use (os.sched_getaffinity); 0: one image at a time, no threads. Same pixels either way. "
             "Ray actors: 0 unless given."),
    in_flight: Optional[int] = typer.Option(
        None, "--in-flight", show_default=False, rich_help_panel=FLOW_PANEL,
        help=f"At most this many images decoded ahead and not yet written (default: --batch + "
             f"{MAX_IN_FLIGHT_IMAGES})."),
    in_flight_mb: Optional[float] = typer.Option(
        None, "--in-flight-mb", show_default=False, rich_help_panel=FLOW_PANEL,
        help=f"...and at most this many MB of their pixels, network inputs, noise and outputs; a reader waits "
             f"before decoding until its image fits (one image alone always runs; default: "
             f"{MEMORY_SHARE:.0%} of the memory available when the run starts)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only errors."),
    json_out: bool = typer.Option(False, "--json", help="Print a machine-readable summary on stdout."),
    report: bool = typer.Option(False, "--report", help="Write OUTPUT/report.html (before/after) and run.json."),
    ray: bool = typer.Option(False, "--ray", help="Run on Ray Data (a local Ray runtime unless --ray-address).",
                             rich_help_panel=RAY_PANEL),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", rich_help_panel=RAY_PANEL,
                                              help="Ray cluster to attach to: auto | host:port | ray://host:port."),
    workers: Optional[int] = typer.Option(None, help="Ray: restore actors (default: sized from the cluster).",
                                          rich_help_panel=RAY_PANEL),
    cpus_per_worker: Optional[float] = typer.Option(None, help="Ray: CPUs each actor reserves.",
                                                    rich_help_panel=RAY_PANEL),
    gpus_per_worker: Optional[float] = typer.Option(None, help="Ray: GPUs each actor reserves (0.5: two share one).",
                                                    rich_help_panel=RAY_PANEL),
    ray_connect_timeout: Optional[float] = typer.Option(
        None, "--ray-connect-timeout", metavar="SECONDS", show_default=False, rich_help_panel=RAY_PANEL,
        help="Ray: seconds to reach --ray-address (an address that does not answer is an error, exit 2) and to wait "
             "for a cluster that stops answering mid-run (then exit 3: rerun with --skip-existing; default: 30)."),
    options: dict = None,
):
    """Restore images; one bad file is reported and skipped, the run goes on.

    Exit status: 0 all restored or skipped; 1 some images failed; 2 a usage, model or connection error;
    3 the Ray cluster was lost mid-run (rerun with --skip-existing to continue); 130 interrupted.

    By default each image is restored in the mode its own noise calls for (camera photos: the model's measured
    mode for correlated noise, see `rddm-infer info`; white noise and clean images: whole, the model's steps),
    said per image; --pixel-shuffle and --steps fix it.

    Examples:

      rddm-infer restore photos/ -o restored/

      rddm-infer restore camera_jpegs/ -o out/ --quality 92 --gt clean/   (per-image mode, PSNR gain)

      rddm-infer restore 'scans/**/*.tif' -r --batch 4 --tile 512 --pixel-shuffle 1

      rddm-infer restore noisy/ --gt clean/ --json

      rddm-infer restore big/ -o out/ --skip-existing --max-pixels 400000000
    """
    from .api import executor
    from .restore.jobs import check_suffix
    from .restore.local import Restorer
    from .io.storage import Uri, location

    output, gt = location(output), (location(gt) if gt is not None else None)
    if gt is not None and not gt.is_dir():
        raise RDDMError(f"{gt}: ground-truth folder not found")
    check_suffix(suffix)
    check_quality(quality)
    inputs = _check_inputs(inputs, recursive, output, json_out)  # before the model loads: a typo costs no load
    _quiet_onnxruntime()
    options = dict(options, seed=seed, tile=tile, overlap=tile_overlap, batch=batch, self_ensemble=self_ensemble,
                   pixel_shuffle=_auto_or_int(pixel_shuffle, "--pixel-shuffle", "1: off, 2: camera photos"),
                   max_pixels=max_pixels, quality=quality, in_flight=in_flight, in_flight_mb=in_flight_mb,
                   io_workers=_auto_or_int(io_workers, "--io-workers", "0: one image at a time"))
    ray_options = dict(address=ray_address, workers=workers, cpus_per_worker=cpus_per_worker,
                       gpus_per_worker=gpus_per_worker, connect_timeout=ray_connect_timeout)
    kind = "ray" if ray or ray_address is not None else "local"
    with executor(model, backend, kind=kind, quiet=quiet, **ray_options, **options) as restorer:
        if not quiet and isinstance(restorer, Restorer):
            err.print(f"backend: [bold]{escape(restorer.engine)}[/bold] ({escape(restorer.choice.reason)}); "
                      f"{restorer.meta.graph} graph, {_steps_note(options['steps'], restorer.meta, restorer.plan.k)}"
                      f"{' in two passes (experiment 0 sampler)' if restorer.plan.config.two_pass else ''}"
                      f"{_pixel_shuffle_note(restorer.pixel_shuffle, restorer.correlated_mode)}"
                      f"{_ensemble_note(restorer.self_ensemble)}")
            if restorer.memory_note:
                err.print(escape(restorer.memory_note))
            err.print(f"files: {escape(restorer.flow.describe())}")
        summary = _run_with_progress(restorer, inputs, output, quiet=quiet or json_out, json_out=json_out,
                                     suffix=suffix, ext=ext,
                                     skip_existing=skip_existing, recursive=recursive, gt_dir=gt)
        if report:
            from .report import write_restore_report

            if restorer.meta is None:
                raise RDDMError("--report needs the model loadable on this machine (the Ray driver could not load "
                                "it here); restore without --report, or run the driver where the backend is installed")

            page = write_restore_report(summary, restorer, output, gt_dir=gt, command=["rddm-infer", *sys.argv[1:]])
            if not quiet:
                err.print(f"report: {escape(str(page))}" + (" (report.html is built for local output folders: "
                          "copy this one and run `rddm-infer report DIR`)" if isinstance(output, Uri) else ""))
        _remove_stale_run_files(output, gt is not None and bool(summary.mean_metrics()), report, quiet)
    if json_out:
        print(json.dumps(summary.to_dict(), indent=2))
    elif not quiet or summary.count("failed"):
        means = summary.mean_metrics()
        if means:
            lossy = sorted({r.job.dst.suffix.lower() for r in summary.results
                            if r.metrics and is_lossy(r.job.dst.suffix, quality)})
            saved = (f"; measured on the saved {', '.join(lossy)} files (quality {quality or 'default'})"
                     if lossy else "")
            out.print(f"mean PSNR {_psnr_change(means)}, mean SSIM {means['ssim']:.4f} "
                      f"(per image: {escape(str(output / 'metrics.csv'))}{saved})")
        out.print(f"{summary.line()} ({summary.images_per_s:.2f} images/s)")
    raise typer.Exit(1 if summary.count("failed") else 0)


def _auto_or_int(value: str, flag: str, hint: str):
    """``--pixel-shuffle``, ``--io-workers``: auto or an integer (range checked where it is used)."""
    if value.strip().lower() == "auto":
        return "auto"
    try:
        return int(value)
    except ValueError:
        raise RDDMError(f"{flag} {value!r}: must be auto or an integer ({hint})") from None


def _check_inputs(inputs, recursive: bool, output, json_out: bool):
    """Nothing to restore (every input missing, an empty folder, a glob that matches nothing): the run's failures,
    said before the model is loaded rather than after (exit 1, as for any run whose images all failed). Returns the
    listing, which the run then uses instead of listing the inputs again."""
    from .restore.jobs import Result, Summary, list_inputs

    listing = list_inputs(inputs, recursive, exclude=output)
    jobs = listing.jobs
    if jobs and all(j.error for j in jobs):
        summary = Summary([Result(j, "failed", j.error) for j in jobs])
        for r in summary.results:
            _report_failure(r)
        print(json.dumps(summary.to_dict(), indent=2)) if json_out else out.print(summary.line())
        raise typer.Exit(1)
    return listing


def _psnr_change(m: dict) -> str:
    """``36.04 → 37.40 dB (+1.36)`` with the input's PSNR, else the output's alone."""
    if "psnr_in" not in m:
        return f"{m['psnr']:.2f} dB"
    return f"{m['psnr_in']:.2f} → {m['psnr']:.2f} dB ({m['psnr'] - m['psnr_in']:+.2f})"


def _remove_stale_run_files(output, metrics: bool, report: bool, quiet: bool) -> None:
    """A run folder describes its last run only: the run files an earlier run left and this one did not write go."""
    from .io.storage import Uri
    from .restore.run_files import METRICS_CSV, REPORT_HTML, RUN_JSON, remove_stale

    if isinstance(output, Uri):
        return  # objects in a store are left as they are
    wrote = ({METRICS_CSV} if metrics else set()) | ({RUN_JSON, REPORT_HTML} if report else set())
    removed = remove_stale(output, wrote)
    if removed and not quiet:
        err.print(f"removed the earlier run's {', '.join(removed)} from {escape(str(output))} (this run wrote none: "
                  f"they would describe other pixels)")


def _pixel_shuffle_note(s, correlated=None) -> str:
    if s == "auto":
        how = (correlated or correlated_mode(None)).describe_how()
        return f"; per image: {how} where its noise is correlated (camera photos), else whole"
    nth = {2: "2nd", 3: "3rd"}.get(s, f"{s}th")
    return f"; pixel-shuffle {s}: the {s * s} sub-images of every {nth} pixel restored separately" if s > 1 else ""


def _ensemble_note(n: int) -> str:
    return f"; self-ensemble {n}: {n} flipped / transposed views averaged ({n}x the time)" if n > 1 else ""


def _steps_note(asked: int | None, meta, steps: int) -> str:
    """Where the step count came from: the user, the model's measured recommendation, or its export default."""
    # The reference samples K = T with its posterior-form p_sample_loop, not the DDIM update run here: say so.
    full = ("; K = T runs the DDIM update, not the reference's p_sample_loop"
            if steps == (meta.diffusion or {}).get("timesteps") else "")
    if asked is not None:
        return f"--steps {steps}{full}"
    measured = meta.steps_recommended
    count = f"{steps} step{'s' * (steps != 1)}"
    return (f"{count} (the model's recommended)" if measured else count) + full


def _run_with_progress(restorer, inputs, output, *, quiet: bool, json_out: bool = False, **kw):
    """Ctrl-C exits 130 with what was done, instead of a traceback; a Ray cluster lost mid-run exits 3 with its
    account (and the partial --json summary)."""
    from .errors import ClusterLost

    restored: list = []
    try:
        return _restore_reporting(restorer, inputs, output, quiet, restored, **kw)
    except ClusterLost as e:
        _error(str(e))
        if json_out and e.summary is not None:
            print(json.dumps(e.summary.to_dict(), indent=2))
        raise typer.Exit(3) from None
    except KeyboardInterrupt:
        _error(f"interrupted: {len(restored)} restored; rerun with --skip-existing to continue")
        raise typer.Exit(130) from None


def _restore_reporting(restorer, inputs, output, quiet: bool, restored: list, **kw):
    """A live bar on a terminal; one line per image otherwise (logs and pipes see progress too)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    def tally(r):
        if r.status == "restored":
            restored.append(r)

    if quiet:
        return restorer.restore_paths(inputs, output, on_result=lambda r: (tally(r), _report_failure(r)), **kw)
    if not err.is_terminal:
        total = [0]
        seen = [0]

        def on_line(r):
            tally(r)
            seen[0] += 1
            _report_failure(r)
            if r.status != "failed":
                what = f"{r.job.dst} ({r.seconds:.1f} s)" if r.status == "restored" else "skipped (output exists)"
                metrics = f", PSNR {_psnr_change(r.metrics)}, SSIM {r.metrics['ssim']:.4f}" if r.metrics else ""
                mode = f" [{r.mode}]" if r.mode else ""
                err.print(f"[{seen[0]}/{total[0]}] {escape(str(r.job.src))} -> {escape(what)}{metrics}{escape(mode)}")

        return restorer.restore_paths(inputs, output, on_start=lambda jobs: total.__setitem__(0, len(jobs)),
                                      on_result=on_line, **kw)
    t0 = time.perf_counter()
    speed = TextColumn("{task.fields[speed]}")
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), speed, TimeElapsedColumn(),
                  console=err, transient=False) as bar:
        images = bar.add_task("images", total=None, speed="")
        tiles = bar.add_task("tiles", total=None, speed="", visible=False)
        done = [0]

        def on_start(jobs):
            bar.update(images, total=len(jobs))

        def on_tile(n, total):
            bar.update(tiles, completed=n, total=total, visible=total > 1 and n < total)

        def on_result(r):
            tally(r)
            _report_failure(r, bar.console)
            done[0] += r.status == "restored"
            rate = done[0] / max(time.perf_counter() - t0, 1e-9)
            bar.update(images, advance=1, speed=f"{rate:.2f} images/s")
            if r.metrics and not r.error:
                bar.console.print(f"{escape(str(r.job.src))}: PSNR {_psnr_change(r.metrics)}, "
                                  f"SSIM {r.metrics['ssim']:.4f}" + (f" [{escape(r.mode)}]" if r.mode else ""))
            elif r.mode and r.status == "restored":
                bar.console.print(f"{escape(str(r.job.src))}: {escape(r.mode)}")

        return restorer.restore_paths(inputs, output, on_start=on_start, on_result=on_result, on_tile=on_tile, **kw)


def _report_failure(r, console: Console = err) -> None:
    if r.status == "failed":
        console.print(f"[red]error:[/red] {escape(r.error)}")
    elif r.error:  # restored, but e.g. its ground truth was missing
        console.print(f"[yellow]warning:[/yellow] {escape(r.error)}")


@app.command()
def report(output: Path = typer.Argument(..., help="An output folder of `restore --report` (holds run.json)."),
           per_page: int = typer.Option(24, min=1, help="Comparison panels per page.")):
    """Rebuild OUTPUT/report.html from OUTPUT/run.json, OUTPUT/metrics.csv and the image files."""
    from .report import build_restore_report

    out.print(escape(str(build_restore_report(output, per_page))))


@app.command()
@registry_flags("sampling", "model")
def info(model: str = typer.Argument(..., help="ONNX model, TensorRT engine or checkpoint."),
         options: dict = None):
    """Print an artifact's metadata (graph kind, steps, η, precision, architecture, diffusion)."""
    from .backends import read_artifact_meta
    from .backends.select import resolve_model

    _quiet_onnxruntime()
    path = resolve_model(model)
    sampling = {k: options.pop(k) for k in ("steps", "eta")}
    stored = read_artifact_meta(path, **options)
    meta = stored.with_sampling(**sampling)
    plan = meta.plan(meta.steps)
    how = correlated_mode(stored.correlated_noise_mode, str(path)).describe_how()
    rows = [("file", f"{path} ({path.stat().st_size / 1e6:.2f} MB)"), ("format", meta.format),
            ("graph", meta.graph), ("steps", meta.steps), ("eta", meta.eta), ("times", list(plan.times)),
            ("recommended", f"{stored.recommended_steps} (measured; the default)" if stored.recommended_steps
             else "not measured"),
            ("correlated noise", f"{stored.correlated_noise_mode} (measured: {how})" if stored.correlated_noise_mode
             else f"not measured ({how}, the default)"),
            ("precision", meta.precision), ("size multiple", meta.size_multiple), ("channels", meta.channels),
            ("channel order", meta.channel_order), ("input range", list(meta.input_range)),
            ("diffusion", json.dumps(meta.config.summary())), ("unet", json.dumps(meta.unet)), ("source", meta.source),
            ("memory", _memory_row(meta)), ("backends", _runs_on(path))]
    for k, v in rows:
        out.print(f"{k:>14}: {escape(str(v))}")


def _memory_row(meta) -> str:
    """What one engine call at the default tile needs (restore checks it against the memory left)."""
    from .restore.memory import call_bytes, gb

    e = call_bytes(meta, DEFAULT_TILE)
    return (f"about {gb(e.bytes)} per engine call at tile {DEFAULT_TILE}, batch 1 ({e.largest}; ONNX Runtime on CPU)"
            if e else "no estimate (the metadata has no architecture)")


def _runs_on(path: Path) -> str:
    """The rows of the backend table that run this artifact, and what installs the missing ones."""
    from .backends.registry import artifact_kind, backends_for

    kind = artifact_kind(path)
    return ", ".join(b.name + ("" if b.available() else f" (not installed: pip install 'rddm-infer[{b.extra}]')")
                     for b in backends_for(kind))


@app.command()
@registry_flags("sampling", "backend", "model")
def bench(
    model: Optional[str] = typer.Argument(None, help="ONNX model, TensorRT engine or checkpoint (default: built-in)."),
    backend: str = typer.Option("auto", help=BACKEND_HELP),
    size: int = typer.Option(256, help="Square input size (rounded up to the model's size multiple)."),
    batch: int = typer.Option(1, help="Images per call."),
    runs: int = typer.Option(10, help="Timed runs."),
    warmup: int = typer.Option(2, help="Untimed runs first (engine setup, CUDA graph capture)."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    calibrate: bool = typer.Option(False, "--calibrate",
                                   help="Time every installed backend and precision on this CPU (at most 3 runs "
                                        "each, after a warm-up), check each is >= 40 dB vs fp32, and save the table "
                                        "that --backend auto reads."),
    levers: bool = typer.Option(False, "--levers",
                                help="torch: eager fp32 (every lever off) vs each lever alone and every lever at each "
                                     "precision, timed one after the other (e.g. --device cuda)."),
    options: dict = None,
):
    """Time whole restores (all K steps) on random input: median latency and images/s."""
    import numpy as np

    from .backends import EngineSampler
    from .backends.calibrate import measured_runner
    from .backends.timings import probe_shape, time_restores

    if runs < 1 or warmup < 0 or batch < 1 or size < 1:
        raise RDDMError("--runs, --batch and --size must be >= 1 and --warmup >= 0")
    from .backends.select import resolve_model

    if calibrate:
        return _calibrate(resolve_model(model, backend), backend, size=size, runs=min(runs, 3), json_out=json_out,
                          **options)

    if levers:
        return _bench_levers(model, backend, size, batch, runs, warmup, json_out, options)
    runner, choice = measured_runner(resolve_model(model, backend), backend, **options)
    with runner:
        sampler = EngineSampler(runner)
        plan = sampler.plan()
        m = max(int(runner.meta.size_multiple), 1)
        shape = probe_shape(runner.meta, size, batch)
        side = shape[-1]
        if batch * side * side > BENCH_MAX_PIXELS:
            raise RDDMError(f"--size {size} --batch {batch}: {batch * side * side / 1e6:.0f} MP in one engine call is "
                            f"over bench's {BENCH_MAX_PIXELS / 1e6:.0f} MP limit (restore tiles large images; bench "
                            f"times one call: use --size <= {int((BENCH_MAX_PIXELS / batch) ** 0.5) // m * m})")
        from .restore.memory import fit_tile

        fit_tile(runner, side, side, batch=batch, multiple=m, flag="--size")  # one call: refused if it cannot fit
        err.print(f"backend: [bold]{escape(runner.description)}[/bold] ({escape(choice.reason)})")
        times, _ = time_restores(sampler, plan, shape, runs, warmup)
    med = float(np.median(times))
    result = {"backend": runner.description, "graph": runner.meta.graph, "steps": plan.steps, "shape": list(shape),
              "runs": runs, "median_ms": round(med * 1e3, 3), "min_ms": round(min(times) * 1e3, 3),
              "images_per_s": round(batch / med, 3)}
    if json_out:
        print(json.dumps(result, indent=2))
    else:
        out.print(f"{escape(result['backend'])}: {runner.meta.graph} graph, {plan.steps} steps, batch {batch} × "
                  f"{side}²: median {result['median_ms']:.2f} ms (min {result['min_ms']:.2f}), "
                  f"{result['images_per_s']:.2f} images/s")


def _bench_levers(model, backend: str, size: int, batch: int, runs: int, warmup: int, json_out: bool,
                  options: dict) -> None:
    from .backends.select import resolve_model
    from .backends.timings import json_safe
    from .backends.torch import bench_levers

    if backend not in ("auto", "torch"):
        raise RDDMError("--levers times the torch backend's levers: --backend torch")
    rows = bench_levers(resolve_model(model, "torch"), size, batch, runs, warmup,
                        log=lambda s: (err if json_out else out).print(escape(s)), **options)
    if json_out:
        print(json.dumps(json_safe(rows), indent=2, default=str))


BENCH_MAX_PIXELS = 4096 * 4096  # one untiled call on a 4096² image already takes several GB of activations


def _calibrate(model: Path, backend: str, *, json_out: bool, **kw) -> None:
    from .backends.calibrate import calibrate
    from .backends.timings import MIN_PSNR

    if backend != "auto":
        raise RDDMError("--calibrate measures every installed backend; leave --backend at auto")
    ignored = [k for k, v in kw.items() if v is not None and k not in ("size", "runs", "steps", "threads")]
    if ignored:
        raise RDDMError(f"--calibrate times every backend and precision with their defaults: "
                        f"{', '.join('--' + k.replace('_', '-') for k in ignored)} does not apply")
    try:
        table, path = calibrate(model, log=lambda s: err.print(escape(s)), **{k: v for k, v in kw.items()
                                                                              if k in ("size", "runs", "steps", "threads")})
    except RDDMError as e:  # measured, but the table cache is not writable: stated, the results still shown
        if getattr(e, "table", None) is None:
            raise
        table, path = e.table, None
        err.print(f"timing table not saved: {escape(str(e))} (--backend auto times the exact paths again on its next run)")
    if json_out:
        print(table.to_json(), end="")
        return
    for e in sorted(table.entries, key=lambda e: (e.median_ms is None, e.median_ms or 0)):
        acc = "identical" if e.psnr_db == float("inf") else f"{e.psnr_db:.1f} dB" if e.psnr_db is not None else ""
        state = e.error or f"{e.median_ms:.1f} ms, {acc}{'' if e.ok else f' (below {MIN_PSNR:g} dB: never chosen)'}"
        out.print(f"{escape(e.label()):>22}: {escape(state)}")
    if path is not None:
        out.print(f"saved {escape(str(path))} ({escape(table.cpu)}, {table.size}², {table.steps} steps); "
                  f"--backend auto now picks from it (reduced precision only with --precision auto)")


def main(argv: Optional[list[str]] = None) -> None:
    """Console-script entry point: user errors become one red line and exit status 2."""
    try:
        app(args=argv, standalone_mode=True)
    except RDDMError as e:
        _error(str(e))
        sys.exit(2)
    except KeyboardInterrupt:
        _error("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
