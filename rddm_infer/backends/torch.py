"""PyTorch runner: a checkpoint's network as a ``unet``-kind runner, with the GPU levers ``benchmarks/gpu_torch.py``
times.

It is the parity baseline for the exported graphs, so it is driven by the same
:class:`~rddm_infer.backends.base.EngineSampler` loop as every other backend; its
handles are torch tensors on the device, so the loop's arithmetic stays there too.

The levers (:data:`LEVERS`; registry options, so each is a ``--flag/--no-flag`` of ``restore`` and ``bench``) are
on by default with ``--device cuda`` and off on the CPU, where the runner keeps the reference's exact math; the
backend line states each one, on or off, and why when the device rules it out:

* ``channels_last``: weights and inputs in NHWC memory (cuDNN's tensor-core layout);
* ``fold_ws``: the weight standardisation folded into the conv weights once at load, not recomputed every call;
* ``sdpa``: fused scaled-dot-product attention for the full attention (no N×N matrix in memory);
* ``cuda_graph``: all K steps of a restore captured once per (batch, tile shape) as one CUDA graph and replayed,
  with the driver's own loop (:func:`~rddm_infer.diffusion.sampler.sample`), coefficients and noise; a shape's
  first batch runs step by step, its second is captured (a shape met once, e.g. a small image, costs no capture);
* ``pinned_memory``: page-locked host buffers, non-blocking copies to and from the GPU;

plus ``compile`` (torch.compile, off unless asked) and ``precision`` (bf16 / fp16 autocast only when asked).
"""

from __future__ import annotations

import copy
import os
import sys
from collections import OrderedDict
from typing import Any, Mapping

import numpy as np

from ..diffusion.metadata import ArtifactMeta
from ..diffusion.sampler import initial_state, sample
from ..diffusion.schedule import COEF_NAMES
from ..errors import BackendUnavailable, OptionError
from ..diffusion.graph_kinds import KINDS
from .base import Runner, threads_note

UNET = KINDS["unet"]  # the torch runner is a unet-kind runner
_SIGMA = COEF_NAMES.index("sigma")

LEVERS = {  # option -> how the backend line names it (registry.TORCH_LEVERS holds the options and their help)
    "channels_last": "channels_last",
    "fold_ws": "folded WS",
    "sdpa": "SDPA",
    "cuda_graph": "CUDA graph of all steps",  # captured at a shape's 2nd batch (CAPTURE_AT), replayed after
    "pinned_memory": "pinned copies",
}
CUDA_ONLY = {"cuda_graph": "a CUDA graph", "pinned_memory": "pinned host memory"}  # asked for on the CPU: an error
NET_LEVERS = ("channels_last", "fold_ws", "sdpa")  # levers that change the network module (a copy of the caller's)
MAX_GRAPHS = 8  # (batch, shape, plan) CUDA graphs kept (the least recently used goes first)
CAPTURE_AT = 2  # a (batch, shape, plan) is captured at its 2nd run: a shape met once (a small image) costs no capture
GRAPH_WARMUP = 2  # eager runs on a side stream before a capture (cuDNN / cuBLAS set-up, torch.compile)
BASELINE = "eager fp32 (reference)"  # the first of lever_variants: every lever off


def _torch():
    try:
        import torch
    except ImportError:
        raise BackendUnavailable("the torch backend needs PyTorch: pip install 'rddm-infer[torch]'") from None
    return torch


def lever_variants(device: str = "cuda", compile: bool = False, each: bool = True) -> list[tuple[str, dict]]:
    """What ``bench`` and the benchmarks time against eager fp32 in one run: ``(label, torch options)``.

    First eager fp32 with every lever off (the reference's math; the baseline), then (``each``) every lever alone
    on top of it, then every lever together at fp32, bf16 and (CUDA) fp16 autocast, and with ``compile`` the bf16
    one compiled as well. Levers ``device`` cannot run are left out, not listed as failures."""
    cuda = str(device).startswith("cuda")
    names = [n for n in LEVERS if cuda or n not in CUDA_ONLY]
    off = {n: False for n in LEVERS} | {"compile": False, "precision": "fp32"}
    out = [(BASELINE, off)]
    if each:
        out += [(f"fp32 + {LEVERS[n]}", {**off, n: True}) for n in names]
    every = {**off, **{n: True for n in names}}
    out += [(f"{p}{' autocast' if p != 'fp32' else ''}, every lever", {**every, "precision": p})
            for p in (("fp32", "bf16", "fp16") if cuda else ("fp32", "bf16"))]
    if compile:
        out.append(("bf16 autocast, every lever + torch.compile", {**every, "precision": "bf16", "compile": True}))
    return out


