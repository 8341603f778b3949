"""Backends: one runner module per engine, the table of them (:mod:`.registry`) and the one place a backend
is chosen (:mod:`.select`). Runners are imported only when used, so listing or choosing backends never pulls
in torch, TensorRT or CUDA."""

from ..diffusion.engine_sampler import EngineSampler, Noise
from ..errors import OptionError, RDDMError
from .base import Runner
from .registry import BACKENDS, NAMES, BackendSpec, Option, backend_help
from .select import Choice, choose_backend, installed_modules, load_runner, read_artifact_meta, resolve_model

__all__ = ["BACKENDS", "NAMES", "BackendSpec", "Choice", "EngineSampler", "Noise", "Option", "OptionError",
           "Runner", "RDDMError", "backend_help", "choose_backend", "installed_modules", "load_runner",
           "read_artifact_meta", "resolve_model"]
