"""Progress lines: what they say, and at what pace they come, in a log and a terminal."""

import io
import time

from autosod_ray.data.progress import ProgressPrinter, duration, progress_bar, progress_line


def test_a_progress_line_says_done_of_total_rate_eta_and_errors():
    line = progress_line("pseudolabel", 120, 1000, 60.0, errors=3)
    assert line == "pseudolabel  120/1000 images  12.0%  2.00 images/s  ETA 7m20s  3 errors"
    assert "ETA -" in progress_line("predict", 0, 10, 5.0)  # no rate yet: no guess
    done = progress_line("predict", 10, 10, 5.0, errors=0)
    assert "ETA -" in done and "100.0%" in done
    resumed = progress_line("train", 300, 500, 100.0, unit="steps", since=200, extra="  loss 1")
    assert resumed == "train  300/500 steps  60.0%  1.00 steps/s  ETA 3m20s  loss 1"
    assert [duration(s) for s in (7.4, 125, 3725)] == ["7s", "2m05s", "1h02m"]
    assert progress_bar("x", 5, 10, width=10) == "[#####.....] x"


class Log(io.StringIO):
    def isatty(self) -> bool:
        return False


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_a_line_at_a_steady_pace_and_a_terminal_one_live_line():
    done = [0]

    def read():
        done[0] += 1
        return done[0], 0

    log = Log()
    with ProgressPrinter("pseudolabel", 100, read, every_s=0.2, stream=log):
        time.sleep(1.1)
    lines = log.getvalue().splitlines()
    assert 5 <= len(lines) <= 7 and all(ln.startswith("pseudolabel  ") for ln in lines)
    assert "\r" not in log.getvalue()
    term = Terminal()
    with ProgressPrinter("predict", 100, lambda: (50, 1), stream=term):
        time.sleep(1.2)
    shown = term.getvalue()
    assert shown.startswith("\r[############............] predict  50/100 images")
    assert shown.endswith("\n") and shown.count("\n") == 1  # one line, redrawn in place
