"""The model's recommended steps: measured by benchmarks.eval_denoise, carried in the artifact, used by restore."""

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest

from helpers.cli import cli
from helpers import models
from benchmarks import eval_denoise
from rddm_infer.diffusion.metadata import META_KEY, ArtifactMeta
from rddm_infer.errors import CheckpointError, RDDMError



def _meta(**kw) -> ArtifactMeta:
    return ArtifactMeta(graph=kw.pop("graph", "step"), unet={"share_encoder": -1}, diffusion={}, **kw)


def _props(path: Path) -> dict:
    return json.loads(next(p.value for p in onnx.load(str(path), load_external_data=False).metadata_props
                           if p.key == META_KEY))


def test_recommended_steps_round_trip_and_older_artifacts_keep_their_default():
    m = ArtifactMeta.from_json(_meta(steps=5, recommended_steps=2).to_json())
    assert m.recommended_steps == 2 and m.default_steps == 2 and m.plan().steps == 2 and m.plan(3).steps == 3
    assert json.loads(m.to_json())["times"] == [999, 799, 599, 399, 199]  # `times` still describes `steps`
    old = json.loads(_meta(steps=5).to_json())
    del old["recommended_steps"]  # as written before the field existed
    m = ArtifactMeta.from_json(json.dumps(old))
    assert m.recommended_steps is None and m.default_steps == 5 and m.plan().steps == 5
    assert _meta(graph="fused", steps=5, recommended_steps=1).plan().steps == 5  # baked in: not ours to change
    for bad in (0, 2.5, "3"):
        with pytest.raises(CheckpointError, match="recommended_steps"):
            _meta(recommended_steps=bad)


@pytest.mark.parametrize("means, best", [({1: 29.88, 2: 29.90, 5: 29.89}, 1),  # the numbers
                                         ({1: 30.00, 2: 30.04, 5: 30.06}, 2),
                                         ({1: 27.0, 3: 28.0, 5: 28.2}, 5)])
def test_recommended_is_the_fewest_steps_within_0_05_db_of_the_best(means, best):
    rows = [{"steps": k, "psnr": m + d} for k, m in means.items() for d in (-0.5, 0.5)]  # two sets per count
    got, by_steps = eval_denoise.recommend_steps(rows)
    assert got == best and by_steps == pytest.approx(means)


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """Tiny clean photos, plus 'real' pairs (a fixed noisy shot of each)."""
    root = tmp_path_factory.mktemp("sets")
    for name in ("clean", "pairs/noisy", "pairs/clean"):
        (root / name).mkdir(parents=True)
    for i in range(2):
        y, x = np.mgrid[0:24, 0:32] / 32
        img = (np.stack([0.2 + 0.5 * x, 0.3 + 0.4 * y, 0.6 - 0.3 * x], -1) * 255).astype(np.uint8)
        cv2.imwrite(str(root / "clean" / f"c{i}.png"), img)
        cv2.imwrite(str(root / "pairs/clean" / f"p{i}.png"), img)
        cv2.imwrite(str(root / "pairs/noisy" / f"p{i}.png"), eval_denoise.add_noise(img, 20, seed=i))
    return root


def test_eval_measures_steps_gray_and_real_pairs_and_stamps_the_model(sets, tmp_path):
    model = tmp_path / "m.onnx"
    shutil.copy(models.onnx_model("step"), model)
    before = _props(model)
    out = tmp_path / "eval.json"
    eval_denoise.main(["--model", str(model), "--data", str(sets / "clean"), "--gray", "--sigma", "25",
                       "--pairs", str(sets / "pairs/noisy"), str(sets / "pairs/clean"), "--steps", "1", "2",
                       "--threads", "1", "--tile", "64", "--out", str(out), "--write-recommended", str(model)])
    report = json.loads(out.read_text())
    rows = report["results"]
    assert [(r["data"], r["steps"]) for r in rows] == [
        (d, k) for k in (1, 2) for d in ("clean", "clean gray", "pairs/noisy")]
    assert all(r["images"] == 2 and np.isfinite(r["psnr"]) for r in rows)
    assert rows[2]["psnr_in"] == pytest.approx(rows[5]["psnr_in"]) and rows[2]["sigma"] is None  # same real inputs
    assert rows[0]["psnr"] != rows[3]["psnr"]  # 1 and 2 steps really ran
    assert 19 < rows[1]["psnr_in"] < 22 and rows[1]["psnr_in"] != rows[0]["psnr_in"]  # σ = 25 on the gray images
    means = {int(k): v for k, v in report["psnr_by_steps"].items()}
    assert means == pytest.approx({k: np.mean([r["psnr"] for r in rows if r["steps"] == k]) for k in (1, 2)})
    assert report["recommended_steps"] == eval_denoise.recommend_steps(rows)[0]
    after = _props(model)
    assert after.pop("recommended_steps") == report["recommended_steps"]
    before.pop("recommended_steps", None)
    assert after == before  # every other key as it was
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.json", "m.onnx"]  # written in place, no temp left


