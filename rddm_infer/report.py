"""One self-contained ``report.html`` per run, so results are judged by looking at them.

Three producers share one page shape (a header of key facts, then the body):

* ``rddm-infer restore ... --report`` / ``rddm-infer report OUT``: per image a before/after slider
  over the same view, zoom to 1:1 (or 2:1, 4:1) on any region, PSNR/SSIM and time; failed files
  with their error. What the page needs is kept in ``OUT/run.json`` so the page can be rebuilt.
* ``rddm-export --report``: each artifact's size, validation error, build time and restore command.
* ``python -m benchmarks.backends``: its table and throughput plot.

No network, no CDN: CSS and JS are inline. Pixels are never inlined: small thumbnails go to
``OUT/.report/`` and the 1:1 view loads the full-size files through relative links (a browser-
unfriendly format such as TIFF gets a PNG copy there). Every name is HTML-escaped. Stdlib, numpy
and opencv only.
"""

from __future__ import annotations

import csv
import html
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from urllib.parse import quote

import numpy as np

from . import __version__
from .io.atomic import write_bytes_atomic
from .errors import RDDMError
from .io.storage import Uri, location, write_bytes

RUN_JSON = "run.json"
REPORT_HTML = "report.html"
ASSETS = ".report"  # thumbnails and browser-viewable copies, beside report.html
RUN_FORMAT = "rddm-infer-run/1"
PER_PAGE = 24  # comparison panels per page; the others stay hidden (and their lazy thumbnails unloaded)
THUMB = 720  # longest thumbnail side, px
BROWSER_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif")


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def href(target: str | os.PathLike, base: str | os.PathLike) -> str:
    """A relative, percent-encoded, attribute-escaped link from folder ``base`` to ``target``."""
    try:
        rel = quote(Path(os.path.relpath(os.path.abspath(target), os.path.abspath(base))).as_posix())
    except ValueError:  # another drive (Windows): no relative path exists
        rel = Path(os.path.abspath(target)).as_uri()
    return esc(rel)


def versions() -> dict[str, str]:
    """Versions of what ran, without importing anything new (torch stays unimported)."""
    v = {"rddm-infer": __version__, "python": platform.python_version(), "numpy": np.__version__}
    for name, label in (("cv2", "opencv"), ("onnxruntime", "onnxruntime"), ("torch", "torch"),
                        ("tensorrt", "tensorrt")):
        mod = sys.modules.get(name)
        if mod is not None and getattr(mod, "__version__", None):
            v[label] = str(mod.__version__)
    return v


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        text = Path("/proc/cpuinfo").read_text()
        cpu = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(terse=True)}


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())


def _write(path: Path | Uri, data: bytes) -> Path | Uri:
    if isinstance(path, Uri):
        return write_bytes(path, data)
    try:
        return write_bytes_atomic(path, data)
    except OSError as e:
        raise RDDMError(f"{path}: cannot write the report ({e.strerror or e})") from None


def _write_text(path: Path, text: str) -> Path:
    return _write(path, text.encode("utf-8"))


# ------------------------------------------------------------------------------------- page shape

CSS = """
:root{--fg:#1d2125;--mut:#667;--bd:#d8dce0;--bg:#f6f7f8;--ok:#17803d;--bad:#b42318;--acc:#1f5fbf}
*{box-sizing:border-box}body{margin:0;font:14px/1.45 system-ui,sans-serif;color:var(--fg);background:var(--bg)}
header,main{max-width:1500px;margin:0 auto;padding:12px 20px}h1{font-size:20px;margin:8px 0}
h2{font-size:15px;margin:0 0 6px;word-break:break-all}dl.facts{display:grid;grid-template-columns:max-content 1fr;
gap:2px 14px;margin:0;background:#fff;border:1px solid var(--bd);border-radius:6px;padding:10px 14px}
dt{color:var(--mut)}dd{margin:0;word-break:break-word}code{font:12px ui-monospace,monospace;background:#eef0f2;
padding:1px 4px;border-radius:3px;word-break:break-all}table{border-collapse:collapse;background:#fff;width:100%}
th,td{border:1px solid var(--bd);padding:4px 8px;text-align:left;vertical-align:top}th{background:#eef0f2}
td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}.ok{color:var(--ok)}.bad{color:var(--bad)}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(min(100%,440px),1fr));gap:14px}
.item{background:#fff;border:1px solid var(--bd);border-radius:6px;padding:10px}.item p{margin:6px 0 0;color:var(--mut)}
.cmp{margin:0}.frame{position:relative}
.view{position:relative;overflow:hidden;background:#222;cursor:zoom-in;line-height:0}
.stack{position:relative;width:100%}.stack img{display:block;width:100%;height:auto}
.stack img.after{position:absolute;left:0;top:0;clip-path:inset(0 0 0 50%)}
.up img,.cmp.zoom img{image-rendering:pixelated}.cmp.zoom .view{overflow:auto;max-height:70vh;cursor:auto}
.cmp.zoom .stack{width:auto}.item:has(.cmp.zoom){grid-column:1/-1}
.line{position:absolute;top:0;bottom:0;left:50%;width:2px;background:#ffd400;
pointer-events:none}.lab{position:absolute;top:4px;font-size:11px;background:#000a;color:#fff;padding:0 5px;
border-radius:3px;line-height:18px}.lab.l{left:4px}.lab.r{right:4px}.slider{width:100%;margin:6px 0 0}
.tools button,.pages button{font:inherit;padding:1px 8px;margin-right:4px;border:1px solid var(--bd);
background:#fff;border-radius:4px;cursor:pointer}.tools button[aria-pressed=true],.pages button[aria-current=page]{
background:var(--acc);color:#fff}.pages{margin:10px 0}section{margin:18px 0}img.plot{max-width:100%;
border:1px solid var(--bd);background:#fff}
"""

