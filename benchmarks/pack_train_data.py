"""Pack ../shared/data for a device run: WebP-lossless copies within the 64 MiB the device tool carries.

    python -m benchmarks.pack_train_data            # -> .data/train (≈54 MB, 249 photos), .data/val (4 photos)

Sources are interleaved (bsd200, sunhays80, urban100, ...) so the size budget keeps all three;
lossless, so the clean targets are bit-identical to the originals. `.data/` is git-ignored.
"""

import argparse
import shutil
from pathlib import Path

import cv2


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    ap.add_argument("--out", type=Path, default=Path(".data"))
    ap.add_argument("--budget-mb", type=float, default=54.0)
    ap.add_argument("--val", nargs="*", default=["1", "5", "10", "15"], help="McMaster images for in-run validation")
    a = ap.parse_args(argv)
    by_source: dict[str, list[Path]] = {}
    for f in sorted((a.shared / "train").glob("*.png")):
        by_source.setdefault(f.name.split("_")[0], []).append(f)
    order = []
    while any(by_source.values()):
        for k in sorted(by_source):
            if by_source[k]:
                order.append(by_source[k].pop(0))
    (a.out / "train").mkdir(parents=True, exist_ok=True)
    total = n = 0
    for f in order:
        ok, buf = cv2.imencode(".webp", cv2.imread(str(f), cv2.IMREAD_UNCHANGED), [cv2.IMWRITE_WEBP_QUALITY, 101])
        if not ok or total + len(buf) > a.budget_mb * 1e6:
            continue
        (a.out / "train" / (f.stem + ".webp")).write_bytes(buf.tobytes())
        total, n = total + len(buf), n + 1
    (a.out / "val").mkdir(exist_ok=True)
    for name in a.val:
        shutil.copy(a.shared / "val" / "mcmaster" / f"{name}.png", a.out / "val" / f"{name}.png")
    print(f"{n} training photos, {total / 1e6:.1f} MB in {a.out / 'train'}; {len(a.val)} validation photos")


if __name__ == "__main__":
    main()