def test_eval_measures_pixel_shuffle_and_self_ensemble(sets, tmp_path):
    out = tmp_path / "eval.json"
    eval_denoise.main(["--model", str(models.onnx_model("step")), "--pairs", str(sets / "pairs/noisy"),
                       str(sets / "pairs/clean"), "--pixel-shuffle", "1", "2", "--threads", "1", "--out", str(out)])
    rows = json.loads(out.read_text())
    assert [r["pixel_shuffle"] for r in rows] == [1, 2] and rows[0]["psnr_in"] == rows[1]["psnr_in"]
    assert rows[0]["psnr"] != rows[1]["psnr"]  # the sub-images really were restored apart
    eval_denoise.main(["--model", str(models.onnx_model("step")), "--pairs", str(sets / "pairs/noisy"),
                       str(sets / "pairs/clean"), "--self-ensemble", "2", "--threads", "1", "--out", str(out)])
    ens = json.loads(out.read_text())
    assert ens[0]["self_ensemble"] == 2 and ens[0]["psnr"] != rows[0]["psnr"]  # the views really were averaged


def test_eval_held_out_scenes_per_image_mode_and_nlm_at_its_best_h(sets, tmp_path, capsys):
    """--held-out keeps the pairs of a training config's held-out scenes; --pixel-shuffle auto is restore's default
    (each row says the mode chosen); --nlm-h scores non-local means at each h and names the best one."""
    pairs = tmp_path / "pairs"
    for sub in ("noisy", "clean"):
        (pairs / sub).mkdir(parents=True)
    img = cv2.imread(str(sets / "pairs/clean/p0.png"))
    for k, name in enumerate(["CamA_5_fruit_1.png", "CamA_5_fruit_2.png", "CamB_8_ball_1.png"]):
        cv2.imwrite(str(pairs / "clean" / name), img)
        cv2.imwrite(str(pairs / "noisy" / name), eval_denoise.add_noise(img, 12, seed=k))
    cfg = tmp_path / "split.toml"
    cfg.write_text('[real]\nheld_out = ["CamA_5_fruit"]\n')
    out = tmp_path / "eval.json"
    eval_denoise.main(["--model", str(models.onnx_model("step")), "--pairs", str(pairs / "noisy"),
                       str(pairs / "clean"), "--held-out", str(cfg), "--pixel-shuffle", "auto", "1",
                       "--nlm-h", "4", "40", "--threads", "1", "--out", str(out)])
    rows = json.loads(out.read_text())
    assert [(r["method"], r.get("pixel_shuffle"), r.get("h")) for r in rows] == [
        ("model", "auto", None), ("model", 1, None), ("nlm", None, 4), ("nlm", None, 40)]
    assert all(r["data"] == "pairs/noisy held-out" and [x["image"] for x in r["per_image"]] ==
               ["CamA_5_fruit_1.png", "CamA_5_fruit_2.png"] for r in rows)  # the ball scene is not held out
    assert all(x["mode"].startswith(("whole", "pixel-shuffle")) for x in rows[0]["per_image"])
    assert "mode" not in rows[1]["per_image"][0]
    assert rows[2]["psnr"] != rows[3]["psnr"]
    best = max(rows[2:], key=lambda r: r["psnr"])
    assert f"best non-local means h = {best['h']:g}, PSNR {best['psnr']:.2f} dB" in capsys.readouterr().out
    cfg.write_text('[real]\nheld_out = ["CamC_1_desk"]\n')
    with pytest.raises(SystemExit, match="no pair of scene CamC_1_desk"):
        eval_denoise.main(["--pairs", str(pairs / "noisy"), str(pairs / "clean"), "--held-out", str(cfg),
                           "--nlm-h", "4", "--only-anchors"])