JS = """
(function(){
var B=document.body;B.dataset.errors="0";
window.addEventListener("error",function(){B.dataset.errors=String(+B.dataset.errors+1)});
function clip(c){var v=c.querySelector(".slider").value/100,vp=c.querySelector(".view"),a=c.querySelector("img.after"),
 z=c.classList.contains("zoom"),w=Math.min(vp.clientWidth,c.querySelector(".stack").offsetWidth);
 a.style.clipPath="inset(0 0 0 "+(z?(vp.scrollLeft+v*w)+"px":(v*100)+"%")+")";
 c.querySelector(".line").style.left=z?(v*w)+"px":(v*100)+"%";}
function zoom(c,z,fx,fy){var st=c.querySelector(".stack"),vp=c.querySelector(".view"),w=+c.dataset.w;
 c.querySelectorAll(".tools button").forEach(function(b){b.setAttribute("aria-pressed",String(+b.dataset.z===z))});
 c.querySelectorAll(".stack img").forEach(function(i){var s=z?i.dataset.full:i.dataset.thumb;
  if(i.getAttribute("src")!==s){i.loading="eager";i.src=s;}});
 if(!z){c.classList.remove("zoom");st.style.width="";clip(c);return;}
 c.classList.add("zoom");st.style.width=(w*z/(window.devicePixelRatio||1))+"px";
 vp.scrollLeft=fx*st.clientWidth-vp.clientWidth/2;vp.scrollTop=fy*st.clientHeight-vp.clientHeight/2;clip(c);}
document.querySelectorAll(".cmp").forEach(function(c){var vp=c.querySelector(".view");
 c.querySelector(".slider").addEventListener("input",function(){clip(c)});
 vp.addEventListener("scroll",function(){clip(c)});
 vp.addEventListener("click",function(e){if(c.classList.contains("zoom"))return;var r=vp.getBoundingClientRect();
  zoom(c,1,(e.clientX-r.left)/r.width,(e.clientY-r.top)/r.height);});
 c.querySelectorAll(".tools button").forEach(function(b){b.addEventListener("click",function(){
  zoom(c,+b.dataset.z,.5,.5)})});clip(c);});
var items=document.querySelectorAll(".item[data-page]"),nav=document.querySelector(".pages");
function page(p){items.forEach(function(it){it.hidden=+it.dataset.page!==p});
 if(nav)nav.querySelectorAll("button").forEach(function(b){if(+b.dataset.p===p)b.setAttribute("aria-current","page");
  else b.removeAttribute("aria-current")});B.dataset.page=String(p);}
if(nav)nav.querySelectorAll("button").forEach(function(b){
 b.addEventListener("click",function(){page(+b.dataset.p)})});
if(items.length)page(1);
B.dataset.panels=String(document.querySelectorAll(".cmp").length);B.dataset.ready="1";
})();
"""


def page(title: str, facts: list[tuple[str, str]], body: str, *, script: bool = False) -> str:
    """The shared page: title, a fact list (values already HTML), the body; inline CSS (and JS)."""
    rows = "".join(f"<dt>{esc(k)}</dt><dd>{v}</dd>" for k, v in facts)
    js = f"<script>{JS}</script>" if script else ""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="generator" content="rddm-infer {esc(__version__)}">'
            f'<meta name="viewport" content="width=device-width,initial-scale=1">'
            f"<title>{esc(title)}</title><style>{CSS}</style></head>\n<body><header><h1>{esc(title)}</h1>"
            f'<dl class="facts">{rows}</dl></header>\n<main>{body}</main>{js}</body></html>\n')


def _versions_html(v: dict) -> str:
    return esc(", ".join(f"{k} {val}" for k, val in v.items()))


