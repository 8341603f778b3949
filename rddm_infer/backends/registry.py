"""The backend table: every engine rddm-infer can run on, in one list of small rows.

A row says what a backend is called, which pip extra installs it, how to tell it is
installed (``importlib.util.find_spec``: nothing is imported), which artifacts it runs,
its typed options, and where its runner class lives. ``choose_backend``/``load_runner``,
the CLI (``--backend`` help, every backend, model and sampling flag of ``restore``, ``bench``,
``info`` and ``rddm-export``, option checks) and ``benchmarks.backends`` all read it, so
adding a backend is one runner module plus one row: a row here, or :func:`register` /
an ``rddm_infer.backends`` entry point (``name = "package.module:SPEC"``) from another package.

Model options (``objective``, ``sum_scale``, ``timesteps``, ``time_input``, ``translation``,
``test_res_or_noise``, ``two_pass``) and sampling options
(``steps``, ``eta``) mean the same for every backend: a backend that builds the model
from a checkpoint passes the model options to :func:`rddm_infer.model.load_checkpoint`;
an exported artifact has them baked into its metadata, and a *different* value is an
error naming the option (the same value is accepted).
"""

from __future__ import annotations

import errno
import importlib
import importlib.util
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ..errors import BackendUnavailable, OptionError
from ..diffusion.schedule import OBJECTIVES

ARTIFACTS = {  # artifact kind -> file extensions
    "onnx": (".onnx",),
    "engine": (".engine", ".trt", ".plan"),
    "checkpoint": (".safetensors", ".pt", ".pth", ".ckpt"),
}
ARTIFACT_WORDS = {  # how errors name each kind, and how to make one
    "onnx": ("runs ONNX models", "; export one with `rddm-export CHECKPOINT`"),
    "engine": ("runs TensorRT engines", "; build one with `rddm-export CHECKPOINT --tensorrt`"),
    "checkpoint": ("loads checkpoints", ""),
}
_DEVICE = re.compile(r"^(auto|cpu|cuda)(?::(\d+))?$")


def user_cache_dir(*parts: str) -> Path:
    """``$XDG_CACHE_HOME/rddm-infer/...`` (default ``~/.cache``): compiled models, calibration tables."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base, "rddm-infer", *parts)


_CACHES_OFF: set[tuple[str, Path]] = set()  # (what, folder) already stated in this process


def optional_cache_dir(path: str | os.PathLike, what: str) -> Path | None:
    """``path`` created and writable, or None after one stated line on stderr ("<what> off: <dir>: <cause>"):
    a cache only saves time, so a read-only, full or misplaced one (a file where the folder belongs) never
    stops a run."""
    path = Path(path)
    cause = cache_dir_problem(path)
    if not cause:
        return path
    if (what, path) not in _CACHES_OFF:
        _CACHES_OFF.add((what, path))
        print(f"{what} off: {path}: {cause}", file=sys.stderr)
    return None


def cache_dir_problem(path: Path) -> str:
    """Why ``path`` cannot be a cache folder ('' when it can): created here when missing, then checked writable."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, "not writable")
    except FileExistsError:
        return "a file of that name is in the way"
    except OSError as e:
        return e.strerror or type(e).__name__
    return ""


def artifact_kind(path: str | Path) -> str | None:
    ext = Path(path).suffix.lower()
    return next((k for k, exts in ARTIFACTS.items() if ext in exts), None)


