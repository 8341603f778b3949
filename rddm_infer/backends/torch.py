"""PyTorch reference runner: a checkpoint's network as a ``unet``-kind runner.

It is the parity baseline for the exported graphs, so it is driven by the same
:class:`~rddm_infer.backends.base.EngineSampler` loop as every other backend; its
handles are torch tensors on the device, so the loop's arithmetic stays there too.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np

from ..diffusion.metadata import ArtifactMeta
from ..errors import BackendUnavailable, OptionError
from ..diffusion.graph_kinds import KINDS
from .base import Runner, threads_note

UNET = KINDS["unet"]  # the torch runner is a unet-kind runner


def _torch():
    try:
        import torch
    except ImportError:
        raise BackendUnavailable("the torch backend needs PyTorch: pip install 'rddm-infer[torch]'") from None
    return torch


class TorchRunner(Runner):
    """Eager (or ``torch.compile``d) ``UnetRes`` from a checkpoint path or a ``LoadedModel``.

    ``precision="bf16"`` runs the network under bf16 autocast (CPU with AMX / avx512_bf16, or CUDA);
    the sampler arithmetic stays fp32. ``threads`` is torch.set_num_threads (process-wide).
    ``objective`` / ``sum_scale`` / ``timesteps`` / ``time_input`` / ``translation`` go to the checkpoint loader.
    """

    name = "torch"
    array_math = True

    def __init__(self, model: "str | os.PathLike | Any", device: str | None = None, compile: bool = False,
                 precision: str = "fp32", threads: int | None = None, **model_options):
        torch = _torch()
        from ..model import TorchRDDM, load_checkpoint
        from .registry import PRECISION, parse_device

        kind, index = parse_device(device)
        if kind == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailable(f"--device {device}: torch sees no CUDA GPU (torch {torch.__version__})")
        if precision not in PRECISION:
            raise OptionError(f"torch option 'precision' must be one of {', '.join(PRECISION)}, got {precision!r}")
        self.device = {"auto": "cuda" if torch.cuda.is_available() else "cpu", "cpu": "cpu"}.get(
            kind, f"cuda:{index}" if index is not None else "cuda")
        if threads:
            torch.set_num_threads(int(threads))
        self.threads = threads
        if hasattr(model, "net"):
            if any(v is not None for v in model_options.values()):
                raise OptionError(f"{', '.join(model_options)}: do not apply to an already loaded model")
            loaded = model
        else:
            loaded = load_checkpoint(model, device=self.device, **model_options)
        self.loaded = loaded
        super().__init__(ArtifactMeta(graph="unet", unet=loaded.unet.to_dict(), diffusion=loaded.diffusion.to_dict(),
                                      size_multiple=loaded.unet.size_multiple, precision=precision,
                                      source=loaded.source,
                                      recommended_steps=loaded.info.get("recommended_steps")))
        self._compile = compile
        self.precision = precision
        self._rddm = TorchRDDM(loaded.net, loaded.diffusion, self.device,
                               dtype=torch.bfloat16 if precision == "bf16" else torch.float32)

    @classmethod
    def read_meta(cls, path, **model_options) -> ArtifactMeta:
        return cls(path, device="cpu", **model_options).meta

    @property
    def description(self) -> str:
        extra = "".join((", bf16 autocast" if self.precision == "bf16" else ", fp32",
                         ", compiled" if self._compile else "", threads_note(self.threads)))
        note = self.loaded.info.get("time_input")
        return f"torch ({self.device}{extra})" + (f"; reference checkpoint: {note}" if note else "")

    def _activate(self) -> None:
        if self._compile:
            self._rddm.net = _torch().compile(self._rddm.net)

    def upload(self, a: np.ndarray):
        return _torch().from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(self.device)

    def download(self, h) -> np.ndarray:
        return h.detach().float().cpu().numpy() if hasattr(h, "detach") else np.asarray(h)

    def infer(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        torch = _torch()
        x_t, x_input, t = (f if torch.is_tensor(f) else self.upload(f) for f in
                           (feeds[n] for n in UNET.inputs))
        with torch.inference_mode():
            row = t.reshape(t.shape[0], -1)[0].tolist()  # one step's time: (B,) index or (B, 2) scaled pair
            outs = self._rddm.model_fn(x_t, x_input, tuple(row) if len(row) == 2 else int(row[0]))
        return dict(zip(UNET.outputs, outs))