def test_stamping_refuses_fused_graphs_and_foreign_files(tmp_path):
    fused = tmp_path / "f.onnx"
    shutil.copy(models.onnx_model("fused"), fused)
    with pytest.raises(RDDMError, match="fused graph has its 5 steps built in"):
        eval_denoise.write_recommended(fused, 1)
    plain = tmp_path / "plain.onnx"
    m = onnx.load(str(fused))
    del m.metadata_props[:]
    onnx.save(m, str(plain))
    with pytest.raises(RDDMError, match="no 'rddm' metadata"):
        eval_denoise.write_recommended(plain, 1)


def _cli(*args):
    return cli(*args, inherit_env=False)


def test_restore_uses_the_recommended_steps_by_default_and_says_so(sets, tmp_path):
    model = tmp_path / "m.onnx"
    shutil.copy(models.onnx_model("step"), model)
    eval_denoise.write_recommended(model, 2)  # the export default stays 5
    src = sets / "pairs/noisy"
    r = _cli("restore", src, "-o", tmp_path / "default", "--model", model)
    assert r.returncode == 0, r.stderr
    assert "step graph, 2 steps (the model's recommended)" in r.stderr
    r = _cli("restore", src, "-o", tmp_path / "two", "--model", model, "--steps", 2)
    assert r.returncode == 0 and "step graph, --steps 2" in r.stderr, r.stderr
    r = _cli("restore", src, "-o", tmp_path / "five", "--model", model, "--steps", 5)
    assert r.returncode == 0 and "step graph, --steps 5" in r.stderr, r.stderr
    read = lambda d: cv2.imread(str(tmp_path / d / "p0.png")).astype(int)  # noqa: E731
    assert np.array_equal(read("default"), read("two")) and not np.array_equal(read("default"), read("five"))
    r = _cli("info", model)
    assert r.returncode == 0 and "recommended: 2 (measured; the default)" in r.stdout and "steps: 5" in r.stdout
    r = _cli("info", models.onnx_model("step"))
    assert "recommended: not measured" in r.stdout


def test_noise_mode_stamps_the_models_correlated_noise_mode_and_restore_and_info_use_it(sets, tmp_path):
    from benchmarks import noise_mode

    model = tmp_path / "m.onnx"
    shutil.copy(models.onnx_model("step"), model)
    out = tmp_path / "modes.json"
    noise_mode.main(["--model", str(model), "--pairs", str(sets / "pairs/noisy"), str(sets / "pairs/clean"),
                     "--out", str(out), "--write-mode", str(model)])
    measured = json.loads(out.read_text())["summary"]["real pairs"]["gain_db"]
    stamped = _props(model)["correlated_noise_mode"]
    assert stamped == noise_mode.best_real_mode(measured) and stamped in measured
    second = tmp_path / "m2.onnx"  # --reanalyse stamps from the measured file, restoring nothing
    shutil.copy(models.onnx_model("step"), second)
    noise_mode.main(["--model", str(second), "--pairs", str(sets / "pairs/noisy"), str(sets / "pairs/clean"),
                     "--out", str(out), "--reanalyse", "--write-mode", str(second)])
    assert _props(second)["correlated_noise_mode"] == stamped
    eval_denoise.stamp_facts(model, correlated_noise_mode="whole-1")  # as a model trained on real pairs measures
    r = _cli("restore", sets / "pairs/noisy", "-o", tmp_path / "out", "--model", model)
    assert r.returncode == 0 and "per image: whole, 1 step where its noise is correlated" in r.stderr, r.stderr
    r = _cli("info", model)
    assert "correlated noise: whole-1 (measured: whole, 1 step)" in r.stdout, r.stdout
    assert "correlated noise: not measured (pixel-shuffle 2, 1 step" in _cli("info", models.onnx_model("step")).stdout
    assert noise_mode.best_real_mode({"whole": 1.83, "whole-1": 1.80, "camera-2": 1.7, "camera": 1.6}) == "whole-1"
    assert noise_mode.best_real_mode({"whole": 1.83, "whole-1": 1.70, "camera-2": 1.9, "camera": 1.6}) == "camera-2"


