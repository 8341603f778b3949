"""Native TensorRT runner: engine files from ``rddm-export``, cuda-python for memory and streams.

Host data goes through pinned buffers with asynchronous copies on one stream. For
``step`` graphs the whole K-step chain (ping-pong ``x_t``/``x_next`` buffers, one
device-resident ``coef`` row and noise tensor per step) is captured once per input
shape as a CUDA graph and replayed: a restore is then H2D copies, one graph launch,
one D2H copy.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import BackendUnavailable, CheckpointError, RDDMError
from ..diffusion.metadata import ArtifactMeta
from .base import Runner


def _imports():
    try:
        import tensorrt as trt
        from cuda.bindings import runtime as cudart
    except ImportError as e:
        raise BackendUnavailable(f"the tensorrt backend needs tensorrt and cuda-python "
                                 f"(pip install 'rddm-infer[tensorrt]'): {e}") from None
    return trt, cudart


_MAX_SHAPES = 8  # input shapes whose buffers (and CUDA graphs) stay allocated
_ALIGN = 64  # floats: TensorRT wants tensor addresses aligned to 256 bytes


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def _check(result):
    """cuda-python returns (error, *values): raise on error, unwrap the values."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RDDMError(f"CUDA error {err!r}")
    return values[0] if len(values) == 1 else (tuple(values) if values else None)


class _Buffer:
    """A device allocation plus a pinned host mirror of the same size (float32)."""

    def __init__(self, cudart, shape: Sequence[int]):
        self.cudart, self.shape = cudart, tuple(int(s) for s in shape)
        self.nbytes = int(np.prod(self.shape)) * 4
        self.device = _check(cudart.cudaMalloc(self.nbytes))
        self.host_ptr = _check(cudart.cudaMallocHost(self.nbytes))
        c_ptr = ctypes.cast(self.host_ptr, ctypes.POINTER(ctypes.c_float))
        self.host = np.ctypeslib.as_array(c_ptr, shape=self.shape)

    def upload(self, a: np.ndarray, stream) -> None:
        np.copyto(self.host, a, casting="same_kind")
        _check(self.cudart.cudaMemcpyAsync(self.device, self.host_ptr, self.nbytes,
                                           self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, stream))

    def download(self, stream) -> None:
        _check(self.cudart.cudaMemcpyAsync(self.host_ptr, self.device, self.nbytes,
                                           self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream))

    def free(self) -> None:
        self.cudart.cudaFree(self.device)
        self.cudart.cudaFreeHost(self.host_ptr)


