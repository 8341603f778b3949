"""What a running training loop reports, and how it is told to stop: the progress bar (or plain notes),
the ``train_log.jsonl`` rows, and SIGTERM. Log keys are a file format read by users' tools: they stay as
they are, including ``"step"`` for the iteration counter."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path
from typing import Callable


def append_line(path: Path, line: str) -> None:
    with open(path, "a") as f:
        f.write(line + "\n")


class TrainLog:
    """``train_log.jsonl``: one row per logged iteration, with the throughput since the previous row."""

    def __init__(self, path: Path, iteration: int, images_per_iteration: int,
                 sources: Callable[[int, int], dict] | None = None):
        self.path, self.images, self.sources = path, images_per_iteration, sources
        self.t_last, self.iteration_last = time.perf_counter(), iteration

    def write(self, iteration: int, loss: float | None, lr: float) -> float:
        """Appends the row (with ``sources``: where the row's samples came from); returns iterations per second
        since the last row."""
        now = time.perf_counter()
        its = (iteration - self.iteration_last) / max(now - self.t_last, 1e-9)
        row = {"step": iteration, "loss": loss, "it_s": round(its, 3), "img_s": round(its * self.images, 1),
               "lr": lr, "time": round(time.time(), 3)}
        if self.sources is not None:  # the samples of iterations iteration_last + 1 .. iteration
            row["sources"] = self.sources(self.iteration_last * self.images, iteration * self.images)
        self.t_last, self.iteration_last = now, iteration
        append_line(self.path, json.dumps(row))
        return its


class StopOnSigterm:
    """SIGTERM (what `timeout` and job schedulers send) ends the run after the current iteration, with a checkpoint."""

    def __init__(self):
        self.requested = False
        self._old = None
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


class ProgressBar:
    """A rich progress bar with loss and it/s; when disabled (logs, schedulers), only the notes, as plain lines."""

    def __init__(self, enabled: bool, total: int, start: int, log=print):
        self.bar, self.log = None, log
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[its]} it/s"),
                                TimeRemainingColumn())
            self.task = self.bar.add_task("train", total=total, completed=start, loss="-", its="-")
            self.bar.start()

    def update(self, iteration: int, loss: float, its: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=iteration, loss=f"{loss:.4f}", its=f"{its:.2f}")

    def note(self, text: str) -> None:
        if self.bar is not None:
            self.bar.console.print(text)
        else:
            self.log(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