def _num(x, fmt: str, missing: str = "—") -> str:
    return missing if x is None or (isinstance(x, float) and not np.isfinite(x) and x != float("inf")) \
        else ("inf" if x == float("inf") else fmt.format(x))


# ----------------------------------------------------------------------------------- restore runs

def restore_record(summary, restorer, out_dir: str | os.PathLike, *, gt_dir=None,
                   command: list[str] | None = None) -> dict:
    """What the page needs from a finished run (``Summary`` + the ``Restorer`` that made it), as JSON."""
    out_dir = location(out_dir)
    meta, plan = restorer.meta, restorer.plan
    images = []
    for r in summary.results:
        job = r.job
        images.append({
            "src": str(job.src), "src_abs": str(job.src) if isinstance(job.src, Uri) else os.path.abspath(job.src),
            "dst": None if job.dst is None else job.dst.relative_to(out_dir).as_posix() if isinstance(out_dir, Uri)
            else Path(os.path.relpath(os.path.abspath(job.dst), os.path.abspath(out_dir))).as_posix(),
            "status": r.status, "error": r.error, "seconds": round(r.seconds, 4), "metrics": r.metrics,
            "mode": r.mode})
    return {
        "format": RUN_FORMAT, "kind": "restore", "created": _now(),
        "command": shlex.join(command if command is not None else sys.argv),
        "cwd": os.getcwd(),
        "model": {"path": str(restorer.choice.model), "graph": meta.graph,
                  "objective": meta.diffusion.get("objective"), "steps": plan.steps, "eta": plan.eta,
                  "times": [int(t) for t in plan.times], "precision": meta.precision,
                  "size_multiple": meta.size_multiple, "channels": meta.channels, "source": meta.source},
        "backend": restorer.engine, "backend_reason": restorer.choice.reason,
        "settings": {"seed": restorer.seed, "tile": restorer.tile, "overlap": restorer.overlap,
                     "batch": restorer.batch, "pixel_shuffle": restorer.pixel_shuffle,
                     "self_ensemble": restorer.self_ensemble,
                     "gt": str(gt_dir) if gt_dir else None},
        "versions": versions(), "machine": machine(),
        "seconds": round(summary.seconds, 4), "images_per_s": round(summary.images_per_s, 4),
        "counts": {s: summary.count(s) for s in ("restored", "failed", "skipped")},
        "mean": summary.mean_metrics(), "images": images}


def write_restore_report(summary, restorer, out_dir: str | os.PathLike, *, gt_dir=None,
                         command: list[str] | None = None) -> Path:
    """``OUT/run.json`` then ``OUT/report.html`` for a finished run (in a store: run.json only, as the page
    links and reads the files by local paths); returns the page, or run.json."""
    record = restore_record(summary, restorer, out_dir, gt_dir=gt_dir, command=command)
    run = _write_text(location(out_dir) / RUN_JSON, json.dumps(record, indent=1))
    return run if isinstance(run, Uri) else build_restore_report(out_dir)


# ``OUT/run.json`` as the page reads it: every key the page uses, with what it must hold. A spec is a type, a
# tuple (any of its members; None: null), a dict of keys ("key?": may be absent; "*": every key), a one-item
# list (a list of such items) or a frozenset (one of these values). Values only shown as text may be any scalar.
_NUM = (int, float)
_SCALAR = (str, int, float, None)
_METRICS = {"psnr?": _NUM, "ssim?": _NUM, "psnr_in?": _NUM}
RUN_SCHEMA = {
    "format": str, "created": _SCALAR, "command": _SCALAR, "backend": _SCALAR, "backend_reason?": _SCALAR,
    "model": {"path": _SCALAR, "graph": _SCALAR, "objective": _SCALAR, "steps": _SCALAR, "eta": _SCALAR,
              "times": [_SCALAR], "precision": _SCALAR},
    "machine": {"cpu": _SCALAR, "cores": _SCALAR, "platform": _SCALAR},
    "settings": {"seed": _SCALAR, "tile": _SCALAR, "overlap": _SCALAR, "batch": _SCALAR, "pixel_shuffle?": (int, frozenset({"auto"}), None),
                 "self_ensemble?": (int, None), "gt?": _SCALAR},
    "versions": {"*": _SCALAR}, "seconds": _NUM, "images_per_s": _NUM,
    "counts": {"restored": int, "failed": int, "skipped": int}, "mean?": (None, _METRICS),
    "images": [{"src": str, "src_abs": str, "dst": (str, None), "status": frozenset({"restored", "failed", "skipped"}),
                "error?": _SCALAR, "seconds?": (int, float, None), "metrics?": (None, _METRICS), "mode?": _SCALAR}],
}
_KINDS = {str: "text", int: "an integer", float: "a number", type(None): "null", bool: "true/false",
          list: "a list", dict: "an object"}


