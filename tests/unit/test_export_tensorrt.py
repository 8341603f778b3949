"""TensorRT: profiles, the engine file header, compatibility checks and error paths run everywhere;
the real engine build needs TensorRT and an NVIDIA GPU and is skipped without them."""

import importlib.util
import struct

import numpy as np
import pytest

from helpers.export import TINY, reference_checkpoint, tiny_checkpoint
from rddm_infer.diffusion.metadata import ArtifactMeta
from rddm_infer.backends.engine_file import MAGIC, BuildTarget, check_compatible, read_engine, read_header, write_engine
from rddm_infer.errors import BackendUnavailable, CheckpointError, RDDMError
from rddm_infer.diffusion.schedule import DiffusionConfig
from rddm_export.tensorrt_build import EngineProfile, build_engine

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


def _meta(graph="step", **kw):
    return ArtifactMeta(graph=graph, unet=TINY.to_dict(), diffusion=DiffusionConfig().to_dict(), size_multiple=2, **kw)


def test_profile_covers_every_input_of_each_graph_kind():
    p = EngineProfile.parse("1x64x64", "2x3x512x256", "4x1024x1024")
    assert (p.min, p.opt, p.max) == ((1, 64, 64), (2, 512, 256), (4, 1024, 1024))
    image = ((1, 3, 64, 64), (2, 3, 512, 256), (4, 3, 1024, 1024))
    assert p.input_shapes(_meta("unet")) == {"x_t": image, "x_input": image, "t": ((1,), (2,), (4,))}
    assert p.input_shapes(_meta("step")) == {"x_t": image, "x_input": image, "coef": ((8,),) * 3, "noise": image}
    assert p.input_shapes(_meta("fused")) == {"x_input": image, "noise": image}
    gen = ArtifactMeta(graph="fused", unet=TINY.to_dict(), steps=3, eta=0.5, size_multiple=2,
                       diffusion=DiffusionConfig(condition=False).to_dict())
    assert p.input_shapes(gen)["step_noise"] == tuple((3, *s) for s in image)
    # official experiment 0 / root src/: a (B, 2) time pair, and 2K rows of step noise for the two passes
    scaled = ArtifactMeta(graph="unet", unet=TINY.to_dict(), size_multiple=2,
                          diffusion=DiffusionConfig(time_input="scaled").to_dict())
    assert p.input_shapes(scaled)["t"] == ((1, 2), (2, 2), (4, 2))
    two = ArtifactMeta(graph="fused", unet=TINY.to_dict(), steps=3, eta=0.5, size_multiple=2,
                       diffusion=DiffusionConfig(condition=False, two_pass=True).to_dict())
    assert p.input_shapes(two)["step_noise"] == tuple((6, *s) for s in image)


@pytest.mark.parametrize("args, message", [
    (("1x64x64", "1x32x32", "1x128x128"), "height must satisfy 1 <= min <= opt <= max"),
    (("1x64x64", "1x64x64", "0x64x64"), "batch must satisfy"),
    (("1x60x64", "1x64x64", "1x64x64"), "multiples of the model's size multiple 8"),
    (("64x64", "1x64x64", "1x64x64"), "expected BxHxW"),
])
def test_bad_profiles_are_refused(args, message):
    meta = _meta()
    meta.size_multiple = 8
    with pytest.raises(RDDMError, match=message):
        EngineProfile.parse(*args).input_shapes(meta)


def test_engine_file_round_trip(tmp_path):
    payload = np.random.default_rng(0).bytes(4096)  # the serialized plan is opaque to the header
    target = BuildTarget("10.7.0.23", (8, 9), "NVIDIA L4")
    path = write_engine(tmp_path / "step_fp16.engine", _meta(precision="fp16", steps=4), payload, target)
    meta, engine = read_engine(path)
    assert engine == payload
    assert (meta.graph, meta.precision, meta.steps, meta.unet) == ("step", "fp16", 4, TINY.to_dict())
    assert meta.extra["tensorrt"] == {"version": "10.7.0.23", "compute_capability": [8, 9], "device": "NVIDIA L4"}
    meta2, built, offset = read_header(path)
    assert built == target and path.read_bytes()[offset:] == payload
    magic, version, size = struct.unpack("<8sII", path.read_bytes()[:16])
    assert magic == MAGIC and version == 1 and offset == 16 + size
    assert [p.name for p in tmp_path.iterdir()] == ["step_fp16.engine"]  # atomic write left no temp file