def parse_device(device: str | None) -> tuple[str, int | None]:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` -> (kind, index or None)."""
    m = _DEVICE.match(str(device or "auto").strip().lower())
    if not m or (m.group(2) is not None and m.group(1) != "cuda"):
        raise OptionError(f"--device {device!r}: expected auto, cpu, cuda or cuda:N")
    return m.group(1), None if m.group(2) is None else int(m.group(2))


@dataclass(frozen=True)
class Option:
    """One typed option: ``None`` always means "not given" (the backend's default applies).

    Each option is also a command-line flag (``--name-with-dashes``; a bool is ``--x/--no-x``)
    unless ``cli`` is False (an option that another flag already sets, e.g. ``--device cuda:N``).
    """

    name: str
    type: type
    default: Any
    help: str
    choices: tuple = ()
    cli: bool = True
    gpu_choices: tuple = ()  # choices that run on a GPU only (the CPU timing table skips them)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def check(self, value: Any, owner: str) -> Any:
        if value is None:
            return None
        ok = isinstance(value, self.type) and not (self.type is int and isinstance(value, bool))
        if self.type is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if self.type is object:
            ok = True
        if not ok:
            raise OptionError(f"{owner} option {self.name!r} must be {self.type.__name__}, got {value!r}")
        if self.choices and value not in self.choices:
            raise OptionError(f"{owner} option {self.name!r} must be one of {', '.join(map(str, self.choices))}, "
                              f"got {value!r}")
        if self.type is int and value < 1:
            raise OptionError(f"{owner} option {self.name!r} must be >= 1, got {value}")
        return value


DEVICE = Option("device", str, "auto", "auto | cpu | cuda | cuda:N")
THREADS = Option("threads", int, None, "CPU threads for inference")
PRECISION = ("fp32", "bf16")
TORCH_PRECISION = (*PRECISION, "fp16")
ON_CUDA = "default: on with --device cuda, off on the CPU"
# The torch runner's speed levers (rddm_infer.backends.torch.LEVERS states each in the backend line). None: the
# device's default; a lever the device cannot run (CUDA graphs, pinned memory on the CPU) asked for is an error.
TORCH_LEVERS = (
    Option("channels_last", bool, None, f"channels_last (NHWC) weights and inputs ({ON_CUDA})"),
    Option("fold_ws", bool, None, f"fold the weight standardisation into the conv weights once at load instead of "
                                  f"every call (same math to float rounding; {ON_CUDA})"),
    Option("sdpa", bool, None, f"fused scaled-dot-product attention kernels for the full attention (no N×N "
                               f"matrix; {ON_CUDA})"),
    Option("cuda_graph", bool, None, "capture all K steps of a restore as one CUDA graph per (batch, tile "
                                     "shape) at its second batch, replayed for every later one (CUDA only; default: "
                                     "on with --device cuda)"),
    Option("pinned_memory", bool, None, "page-locked host buffers and non-blocking copies to and from the GPU "
                                        "(CUDA only; default: on with --device cuda)"),
)

# The same for every backend (see the module docstring).
MODEL_OPTIONS = (
    Option("objective", str, None, "checkpoints: what the network predicts; exported models: must match the one "
           "they were exported with", (*OBJECTIVES, "auto_res_noise")),
    Option("sum_scale", float, None, "checkpoints: the schedule's sum_scale (Σβ², the noise level of x_T); exported "
           "models: must match the one baked in"),
    Option("timesteps", int, None, "checkpoints: length of the training schedule; exported models: must match"),
    Option("time_input", str, None, "reference checkpoints: what the UNet was fed as time, index (t: official "
           "experiments 2, 3, 6) or scaled (ᾱ_t·T / β̄_t·T: experiments 0, 4, 5, root src/); the file cannot tell. "
           "Exported models: must match", ("index", "scaled")),
    Option("translation", bool, None, "reference checkpoints: the x_t-only network is an img2img translation model "
           "(official img_to_img_translation, experiments 4, 5), sampled from the input image. Exported: must match"),
    Option("test_res_or_noise", str, None, "official checkpoints: the reference's test_res_or_noise, which UNet(s) "
           "to read: res_noise | x0_noise (both), res (unet0's residual), noise (unet1's noise)",
           ("res_noise", "res", "noise", "x0_noise")),
    Option("two_pass", bool, None, "reference checkpoints: sample as the official experiment 0 / root src/ "
           "ddim_sample does, K residual-only steps then K noise-only steps (2K network calls). Exported models: "
           "must match"),
)
SAMPLING_OPTIONS = (
    Option("steps", int, None, "sampling steps (default: the model's measured recommendation, else its export "
                               "default)"),
    Option("eta", float, None, "DDIM η in [0, 1], generation models only (default: the model's; restoration "
                               "models sample with η = 0, another value is an error)"),
)
# What ``choose_backend``/``load_runner`` add to a shared option's meaning (the flags' help says it once).
SELECTION_NOTES = {
    "device": "auto picks the fastest device here; cuda:N also sets the CUDA device index",
    "precision": "auto: with --backend auto, allow a calibrated reduced precision (see bench --calibrate); other "
                 "backends run the artifact's precision",
}


@dataclass(frozen=True)
class BackendSpec:
    name: str
    description: str
    extra: str  # pip extra that installs it ("" = the base install)
    requires: tuple[str, ...]  # modules that must be importable (probed, not imported)
    artifacts: tuple[str, ...]  # keys of ARTIFACTS it runs
    runner: str  # "module:Class", module relative to rddm_infer.backends
    options: tuple[Option, ...]
    devices: tuple[str, ...] = ("cpu",)
    model_options: tuple[str, ...] = ()  # MODEL_OPTIONS it passes to the checkpoint loader
    hardware: str = ""  # what else it needs, for the install hint
    needs: str = ""  # the packages, as users know them (default: the module names)

    def missing(self, modules: set[str] | None = None) -> list[str]:
        if modules is not None:
            return [m for m in self.requires if m not in modules]
        return [m for m in self.requires if not _importable(m)]

    def available(self, modules: set[str] | None = None) -> bool:
        return not self.missing(modules)

    @property
    def install_hint(self) -> str:
        pkg = f"pip install 'rddm-infer[{self.extra}]'" if self.extra else "pip install rddm-infer"
        return f"the {self.name} backend needs {self.needs or ', '.join(self.requires)} ({pkg}){self.hardware}"

    def runner_class(self) -> type:
        module, cls = self.runner.split(":")
        return getattr(importlib.import_module(module, __package__), cls)

    def option(self, name: str) -> Option | None:
        return next((o for o in self.options if o.name == name), None)

    def help_line(self) -> str:
        opts = ", ".join(o.name for o in self.options)
        return f"{self.name}: {self.description} [{', '.join(self.artifacts)}; options: {opts}]"


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


# Order matters: without a calibration table, ``auto`` takes the first available row that runs the artifact.
BACKENDS: list[BackendSpec] = [
    BackendSpec(
        "tensorrt", "native TensorRT engines, CUDA graphs", "tensorrt", ("tensorrt", "cuda.bindings"),
        ("engine",), ".tensorrt:TensorRTRunner",
        (DEVICE, Option("device_id", int, None, "CUDA device index (same as --device cuda:N)", cli=False),
         Option("cuda_graph", bool, True, "replay step chains as CUDA graphs")),
        devices=("cuda",), hardware=" and an NVIDIA GPU", needs="tensorrt and cuda-python"),
    BackendSpec(
        "onnxruntime", "ONNX Runtime: CPU, CUDA and TensorRT execution providers", "", ("onnxruntime",),
        ("onnx",), ".onnxruntime:OnnxRuntimeRunner",
        (DEVICE, THREADS, Option("providers", object, None, "execution providers, e.g. cuda,cpu (default: fastest)"),
         Option("device_id", int, None, "CUDA device index (same as --device cuda:N)", cli=False)),
        devices=("cpu", "cuda")),
    BackendSpec(
        "torch", "PyTorch from a checkpoint (on CUDA: channels_last, folded weight standardisation, SDPA, CUDA "
        "graphs, pinned copies, each can be switched off; optional torch.compile)", "torch", ("torch",),
        ("checkpoint",), ".torch:TorchRunner",
        (DEVICE, Option("threads", int, None, "torch.set_num_threads (process-wide)"),
         Option("compile", bool, False, "torch.compile the network"),
         Option("precision", str, "fp32", "fp32, or bf16 / fp16 autocast (fp16: CUDA only)", TORCH_PRECISION,
                gpu_choices=("fp16",)),
         *TORCH_LEVERS),
        devices=("cpu", "cuda"), model_options=("objective", "sum_scale", "timesteps", "time_input", "translation",
                                                   "test_res_or_noise", "two_pass")),
    BackendSpec(
        "openvino", "OpenVINO on the CPU, exact fp32 or bf16", "openvino", ("openvino",),
        ("onnx",), ".openvino:OpenVINORunner",
        (DEVICE, THREADS, Option("precision", str, "fp32", "fp32 (exact) or bf16 (AMX / avx512_bf16)", PRECISION),
         Option("cache_dir", str, None, "compiled-model cache (default: user cache dir; '' disables)"),
         Option("static_shapes", bool, True, "compile each input size as a static model (faster calls; "
                                             "each new size compiles once)"),
         Option("rewrite_norms", bool, True, "rewrite LayerNorm / GroupNorm at load into ops that need no layout "
                                             "reorders (same math; off: the graph as exported)")),
        devices=("cpu",)),
]
BY_NAME = {b.name: b for b in BACKENDS}
NAMES = ["auto", *BY_NAME]
ENTRY_POINTS = "rddm_infer.backends"  # packages add rows here: [project.entry-points."rddm_infer.backends"]


def register(spec: BackendSpec) -> BackendSpec:
    """Add a row (after the built-in ones, so ``auto`` prefers those): its runner, options and flags then
    work everywhere the table is read. An option that shares a name with another row's must share its type."""
    if spec.name in BY_NAME or spec.name == "auto":
        raise ValueError(f"backend {spec.name!r} is already registered")
    reserved = {o.name for o in (*MODEL_OPTIONS, *SAMPLING_OPTIONS)}
    for o in spec.options:
        other = next((x for b in BACKENDS for x in b.options if x.name == o.name), None)
        if o.name in reserved or (other is not None and other.type is not o.type):
            raise ValueError(f"backend {spec.name!r}: option {o.name!r} clashes with "
                             f"{'a model/sampling option' if o.name in reserved else 'another row of type ' + other.type.__name__}")
    BACKENDS.append(spec)
    BY_NAME[spec.name] = spec
    NAMES.append(spec.name)
    return spec


def _register_entry_points() -> None:
    """Rows that installed packages declare; a broken one is named on stderr and skipped (the CLI still runs)."""
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINTS):
        try:
            spec = ep.load()
            if not isinstance(spec, BackendSpec):
                raise TypeError(f"{ep.value} is a {type(spec).__name__}, not a BackendSpec")
            register(spec)
        except Exception as e:  # a third-party plugin must not break the built-in backends
            import sys
            print(f"rddm-infer: backend plugin {ep.name!r} ({ep.value}) skipped: {e}", file=sys.stderr)


_register_entry_points()


def backend_spec(name: str) -> BackendSpec:
    if name not in BY_NAME:
        raise BackendUnavailable(f"unknown backend {name!r}; choose one of {', '.join(NAMES)}")
    return BY_NAME[name]


def backends_for(kind: str | None) -> list[BackendSpec]:
    """The rows that run artifacts of ``kind`` (see :data:`ARTIFACTS`), in the table's order."""
    return [b for b in BACKENDS if kind in b.artifacts]


def backend_help() -> str:
    """The ``--backend`` help text, from the table."""
    return "auto (see the reason printed) | " + " | ".join(b.name for b in BACKENDS) + ". " + "; ".join(
        f"{b.name}: {b.description}" for b in BACKENDS)


def cli_options(group: str) -> list[tuple[Option, list[str]]]:
    """The flags of one group, ``backend`` | ``model`` | ``sampling``: each option once, with the rows
    that own it (a backend option several rows share is one flag: ``--threads``, ``--precision``)."""
    if group == "model":
        return [(o, []) for o in MODEL_OPTIONS]
    if group == "sampling":
        return [(o, []) for o in SAMPLING_OPTIONS]
    if group != "backend":
        raise ValueError(f"unknown option group {group!r}")
    merged: dict[str, tuple[Option, list[str]]] = {}
    for b in BACKENDS:
        for o in b.options:
            if o.cli:
                merged.setdefault(o.name, (o, []))[1].append(b.name)
    return list(merged.values())


def option_help(name: str, owners: list[str]) -> str:
    """One flag's help from the rows that own it: shared texts once, others per backend, with defaults."""
    texts: dict[str, list[str]] = {}
    for owner in owners:
        o = BY_NAME[owner].option(name)
        default = o.default if o.type is not bool else ("on" if o.default else "off")
        text = o.help + (f" (default: {default})" if o.default is not None and o.name != "device" else "")
        texts.setdefault(text, []).append(owner)
    if len(owners) == len(BACKENDS) and len(texts) == 1:
        parts = [next(iter(texts))]
    else:
        parts = [f"{', '.join(who)}: {text}" for text, who in texts.items()]
    note = SELECTION_NOTES.get(name)
    return "; ".join(parts + ([note] if note else [])) + "."


def split_options(spec: BackendSpec | None, options: Mapping[str, Any]) -> tuple[dict, dict, dict]:
    """(backend options, model options, sampling options) for ``spec``, each checked.

    An unknown name is an error; so is a backend option of another backend given a value
    (``None`` means "not given", so callers may pass every option they know). ``spec`` None:
    no backend (reading an artifact), so every backend option is unknown here.
    """
    model_names = {o.name: o for o in MODEL_OPTIONS}
    sampling = {o.name: o for o in SAMPLING_OPTIONS}
    own, model, samp = {}, {}, {}
    for name, value in options.items():
        if name in model_names:
            if (v := model_names[name].check(value, "model")) is not None:
                model[name] = v
        elif name in sampling:
            if (v := sampling[name].check(value, "sampling")) is not None:
                samp[name] = v
        elif spec is not None and (opt := spec.option(name)) is not None:
            if (v := opt.check(value, spec.name)) is not None:
                own[name] = v
        else:
            owners = [b.name for b in BACKENDS if b.option(name)]
            if not owners or spec is None:
                known = sorted({o.name for b in BACKENDS for o in b.options} | set(model_names) | set(sampling))
                raise OptionError(f"unknown option {name!r} (known: {', '.join(known)})")
            if value is not None:
                raise OptionError(f"option {name!r} does not apply to the {spec.name} backend "
                                  f"(it is an option of {', '.join(owners)})")
    return own, model, samp


def check_baked_options(meta, given: Mapping[str, Any], where: str) -> None:
    """Model options against an artifact's metadata: the same value is fine, another is an error."""
    derived = {"time_input": meta.config.time_input,  # absent from older artifacts: the index t
               "translation": meta.config.condition and not meta.unet.get("condition", True),
               "two_pass": meta.config.two_pass}
    for name, value in given.items():
        have = derived[name] if name in derived else meta.diffusion.get(name)
        if have is None:
            raise OptionError(f"{where}: {name} does not apply: the artifact records no {name}")
        same = abs(float(have) - float(value)) <= 1e-6 * max(1.0, abs(float(have))) \
            if name in ("sum_scale", "timesteps") else have == value
        if not same:
            raise OptionError(f"{where}: {name} {value} does not apply: the artifact was exported with "
                              f"{name} {have} (re-export it from the checkpoint to change it)")