def bench_levers(model, size: int, batch: int = 1, runs: int = 3, warmup: int = 1, log=lambda s: None,
                 **options) -> list[dict]:
    """``rddm-infer bench --levers``: the checkpoint ``model`` on the torch backend, every variant of
    :func:`lever_variants` for the device ``options`` names (``compile`` adds the compiled one), timed one after the
    other against eager fp32 by :func:`~rddm_infer.backends.timings.time_variants` (one line each to ``log``).

    ``options``: bench's other flags (device, threads, model and sampling options; None: not given). A lever or
    ``precision`` given is an error: each row sets them itself."""
    from .registry import BY_NAME, parse_device, split_options
    from .select import choose_backend, load_runner
    from .timings import time_variants

    given = {k: v for k, v in options.items() if v is not None}
    clash = [k for k in given if k in LEVERS or k == "precision"]
    if clash:
        raise OptionError(f"--levers sets {', '.join('--' + k.replace('_', '-') for k in clash)} itself, "
                          f"row by row: leave {'it' if len(clash) == 1 else 'them'} out")
    choose_backend(model, "torch", device=given.get("device"))  # a wrong model kind or device: one error, not rows
    split_options(BY_NAME["torch"], given)  # likewise an option the torch backend does not take
    compile = bool(given.pop("compile", False))
    kind, _ = parse_device(given.get("device"))
    device = "cuda" if kind == "cuda" or (kind == "auto" and _torch().cuda.is_available()) else "cpu"
    return time_variants(lambda o: load_runner(model, "torch", **given, **o)[0], lever_variants(device, compile),
                         size, batch, runs, warmup, log=log)