def _kind(value) -> str:
    return _KINDS.get(type(value), type(value).__name__)


def _what(spec) -> str:
    """``spec`` in words, for the error line."""
    if isinstance(spec, tuple):  # an integer or a number: a number
        return " or ".join(dict.fromkeys(_what(s) for s in spec if not (s is int and float in spec)))
    if isinstance(spec, frozenset):
        return "one of " + ", ".join(sorted(map(repr, spec)))
    if isinstance(spec, (dict, list)):
        return _KINDS[type(spec)]
    return "null" if spec is None else _KINDS[spec]


def _problem(value, spec, where: str) -> str | None:
    """What is wrong with ``value`` (at ``where``, e.g. ``images[3].dst``) against ``spec``; None when it fits."""
    if isinstance(spec, tuple):
        if any(_problem(value, s, where) is None for s in spec):
            return None
        inner = [s for s in spec if isinstance(s, (dict, list)) and isinstance(value, type(s))]
        return _problem(value, inner[0], where) if inner else f"{where} is {_kind(value)}, expected {_what(spec)}"
    if isinstance(spec, frozenset):
        ok = isinstance(value, str) and value in spec
        return None if ok else f"{where} is {value!r:.40}, expected {_what(spec)}"
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            return f"{where or 'the file'} is {_kind(value)}, expected an object"
        keys = {k: spec["*"] for k in value} if "*" in spec else spec
        for key, sub in keys.items():
            name = key.rstrip("?") if key in spec else key
            at = f"{where}.{name}" if where else name
            if name not in value:
                if key.endswith("?"):
                    continue
                return f"{at} is missing"
            problem = _problem(value[name], sub, at)
            if problem:
                return problem
        return None
    if isinstance(spec, list):
        if not isinstance(value, list):
            return f"{where} is {_kind(value)}, expected a list"
        return next(filter(None, (_problem(v, spec[0], f"{where}[{i}]") for i, v in enumerate(value))), None)
    if spec is None:
        return None if value is None else f"{where} is {_kind(value)}, expected null"
    ok = isinstance(value, spec) and not (isinstance(value, bool) and spec is not bool)
    return None if ok else f"{where} is {_kind(value)}, expected {_what(spec)}"


def _outside(out_dir: Path, dst: str) -> bool:
    """Whether ``OUT/dst`` is not a file inside ``OUT``: absolute, up through ``..`` or a symbolic link out of it."""
    root = out_dir.resolve()
    try:
        target = (out_dir / dst).resolve()
    except RuntimeError:  # a loop of symbolic links leads nowhere inside
        return True
    return Path(dst).is_absolute() or target == root or not target.is_relative_to(root)


def check_run(record, path: Path) -> dict:
    """``record`` (run.json's content) if the page can be built from it; else a one-line error naming ``path`` and
    the entry. Output paths must stay inside the output folder: the page links and reads them as the outputs."""
    if not isinstance(record, dict) or record.get("format") != RUN_FORMAT:
        raise RDDMError(f"{path}: not an rddm-infer run record (format {RUN_FORMAT!r} expected)")
    problem = _problem(record, RUN_SCHEMA, "")
    if problem:
        raise RDDMError(f"{path}: {problem}")
    for i, im in enumerate(record["images"]):
        for key in ("src_abs", "dst"):
            if "\0" in (im[key] or ""):
                raise RDDMError(f"{path}: images[{i}].{key} contains a NUL character, which no file name can")
        if im["dst"] is not None and _outside(path.parent, im["dst"]):
            raise RDDMError(f"{path}: images[{i}].dst {im['dst']!r} is outside the output folder (an absolute path, "
                            f"'..' or a symbolic link out of it); the report links and reads outputs only inside it")
    return record


def load_run(out_dir: str | os.PathLike) -> dict:
    """``OUT/run.json``, checked against :data:`RUN_SCHEMA`, with per-image metrics refreshed from
    ``OUT/metrics.csv`` when present."""
    out_dir = Path(out_dir)
    path = out_dir / RUN_JSON
    if not out_dir.is_dir():
        raise RDDMError(f"{out_dir}: no such output folder")
    if not path.is_file():
        raise RDDMError(f"{path}: not found; create it with `rddm-infer restore IN -o {out_dir} --report`")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise RDDMError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise RDDMError(f"{path}: nested too deeply to be a run record") from None
    except OSError as e:
        raise RDDMError(f"{path}: cannot read ({e.strerror or e})") from None
    record = check_run(record, path)
    _check_fresh(record, out_dir, path)
    csv_path = out_dir / "metrics.csv"
    if csv_path.is_symlink():
        raise RDDMError(f"{csv_path}: a symbolic link; the report reads metrics only from a file of the output folder")
    if csv_path.is_file():
        _refresh_metrics(record, csv_path)
    return record


