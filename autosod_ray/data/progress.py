"""Progress a person can follow: images done of total, images/s, ETA, errors so far.

The sink tells a small ledger actor what it wrote (rows to masks/, rows to
errors/); a thread on the driver reads the ledger and prints. In a terminal
it is one live line, redrawn every second; in a log (CI, `ray job logs`) it is
one line every `every_s` seconds, so the log reads at a steady pace.
"""

from __future__ import annotations

import sys
import threading
import time


class WriteLedger:
    """A Ray actor (no CPU, on the driver's node) the writers report to. It admits each
    write while the run goes on and counts what each wrote (the progress line); once the
    run ends early it admits no more, so that no write lands after the counts run.json
    records."""

    def __init__(self):
        self.done, self.errors = 0, 0
        self.open, self.writing = True, 0

    def admit(self) -> bool:
        """A writer asks before it writes: False once the run is ending."""
        if self.open:
            self.writing += 1
        return self.open

    def add(self, done: int, errors: int) -> None:
        """An admitted writer's rows, told when it is done (or has failed)."""
        self.done += done
        self.errors += errors
        self.writing -= 1

    def close(self) -> int:
        """Admit no more writes; returns how many admitted ones are still under way."""
        self.open = False
        return self.writing

    def read(self) -> tuple[int, int]:
        return self.done, self.errors


def duration(seconds: float) -> str:
    """3725 -> '1h02m', 125 -> '2m05s', 7.4 -> '7s'."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def progress_line(
    job: str, done: int, total: int, seconds: float, errors: int | None = None,
    unit: str = "images", since: int = 0, extra: str = "",
) -> str:  # fmt: skip
    """'pseudolabel  120/1000 images  12.0%  2.31 images/s  ETA 6m21s  3 errors': `done`
    of `total`, the rate of the `done - since` made in `seconds`, and what is left at it."""
    rate = (done - since) / seconds if seconds > 0 else 0.0
    eta = duration((total - done) / rate) if rate > 0 and done < total else "-"
    share = 100.0 * done / total if total else 100.0
    line = f"{job}  {done}/{total} {unit}  {share:.1f}%  {rate:.2f} {unit}/s  ETA {eta}"
    return line + (f"  {errors} errors" if errors is not None else "") + extra


def progress_bar(line: str, done: int, total: int, width: int = 24) -> str:
    filled = int(width * done / total) if total else width
    return f"[{'#' * filled}{'.' * (width - filled)}] {line}"


class ProgressPrinter:
    """`with ProgressPrinter(job, total, read):` prints what `read() -> (done, errors)`
    says until the block ends (and once more at its end)."""

    def __init__(self, job: str, total: int, read, every_s: float = 10.0, stream=None):
        self.job, self.total, self.read = job, total, read
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()
        self.every_s = 1.0 if self.live else every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="progress")
        self._start = time.perf_counter()

    def _print(self) -> None:
        try:
            done, errors = self.read()
        except Exception:  # noqa: BLE001 - progress is a courtesy, never a failure
            return
        line = progress_line(self.job, done, self.total, time.perf_counter() - self._start,
                             errors)  # fmt: skip
        if self.live:
            self.stream.write("\r" + progress_bar(line, done, self.total) + "\x1b[K")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self._print()

    def __enter__(self) -> ProgressPrinter:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if exc[0] is None:
            self._print()
        if self.live:
            self.stream.write("\n")
            self.stream.flush()


def use_our_progress() -> None:
    """Turn Ray Data's progress bars (counted in blocks) off in favour of ours (in images),
    and its warning-level notice that they are off with them: we turned them off."""
    import logging

    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
