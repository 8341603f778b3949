"""rddm-infer: fast few-step restoration with Residual Denoising Diffusion Models.

The runtime needs numpy, opencv and an inference engine (ONNX Runtime, TensorRT);
``import rddm_infer`` never imports torch. The torch model lives in
:mod:`rddm_infer.model` (``pip install rddm-infer[torch]``).
"""

from importlib import import_module

__version__ = "0.1.0"

from .errors import RDDMError, CheckpointError, ImageError, BackendUnavailable  # noqa: E402
from .diffusion.schedule import DiffusionConfig, Schedule, SamplingPlan, time_grid  # noqa: E402

_LAZY = {  # name -> module, filled in by the runtime modules as they land
    "Restorer": ".api", "load_model": ".api", "restore_folder": ".api", "DEFAULT_MODEL": ".api",
    "EngineSampler": ".diffusion.engine_sampler", "Noise": ".diffusion.engine_sampler",
    "Runner": ".backends.base", "load_runner": ".backends.select", "read_artifact_meta": ".backends.select",
    "read_image": ".io.images", "write_image": ".io.images", "psnr": ".metrics", "ssim": ".metrics",
    "read_engine": ".backends.engine_file", "write_engine": ".backends.engine_file",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'rddm_infer' has no attribute {name!r}")


__all__ = ["__version__", "RDDMError", "CheckpointError", "ImageError", "BackendUnavailable", "DiffusionConfig",
           "Schedule", "SamplingPlan", "time_grid", *_LAZY]
