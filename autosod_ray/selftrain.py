"""Self-training: students relabel the images their teacher labelled, and new students
learn from the masks they are surest of.

    POTNet's pseudo-masks -> student-0 (train)
      -> labels-1 (predict: student-0 relabels --input, each mask with its own quality)
      -> student-1 (train on the best of labels-1) -> labels-2 -> ... -> student-<rounds>

Every step is one of the ordinary jobs (run_train, run_predict) on its own folder
under --output, so each keeps its record, lease and resume: running the same
command again skips what is complete and goes on where it stopped. The students
share one token cache (<output>/token_cache by default), so with a frozen encoder
a round encodes only the images no earlier student trained on.
"""

from __future__ import annotations

import json
import posixpath

from .config import SelfTrainConfig
from .data.run_output import redacted
from .data.uris import InputError, absolute, open_fs
from .endings import EXIT_CODES, ending_of
from .predict import run_predict
from .train.run import run_train

SUMMARY = "selftrain.json"


def student_dir(output: str, k: int) -> str:
    return posixpath.join(output, f"student-{k}")


def labels_dir(output: str, k: int) -> str:
    return posixpath.join(output, f"labels-{k}")


def round_configs(cfg: SelfTrainConfig, k: int):
    """Round k's jobs: (predict config that makes labels-k, or None for k = 0; the train
    config of student-k)."""
    out = cfg.output
    data = cfg.train.data
    if data.cache_tokens and not data.token_cache:
        data = data.model_copy(update={"token_cache": posixpath.join(out, "token_cache")})
    common = {"force_unlock": cfg.force_unlock, "overwrite": cfg.overwrite, "storage": cfg.storage}
    predict = None
    masks = cfg.pseudo_masks
    if k > 0:
        masks = labels_dir(out, k)
        predict = cfg.predict.model_copy(
            update={
                "model": posixpath.join(student_dir(out, k - 1), "model"),
                "input": cfg.input,
                "output": masks,
                **common,
            }
        )
    train = cfg.train.model_copy(
        update={"pseudo_masks": masks, "output": student_dir(out, k), "data": data, **common}
    )
    return predict, train


def run_selftrain(cfg: SelfTrainConfig, on_step=None) -> dict:
    """Run (or resume) every round; returns the summary (also <output>/selftrain.json).
    A step that does not end complete stops the rounds: its status is the run's; a step
    that raises is recorded in selftrain.json (status, reason, the step) and re-raised."""
    if not cfg.input or not cfg.pseudo_masks or not cfg.output:
        raise InputError("--input, --pseudo-masks and --output are all required")
    cfg = cfg.model_copy(
        update={
            "input": absolute(cfg.input),
            "pseudo_masks": absolute(cfg.pseudo_masks),
            "output": absolute(cfg.output),
        }
    )
    plan = [
        (k, job, step)
        for k in range(cfg.rounds + 1)
        for job, step in zip(("predict", "train"), round_configs(cfg, k), strict=True)
        if step is not None
    ]
    steps, status, reason = [], "complete", None
    try:
        for k, job, step in plan:
            summary = (run_predict if job == "predict" else run_train)(step)
            steps.append({"round": k, "job": job, "output": step.output, "summary": summary})
            if on_step is not None:
                on_step(job, summary)
            if EXIT_CODES[summary["status"]] != 0:
                status = summary["status"]
                break
    except BaseException as err:  # a step that raised: recorded, then raised as before
        ending = ending_of(err)
        status, reason = ending.status, ending.reason
        write_summary(cfg, summarise(cfg, steps, status, reason, plan[len(steps)]))
        raise
    result = summarise(cfg, steps, status, reason)
    write_summary(cfg, result)
    return result


def summarise(cfg: SelfTrainConfig, steps: list, status: str, reason, stopped_at=None) -> dict:
    """selftrain.json: how the run ended, each step's figures, the model to use."""
    return {
        "status": status,
        "reason": reason,
        "stopped_at": None
        if stopped_at is None
        else {"round": stopped_at[0], "job": stopped_at[1], "output": stopped_at[2].output},
        "rounds": cfg.rounds,
        "model": posixpath.join(student_dir(cfg.output, cfg.rounds), "model")
        if status == "complete"
        else None,
        "steps": [
            {
                "round": s["round"],
                "job": s["job"],
                "output": s["output"],
                "status": s["summary"]["status"],
                **step_figures(s["job"], s["summary"]),
            }
            for s in steps
        ],
        "config": cfg.model_dump(mode="json"),
    }


def write_summary(cfg: SelfTrainConfig, result: dict) -> None:
    fs, root = open_fs(cfg.output, cfg.storage.options(cfg.output))
    fs.makedirs(root, exist_ok=True)
    body = json.dumps(redacted(result), indent=2)  # a reason may quote an endpoint URL
    fs.pipe_file(posixpath.join(root, SUMMARY), body.encode())


def step_figures(job: str, summary: dict) -> dict:
    """The few numbers of a step a reader of selftrain.json wants first."""
    if job == "predict":
        keys = ("inputs", "labelled", "errors", "seconds")
    else:
        keys = ("steps", "seconds", "pseudo_masks")
    return {k: summary[k] for k in keys if k in summary}


def print_selftrain_summary(summary: dict, file=None) -> None:
    import sys

    file = file or sys.stdout
    lines = [f"\nselftrain {summary['status']}: {summary['rounds']} round(s)"]
    for s in summary["steps"]:
        extra = ""
        if s["job"] == "train" and s.get("pseudo_masks"):
            pm = s["pseudo_masks"]
            extra = f", trained on {pm['kept']} of {pm['rows']} masks"
        elif s["job"] == "predict" and "labelled" in s:
            extra = f", {s['labelled']} masks, {s['errors']} errors"
        lines.append(f"  round {s['round']} {s['job']:<8} {s['status']}{extra}  {s['output']}")
    if summary["model"]:
        lines.append(f"  model     {summary['model']}")
    print("\n".join(lines), file=file)