def test_corrupt_engine_files_are_refused_with_the_cause(tmp_path):
    good = write_engine(tmp_path / "good.engine", _meta(), b"plan", BuildTarget("10.7.0", (9, 0)))
    raw = good.read_bytes()
    cases = {
        "plain.engine": (b"\x00" * 64, "not an rddm-infer TensorRT engine"),
        "short.engine": (raw[:20], "truncated engine header"),
        "json.engine": (raw[:16] + b"{" * (len(raw) - 16 - 4) + b"plan", "corrupt engine header"),
        "future.engine": (raw[:8] + struct.pack("<I", 9) + raw[12:], "header version 9 is not supported"),
        "empty.engine": (raw[:-4], "holds a header but no engine"),
    }
    for name, (data, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(CheckpointError, match=message) as e:
            read_engine(path)
        assert str(e.value).startswith(str(path))


def test_compatibility_check_tells_the_user_to_rebuild():
    built = BuildTarget("10.7.0.23", (8, 9), "NVIDIA L4")
    check_compatible("a.engine", built, BuildTarget("10.7.0.23", (8, 9)))
    check_compatible("a.engine", built, BuildTarget("10.7.0", (8, 9), "another L4"))  # same release and arch
    with pytest.raises(CheckpointError, match=r"TensorRT version differ.*rebuild it here"):
        check_compatible("a.engine", built, BuildTarget("10.8.0.1", (8, 9)))
    with pytest.raises(CheckpointError, match=r"^a.engine: engine built for TensorRT 10.7.0.23, compute capability 8.9 "
                                              r"\(NVIDIA L4\), this machine has .*compute capability 9.0 \(NVIDIA H100\)"):
        check_compatible("a.engine", built, BuildTarget("10.7.0.23", (9, 0), "NVIDIA H100"))


@pytest.mark.skipif(HAS_TRT, reason="checks the error path of a machine without TensorRT")
def test_missing_tensorrt_is_a_clear_error(tmp_path):
    with pytest.raises(BackendUnavailable, match=r"needs TensorRT 10 or 11 and an NVIDIA GPU .*rddm-infer\[tensorrt\]"):
        build_engine(tmp_path / "x.onnx", tmp_path / "x.engine", _meta())
    assert not (tmp_path / "x.engine").exists()


@pytest.mark.skipif(HAS_TRT, reason="checks the error path of a machine without TensorRT")
@pytest.mark.slow  # over 2 s on 2 cores
def test_cli_refuses_tensorrt_before_exporting(tmp_path):
    import subprocess
    import sys

    ckpt = reference_checkpoint(tmp_path)
    r = subprocess.run([sys.executable, "-m", "rddm_export.cli", str(ckpt), "--tensorrt", "-o", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "needs TensorRT 10 or 11" in r.stderr
    assert not (tmp_path / "o").exists()


def _gpu_reason():
    if not HAS_TRT:
        return "TensorRT is not installed (pip install 'rddm-infer[tensorrt]' on a machine with an NVIDIA GPU)"
    try:
        from cuda.bindings import runtime as cudart
        err, n = cudart.cudaGetDeviceCount()
        return None if int(err) == 0 and n > 0 else "no CUDA GPU visible"
    except ImportError:
        return "cuda-python is not installed"


@pytest.mark.skipif(_gpu_reason() is not None, reason=str(_gpu_reason()))
@pytest.mark.parametrize("fp16", [False, True])
def test_build_validated_engines_on_a_gpu(tmp_path, fp16):
    from rddm_export.exporter import export_all

    profile = EngineProfile((1, 32, 32), (1, 64, 64), (2, 64, 64))
    arts = export_all(tiny_checkpoint(tmp_path), tmp_path / "out", graphs=("step", "fused"), fp16=fp16, steps=2,
                      tensorrt={"profile": profile, "opt_level": 1})
    engines = [a for a in arts if a.format == "tensorrt"]
    assert [a.path.name for a in engines] == [f"step_{'fp16' if fp16 else 'fp32'}.engine",
                                              f"fused2_{'fp16' if fp16 else 'fp32'}.engine"]
    assert all(a.validation.ok for a in engines) and (tmp_path / "out" / "timing.cache").is_file()
    meta, plan = read_engine(engines[0].path)
    assert meta.extra["tensorrt"]["version"] and len(plan) > 1000
