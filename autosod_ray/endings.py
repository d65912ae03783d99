"""How a run ends: its status in run.json, its exit code, and the one-line reason.

Every job ends through `ending_of(exception)` (or a summary's status), so the
record and the exit code always agree:

| status                       | exit | meaning                                                  |
|------------------------------|------|----------------------------------------------------------|
| complete                     | 0    | every input has a mask                                    |
| complete with input errors   | 0    | the rest have a permanent reason in errors/ (bad files)   |
| unfinished                   | 1    | some images failed for a passing reason: rerun to retry   |
| user error                   | 2    | the config, input or output is wrong: nothing was done    |
| failed                       | 3    | internal errors, a lost cluster, a lost output or lease   |
| interrupted                  | 130  | Ctrl-C (SIGINT)                                           |
| terminated                   | 143  | SIGTERM (`ray job stop`, a scheduler, `kill`)             |
"""

from __future__ import annotations

import re
import signal
from dataclasses import dataclass

from .config import UserError

EXIT_CODES = {
    "complete": 0,
    "complete with input errors": 0,
    "already complete": 0,
    "unfinished": 1,
    "user error": 2,
    "failed": 3,
    "interrupted": 128 + signal.SIGINT,
    "terminated": 128 + signal.SIGTERM,
}


class RunFailed(Exception):
    """The run stopped itself: too many internal errors, its lease or its output lost."""


class LeaseLost(RunFailed):
    """Another run took the output's lease: this one must stop writing."""


@dataclass
class Ending:
    status: str
    reason: str
    known: bool = True  # a cause the reason explains in one line (no traceback needed)

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.status]


def terminated(err: BaseException) -> bool:
    """SIGTERM as Ray's driver handler raises it (`sys.exit(15)`) or ours does."""
    return isinstance(err, SystemExit) and err.code in (signal.SIGTERM, 128 + signal.SIGTERM)


def ending_of(err: BaseException) -> Ending:
    """The status and one-line reason of a run that `err` stopped."""
    if isinstance(err, KeyboardInterrupt):
        return Ending("interrupted", "interrupted (Ctrl-C / SIGINT)")
    if terminated(err):
        return Ending("terminated", "terminated (SIGTERM)")
    if isinstance(err, UserError):
        return Ending("user error", str(err).strip())  # its lines name every bad key
    said = _run_failed(err)
    if said is not None:  # ours, also when a Ray task raised it
        return Ending("failed", said)
    lost = _ray_lost(err)
    if lost:
        return Ending("failed", lost)
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    said = task_error_line(err) or f"{type(err).__name__}: {text}"
    return Ending("failed", said[:2000], known=False)


# a traceback's own line for its exception: `Name: message` at the line's start
_RAISED = re.compile(r"^[A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt|Warning): .+$", re.M)
_WRAPPED = "The above exception was the direct cause of the following exception:"


def task_error_line(err: BaseException) -> str | None:
    """`SomeError: message` as a Ray task raised it, where `err` carries one. Ray puts the
    task's traceback in its error's text, after a coloured `ray::Task()` header (the
    exception object Ray Data re-raises in the driver has its message replaced, so the
    text is the faithful copy); of a chain (Ray Data raises a UDF's error again as
    "UDF failed to process a data block") the first exception is the cause."""
    for e in chain(err):
        if type(e).__name__.startswith("RayTaskError"):
            found = _RAISED.findall(str(e).split(_WRAPPED)[0])
            if found:
                return found[-1].strip()
    return None


def _subclasses(cls: type) -> list[type]:
    return [cls, *(c for sub in cls.__subclasses__() for c in _subclasses(sub))]


def _run_failed(err: BaseException) -> str | None:
    """The message of a RunFailed in `err`'s chain; a Ray task's exception reaches the
    driver as text only (its traceback), so it is found there by its class name."""
    names = "|".join(sorted({c.__name__ for c in _subclasses(RunFailed)}))
    for e in chain(err):
        if isinstance(e, RunFailed):
            return str(e.args[0]) if e.args else type(e).__name__
        found = re.search(rf"\b(?:{names}): (.+)", str(e))
        if found:
            return found.group(1).strip()
    return None


def _ray_lost(err: BaseException) -> str | None:
    """A reason when `err` says the Ray cluster under the driver went away."""
    names = {type(e).__name__ for e in chain(err)}
    lost = {"LocalRayletDiedError", "RaySystemError", "GetTimeoutError", "NodeDiedError"}
    text = " ".join(str(e).lower() for e in chain(err))
    if names & lost or "raylet died" in text or "node has crashed" in text:
        return f"the Ray cluster was lost ({', '.join(sorted(names & lost)) or 'raylet died'})"
    return None


def chain(err: BaseException):
    """`err` and the exceptions it was raised from or during, each before those it wraps
    (breadth first: Ray's task errors link both ways)."""
    seen, todo = set(), [err]
    while todo:
        err = todo.pop(0)
        if not isinstance(err, BaseException) or id(err) in seen:
            continue
        seen.add(id(err))
        yield err
        # Ray's RayTaskError keeps the task's own exception in `cause`, and Ray Data raises
        # it from its own SystemException; a context `raise ... from` hid stays hidden
        context = None if err.__suppress_context__ else err.__context__
        todo += [getattr(err, "cause", None), err.__cause__, context]


def status_of(errors_permanent: int, errors_transient: int, errors_internal: int) -> str:
    """The status of a run that got to its end, from what its errors table holds."""
    if errors_internal:
        return "failed"
    if errors_transient:
        return "unfinished"
    if errors_permanent:
        return "complete with input errors"
    return "complete"
