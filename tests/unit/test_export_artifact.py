"""The export package's shape: one artifact module, no import cycle, names the README can rely on."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from helpers.export import exported, tiny_loaded
from rddm_export.artifact import artifact_name, get_metadata, read_metadata, save_model, write_validated
from rddm_export.onnx_export import GraphBuilder
from rddm_export.validate import ValidationError, validate_onnx

ROOT = Path(__file__).resolve().parents[2]
EXPORT = ROOT / "export"


def _imports(path: Path) -> set[str]:
    """rddm_export modules ``path`` imports anywhere (module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                found.add(node.module.split(".")[0])
            elif node.level == 1:
                found.update(a.name for a in node.names)
            elif (node.module or "").startswith("rddm_export."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("rddm_export."))
    return found


def test_export_modules_import_each_other_without_a_cycle():
    graph = {p.stem: _imports(p) & {q.stem for q in EXPORT.glob("*.py")} for p in EXPORT.glob("*.py")}
    assert "export_all" not in graph["tensorrt_build"]  # the cycle this package used to have

    def visit(node, path):
        assert node not in path, f"import cycle: {' -> '.join([*path, node])}"
        for nxt in graph[node]:
            visit(nxt, [*path, node])

    for module in graph:
        visit(module, [])


@pytest.mark.slow  # over 2 s on 2 cores
def test_each_module_imports_on_its_own():
    """Every module imports first in a fresh package state (an order-dependent cycle would fail here)."""
    modules = sorted(p.stem for p in EXPORT.glob("*.py") if p.stem != "__init__")
    code = ("import importlib, sys\n"
            f"for m in {modules!r}:\n"
            "    for k in [k for k in sys.modules if k.startswith('rddm_export')]:\n"
            "        del sys.modules[k]\n"
            "    importlib.import_module('rddm_export.' + m)\n"
            "print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_artifact_and_engine_modules_need_no_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import rddm_export.artifact, rddm_export.tensorrt_build; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


@pytest.mark.slow  # over 2 s on 2 cores
def test_builder_hands_back_the_metadata_it_stamped(tmp_path):
    builder = GraphBuilder(tiny_loaded())
    model, meta = builder.build("fused", steps=2)
    assert get_metadata(model, "in memory") == meta
    path = save_model(model, tmp_path / artifact_name("fused", "fp32", 2))
    assert path.name == "fused2_fp32.onnx" and read_metadata(path) == meta
    step, step_meta = builder.build("step")
    assert (step_meta.graph, step_meta.steps) == ("step", 5)
    # one trace of the network serves both: each graph holds one copy of its nodes per network call
    convs = sum(n.op_type == "Conv" for n in builder.net().graph.node)
    assert sum(n.op_type == "Conv" for n in model.graph.node) == 2 * convs
    assert sum(n.op_type == "Conv" for n in step.graph.node) == convs
    # ... and the weights once, shared by the two calls of the fused graph
    assert len(model.graph.initializer) <= len(builder.net().graph.initializer) + 40


@pytest.mark.slow  # over 2 s on 2 cores
def test_a_graph_that_fails_validation_never_reaches_its_path(tmp_path):
    model = onnx.load(str(exported("step")))
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    init = next(i for i in model.graph.initializer if i.name == conv.input[1])
    init.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(init) + np.float32(0.05), init.name))
    meta = get_metadata(model, "corrupted")
    final = tmp_path / "step_fp32.onnx"
    with pytest.raises(ValidationError, match="step_fp32.onnx: step fp32 graph does not match PyTorch"):
        write_validated(final, "onnx", meta, lambda tmp: save_model(model, tmp),
                        lambda tmp, name: validate_onnx(tmp, tiny_loaded(), meta=meta, report_as=name))
    assert list(tmp_path.iterdir()) == []  # neither the file nor its temp


def test_readme_names_only_files_the_exporter_writes():
    text = (ROOT / "README.md").read_text()
    names = set(re.findall(r"\b[\w]+_(?:fp32|fp16|int8)\.(?:onnx|engine)\b", text))
    assert names, "the README shows no exported file"
    writable = {artifact_name(g, p, k, s) for g in ("unet", "step", "fused") for p in ("fp32", "fp16", "int8")
                for k in (1, 2, 5, 10, 20) for s in (".onnx", ".engine")}
    assert names <= writable, names - writable
