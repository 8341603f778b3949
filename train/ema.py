"""The EMA weights: what validation scores and what the exporter ships, so they get their own small class."""

from __future__ import annotations

import copy

import torch


class EMA:
    """Exponential moving average of the weights, updated every ``every`` iterations.

    Until ``start`` it copies the online weights; then the decay warms up as
    ``1 - (1 + n)^(-2/3)`` capped at ``decay`` (ema-pytorch's schedule, which the reference uses).
    """

    def __init__(self, net: torch.nn.Module, decay: float, every: int, start: int):
        self.model = copy.deepcopy(net).eval().requires_grad_(False)
        self.decay, self.every, self.start = decay, every, start

    def current_decay(self, iteration: int) -> float:
        n = iteration - self.start - 1
        return 0.0 if n <= 0 else min(self.decay, 1 - (1 + n) ** (-2 / 3))

    @torch.no_grad()
    def update(self, net: torch.nn.Module, iteration: int) -> None:
        if iteration % self.every:
            return
        ema_p, net_p = list(self.model.parameters()), list(net.parameters())
        d = self.current_decay(iteration)
        if d == 0.0:
            torch._foreach_copy_(ema_p, net_p)
        else:
            torch._foreach_lerp_(ema_p, net_p, 1.0 - d)
