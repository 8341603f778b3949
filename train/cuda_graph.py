"""Forward and backward of the network captured as CUDA graphs (``run.cuda_graph``).

The eager UNet issues ~13k small ops per iteration, so a GPU waits on Python for most of it;
replaying captured graphs removes that launch overhead at no compile time. The capture fixes
the batch and crop, which a training run never changes.
"""

from __future__ import annotations

import torch

from rddm_infer.errors import RDDMError

from .config import TrainConfig


def graphed_forward(net: torch.nn.Module, cfg: TrainConfig, device: torch.device, amp: bool):
    """``net`` as a graphed callable; gives ``net`` its own zeroed ``.grad`` buffers (see below)."""
    if device.type != "cuda":
        raise RDDMError(f"run.cuda_graph needs a CUDA device, not {device}")
    if cfg.run.compile:
        raise RDDMError("run.cuda_graph and run.compile exclude each other (use one)")
    r, crop = cfg.run, cfg.data.crop
    fmt = torch.channels_last if r.channels_last else torch.contiguous_format
    x = torch.randn(r.batch_size, cfg.unet_config().in_channels, crop, crop, device=device).contiguous(
        memory_format=fmt)
    t = torch.randint(0, cfg.diffusion_config().timesteps, (r.batch_size,), device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp, cache_enabled=False):
        forward = torch.cuda.make_graphed_callables(net, (x, t))
    # The graphed backward hands out views of its static buffers; autograd would adopt them as .grad
    # and the next micro-batch's replay would overwrite them. Own .grad buffers make it add instead.
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    return forward
