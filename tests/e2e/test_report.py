"""report.html: a real restore run's page (valid, self-contained, escaped, every link to a real file),
its rebuild from the output folder, the export and benchmark pages, and the page in a real browser."""

from __future__ import annotations

import csv
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import cv2
import numpy as np
import pytest

from helpers import models
from helpers.browser import Browser, find_chromium
from helpers.cli import cli

ROOT = Path(__file__).resolve().parents[2]
SCRIPT_NAME = "b<script>alert(1)<script>.png"
ODD_NAME = "p #1 %20&'q.png"  # URL and HTML special characters
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
LINK_ATTRS = ("src", "href", "data-full", "data-thumb")


class Page(HTMLParser):
    """Parses a page strictly enough to catch broken structure; collects links, text and elements."""

    def __init__(self, path: Path):
        super().__init__(convert_charrefs=True)
        self.path, self.stack, self.problems, self.refs, self.text, self.elements = path, [], [], [], [], []
        self.feed(path.read_text(encoding="utf-8"))
        self.close()
        if self.stack:
            self.problems.append(f"unclosed: {self.stack}")

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.elements.append((tag, a, list(self.stack)))
        self.refs += [v for k, v in attrs if k in LINK_ATTRS and v is not None]
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in VOID:
            self.stack.pop()

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.problems.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()

    def handle_data(self, data):
        if self.stack and self.stack[-1] not in ("script", "style"):
            self.text.append((self.stack[-1], data))

    def all(self, tag, **attrs):
        return [a for t, a, _ in self.elements if t == tag and all(a.get(k) == v for k, v in attrs.items())]

    def check(self) -> "Page":
        """Balanced; one html/head/body; no network; every link names an existing file."""
        assert not self.problems, self.problems
        assert [t for t, _, _ in self.elements if t in ("html", "head", "body")] == ["html", "head", "body"]
        for ref in self.refs:
            if ref.startswith("#"):
                continue
            assert "://" not in ref and not ref.startswith("//"), f"network reference {ref}"
            target = self.path.parent / unquote(ref)
            assert target.is_file(), f"{ref} -> {target} does not exist"
        assert all(not a.get("src") for a in self.all("script")), "external script"
        assert len(self.all("link")) == 0, "external stylesheet"
        return self

    def texts(self, tag):
        return [d for t, d in self.text if t == tag]


def _img(shape, seed, dtype=np.uint8):
    rng = np.random.default_rng(seed)
    hi = 255 if dtype == np.uint8 else 65535
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    clean = np.stack([xx * hi / shape[1], yy * hi / shape[0], np.full(xx.shape, hi / 2)], -1)
    noisy = np.clip(clean + rng.normal(0, hi / 10, clean.shape), 0, hi)
    return clean.astype(dtype), noisy.astype(dtype)


