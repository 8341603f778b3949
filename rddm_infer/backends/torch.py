"""PyTorch reference runner: a checkpoint's network as a ``unet``-kind runner.

It is the parity baseline for the exported graphs, so it is driven by the same
:class:`~rddm_infer.backends.base.EngineSampler` loop as every other backend; its
handles are torch tensors on the device, so the loop's arithmetic stays there too.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np

from ..artifact import ArtifactMeta
from ..errors import BackendUnavailable
from .base import Runner


def _torch():
    try:
        import torch
    except ImportError:
        raise BackendUnavailable("the torch backend needs PyTorch: pip install 'rddm-infer[torch]'") from None
    return torch


class TorchRunner(Runner):
    """Eager (or ``torch.compile``d) ``UnetRes`` from a checkpoint path or a ``LoadedModel``."""

    name = "torch"
    array_math = True

    def __init__(self, model: "str | os.PathLike | Any", device: str | None = None, compile: bool = False):
        torch = _torch()
        from ..model import TorchRDDM, load_checkpoint

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        loaded = model if hasattr(model, "net") else load_checkpoint(model, device=self.device)
        self.loaded = loaded
        super().__init__(ArtifactMeta(graph="unet", unet=loaded.unet.to_dict(), diffusion=loaded.diffusion.to_dict(),
                                      size_multiple=loaded.unet.size_multiple, source=loaded.source))
        self._compile = compile
        self._rddm = TorchRDDM(loaded.net, loaded.diffusion, self.device)

    @property
    def description(self) -> str:
        return f"torch ({self.device}{', compiled' if self._compile else ''})"

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
                           (feeds["x_t"], feeds["x_input"], feeds["t"]))
        with torch.inference_mode():
            outs = self._rddm.model_fn(x_t, x_input, int(t.reshape(-1)[0]))
        return {f"out{i}": o for i, o in enumerate(outs)}
