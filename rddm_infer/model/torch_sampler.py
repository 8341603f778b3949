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
                 dtype: torch.dtype = torch.float32, channels_last: bool = False):
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
        self.channels_last = channels_last  # the network's input in NHWC memory (its weights are the caller's)
        self.autocast_cache = True  # False inside a CUDA graph capture (the cast weights live in the graph)

    def model_fn(self, x_t: torch.Tensor, x_input: torch.Tensor, t: int | tuple[float, float]):
        """(x_t, x_input, t) -> network outputs, the interface every backend implements.

        ``t``: the step index, or the pair (ᾱ_t·T, β̄_t·T) of a "scaled" time input
        (:meth:`~rddm_infer.diffusion.schedule.SamplingPlan.net_time`)."""
        return self.call(x_t, x_input, self.time_input(t, x_t.shape[0], x_t.device))

    def time_input(self, t: int | tuple[float, float], batch: int, device) -> torch.Tensor:
        """The network's time tensor for one step's ``t`` (as :meth:`model_fn` takes it)."""
        if isinstance(t, tuple):
            time = torch.tensor(t, device=device, dtype=torch.float32).expand(batch, 2)
            return select_time(time, self.num_outputs, self.diffusion.objective)
        return torch.full((batch,), t, device=device, dtype=torch.long)

    def call(self, x_t: torch.Tensor, x_input: torch.Tensor, time: torch.Tensor):
        """One network call with a ready time tensor (:meth:`time_input`): outputs as float32."""
        x = torch.cat((x_t, x_input), dim=1) if self.concat else x_t
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32,
                            cache_enabled=self.autocast_cache):
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