IMAGES = {"a.png": ((32, 40), np.uint8), SCRIPT_NAME: ((24, 32), np.uint8), ODD_NAME: ((16, 24), np.uint8),
          "deep16.tif": ((24, 32), np.uint16), "wide.png": ((40, 776), np.uint8)}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A real `rddm-infer restore --gt --report` run on small images and one broken file."""
    tmp = tmp_path_factory.mktemp("report")
    src, gt, out = tmp / "in", tmp / "gt", tmp / "out"
    src.mkdir(), gt.mkdir()
    for i, (name, (shape, dtype)) in enumerate(IMAGES.items()):
        clean, noisy = _img(shape, i, dtype)
        assert cv2.imwrite(str(gt / name), clean) and cv2.imwrite(str(src / name), noisy)
    (src / "broken.png").write_bytes(b"not an image at all")
    r = cli("restore", src, "-o", out, "--model", models.onnx_model("step"), "--gt", gt, "--report", "--seed", "3")
    assert r.returncode == 1, r.stderr  # the broken file fails, the rest are restored
    assert "Traceback" not in r.stderr and f"report: {out / 'report.html'}" in r.stderr
    return src, gt, out, json.loads((out / "run.json").read_text())


def test_restore_page_is_valid_self_contained_and_links_real_files(run):
    src, gt, out, record = run
    page = Page(out / "report.html").check()
    panels = page.all("figure")
    assert len(panels) == len(IMAGES) == record["counts"]["restored"]
    assert len(page.all("script")) == 1  # the page's own inline script, nothing else
    # every comparison shows the input's and the output's pixels: full-size links go to the real files
    fulls = {a["alt"]: unquote(a["data-full"]) for a in page.all("img")}
    for name in IMAGES:
        if name.endswith(".png"):
            assert (out / fulls[f"before: {src / name}"]).resolve() == (src / name).resolve()
            assert (out / fulls[f"after: {src / name}"]).resolve() == (out / name).resolve()
    # failed files: listed with their one-line error
    (failed,) = [im for im in record["images"] if im["status"] == "failed"]
    cells = page.texts("td")
    assert str(src / "broken.png") in cells and failed["error"] in cells and "not a readable image" in failed["error"]


def test_file_names_stay_text(run):
    src, _, out, _ = run
    raw = (out / "report.html").read_text()
    page = Page(out / "report.html").check()
    assert str(src / SCRIPT_NAME) in page.texts("h2") and str(src / ODD_NAME) in page.texts("h2")
    assert "<script>alert" not in raw and raw.count("<script") == 1
    assert f"before: {src / SCRIPT_NAME}" in [a["alt"] for a in page.all("img")]


def test_header_states_model_backend_seed_versions_and_speed(run):
    _, _, out, record = run
    from rddm_infer.backends import read_artifact_meta

    meta = read_artifact_meta(models.onnx_model("step"))
    m = record["model"]
    assert (m["graph"], m["objective"], m["steps"], m["precision"]) == (meta.graph, meta.diffusion["objective"],
                                                                       meta.steps, meta.precision)
    assert record["settings"]["seed"] == 3 and record["backend"].startswith(("onnxruntime", "openvino"))
    assert record["command"].startswith("rddm-infer restore ") and "--report" in record["command"]
    assert record["versions"]["onnxruntime"] and "torch" not in record["versions"]  # the CLI never imported it
    n = record["counts"]["restored"]
    assert record["images_per_s"] == pytest.approx(n / record["seconds"], rel=1e-3)
    page = Page(out / "report.html")
    assert {"model", "graph", "backend", "device", "settings", "result", "mean", "versions", "command"} \
        <= set(page.texts("dt"))
    raw = (out / "report.html").read_text()
    with open(out / "metrics.csv") as f:
        mean = [r for r in csv.DictReader(f) if r["file"] == "mean"][0]
    assert f"PSNR {float(mean['psnr_in']):.2f} → {float(mean['psnr']):.2f} dB" in raw  # the gain, as printed
    assert f"{record['images_per_s']:.3f} images/s" in raw
    assert f"{m['steps']} steps" in raw and m["objective"] in raw and "seed 3" in raw


def test_thumbnails_and_browser_copies(run):
    src, _, out, record = run
    page = Page(out / "report.html")
    imgs = {a["alt"]: a for a in page.all("img")}
    wide = imgs[f"after: {src / 'wide.png'}"]
    thumb = cv2.imread(str(out / unquote(wide["src"])))
    assert wide["src"].startswith(".report/") and wide["src"].endswith(".jpg") and thumb.shape[1] == 720
    assert unquote(wide["data-full"]) == "wide.png"
    # TIFF is not browser-viewable: an 8-bit PNG copy of the very pixels, under .report/
    deep = imgs[f"before: {src / 'deep16.tif'}"]
    copy = cv2.imread(str(out / unquote(deep["data-full"])), cv2.IMREAD_UNCHANGED)
    orig = cv2.imread(str(src / "deep16.tif"), cv2.IMREAD_UNCHANGED)
    assert deep["data-full"].endswith(".png") and copy.dtype == np.uint8
    assert np.abs(copy.astype(int) - np.round(orig / 257.0)).max() <= 1
    small = imgs[f"before: {src / 'a.png'}"]  # small images are their own thumbnails
    assert small["src"] == small["data-full"]


def test_report_command_rebuilds_from_the_folder_and_its_metrics(run, tmp_path):
    src, _, out, _ = run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "report.html").unlink()
    (copy / ".report" / "stale.jpg").write_bytes(b"old")
    rows = list(csv.reader(open(copy / "metrics.csv")))
    for row in rows:
        if row[0] == str(src / "a.png"):
            row[1] = "12.3456"
    with open(copy / "metrics.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    r = cli("report", copy, "--per-page", "2")
    assert r.returncode == 0, r.stderr
    page = Page(copy / "report.html").check()
    items = page.all("section", **{"data-status": "restored"})
    assert [it["data-page"] for it in items] == ["1", "1", "2", "2", "3"]
    assert ["hidden" in it for it in items] == [False, False, True, True, True]
    assert len(page.all("button", **{"data-p": "3"})) == 2  # page navigation above and below
    assert "→ 12.35 dB" in (copy / "report.html").read_text()  # input PSNR → the edited output PSNR
    assert not (copy / ".report" / "stale.jpg").exists()
    # a report that cannot be written is one line, and the old page stays whole
    before = (copy / "report.html").read_bytes()
    shutil.rmtree(copy / ".report")
    (copy / ".report").write_bytes(b"in the way")
    r = cli("report", copy)
    assert r.returncode == 2 and "cannot write the report" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and (copy / "report.html").read_bytes() == before


def test_report_command_errors_are_one_line(tmp_path):
    r = cli("report", tmp_path)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "run.json: not found" in r.stderr
    (tmp_path / "run.json").write_text("{not json")
    r = cli("report", tmp_path)
    assert r.returncode == 2 and "run.json: not valid JSON" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "report.html").exists()


def test_bench_report_has_the_table_and_plot(tmp_path):
    result = json.loads((ROOT / "benchmarks/results/cpu_512_run6.json").read_text())
    shutil.copy(ROOT / "benchmarks/results/cpu_512_run6.png", tmp_path / "results.png")
    (tmp_path / "results.json").write_text(json.dumps(result))
    from rddm_infer.report import write_bench_report

    page = Page(write_bench_report(result, tmp_path)).check()
    rows = [r for s in result["sizes"] for r in s["rows"]]
    assert [d for d in page.texts("td") if d in {r["variant"] for r in rows}] == [r["variant"] for r in rows]
    assert page.all("img", src="results.png") and page.all("a", href="results.json")
    assert f"{rows[-1]['images_per_s']:.3f}" in page.texts("td")


# ------------------------------------------------------------------------------------ real browser

CHROMIUM = find_chromium()
needs_browser = pytest.mark.skipif(CHROMIUM is None, reason="no chromium here (apt-get install chromium, or set "
                                                            "RDDM_CHROMIUM): the page was not checked in a browser")
LOADED = ("(() => {const shown = [...document.images].filter(i => i.offsetParent);"  # hidden pages load nothing
          "return Promise.all(shown.map(i => i.complete ? 0 : new Promise(r => {i.onload = i.onerror = r})))"
          ".then(() => shown.filter(i => !(i.naturalWidth > 0)).map(i => i.src))})()")


def _shot(png: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)


@needs_browser
def test_page_in_a_real_browser(run, tmp_path):
    src, _, out, _ = run
    with Browser(CHROMIUM, 1280, 2400) as b:
        b.open((out / "report.html").as_uri())
        assert b.js(LOADED) == []  # every visible image decoded
        body = b.js("({...document.body.dataset})")
        assert body == {"errors": "0", "panels": str(len(IMAGES)), "ready": "1", "page": "1"}
        shot = _shot(b.screenshot())
        cv2.imwrite(str(tmp_path / "page.png"), shot)
        assert shot.shape[:2] == (2400, 1280) and shot.std() > 20  # not blank

        # the slider: at 100 the view shows the input, at 0 the output (compared with the real files)
        def view_at(value, index=0):
            rect = b.js(f"""(() => {{const c = document.querySelectorAll('.cmp')[{index}],
                s = c.querySelector('.slider');
                s.value = {value}; s.dispatchEvent(new Event('input'));
                const r = c.querySelector('.view').getBoundingClientRect();
                return {{x: r.x, y: r.y, width: r.width, height: r.height}}}})()""")
            return _shot(b.screenshot(rect))

        before_px, after_px = (cv2.imread(str(p)) for p in (src / "a.png", out / "a.png"))
        for value, want, other in ((100, before_px, after_px), (0, after_px, before_px)):
            seen = cv2.resize(view_at(value), want.shape[1::-1], interpolation=cv2.INTER_AREA).astype(float)
            err_want, err_other = np.abs(seen - want).mean(), np.abs(seen - other).mean()
            assert err_want < 8 and err_want < err_other / 2, (value, err_want, err_other)

        # zoom 1:1 on the wide image: the full-size file, one image pixel per screen pixel, scrollable
        i = list(IMAGES).index("wide.png")

        def zoom(z):
            b.js(f"document.querySelectorAll('.cmp')[{i}].querySelector('button[data-z=\"{z}\"]').click()")
            assert b.js(LOADED) == []
            return b.js(f"""(() => {{const c = document.querySelectorAll('.cmp')[{i}],
                im = c.querySelector('img.after'), v = c.querySelector('.view');
                return [c.classList.contains('zoom'), im.getBoundingClientRect().width, im.naturalWidth,
                        decodeURIComponent(im.getAttribute('src')), v.scrollWidth > v.clientWidth,
                        v.clientWidth]}})()""")

        assert zoom(1)[:4] == [True, 776, 776, "wide.png"]
        assert zoom(2)[:5] == [True, 2 * 776, 776, "wide.png", True]  # wider than the panel: scrolls
        fit = zoom(0)
        assert fit[0] is False and fit[1] == fit[5] < 776 and fit[4] is False  # back to the panel's width
        # a click on a fitted image zooms there
        r = b.js("(() => {const r = document.querySelector('.view').getBoundingClientRect(); "
                 "return [r.x + r.width / 2, r.y + r.height / 2]})()")
        for kind in ("mousePressed", "mouseReleased"):
            b.call("Input.dispatchMouseEvent", type=kind, x=r[0], y=r[1], button="left", clickCount=1, session=True)
        assert b.js("document.querySelector('.cmp').classList.contains('zoom')")
        assert b.js("document.body.dataset.errors") == "0"
        assert b.problems == []  # no console error, exception, failed load or dialog (the <script> name)


@needs_browser
def test_pages_in_a_real_browser(run, tmp_path):
    _, _, out, _ = run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    assert cli("report", copy, "--per-page", "2").returncode == 0
    visible = ("[...document.querySelectorAll('.item')].filter(i => !i.hidden)"
               ".map(i => i.querySelector('h2').textContent)")
    with Browser(CHROMIUM, 1000, 1400) as b:
        b.open((copy / "report.html").as_uri())
        first = b.js(visible)
        b.js("document.querySelector('.pages button[data-p=\"3\"]').click()")
        last = b.js(visible)
        assert len(first) == 2 and len(last) == 1 and not set(first) & set(last)
        assert b.js(LOADED) == [] and b.js("document.body.dataset.page") == "3"
        assert b.problems == []


def test_a_symlinked_report_folder_is_refused_and_the_folder_it_points_to_is_untouched(tmp_path):
    """Issue 26, case 1: pruning stale thumbnails through OUT/.report -> another folder deleted that folder's files."""
    src, out, victim = tmp_path / "in", tmp_path / "out", tmp_path / "victim"
    for d in (src, out, victim):
        d.mkdir()
    cv2.imwrite(str(src / "a.png"), np.random.default_rng(0).integers(0, 256, (20, 20, 3), dtype=np.uint8))
    (victim / "a.txt").write_text("precious")
    (out / ".report").symlink_to(victim, target_is_directory=True)
    r = cli("restore", src, "-o", out, "--model", models.onnx_model("step"), "--report")
    assert r.returncode == 2 and "symbolic link" in r.stderr and "Traceback" not in r.stderr
    assert (out / "a.png").is_file()  # the images were restored before the report was refused
    r = cli("report", out)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert sorted(p.name for p in victim.iterdir()) == ["a.txt"] and (victim / "a.txt").read_text() == "precious"