def test_eval_refuses_missing_folders_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        eval_denoise.main(["--data", str(tmp_path / "nope"), "--steps", "1", "2"])
    assert e.value.code == 2 and "nope: no such folder" in capsys.readouterr().err


def test_anchors_score_classical_denoisers_on_the_same_noisy_files(sets, tmp_path):
    out = tmp_path / "anchors.json"
    eval_denoise.main(["--only-anchors", "--anchor", "nlm", "--data", str(sets / "clean"), "--gray", "--sigma", "25",
                       "--pairs", str(sets / "pairs/noisy"), str(sets / "pairs/clean"), "--out", str(out)])
    rows = json.loads(out.read_text())
    assert [(r["data"], r["method"]) for r in rows] == [(d, "nlm") for d in ("clean", "clean gray", "pairs/noisy")]
    assert all(r["psnr"] > r["psnr_in"] + 2 for r in rows)  # smooth images: non-local means must gain a lot


def test_steps_equal_to_t_say_that_the_reference_would_sample_otherwise():
    """K = T: the reference switches to its posterior-form p_sample_loop; the DDIM update run here is stated."""
    from rddm_infer.cli import _steps_note

    meta = ArtifactMeta(graph="step", unet={"share_encoder": -1}, diffusion={"timesteps": 10}, recommended_steps=1)
    assert _steps_note(10, meta, 10) == "--steps 10; K = T runs the DDIM update, not the reference's p_sample_loop"
    assert _steps_note(None, meta, 1) == "1 step (the model's recommended)"
    assert "p_sample_loop" not in _steps_note(9, meta, 9)


def test_export_keeps_the_recommended_steps_and_every_exact_backend_agrees_on_a_seed(sets, tmp_path):
    """A stamped checkpoint exports graphs that default to its recommended steps, and the same seed gives the
    same uint8 result (within 1/255) on onnxruntime, openvino f32 and torch at the defaults."""
    from helpers.export import tiny_checkpoint

    ckpt = tiny_checkpoint(tmp_path)
    eval_denoise.write_recommended(ckpt, 2)
    r = cli("info", ckpt)
    assert r.returncode == 0 and "recommended: 2 (measured; the default)" in r.stdout, r.stdout + r.stderr
    from helpers.cli import run

    r = run("rddm-export", ckpt, "-o", tmp_path / "onnx", "-g", "step", "-g", "fused")
    assert r.returncode == 0, r.stderr
    assert "2 steps, the checkpoint's recommended" in r.stderr
    assert (tmp_path / "onnx" / "fused2_fp32.onnx").is_file()  # K baked in = the recommendation
    step = tmp_path / "onnx" / "step_fp32.onnx"
    props = _props(step)
    assert props["recommended_steps"] == 2 and props["source"] == ckpt.name  # no build-machine path
    assert str(tmp_path) not in json.dumps(props)
    r = _cli("info", step)
    assert "recommended: 2 (measured; the default)" in r.stdout
    runs = {"onnxruntime": ("--model", step), "torch": ("--model", ckpt, "--backend", "torch"),
            "openvino": ("--model", step, "--backend", "openvino", "--precision", "fp32")}  # openvino: a dev extra
    outs = {}
    for name, args in runs.items():
        r = cli("restore", sets / "pairs/noisy", "-o", tmp_path / name, "--seed", 7, *args)
        assert r.returncode == 0, r.stderr
        assert "2 steps (the model's recommended)" in r.stderr, (name, r.stderr)
        outs[name] = np.stack([cv2.imread(str(tmp_path / name / f"p{i}.png")).astype(int) for i in range(2)])
    for name, o in outs.items():
        assert np.abs(o - outs["onnxruntime"]).max() <= 1, name
    r = run("rddm-export", ckpt, "-o", tmp_path / "k5", "-g", "step", "--steps", 5, "--no-validate")
    assert r.returncode == 0, r.stderr
    assert "recommended_steps" not in _props(tmp_path / "k5" / "step_fp32.onnx") or \
        _props(tmp_path / "k5" / "step_fp32.onnx")["recommended_steps"] is None  # an explicit K replaces it
