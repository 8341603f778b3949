"""The Python API: load a model once, restore numpy images, files and folders.

>>> with load_model() as model:                      # the built-in model, fastest backend available
...     out = model.restore_array(cv2.imread("in.png"))
>>> summary = restore_folder("photos/", "restored/", steps=2)

:func:`executor` is the one place a run is given to the local executor (this process) or to Ray; the CLI
and :func:`restore_folder` both go through it.
"""

from __future__ import annotations

import os
from typing import Iterable

from .backends.select import DEFAULT_CHECKPOINT, DEFAULT_MODEL
from .errors import OptionError, RDDMError
from .restore.jobs import Summary
from .restore.local import Restorer

__all__ = ["DEFAULT_CHECKPOINT", "DEFAULT_MODEL", "EXECUTORS", "RAY_OPTIONS", "Restorer", "executor", "load_model",
           "restore_folder"]

EXECUTORS = ("local", "ray")
RAY_OPTIONS = ("address", "workers", "cpus_per_worker", "gpus_per_worker", "connect_timeout")
RUN_OPTIONS = ("suffix", "ext", "skip_existing", "recursive", "gt_dir")


def load_model(model: str | os.PathLike | None = None, backend: str = "auto", **options) -> Restorer:
    """Load a model (default: the built-in one) for restoring arrays, files and folders.

    ``options``: Restorer settings (steps, eta, seed, tile, overlap, batch, pixel_shuffle,
    self_ensemble; ``tile`` None: 512, or the largest that fits in memory, which ``memory_note`` then says; a
    tile given that does not fit is an error: ``rddm_infer.restore.memory``), model options
    (objective, sum_scale, timesteps) and the backend's own options (``rddm_infer.backends.registry``);
    an unknown option, or one that does not apply, is an error naming it."""
    return Restorer(model, backend, **options)


def executor(model: str | os.PathLike | None = None, backend: str = "auto", *, kind: str = "local",
             quiet: bool = False, **options):
    """A loaded executor for a folder run: :class:`Restorer` (``kind="local"``) or the Ray executor
    (``kind="ray"``, which also takes ``address``, ``workers``, ``cpus_per_worker``, ``gpus_per_worker``,
    ``connect_timeout``).
    Both have ``restore_paths`` and are context managers."""
    if kind not in EXECUTORS:
        raise OptionError(f"executor {kind!r}: choose 'local' (this process) or 'ray'")
    if kind == "ray":
        from .restore.ray_executor import RayRestorer

        return RayRestorer(model, backend, quiet=quiet, **options)
    given = [k for k in RAY_OPTIONS if options.get(k) is not None]
    if given:
        flags = ", ".join("--" + {"connect_timeout": "ray-connect-timeout"}.get(k, k.replace("_", "-")) for k in given)
        raise RDDMError(f"{flags}: Ray options need --ray or --ray-address (executor='ray')")
    return Restorer(model, backend, **{k: v for k, v in options.items() if k not in RAY_OPTIONS})


def restore_folder(inputs: str | os.PathLike | Iterable[str | os.PathLike], out_dir: str | os.PathLike,
                   model: str | os.PathLike | None = None, *, executor: str = "local", **options) -> Summary:
    """One-call folder restore with the given (or built-in) model.

    ``executor="ray"`` runs the same jobs on Ray Data (same names, pixels and errors); it also takes
    ``address``, ``workers``, ``cpus_per_worker`` and ``gpus_per_worker``."""
    run_opts = {k: options.pop(k) for k in RUN_OPTIONS if k in options}
    items = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    with _executor(model, kind=executor, quiet=True, **options) as runner:
        return runner.restore_paths(items, out_dir, **run_opts)


_executor = executor  # restore_folder's own parameter is named ``executor``