class TorchRunner(Runner):
    """``UnetRes`` from a checkpoint path or a ``LoadedModel``, eager or with the GPU levers (module docstring).

    ``precision="bf16"`` / ``"fp16"`` runs the network under autocast (bf16: CPU with AMX / avx512_bf16, or CUDA;
    fp16: CUDA); the sampler arithmetic stays fp32. ``threads`` is torch.set_num_threads (process-wide).
    A lever left at None takes the device's default (on for CUDA, off on the CPU); a ``LoadedModel`` given is
    never changed (the levers that rewrite the network work on a copy).
    ``objective`` / ``sum_scale`` / ``timesteps`` / ``time_input`` / ``translation`` go to the checkpoint loader.
    """

    name = "torch"
    array_math = True

    def __init__(self, model: "str | os.PathLike | Any", device: str | None = None, compile: bool = False,
                 precision: str = "fp32", threads: int | None = None, channels_last: bool | None = None,
                 fold_ws: bool | None = None, sdpa: bool | None = None, cuda_graph: bool | None = None,
                 pinned_memory: bool | None = None, **model_options):
        torch = _torch()
        from ..model import TorchRDDM, fold_weight_standardization, load_checkpoint
        from ..model.unet import use_sdpa
        from .registry import BY_NAME, parse_device

        kind, index = parse_device(device)
        if kind == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailable(f"--device {device}: torch sees no CUDA GPU (torch {torch.__version__})")
        precision = BY_NAME["torch"].option("precision").check(precision or "fp32", "torch")
        self.device = {"auto": "cuda" if torch.cuda.is_available() else "cpu", "cpu": "cpu"}.get(
            kind, f"cuda:{index}" if index is not None else "cuda")
        cuda = self.device.startswith("cuda")
        if precision == "fp16" and not cuda:
            raise OptionError("--precision fp16 runs on CUDA only (this torch runner is on the CPU: fp32 or bf16)")
        given = dict(channels_last=channels_last, fold_ws=fold_ws, sdpa=sdpa, cuda_graph=cuda_graph,
                     pinned_memory=pinned_memory)
        for name in CUDA_ONLY:
            if given[name] and not cuda:
                raise OptionError(f"--{name.replace('_', '-')}: {CUDA_ONLY[name]} needs --device cuda; this torch "
                                  f"runner is on the CPU (leave it off there)")
        self.levers = {n: cuda if v is None else bool(v) for n, v in given.items()}
        self.graph_off = ""  # why CUDA graphs stopped (a capture that failed), stated in the backend line
        if threads:
            torch.set_num_threads(int(threads))
        self.threads = threads
        if hasattr(model, "net"):
            if any(v is not None for v in model_options.values()):
                raise OptionError(f"{', '.join(model_options)}: do not apply to an already loaded model")
            loaded = model
            if any(self.levers[n] for n in NET_LEVERS):
                loaded = copy.copy(model)
                loaded.net = copy.deepcopy(model.net)  # the caller's network stays as it was
        else:
            loaded = load_checkpoint(model, device=self.device, **model_options)
        self.loaded = loaded
        super().__init__(ArtifactMeta(graph="unet", unet=loaded.unet.to_dict(), diffusion=loaded.diffusion.to_dict(),
                                      size_multiple=loaded.unet.size_multiple, precision=precision,
                                      source=loaded.source,
                                      recommended_steps=loaded.info.get("recommended_steps"),
                                      correlated_noise_mode=loaded.info.get("correlated_noise_mode")))
        self._compile, self._compiled = compile, False
        self.precision = precision
        net = loaded.net
        if self.levers["fold_ws"]:
            fold_weight_standardization(net)
        if self.levers["sdpa"]:
            use_sdpa(net)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
        self._rddm = TorchRDDM(net, loaded.diffusion, self.device, dtype=dtype,
                               channels_last=self.levers["channels_last"])
        if self.levers["channels_last"]:
            self._rddm.net.to(memory_format=torch.channels_last)
        self._graphs: OrderedDict[tuple, _StepsGraph] = OrderedDict()
        self._pool = None  # one memory pool for all of them (graphs replayed one at a time, outputs read at once)
        self._seen: OrderedDict[tuple, int] = OrderedDict()  # runs of each key not captured yet (bounded)

    @classmethod
    def read_meta(cls, path, **model_options) -> ArtifactMeta:
        return cls(path, device="cpu", **model_options).meta

    @property
    def description(self) -> str:
        cuda = self.device.startswith("cuda")
        if self.precision != "fp32":
            prec = f"{self.precision} autocast"
        else:
            prec = "fp32 (TF32 convolutions)" if cuda and _torch().backends.cudnn.allow_tf32 else "fp32"
        states = []
        for name, label in LEVERS.items():
            if self.levers[name]:
                states.append(label)
            elif name == "cuda_graph" and self.graph_off:
                states.append(f"{label} off ({self.graph_off})")
            else:
                states.append(f"{label} off" + (" (cpu)" if name in CUDA_ONLY and not cuda else ""))
        states.append("torch.compile" if self._compile else "not compiled")
        note = self.loaded.info.get("time_input")
        return (f"torch ({self.device}, {prec}{threads_note(self.threads)}; {', '.join(states)})"
                + (f"; reference checkpoint: {note}" if note else ""))

    def _activate(self) -> None:
        if self._compile and not self._compiled:
            self._rddm.net = _torch().compile(self._rddm.net)
            self._compiled = True

    def _deactivate(self) -> None:
        self._graphs.clear()  # their memory pool goes with the last of them
        self._pool = None
        self._seen.clear()

    # -- data: torch tensors on the device (pinned, non-blocking copies when that lever is on)
    def upload(self, a: np.ndarray):
        t = _torch().from_numpy(np.ascontiguousarray(a, dtype=np.float32))
        if self.levers["pinned_memory"]:  # the caching host allocator keeps the block until the copy is done
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def download(self, h) -> np.ndarray:
        if not hasattr(h, "detach"):
            return np.asarray(h)
        h = h.detach().float().contiguous()  # NCHW whatever the network's memory format
        if self.levers["pinned_memory"] and h.is_cuda:
            torch = _torch()
            host = torch.empty(h.shape, dtype=h.dtype, pin_memory=True)
            host.copy_(h, non_blocking=True)
            torch.cuda.current_stream(h.device).synchronize()
            return host.numpy()
        return h.cpu().numpy()

    def infer(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        torch = _torch()
        x_t, x_input, t = (feeds[n] for n in UNET.inputs)
        x_t, x_input = (f if torch.is_tensor(f) else self.upload(f) for f in (x_t, x_input))
        t = t.detach().cpu().numpy() if torch.is_tensor(t) else np.asarray(t, dtype=np.float32)
        row = t.reshape(t.shape[0], -1)[0].tolist()  # one step's time: (B,) index or (B, 2) scaled pair
        with torch.inference_mode():
            outs = self._rddm.model_fn(x_t, x_input, tuple(row) if len(row) == 2 else int(row[0]))
        return dict(zip(UNET.outputs, outs))

    # -- the whole K-step loop as one CUDA graph
    def run_plan(self, x_input: np.ndarray, plan, noise) -> np.ndarray | None:
        if not self.levers["cuda_graph"]:
            return None
        key = (tuple(x_input.shape), repr(plan.config), plan.times, plan.coefs.tobytes())
        graph = self._graphs.pop(key, None)
        if graph is None:
            runs = self._seen.pop(key, 0) + 1
            if runs < CAPTURE_AT:  # step by step this time
                self._seen[key] = runs
                while len(self._seen) > 64 * MAX_GRAPHS:
                    self._seen.popitem(last=False)
                return None
            while len(self._graphs) >= MAX_GRAPHS:  # many shapes: the least recently used graph's memory goes
                self._graphs.popitem(last=False)
            if self._pool is None:
                self._pool = _torch().cuda.graph_pool_handle()
            graph = _StepsGraph(self, x_input.shape, plan, self._pool)
        self._graphs[key] = graph  # most recently used last
        x_t = initial_state(plan, x_input, noise=noise.eps)
        try:
            return graph.run(x_input, x_t, noise.steps)
        except _CaptureFailed as e:  # a network that cannot be captured runs eagerly, and the backend line says so
            self._graphs.clear()
            self.levers["cuda_graph"] = False
            self.graph_off = f"capture failed: {e}"
            print(f"torch: CUDA graph off, eager from here: {self.graph_off}", file=sys.stderr)
            return None
        except BaseException:  # e.g. out of memory in the warm-up: this batch fails, the next shape captures anew
            if graph.graph is None:
                self._graphs.pop(key, None)
            raise


class _CaptureFailed(RuntimeError):
    """The eager warm-up ran, the capture did not (an operation a CUDA graph cannot record)."""


class _StepsGraph:
    """All K steps of one plan for one batch shape, captured once as a CUDA graph and replayed.

    Static device buffers hold x_input, x_T and the z of each stochastic step (one block, filled by one copy
    from a host block: pinned and non-blocking with ``pinned_memory``); the loop is the driver's own
    :func:`~rddm_infer.diffusion.sampler.sample` with the plan's coefficients, around the runner's network call
    (time tensors made once, before the capture). The result is copied back into a host buffer at once, so the
    runner's graphs can share one memory pool: a later capture may reuse an earlier graph's scratch memory (its
    output included), which only matters while a replay's output is still unread, and none ever is.
    """

    def __init__(self, runner: TorchRunner, shape: tuple, plan, pool=None):
        torch = _torch()
        self.pool = pool
        self.device, self.pinned = torch.device(runner.device), runner.levers["pinned_memory"]
        rddm = runner._rddm
        self.noisy = [i for i in range(plan.steps) if plan.coefs[i, _SIGMA] > 0]
        n = 2 + len(self.noisy)
        self.host = torch.empty((n, *shape), dtype=torch.float32, pin_memory=self.pinned)
        self.inputs = torch.empty((n, *shape), dtype=torch.float32, device=self.device)
        self.host_out = torch.empty(tuple(shape), dtype=torch.float32, pin_memory=self.pinned)
        times = {}
        for i in range(plan.steps):
            t = plan.net_time(i)
            if t not in times:
                times[t] = rddm.time_input(t, shape[0], self.device)
        z = {i: self.inputs[2 + j] for j, i in enumerate(self.noisy)}

        def model(x_t, x_input, t):
            return rddm.call(x_t, x_input, times[t])

        self._loop = lambda: sample(model, plan, self.inputs[0], self.inputs[1], z.__getitem__).contiguous()
        self._rddm = rddm
        self.graph, self.out = None, None

    def _capture(self) -> None:
        """Warm up on a side stream, then capture (the recipe of PyTorch's CUDA graph notes)."""
        torch = _torch()
        self._rddm.autocast_cache = False  # weight casts recorded in the graph, not kept from outside it
        try:
            side = torch.cuda.Stream(device=self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side), torch.no_grad():
                for _ in range(GRAPH_WARMUP):
                    self._loop()
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            try:
                # thread_local: reader / writer threads of the restore pipeline may use CUDA meanwhile
                with torch.no_grad(), torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                    out = self._loop()
            except torch.cuda.OutOfMemoryError:
                raise
            except RuntimeError as e:
                raise _CaptureFailed((str(e).strip().splitlines() or [type(e).__name__])[0][:160]) from e
        finally:
            self._rddm.autocast_cache = True
        self.graph, self.out = graph, out

    def fill(self, x_input: np.ndarray, x_t: np.ndarray, steps) -> None:
        """Copy one run's x_input, x_T and step noises into the static device buffers the graph reads."""
        host = self.host.numpy()  # free to write: the last run synchronised after its copies
        host[0], host[1] = x_input, x_t
        for j, i in enumerate(self.noisy):
            host[2 + j] = steps[i]
        self.inputs.copy_(self.host, non_blocking=self.pinned)

    def run(self, x_input: np.ndarray, x_t: np.ndarray, steps) -> np.ndarray:
        torch = _torch()
        with torch.cuda.device(self.device):  # cuda:N: the capture's and the replay's streams are that GPU's
            self.fill(x_input, x_t, steps)
            if self.graph is None:
                self._capture()
            self.graph.replay()
            self.host_out.copy_(self.out, non_blocking=self.pinned)
            torch.cuda.current_stream(self.device).synchronize()
        return self.host_out.numpy().copy()
