"""Images/s against the number of Ray workers, beside the single-process run, on this machine.

    python -m benchmarks.cluster --images 8 --size 128 --workers 1 2 [--address auto] [--out results/x.json]
    python -m benchmarks.cluster --host-costs 1024      # per-image CPU work around the engine, 1 core


The same synthetic images (seeded) go through ``Restorer.restore_paths`` (one process, its default
threads) and through ``rddm_infer.restore.ray_executor.restore_paths`` with 1, 2, ... actors on one Ray runtime
(started once, so its ~10-20 s start-up is not counted; each run does count its actors' model
loads, as a real job does). Every run must write byte-identical outputs; the script checks it.
Wall-clock images/s on a shared machine drift with the other load: compare rows of one run only.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import cv2
import numpy as np

from rddm_infer.io.atomic import write_bytes_atomic
from rddm_infer.restore.ray_executor import ray_runtime, restore_paths
from rddm_infer.restore.local import Restorer


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def make_images(folder: Path, n: int, size: int) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        base = cv2.resize(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), (size, size), interpolation=cv2.INTER_CUBIC)
        cv2.imwrite(str(folder / f"img{i:03d}.png"), np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8))


def outputs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


def host_costs(side: int, repeats: int = 5) -> dict[str, float]:
    """Milliseconds of one core per image for what a worker does besides the engine (median of ``repeats``):
    decode, model-space conversion + seeded noise, back to pixels, encode. Sizes the CPUs a GPU needs."""
    from rddm_infer.backends import Noise
    from rddm_infer.io.images import Image, encode_image, from_model, to_model
    from rddm_infer.diffusion.schedule import DiffusionConfig, SamplingPlan

    rng = np.random.default_rng(0)
    base = cv2.resize(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), (side, side), interpolation=cv2.INTER_CUBIC)
    pix = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
    png, jpg = encode_image(pix, ".png"), encode_image(pix, ".jpg")
    plan = SamplingPlan.create(DiffusionConfig(), 5, 0.0)
    img = Image(pix, "x.png")
    x = to_model(img)
    steps = {
        "decode png": lambda: cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED),
        "decode jpeg": lambda: cv2.imdecode(np.frombuffer(jpg, np.uint8), cv2.IMREAD_UNCHANGED),
        "to model space": lambda: to_model(img),
        "noise (seeded, per image)": lambda: Noise.draw(plan, x.shape, 0),
        "from model space": lambda: from_model(x, img, ".png"),
        "encode png": lambda: encode_image(pix, ".png"),
        "encode jpeg": lambda: encode_image(pix, ".jpg"),
    }
    cv2.setNumThreads(1)
    out = {}
    for name, fn in steps.items():
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        out[name] = round(float(np.median(times)) * 1e3, 2)
    out["png MB"], out["jpeg q95 MB"] = round(len(png) / 1e6, 3), round(len(jpg) / 1e6, 3)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--cpus-per-worker", type=float, default=None)
    ap.add_argument("--gpus-per-worker", type=float, default=None)
    ap.add_argument("--address", default=None, help="Ray cluster (default: a local runtime)")
    ap.add_argument("--model", default=None)
    ap.add_argument("--out", type=Path, default=None, help="write the result JSON here")
    ap.add_argument("--host-costs", type=int, default=None, metavar="SIDE",
                    help="only time decode/convert/noise/encode of one SIDE² photo-like image on one core")
    args = ap.parse_args(argv)
    if args.host_costs:
        costs = host_costs(args.host_costs)
        print(f"{cpu_name()}, 1 core, {args.host_costs}² 8-bit BGR:")
        for k, v in costs.items():
            print(f"  {k:<28} {v:8.2f}{'' if 'MB' in k else ' ms'}")
        return costs

    rows = []
    with tempfile.TemporaryDirectory(prefix="rddm-bench-cluster-") as tmp:
        src = Path(tmp) / "in"
        make_images(src, args.images, args.size)
        with Restorer(args.model) as r:
            s = r.restore_paths([src], Path(tmp) / "one")
        ref = outputs(Path(tmp) / "one")
        rows.append({"run": "one process", "workers": 0, "cpus": None, "seconds": round(s.seconds, 3),
                     "images_per_s": round(s.images_per_s, 4), "identical": True})
        with ray_runtime(args.address):
            for w in args.workers:
                pools = []
                dst = Path(tmp) / f"ray{w}"
                s = restore_paths([src], dst, model=args.model, address=args.address, workers=w,
                                  cpus_per_worker=args.cpus_per_worker, gpus_per_worker=args.gpus_per_worker,
                                  on_pool=pools.append)
                rows.append({"run": f"ray: {pools[0].describe()}", "workers": w, "cpus": pools[0].cpus,
                             "seconds": round(s.seconds, 3), "images_per_s": round(s.images_per_s, 4),
                             "identical": outputs(dst) == ref})
    result = {"cpu": cpu_name(), "when": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "images": args.images, "size": args.size, "backend": s.engine, "rows": rows}
    print(f"{result['cpu']}; {args.images} images of {args.size}², {result['backend']}; {result['when']}")
    for row in rows:
        print(f"  {row['run']:<40} {row['seconds']:8.2f} s  {row['images_per_s']:7.3f} images/s"
              f"  {'identical' if row['identical'] else 'DIFFERENT OUTPUT'}")
    if args.out:
        write_bytes_atomic(args.out, (json.dumps(result, indent=2) + "\n").encode())
    if not all(row["identical"] for row in rows):
        raise SystemExit("some Ray run wrote different bytes from the single-process run")
    return result


if __name__ == "__main__":
    main()
