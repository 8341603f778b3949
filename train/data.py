"""Training data: images decoded once into RAM, crops / flips / degradations drawn per sample index.

Sample ``i`` is a pure function of ``(seed, i)``: its own ``numpy`` generator picks the
image, the crop, the flip and the degradation. The data stream is therefore the same
with 0 or 16 workers, and a resumed run simply starts at the index where it stopped.
Images live in one packed uint8 buffer that forked DataLoader workers share for free.
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from rddm_infer.errors import ImageError, RDDMError

from .config import DataSection, TrainConfig
from .degradations import Chain, draw, saturate

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
MAX_BAD_IMAGES = 10  # unreadable files skipped with a warning; more than this stops the run (a wrong folder?)
MAX_AUTO_WORKERS = 8


class DataError(RDDMError):
    """Training or validation data that cannot be used (missing, unpaired, unreadable, too small)."""


def list_images(src: str | os.PathLike) -> list[Path]:
    """A folder's images (sorted by name) or the paths listed in a reference-style ``.flist``."""
    src = Path(src)
    if src.is_file() and src.suffix == ".flist":
        lines = [ln.strip() for ln in src.read_text().splitlines() if ln.strip()]
        files = [Path(ln) if Path(ln).is_absolute() else src.parent / ln for ln in lines]
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise DataError(f"{src}: {len(missing)} listed file(s) do not exist, e.g. {missing[0]}")
    elif src.is_dir():
        files = sorted(p for p in src.iterdir() if p.suffix.lower() in IMAGE_EXTS and p.is_file())
    else:
        raise DataError(f"{src}: no such folder or .flist file")
    if not files:
        raise DataError(f"{src}: no images found")
    return files


def pair_files(inputs: str | os.PathLike, gts: str | os.PathLike) -> list[tuple[Path, Path]]:
    """Degraded/clean pairs: folders matched by file name (or stem), ``.flist`` files by line order."""
    a, b = list_images(inputs), list_images(gts)
    if Path(inputs).suffix == ".flist" or Path(gts).suffix == ".flist":
        if len(a) != len(b):
            raise DataError(f"{inputs} lists {len(a)} images but {gts} lists {len(b)}")
        return list(zip(a, b))
    by_name = {p.name: p for p in b}
    by_stem = {p.stem: p for p in b}
    pairs, unmatched = [], []
    for p in a:
        q = by_name.get(p.name) or by_stem.get(p.stem)
        (pairs.append((p, q)) if q is not None else unmatched.append(p))
    if unmatched:
        raise DataError(f"{inputs}: {len(unmatched)} input image(s) have no ground truth of the same name in {gts}, "
                        f"e.g. {unmatched[0].name}")
    return pairs


def read_rgb(path: Path) -> np.ndarray:
    """uint8 HWC RGB (grey and 16-bit files converted); a one-line error names an unreadable file."""
    from rddm_infer.io.images import quiet_stderr

    with quiet_stderr():
        img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise ImageError(f"{path}: cannot be read as an image")
    return np.ascontiguousarray(img[..., ::-1])


def _try_read(path: Path) -> np.ndarray | ImageError:
    try:
        return read_rgb(path)
    except ImageError as e:
        return e


def read_all(groups: list[list[Path]], threads: int | None = None) -> tuple[list[list[np.ndarray]], list[list[Path]]]:
    """Decode parallel lists of files (one list, or inputs and ground truths of pairs); an entry any of
    whose files is unreadable is dropped from every list with a warning naming it, up to MAX_BAD_IMAGES."""
    with ThreadPoolExecutor(threads or min(8, os.cpu_count() or 1)) as pool:  # cv2 decodes without the GIL
        decoded = [list(pool.map(_try_read, files)) for files in groups]
    bad = [k for k in range(len(groups[0])) if any(isinstance(d[k], ImageError) for d in decoded)]
    for k in bad[:MAX_BAD_IMAGES]:
        err = next(d[k] for d in decoded if isinstance(d[k], ImageError))
        print(f"rddm-train: warning: {err}; skipped", file=sys.stderr)
    if len(bad) > MAX_BAD_IMAGES or len(bad) == len(groups[0]):
        first = next(d[bad[0]] for d in decoded if isinstance(d[bad[0]], ImageError))
        raise DataError(f"{len(bad)} of {len(groups[0])} training images cannot be read (more than "
                        f"{MAX_BAD_IMAGES} or all), e.g. {first}")
    keep = [k for k in range(len(groups[0])) if k not in set(bad)]
    return [[d[k] for k in keep] for d in decoded], [[files[k] for k in keep] for files in groups]


