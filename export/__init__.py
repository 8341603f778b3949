"""rddm-export: trained RDDM checkpoint -> validated ONNX graphs (unet / step / fused, fp32 / fp16) -> TensorRT.

Needs the ``export`` extra (torch, onnx, onnxslim). The command line is ``rddm-export``.
"""

from importlib import import_module

_LAZY = {"export_onnx": ".onnx_export", "GraphBuilder": ".onnx_export", "artifact_meta": ".artifact",
         "read_metadata": ".artifact", "Artifact": ".artifact", "artifact_name": ".artifact",
         "validate_onnx": ".validate", "validate_engine": ".validate", "ValidationError": ".validate",
         "export_all": ".exporter", "to_mixed_fp16": ".fp16",
         "build_engine": ".tensorrt_build", "EngineProfile": ".tensorrt_build", "quantize_int8": ".int8"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'rddm_export' has no attribute {name!r}")

__all__ = list(_LAZY)