def _check_fresh(record: dict, out_dir: Path, path: Path) -> None:
    """Refuse a record older than the images it describes: a later run rewrote them, and the page would show that
    run's pixels beside this one's settings and PSNRs."""
    written = path.stat().st_mtime + 2.0  # outputs are written before run.json; 2 s covers coarse file-system clocks
    newer = [im["dst"] for im in record["images"] if im["status"] == "restored" and im["dst"] is not None
             and (out_dir / im["dst"]).is_file() and (out_dir / im["dst"]).stat().st_mtime > written]
    if newer:
        raise RDDMError(f"{path}: older than {len(newer)} of its images (e.g. {newer[0]}): a later run rewrote them; "
                        f"rerun that restore with --report to describe it")


def _refresh_metrics(record: dict, csv_path: Path) -> None:
    """Per-image PSNR/SSIM (and their mean) from ``metrics.csv``; a one-line error naming it if unreadable."""
    by_src = {im["src"]: im for im in record["images"]}
    try:
        with open(csv_path, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                im = by_src.get(row.get("file", ""))
                try:
                    if im is not None:
                        im["metrics"] = {"psnr": float(row["psnr"]), "ssim": float(row["ssim"])}
                        if row.get("psnr_in"):
                            im["metrics"]["psnr_in"] = float(row["psnr_in"])
                except (KeyError, TypeError, ValueError):
                    raise RDDMError(f"{csv_path}: malformed row for {row.get('file')!r}") from None
    except UnicodeDecodeError as e:
        raise RDDMError(f"{csv_path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})") from None
    except csv.Error as e:
        raise RDDMError(f"{csv_path}: not a readable CSV file ({e})") from None
    except OSError as e:
        raise RDDMError(f"{csv_path}: cannot read ({e.strerror or e})") from None
    rows = [im["metrics"] for im in record["images"] if _pair(im.get("metrics"))]
    if rows:
        record["mean"] = {k: float(np.mean([m[k] for m in rows])) for k in ("psnr", "ssim", "psnr_in")
                          if all(k in m for m in rows)}


def _pair(metrics) -> bool:
    """Whether a metrics entry holds both PSNR and SSIM (the page shows them together or not at all)."""
    return bool(metrics) and "psnr" in metrics and "ssim" in metrics


def _display8(pixels: np.ndarray) -> np.ndarray:
    """Any decoded image -> 8-bit BGR for viewing (alpha dropped: the page compares the colour)."""
    if pixels.dtype == np.uint16:
        pixels = (pixels.astype(np.uint32) * 255 + 32767) // 65535
    elif pixels.dtype != np.uint8:
        pixels = np.clip(np.nan_to_num(pixels.astype(np.float32)) * 255 + 0.5, 0, 255)
    pixels = pixels.astype(np.uint8)
    if pixels.ndim == 2:
        return np.repeat(pixels[..., None], 3, axis=2)
    return np.ascontiguousarray(pixels[..., :3])


def _encode(pixels: np.ndarray, ext: str) -> bytes:
    import cv2

    params = [cv2.IMWRITE_JPEG_QUALITY, 90] if ext == ".jpg" else []
    ok, buf = cv2.imencode(ext, pixels, params)
    if not ok:
        raise RDDMError(f"could not encode a {ext} preview")
    return buf.tobytes()


class _Assets:
    """Thumbnails and browser-viewable copies under ``OUT/.report/``; stale ones are removed at the end."""

    def __init__(self, out_dir: Path):
        self.out_dir, self.dir, self.kept = out_dir, out_dir / ASSETS, set()
        # Writing or pruning through a link would touch (and delete) files of another folder.
        if self.dir.is_symlink() or (self.dir.exists() and not self.dir.is_dir()):
            raise RDDMError(f"{self.dir}: cannot write the report (a symbolic link or not a folder); it writes and prunes its "
                            f"thumbnails only in a real folder inside the output (remove it, then rerun)")

    def write(self, name: str, data: bytes) -> str:
        path = _write(self.dir / name, data)
        self.kept.add(path.name)
        return href(path, self.out_dir)

    def views(self, path: Path, stem: str) -> tuple[str, str, tuple[int, int]] | None:
        """(thumbnail link, full-size link, (w, h)) of an image file, or None if it cannot be read."""
        import cv2

        from .io.images import read_image

        try:
            pix = _display8(read_image(path).pixels)
        except (RDDMError, OSError):
            return None
        h, w = pix.shape[:2]
        if path.suffix.lower() in BROWSER_EXTS:
            full = href(path, self.out_dir)
        else:
            full = self.write(f"{stem}_full.png", _encode(pix, ".png"))
        if max(h, w) <= THUMB:  # small: the full-size view is its own thumbnail
            thumb = full
        else:
            s = THUMB / max(h, w)
            small = cv2.resize(pix, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
            thumb = self.write(f"{stem}.jpg", _encode(small, ".jpg"))
        return thumb, full, (w, h)

    def prune(self) -> None:
        if self.dir.is_dir() and not self.dir.is_symlink():
            for p in self.dir.iterdir():
                if (p.is_file() or p.is_symlink()) and p.name not in self.kept:
                    p.unlink(missing_ok=True)  # a link is removed itself, never what it points to


def _is_file(path: Path) -> bool:
    """``path.is_file()``, False for a name the system refuses (too long, say) rather than an error."""
    try:
        return path.is_file()
    except OSError:
        return False


def _panel(i: int, im: dict, out_dir: Path, assets: _Assets, per_page: int) -> str:
    src, dst = Path(im["src_abs"]), out_dir / im["dst"]
    before, after = assets.views(src, f"{i}_before"), assets.views(dst, f"{i}_after")
    name = esc(im["src"])
    facts = []
    if _pair(im.get("metrics")):
        m = im["metrics"]
        psnr = f"{m['psnr_in']:.2f} → {m['psnr']:.2f} dB ({m['psnr'] - m['psnr_in']:+.2f})" \
            if isinstance(m.get("psnr_in"), _NUM) else f"{m['psnr']:.2f} dB"
        facts.append(f"PSNR {psnr} · SSIM {m['ssim']:.4f}")
    if im.get("mode"):
        facts.append(esc(str(im["mode"])))
    if im["status"] == "skipped":
        facts.append("skipped (output existed)")
    elif im.get("seconds"):
        facts.append(f"{im['seconds']:.2f} s")
    if im.get("error"):
        facts.append(f'<span class="bad">{esc(im["error"])}</span>')
    links = []
    if _is_file(src):
        links.append(f'<a href="{href(src, out_dir)}">input</a>')
    if _is_file(dst):
        links.append(f'<a href="{href(dst, out_dir)}">output</a>')
    head = f'<section class="item" data-page="{i // per_page + 1}" data-status="{esc(im["status"])}"' \
           f'{" hidden" if i >= per_page else ""}><h2>{name}</h2>'
    if before is None or after is None:
        missing = "input" if before is None else "output"
        return (f'{head}<p class="bad">{missing} file not readable now; no comparison</p>'
                f'<p>{" · ".join(facts + links)}</p></section>')
    (bt, bf, (w, h)), (at, af, size2) = before, after
    if size2 != (w, h):
        facts.append(f'<span class="bad">output is {size2[0]}×{size2[1]}, input {w}×{h}</span>')
    up = " up" if w < THUMB else ""
    tools = "".join(f'<button type="button" data-z="{z}" aria-pressed="{str(z == 0).lower()}">{label}</button>'
                    for z, label in ((0, "fit"), (1, "1:1"), (2, "2:1"), (4, "4:1")))
    img = lambda cls, t, f: (f'<img class="{cls}" src="{t}" data-thumb="{t}" data-full="{f}" width="{w}" '  # noqa
                             f'height="{h}" loading="lazy" alt="{cls}: {name}">')
    return (f'{head}<figure class="cmp{up}" data-w="{w}" data-h="{h}"><div class="frame"><div class="view" '
            f'title="click: 1:1 here"><div class="stack">{img("before", bt, bf)}{img("after", at, af)}</div></div>'
            f'<div class="line"></div><span class="lab l">before</span><span class="lab r">after</span></div>'
            f'<input class="slider" type="range" min="0" max="100" value="50" aria-label="before / after">'
            f'<div class="tools">zoom {tools}</div></figure>'
            f'<p>{w}×{h} · {" · ".join(facts + links)}</p></section>')


def restore_html(record: dict, out_dir: str | os.PathLike, per_page: int = PER_PAGE) -> str:
    out_dir = Path(out_dir)
    assets = _Assets(out_dir)
    m, c, s = record["model"], record["counts"], record["settings"]
    mean = record.get("mean") or {}
    facts = [
        ("model", f'<code>{esc(m["path"])}</code>'),
        ("graph", esc(f'{m["graph"]}, objective {m["objective"]}, {m["steps"]} steps (t = '
                      f'{", ".join(map(str, m["times"]))}), η {m["eta"]}, {m["precision"]}')),
        ("backend", esc(f'{record["backend"]} ({record["backend_reason"]})' if record.get("backend_reason")
                        else record["backend"])),
        ("device", esc(f'{record["machine"]["cpu"]} ({record["machine"]["cores"]} cores), '
                       f'{record["machine"]["platform"]}')),
        ("settings", esc(f'seed {s["seed"]}, tile {s["tile"]} (overlap {s["overlap"]}), batch {s["batch"]}'
                         + (", pixel-shuffle and steps chosen per image" if s.get("pixel_shuffle") == "auto" else
                            f', pixel-shuffle {s["pixel_shuffle"]}' if (s.get("pixel_shuffle") or 1) > 1 else "")
                         + (f', self-ensemble {s["self_ensemble"]}' if (s.get("self_ensemble") or 1) > 1 else "")
                         + (f', ground truth {s["gt"]}' if s.get("gt") else ""))),
        ("result", esc(f'restored {c["restored"]}, failed {c["failed"]}, skipped {c["skipped"]} in '
                       f'{record["seconds"]:.2f} s ({record["images_per_s"]:.3f} images/s)')),
    ]
    if _pair(mean):
        facts.append(("mean", esc(f'PSNR {mean["psnr_in"]:.2f} → {mean["psnr"]:.2f} dB '
                                  f'({mean["psnr"] - mean["psnr_in"]:+.2f})' if isinstance(mean.get("psnr_in"), _NUM)
                                  else f'PSNR {mean["psnr"]:.2f} dB')
                              + esc(f', SSIM {mean["ssim"]:.4f}')
                      + (' (<a href="metrics.csv">metrics.csv</a>)' if (out_dir / "metrics.csv").is_file() else "")))
    facts += [("versions", _versions_html(record["versions"])), ("command", f'<code>{esc(record["command"])}</code>'),
              ("created", esc(record["created"]) + f' · <a href="{RUN_JSON}">{RUN_JSON}</a>')]
    shown = [im for im in record["images"] if im["status"] in ("restored", "skipped") and im.get("dst")]
    panels = "".join(_panel(i, im, out_dir, assets, per_page) for i, im in enumerate(shown))
    pages = -(-len(shown) // per_page)
    nav = ('<nav class="pages">page ' + "".join(f'<button type="button" data-p="{p}">{p}</button>'
                                                for p in range(1, pages + 1)) + "</nav>") if pages > 1 else ""
    failed = [im for im in record["images"] if im["status"] == "failed"]
    body = ""
    if failed:
        rows = "".join(f"<tr><td>{esc(im['src'])}</td><td>{esc(im.get('error') or '')}</td></tr>" for im in failed)
        body += (f'<section id="failed"><h2 class="bad">failed ({len(failed)})</h2><table><tr><th>file</th>'
                 f"<th>error</th></tr>{rows}</table></section>")
    body += (f'<section id="images"><h2>{len(shown)} images — drag the slider to compare; click an image (or 1:1) '
             f"to see its pixels</h2>{nav}<div class=\"grid\">{panels}</div>{nav}</section>")
    text = page(f"rddm-infer restore → {out_dir.name or out_dir}", facts, body, script=True)
    assets.prune()
    return text


def build_restore_report(out_dir: str | os.PathLike, per_page: int = PER_PAGE) -> Path:
    """(Re)build ``OUT/report.html`` from ``OUT/run.json`` (and ``metrics.csv``) and the files themselves."""
    out_dir = Path(out_dir)
    return _write_text(out_dir / REPORT_HTML, restore_html(load_run(out_dir), out_dir, per_page))


# ----------------------------------------------------------------------------------------- export

def export_html(artifacts: list[dict], folder: str | os.PathLike, *, checkpoint: str = "",
                seconds: float | None = None) -> str:
    """The ``rddm-export`` page from ``Artifact.to_dict()`` rows."""
    folder = Path(folder)
    rows = []
    for a in artifacts:
        path = Path(a["path"])
        checks = a.get("checks") or []
        if a.get("validated"):
            worst = max(checks, key=lambda c: c["value"] / c["limit"] if c["limit"] else 0) if checks else None
            val = '<span class="ok">passed</span>' + (
                esc(f" — worst {worst['metric']} {worst['value']:.3g} (limit {worst['limit']:.3g}, {worst['what']})")
                if worst else "")
        elif checks:
            val = '<span class="bad">FAILED</span>'
        else:
            val = '<span class="bad">not validated</span>'
        if len(checks) > 1:
            val += "<details><summary>all checks</summary>" + "".join(
                esc(f"{c['what']} {c['shape']}: {c['metric']} {c['value']:.3g} ≤ {c['limit']:.3g}") + "<br>"
                for c in checks) + "</details>"
        link = f'<a href="{href(path, folder)}">{esc(path.name)}</a>' if path.exists() else esc(path.name)
        notes = "<br>".join(esc(n) for n in a.get("notes") or [])
        rows.append(f"<tr><td>{link}</td><td>{esc(a['format'])}</td><td>{esc(a['graph'])}</td>"
                    f"<td>{esc(a['precision'])}</td><td class=n>{a['bytes'] / 2**20:.2f} MiB</td>"
                    f"<td class=n>{a['build_s']:.1f} s</td><td>{val}</td><td><code>{esc(a['command'])}</code>"
                    f"{'<br>' + notes if notes else ''}</td></tr>")
    total = sum(a["build_s"] for a in artifacts)
    ok = sum(bool(a.get("validated")) for a in artifacts)
    facts = [("checkpoint", f"<code>{esc(checkpoint)}</code>"), ("folder", f"<code>{esc(folder)}</code>"),
             ("artifacts", esc(f"{len(artifacts)} written, {ok} validated against PyTorch")),
             ("build time", esc(f"{total:.1f} s" + (f" (whole export {seconds:.1f} s)" if seconds else ""))),
             ("device", esc(f"{machine()['cpu']} ({machine()['cores']} cores)")),
             ("versions", _versions_html(versions())), ("created", esc(_now()))]
    body = ("<section><table><tr><th>artifact</th><th>format</th><th>graph</th><th>precision</th><th>size</th>"
            "<th>build</th><th>validation</th><th>restore with</th></tr>" + "".join(rows) + "</table></section>")
    return page(f"rddm-export → {folder.name or folder}", facts, body)


def write_export_report(artifacts: list[dict], folder: str | os.PathLike, **kw) -> Path:
    return _write_text(Path(folder) / REPORT_HTML, export_html(artifacts, folder, **kw))


# -------------------------------------------------------------------------------------- benchmark

def bench_html(result: dict, folder: str | os.PathLike, plot: str = "results.png") -> str:
    """The ``benchmarks.backends`` page: environment, the table and the throughput plot."""
    folder = Path(folder)
    env = result["environment"]
    facts = [("model", esc(f"{result['model']} — {result['params_m']:.2f} M parameters")),
             ("run", esc(f"{result['steps']} steps, batch {result['batch']}, {result['runs']} timed runs after "
                         f"{result['warmup']} warm-up, round-robin; input {result.get('image', '')}")),
             ("device", esc(f"{env['cpu']} ({env['cores']} cores, {', '.join(env['isa']) or 'no AVX-512'})"
                            + (f", GPU {env['gpu']}" if env.get("gpu") else "")
                            + f"; threads {env['threads'] or 'default'}")),
             ("versions", esc(f"torch {env['torch']}, onnxruntime {env['onnxruntime']}, Python {env['python']}")),
             ("baseline", esc(result["baseline"])), ("date", esc(env["date"]))]
    if result.get("skipped"):
        facts.append(("not run here", esc("; ".join(result["skipped"]))))
    files = [n for n in ("results.json", "results.md") if (folder / n).is_file()]
    if files:
        facts.append(("data", " · ".join(f'<a href="{esc(quote(n))}">{esc(n)}</a>' for n in files)))
    head = ("<tr><th>size</th><th>variant</th><th>p50 ms</th><th>p90 ms</th><th>img/s</th><th>× baseline</th>"
            "<th>PSNR vs baseline</th><th>peak RSS MB</th><th>TFLOP/s</th></tr>")
    rows = []
    for size in result["sizes"]:
        for r in size["rows"]:
            if r.get("error"):
                rows.append(f"<tr><td>{esc(size['label'])}</td><td>{esc(r['variant'])}</td>"
                            f"<td colspan=7 class=bad>failed: {esc(r['error'])}</td></tr>")
                continue
            rows.append(f"<tr><td>{esc(size['label'])}</td><td>{esc(r['variant'])}</td>"
                        f"<td class=n>{r['p50_ms']:.1f}</td><td class=n>{r['p90_ms']:.1f}</td>"
                        f"<td class=n>{r['images_per_s']:.3f}</td>"
                        f"<td class=n>{_num(r.get('speedup_vs_baseline'), '{:.2f}')}</td>"
                        f"<td class=n>{_num(r.get('psnr_vs_baseline_db'), '{:.1f} dB')}</td>"
                        f"<td class=n>{r['peak_rss_mb']:.0f}</td><td class=n>{_num(r.get('tflops'), '{:.4f}')}</td>"
                        "</tr>")
    body = f"<section><table>{head}{''.join(rows)}</table></section>"
    if (folder / plot).is_file():
        body += f'<section><h2>throughput</h2><img class="plot" src="{esc(quote(plot))}" alt="images/s per backend">' \
                "</section>"
    return page(f"benchmarks.backends → {folder.name or folder}", facts, body)


def write_bench_report(result: dict, folder: str | os.PathLike, plot: str = "results.png") -> Path:
    return _write_text(Path(folder) / REPORT_HTML, bench_html(result, folder, plot))
