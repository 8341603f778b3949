"""The PyTorch reference sampler: the shared RDDM step around a torch ``UnetRes``.

Noise comes from numpy (seeded) or from the caller, so every backend fed the same
seed starts from bit-identical noise.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import RDDMError
from ..diffusion.sampler import initial_state, sample, select_time
from ..diffusion.schedule import DiffusionConfig, SamplingPlan
from .unet import UnetRes


class TorchRDDM:
    """restore(x_input in [0, 1]) / generate(shape) with the few-step residual/noise sampler."""

    def __init__(self, net: UnetRes, diffusion: DiffusionConfig, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32):
        cfg = getattr(net, "config", None)
        if cfg is not None and cfg.input_condition:
            raise RDDMError("this model takes an extra input-condition image (reference input_condition=True), "
                            "which the sampler has no input for; it cannot be sampled here")
        self.net = net.eval().to(device)
        self.diffusion = diffusion
        # The network's own input decides what is concatenated: an img2img translation network
        # (reference img_to_img_translation) sees x_t only although it samples towards x_input.
        self.concat = cfg.condition if cfg is not None else diffusion.condition
        self.num_outputs = cfg.num_outputs if cfg is not None else 2
        self.device = torch.device(device)
        self.dtype = dtype

    def model_fn(self, x_t: torch.Tensor, x_input: torch.Tensor, t: int | tuple[float, float]):
        """(x_t, x_input, t) -> network outputs, the interface every backend implements.

        ``t``: the step index, or the pair (ᾱ_t·T, β̄_t·T) of a "scaled" time input
        (:meth:`~rddm_infer.diffusion.schedule.SamplingPlan.net_time`)."""
        x = torch.cat((x_t, x_input), dim=1) if self.concat else x_t
        if isinstance(t, tuple):
            time = torch.tensor(t, device=x.device, dtype=torch.float32).expand(x.shape[0], 2)
            time = select_time(time, self.num_outputs, self.diffusion.objective)
        else:
            time = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            outs = self.net(x, time)
        return tuple(o.float() for o in outs)

    @torch.no_grad()
    def sample_model_space(self, x_input: np.ndarray, plan: SamplingPlan, *, seed: int | None = None,
                           noise: np.ndarray | None = None, step_noises: list[np.ndarray] | None = None) -> np.ndarray:
        """The whole loop on [-1, 1] arrays (NCHW float32); returns the final sample."""
        rng = np.random.default_rng(seed)
        x_t = initial_state(plan, x_input, rng, noise)
        dev = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(self.device)  # noqa: E731

        def step_noise(i):
            z = step_noises[i] if step_noises is not None else rng.standard_normal(x_input.shape, dtype=np.float32)
            return dev(z)

        out = sample(self.model_fn, plan, dev(x_input), dev(x_t), step_noise)
        return out.float().cpu().numpy()

    def restore(self, x_input: np.ndarray, steps: int = 5, eta: float = 0.0, *, seed: int | None = 0,
                noise: np.ndarray | None = None) -> np.ndarray:
        """Restore NCHW images in [0, 1]; returns [0, 1] (the last step is already clamped)."""
        plan = SamplingPlan.create(self.diffusion, steps, eta)
        x = np.asarray(x_input, dtype=np.float32) * 2 - 1
        return (self.sample_model_space(x, plan, seed=seed, noise=noise) + 1) * 0.5

    def generate(self, shape: tuple[int, int, int, int], steps: int = 5, eta: float = 0.0, *, seed: int | None = 0,
                 noise: np.ndarray | None = None) -> np.ndarray:
        """Unconditional sampling (I_in = 0) for generation models; returns [0, 1]."""
        if self.diffusion.condition:
            raise ValueError("generate() needs a generation model (condition=False)")
        plan = SamplingPlan.create(self.diffusion, steps, eta)
        zeros = np.zeros(shape, dtype=np.float32)
        return (self.sample_model_space(zeros, plan, seed=seed, noise=noise) + 1) * 0.5