class ImageBank:
    """Many uint8 RGB images packed in one buffer (cheap to share with worker processes)."""

    def __init__(self, images: list[np.ndarray], names: list[str]):
        self.shapes = np.array([im.shape for im in images], dtype=np.int64)
        sizes = self.shapes.prod(axis=1)
        self.offsets = np.concatenate(([0], np.cumsum(sizes)))
        self.buffer = np.empty(int(self.offsets[-1]), dtype=np.uint8)
        for im, o, s in zip(images, self.offsets, sizes):
            self.buffer[o:o + s] = im.reshape(-1)
        self.names = names

    @classmethod
    def load(cls, files: list[Path], threads: int | None = None) -> "ImageBank":
        """Decode ``files``; unreadable ones are skipped with a warning (see :func:`read_all`)."""
        (images,), (files,) = read_all([files], threads)
        return cls(images, [str(f) for f in files])

    @classmethod
    def load_pairs(cls, pairs: list[tuple[Path, Path]], threads: int | None = None) -> tuple["ImageBank", "ImageBank"]:
        """(inputs, ground truths) banks; a pair with an unreadable side is skipped as a whole."""
        (ins, gts), (a, b) = read_all([[p for p, _ in pairs], [q for _, q in pairs]], threads)
        return cls(ins, [str(f) for f in a]), cls(gts, [str(f) for f in b])

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, k: int) -> np.ndarray:
        o = self.offsets[k]
        return self.buffer[o:o + self.shapes[k].prod()].reshape(self.shapes[k])

    @property
    def nbytes(self) -> int:
        return self.buffer.nbytes


def _fit(img: np.ndarray, size: int) -> np.ndarray:
    """Reflect-pad an image smaller than the crop (rare: tiny photos)."""
    h, w = img.shape[:2]
    if h >= size and w >= size:
        return img
    return cv2.copyMakeBorder(img, 0, max(size - h, 0), 0, max(size - w, 0), cv2.BORDER_REFLECT_101)


def to_chw(img: np.ndarray) -> torch.Tensor:
    """HWC float [0, 1] or uint8 -> CHW float32 tensor in [0, 1]."""
    a = img.astype(np.float32) / 255.0 if img.dtype == np.uint8 else img.astype(np.float32, copy=False)
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))


def check_pair_sizes(inputs, gts, input_names: list[str], gt_names: list[str]) -> None:
    """A one-line error naming the first pair whose input and ground truth (images or banks) differ in size."""
    for k in range(len(gts)):
        (hi, wi), (hg, wg) = inputs[k].shape[:2], gts[k].shape[:2]
        if (hi, wi) != (hg, wg):
            raise DataError(f"{input_names[k]}: size {wi}x{hi} differs from its ground truth {gt_names[k]} ({wg}x{hg})")


class TrainSet(Dataset):
    """Sample i -> (degraded input, ground truth), CHW float32 in [0, 1], determined by (seed, i).

    With ``inputs`` (paired mode) the same crop/flip is cut from both banks and no
    degradation is applied; otherwise ``chain`` degrades the clean crop. ``rotate`` adds a
    quarter turn (0-3, drawn after the flip) to the flip: all 8 flips and 90° rotations, no resampling.
    """

    def __init__(self, gt: ImageBank, crop: int, seed: int, chain: Chain | None = None,
                 inputs: ImageBank | None = None, flip: bool = True, saturation: tuple[float, float] = (1.0, 1.0),
                 rotate: bool = False):
        if inputs is None and chain is None:
            raise DataError("training data needs either paired inputs or a degradation chain")
        if inputs is not None:
            check_pair_sizes(inputs, gt, inputs.names, gt.names)
        self.gt, self.inputs, self.chain = gt, inputs, chain
        if inputs is not None and tuple(saturation) != (1.0, 1.0):
            raise DataError("saturation augments clean photos before they are degraded; paired data is used as is")
        self.crop, self.seed, self.flip, self.saturation = crop, seed, flip, tuple(map(float, saturation))
        self.rotate = rotate

    def __len__(self) -> int:  # nominal; indices run as far as training goes
        return 2 ** 62

    def image_of(self, i: int) -> int:
        """The bank index sample ``i`` is cut from (the first draw of its generator, as in :meth:`sample`)."""
        return int(np.random.default_rng([self.seed, i]).integers(len(self.gt)))

    def sample(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, i])
        k = int(rng.integers(len(self.gt)))
        gt = _fit(self.gt[k], self.crop)
        h, w = gt.shape[:2]
        y, x = int(rng.integers(h - self.crop + 1)), int(rng.integers(w - self.crop + 1))
        flip = self.flip and rng.random() < 0.5
        turns = int(rng.integers(4)) if self.rotate else 0  # drawn only when on: other streams are unchanged

        def cut(im: np.ndarray) -> np.ndarray:
            return np.rot90((im[y:y + self.crop, x:x + self.crop])[:, ::-1 if flip else 1], turns)

        gt_crop = cut(gt).astype(np.float32) / 255.0
        if self.inputs is not None:
            inp = cut(_fit(self.inputs[k], self.crop)).astype(np.float32) / 255.0
        else:
            if self.saturation != (1.0, 1.0):  # drawn only when on: the streams of runs without it are unchanged
                gt_crop = saturate(gt_crop, draw(rng, self.saturation))
            inp, gt_crop = self.chain.apply(gt_crop, rng)
        return inp, gt_crop

    def __getitem__(self, i: int):
        inp, gt = self.sample(int(i))
        return to_chw(inp), to_chw(gt)


