"""The training loss: L1 between the network's outputs and what they predict, at a noised x_t and its time t.

x_t is either the forward process at a random t (``q_sample``, as the reference trains) or, with
``optim.rollout``, the state the few-step sampler itself reaches, run by the current network.
Every random draw comes from one generator, which the checkpoint saves, so a resumed run is exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rddm_infer.diffusion.sampler import sample
from rddm_infer.diffusion.schedule import SamplingPlan, Schedule, time_grid

from .config import TrainConfig


def targets(objective: str, x0: torch.Tensor, res: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """What each network output is trained to predict (REFERENCE.md, objectives)."""
    return {"pred_res_noise": (res, noise), "pred_res": (res,), "pred_noise": (noise,),
            "pred_x0_noise": (x0, noise), "pred_res_add_noise": (res, res + noise),
            "pred_x0_add_noise": (x0, x0 + noise), "pred_x0": (x0,)}[objective]


class Loss:
    """Σ over outputs of mean L1 for one micro-batch; draws t, ε (or a rollout) from ``gen``."""

    def __init__(self, cfg: TrainConfig, diffusion, device: torch.device, amp: bool, gen: torch.Generator):
        self.diffusion, self.device, self.amp, self.gen = diffusion, device, amp, gen
        self.channels_last, self.cuda_graph = cfg.run.channels_last, cfg.run.cuda_graph
        sched = Schedule.from_config(diffusion)  # the tables come from the core, never re-derived
        self.alpha_bar = torch.tensor(sched.alphas_cumsum, dtype=torch.float32, device=device)
        self.beta_bar = torch.tensor(sched.betas_cumsum, dtype=torch.float32, device=device)
        # optim.t_grid: train on the sampler's own time indices (the trailing -1 is "done", not a sampler step)
        grid = time_grid(diffusion.timesteps, cfg.optim.t_grid)[:-1] if cfg.optim.t_grid else []
        self.t_grid = torch.tensor(grid, dtype=torch.long, device=device)
        self.plan = SamplingPlan.create(diffusion, cfg.optim.t_grid) if cfg.optim.rollout else None

    def __call__(self, inp: torch.Tensor, gt: torch.Tensor, forward, net) -> torch.Tensor:
        """``inp``/``gt``: [0, 1] NCHW on the device; ``forward`` is trained, ``net`` (eager) runs rollouts."""
        x_in, x0 = inp * 2 - 1, gt * 2 - 1
        res = x_in - x0
        b = x0.shape[0]
        if self.plan is not None:  # optim.rollout: x_t where the sampler itself arrives
            x_t, t = self.rollout(net, x_in)
            a, s = self.alpha_bar[t].view(b, 1, 1, 1), self.beta_bar[t].view(b, 1, 1, 1)
            noise = (x_t - x0 - a * res) / s  # the ε that q_sample would need to land on this x_t
        else:
            t = self.sample_t(b)
            noise = torch.randn(x0.shape, generator=self.gen, device=self.device)
            # Schedule.q_sample's I_t = I_0 + ᾱ_t·I_res + β̄_t·ε with one t per sample.
            x_t = x0 + self.alpha_bar[t].view(b, 1, 1, 1) * res + self.beta_bar[t].view(b, 1, 1, 1) * noise
        outs = self.outputs(forward, x_t, x_in, t)
        goals = targets(self.diffusion.objective, x0, res, noise)
        return sum(F.l1_loss(o, g) for o, g in zip(outs, goals))

    def outputs(self, net, x_t, x_in, t) -> list[torch.Tensor]:
        x = torch.cat((x_t, x_in), dim=1)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp,
                            cache_enabled=not self.cuda_graph):
            return [o.float() for o in net(x, t)]

    @torch.no_grad()
    def rollout(self, net, x_in: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t, t) before a random step k of the K-step sampler, run by ``net`` from x_T.

        q_sample's x_t carries the *true* residual, so at low t the network learns to copy it; at
        inference x_t carries the network's own earlier estimates. Training on the sampler's own states
        (one k per micro-batch) teaches each step to improve on them, which is what the output is made of.
        """
        plan, b = self.plan, x_in.shape[0]
        if k is None:
            k = int(torch.randint(0, plan.steps, (1,), generator=self.gen, device=self.device))
        x_t = x_in + plan.init_scale() * torch.randn(x_in.shape, generator=self.gen, device=self.device)
        times = lambda t: torch.full((b,), int(t), dtype=torch.long, device=self.device)  # noqa: E731
        model = lambda x, xi, t: self.outputs(net, x, xi, times(t))  # noqa: E731
        return sample(model, plan, x_in, x_t, stop=k), times(plan.times[k])

    def sample_t(self, b: int) -> torch.Tensor:
        """One time index per sample: uniform over [0, T), or over the sampling grid with ``optim.t_grid``."""
        if len(self.t_grid):
            return self.t_grid[torch.randint(0, len(self.t_grid), (b,), generator=self.gen, device=self.device)]
        return torch.randint(0, self.diffusion.timesteps, (b,), generator=self.gen, device=self.device)