class TensorRTRunner(Runner):
    """A serialized engine (our header + TensorRT plan); ``cuda_graph`` replays step chains."""

    name = "tensorrt"
    activations_on_gpu = True

    def __init__(self, path: str | os.PathLike, device_id: int | None = None, cuda_graph: bool = True,
                 device: str | None = None):
        from .engine_file import read_engine
        from .registry import parse_device

        kind, index = parse_device(device)
        if kind == "cpu":
            raise BackendUnavailable("--device cpu: TensorRT engines run on an NVIDIA GPU (use an .onnx model)")
        if device_id is not None and index is not None and index != device_id:
            raise RDDMError(f"--device {device} contradicts device_id {device_id}")
        device_id = index if index is not None else (device_id or 0)

        self.trt, self.cudart = _imports()
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: no such engine file")
        meta, self._plan = read_engine(self.path)  # header checked before TensorRT sees the plan
        super().__init__(meta)
        self.device_id, self.cuda_graph = device_id, cuda_graph
        self._bufs: dict[tuple, dict[str, _Buffer]] = {}
        self._graphs: dict[tuple, Any] = {}

    @classmethod
    def choice_reason(cls, kind: str, model, device: str, providers) -> str:
        return "native TensorRT engine" if kind == "engine" else f"TensorRT engine {model.name} found beside the ONNX model"

    @classmethod
    def gpu_visible(cls) -> bool:
        return True  # installed TensorRT means an NVIDIA GPU is the target

    @classmethod
    def read_meta(cls, path, **model_options) -> ArtifactMeta:
        from .engine_file import read_engine

        return read_engine(path)[0]  # the header: no GPU needed

    @property
    def description(self) -> str:
        return f"tensorrt ({'CUDA graphs' if self.cuda_graph else 'eager'}, {self.meta.precision})"

    def _activate(self) -> None:
        from .engine_file import BuildTarget, check_compatible

        trt, cudart = self.trt, self.cudart
        _check(cudart.cudaSetDevice(self.device_id))
        props = _check(cudart.cudaGetDeviceProperties(self.device_id))
        built = self.meta.extra.get("tensorrt")
        if built:
            check_compatible(self.path, BuildTarget.from_dict(built), trt.__version__, (props.major, props.minor))
        self._logger = trt.Logger(trt.Logger.ERROR)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(self._plan)
        if self.engine is None:
            raise CheckpointError(f"{self.path}: TensorRT could not deserialize the engine "
                                  f"(built for another TensorRT version or GPU?)")
        self.context = self.engine.create_execution_context()
        self.stream = _check(cudart.cudaStreamCreate())
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        bad = [n for n in names if self.engine.get_tensor_dtype(n) != trt.DataType.FLOAT]
        if bad:
            raise CheckpointError(f"{self.path}: engine I/O must be float32 (got other types for {', '.join(bad)})")

    def _deactivate(self) -> None:
        cudart = self.cudart
        cudart.cudaStreamSynchronize(self.stream)
        for g in self._graphs.values():
            cudart.cudaGraphExecDestroy(g)
        for bufs in self._bufs.values():
            for b in bufs.values():
                b.free()
        self._graphs.clear()
        self._bufs.clear()
        cudart.cudaStreamDestroy(self.stream)
        del self.context, self.engine

    # -- buffers bound to shapes
    def _buffers(self, key: tuple, shapes: Mapping[str, tuple]) -> dict[str, _Buffer]:
        if key not in self._bufs:
            if len(self._bufs) >= _MAX_SHAPES:  # many image sizes: free the oldest shape's memory and graph
                old = next(iter(self._bufs))
                self.cudart.cudaStreamSynchronize(self.stream)
                for b in self._bufs.pop(old).values():
                    b.free()
                if old in self._graphs:
                    self.cudart.cudaGraphExecDestroy(self._graphs.pop(old))
            self._bufs[key] = {n: _Buffer(self.cudart, s) for n, s in shapes.items()}
        return self._bufs[key]

    def _set_shape(self, name: str, shape: tuple) -> None:
        if not self.context.set_input_shape(name, shape):
            raise RDDMError(f"{self.path}: input {name} shape {tuple(shape)} is outside the engine's optimization "
                            f"profile; rebuild it for this size or use a smaller --tile / --batch")

    def _bind(self, addresses: Mapping[str, _Buffer]) -> None:
        for name, buf in addresses.items():
            self.context.set_tensor_address(name, buf.device)

    def _execute(self) -> None:
        if not self.context.execute_async_v3(self.stream):
            raise RDDMError(f"{self.path}: TensorRT execution failed")

    def _output_shapes(self) -> dict[str, tuple]:
        return {n: tuple(self.context.get_tensor_shape(n)) for n in self.outputs}

    # -- one call (unet / fused graphs)
    def infer(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        feeds = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in feeds.items() if k in self.inputs}
        for name, a in feeds.items():
            self._set_shape(name, a.shape)
        key = ("call", *((n, feeds[n].shape) for n in self.inputs))
        bufs = self._buffers(key, {**{n: a.shape for n, a in feeds.items()}, **self._output_shapes()})
        for name, a in feeds.items():
            bufs[name].upload(a, self.stream)
        self._bind(bufs)
        self._execute()
        for name in self.outputs:
            bufs[name].download(self.stream)
        _check(self.cudart.cudaStreamSynchronize(self.stream))
        return {n: bufs[n].host.copy() for n in self.outputs}

    # -- the K-step chain of a step graph, on the device, replayed as a CUDA graph
    def run_chain(self, static, per_step, carry, state):
        if self.meta.graph != "step" or carry != ("x_t", "x_next"):
            return super().run_chain(static, per_step, carry, state)
        cudart, k = self.cudart, len(per_step)
        shape = tuple(state.shape)
        key = ("chain", shape, k)
        stochastic = [not isinstance(f["noise"], np.ndarray) or bool(np.any(f["noise"])) for f in per_step]
        plane = _aligned(int(np.prod(shape)))
        names = {"x_input": shape, "x_a": shape, "x_b": shape, "x0": shape, "coef": (k, _ALIGN),
                 "noise": (k, plane)}
        bufs = self._buffers(key, names)
        bufs["x_input"].upload(static["x_input"], self.stream)
        bufs["x_a"].upload(state, self.stream)
        coef = np.zeros((k, _ALIGN), dtype=np.float32)  # one 256-byte-aligned row per step
        noise = np.zeros((k, plane), dtype=np.float32)
        for i, f in enumerate(per_step):
            coef[i, :8] = f["coef"]
            if stochastic[i]:
                noise[i, :int(np.prod(shape))] = self.download(f["noise"]).ravel()
        bufs["coef"].upload(coef, self.stream)
        bufs["noise"].upload(noise, self.stream)
        if key in self._graphs:
            _check(cudart.cudaGraphLaunch(self._graphs[key], self.stream))
        else:
            self._enqueue_chain(bufs, k)  # the first run also lets TensorRT finish lazy setup before capture
            if self.cuda_graph:
                self._capture(key, bufs, k)
        out = bufs["x_a" if k % 2 == 0 else "x_b"]
        out.download(self.stream)
        _check(cudart.cudaStreamSynchronize(self.stream))
        return out.host.copy()

    def _capture(self, key: tuple, bufs: dict[str, _Buffer], k: int) -> None:
        """Record the K enqueues as one CUDA graph; an engine that cannot be captured runs eagerly."""
        cudart = self.cudart
        _check(cudart.cudaStreamSynchronize(self.stream))
        _check(cudart.cudaStreamBeginCapture(self.stream, cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal))
        try:
            self._enqueue_chain(bufs, k)
        finally:
            err, graph = cudart.cudaStreamEndCapture(self.stream)
        if int(err) != 0:
            self.cuda_graph = False
            return
        self._graphs[key] = _check(cudart.cudaGraphInstantiate(graph, 0))
        cudart.cudaGraphDestroy(graph)

    def _enqueue_chain(self, bufs: dict[str, _Buffer], k: int) -> None:
        ctx, shape = self.context, bufs["x_input"].shape
        for name, s in (("x_t", shape), ("x_input", shape), ("coef", (8,)), ("noise", shape)):
            self._set_shape(name, s)
        ctx.set_tensor_address("x_input", bufs["x_input"].device)
        ctx.set_tensor_address("x0", bufs["x0"].device)
        ping, pong = bufs["x_a"], bufs["x_b"]
        coef_row, noise_row = bufs["coef"].shape[1] * 4, bufs["noise"].shape[1] * 4
        for i in range(k):
            ctx.set_tensor_address("x_t", ping.device)
            ctx.set_tensor_address("x_next", pong.device)
            ctx.set_tensor_address("coef", bufs["coef"].device + i * coef_row)
            ctx.set_tensor_address("noise", bufs["noise"].device + i * noise_row)
            self._execute()
            ping, pong = pong, ping