class IndexBatches(Sampler):
    """Consecutive index batches starting at batch ``start``: the stream resumes where it stopped."""

    def __init__(self, batch_size: int, start: int = 0, count: int | None = None):
        self.batch_size, self.start, self.count = batch_size, start, count

    def __iter__(self):
        b = self.start
        while self.count is None or b < self.start + self.count:
            yield list(range(b * self.batch_size, (b + 1) * self.batch_size))
            b += 1

    def __len__(self):
        return self.count if self.count is not None else 2 ** 62


def _worker_init(_):
    """One thread per worker: parallelism comes from the workers, not from oversubscribed pools."""
    cv2.setNumThreads(1)
    torch.set_num_threads(1)


def auto_workers() -> int:
    """Loader workers for this machine: one core stays with the training loop."""
    return max(0, min((os.cpu_count() or 1) - 1, MAX_AUTO_WORKERS))


def make_loader(dataset: TrainSet, batch_size: int, start_batch: int, num_workers: int,
                pin_memory: bool = False) -> DataLoader:
    """An endless loader of batches from ``start_batch`` on; workers prefetch so the device never waits."""
    # Spawned, not forked: a child forked from a process whose thread pools (OpenMP, OpenCV, ONNX Runtime) were
    # busy can deadlock on a lock held at fork time (seen here in the test suite).
    if num_workers < 0:  # -1: chosen from the machine
        num_workers = auto_workers()
    kw = dict(persistent_workers=True, prefetch_factor=4, multiprocessing_context="spawn") if num_workers > 0 else {}
    # Its own generator: creating the loader then leaves the global torch RNG (saved in checkpoints) untouched.
    gen = torch.Generator().manual_seed(dataset.seed)
    return DataLoader(dataset, batch_sampler=IndexBatches(batch_size, start_batch), num_workers=num_workers,
                      pin_memory=pin_memory, generator=gen, worker_init_fn=_worker_init, **kw)


def center_crop(img: np.ndarray, size: int) -> np.ndarray:
    img = _fit(img, size)
    h, w = img.shape[:2]
    y, x = (h - size) // 2, (w - size) // 2
    return img[y:y + size, x:x + size]


def stack_crops(images: list[np.ndarray], crop: int) -> np.ndarray:
    """Centre crops of uint8 HWC images as one NCHW float32 batch in [0, 1]."""
    return np.stack([(center_crop(im, crop).astype(np.float32) / 255).transpose(2, 0, 1) for im in images])


def validation_set(crop: int, count: int, seed: int, clean: str = "", inputs: str = "", gt: str = "",
                   chain: Chain | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Fixed (input, gt) NCHW float32 [0, 1] batches: centre crops, degraded with seeds (seed, i)."""
    if inputs or gt:
        if not (inputs and gt):
            raise DataError("a paired validation set needs both val.input and val.gt")
        pairs = pair_files(inputs, gt)[:count]
        names = [b.name for _, b in pairs]
        return (stack_crops([read_rgb(a) for a, _ in pairs], crop), stack_crops([read_rgb(b) for _, b in pairs], crop),
                names)
    files = list_images(clean)[:count]
    crops = [center_crop(read_rgb(f), crop).astype(np.float32) / 255 for f in files]
    degraded = [chain.apply(g, np.random.default_rng([seed, i])) for i, g in enumerate(crops)]
    ins, gts = [d[0] for d in degraded], [d[1] for d in degraded]  # a gray stage grays the target too
    names = [f.name for f in files]
    stack = lambda xs: np.stack([x.transpose(2, 0, 1) for x in xs]).astype(np.float32)  # noqa: E731
    return stack(ins), stack(gts), names


def chain_of(data: DataSection) -> Chain:
    """The degradation chain a config's ``[data]`` section describes."""
    return Chain.from_specs(data.degradations, bits=data.bits)


def training_set(cfg: TrainConfig) -> TrainSet:
    """The training set a config asks for: clean photos degraded on the fly, or pairs."""
    d = cfg.data
    if d.input or d.gt:
        if not (d.input and d.gt):
            raise RDDMError("paired training data needs both --input and --gt")
        inputs, gts = ImageBank.load_pairs(pair_files(d.input, d.gt))
        return TrainSet(gts, d.crop, cfg.run.seed, inputs=inputs, flip=d.flip)
    if not d.clean:
        raise RDDMError("no training data: give --data DIR (clean photos) or --input DIR --gt DIR")
    return TrainSet(ImageBank.load(list_images(d.clean)), d.crop, cfg.run.seed, chain_of(d), flip=d.flip,
                    saturation=d.saturation)


def validation_data(cfg: TrainConfig) -> tuple[np.ndarray, np.ndarray, list[str]] | None:
    """The config's fixed validation set, or None when it names none."""
    v = cfg.val
    if not (v.clean or v.input or v.gt):
        return None
    return validation_set(v.crop, v.count, v.seed, v.clean, v.input, v.gt, chain_of(cfg.data))
