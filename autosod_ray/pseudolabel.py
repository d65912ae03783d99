"""The pseudolabel job: a whole dataset -> Parquet shards of POTNet masks.

    list -> read bytes -> decode + resize -> backbone + POTNet (actor pool)
         -> encode PNGs -> write Parquet (masks/, errors/) ; run.json

Everything that can be checked before the cluster is touched (config, input,
output) is checked first. Reruns resume: images already written under the same
config hash are skipped.
"""

from __future__ import annotations

import functools
import getpass
import json
import posixpath
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .backbone import check_backbone, vit_geometry
from .config import PredictConfig, PseudolabelConfig, UserError
from .data.lease import OutputLease
from .data.parquet import TABLES, PseudoMaskDatasink, drop_rows, ensure_tables, read_rows
from .data.stages import TRANSIENT, ModelStage, decode, encode, read_bytes
from .data.uris import InputError, open_fs, scan_inputs

# the jobs that label images into the pseudo-mask schema (pseudolabel, predict)
JobConfig = PseudolabelConfig | PredictConfig


class OutputError(UserError, ValueError):
    """A bad --output: e.g. made with another config and no --overwrite."""


def check_output(cfg: JobConfig, config_hash: str) -> None:
    """Refuse an output written under another config unless overwrite; create it."""
    opts = cfg.storage.options(cfg.output)
    fs, root = open_fs(cfg.output, opts)
    run_json = posixpath.join(root, "run.json")
    if fs.exists(run_json):
        previous = json.loads(fs.cat_file(run_json))
        if previous.get("config_hash") != config_hash:
            if not cfg.overwrite:
                raise OutputError(
                    f"--output {cfg.output!r} holds masks of config {previous.get('config_hash')}, "
                    f"not {config_hash}; use a new output, or --overwrite to replace them"
                )
            for table in TABLES:
                if fs.exists(posixpath.join(root, table)):
                    fs.rm(posixpath.join(root, table), recursive=True)
    fs.makedirs(root, exist_ok=True)


def write_run_json(cfg: JobConfig, config_hash: str, **extra) -> None:
    fs, root = open_fs(cfg.output, cfg.storage.options(cfg.output))
    record = {"config": cfg.model_dump(mode="json"), "config_hash": config_hash, **extra}
    fs.pipe_file(posixpath.join(root, "run.json"), json.dumps(record, indent=2).encode())


def transient_rows(errors: pa.Table, config_hash: str):
    """Which rows of an errors table are this config's transient failures."""
    mine = pc.equal(errors.column("config_hash"), config_hash)
    return pc.and_(mine, pc.equal(pc.fill_null(errors.column("error_kind"), ""), TRANSIENT))


def pending_inputs(cfg: JobConfig, config_hash: str, inputs: pa.Table) -> tuple[pa.Table, int]:
    """The inputs not yet done under this config hash (in masks/, or in errors/ for a
    permanent reason), and how many are done. Transient errors of earlier runs are taken
    out of errors/ first: those images are tried again."""
    opts = cfg.storage.options(cfg.output)
    drop_rows(cfg.output, opts, "errors", lambda t: transient_rows(t, config_hash))
    done = pa.concat_arrays(
        [
            read_rows(cfg.output, opts, t, ["image_id"], config_hash)
            .column("image_id")
            .combine_chunks()
            for t in TABLES
        ]
    )
    if not len(done):
        return inputs, 0
    todo = pc.invert(pc.is_in(inputs.column("image_id"), value_set=done))
    return inputs.filter(todo), inputs.num_rows - int(pc.sum(todo).as_py() or 0)


@dataclass
class Labelling:
    """What a labelling job runs: POTNet here, a trained AutoSOD in predict."""

    job: str  # "pseudolabel" or "predict"
    model_factory: Callable[[], Callable]  # built once per actor (ModelStage)
    to_masks: Callable  # (saliency, height, width) -> (soft uint8, binary bool)
    model_name: str  # the `backbone` column
    config_hash: str  # what decides the masks; resume and --overwrite key on it
    image_size: int
    patch_size: int
    max_pixels: int
    max_pixels_key: str  # the config key of max_pixels, named when an image is refused
    # masks/ columns the run summary reads, and what it makes of them
    summary_columns: tuple[str, ...] = ()
    summarize: Callable[[pa.Table], dict] = lambda masks: {}


class _Labeller:
    """Model factory for the actor stage: builds the backbone + POTNet once per actor."""

    def __init__(self, cfg: PseudolabelConfig):
        self.cfg = cfg

    def __call__(self):
        from .labeller import PseudoLabeller

        cfg = self.cfg
        opts = cfg.storage.options(cfg.backbone.weights or "")
        labeller = PseudoLabeller(cfg.backbone, cfg.potnet, storage_options=opts)

        def label(images):
            out = labeller.potnet(labeller.features(images))
            return out.saliency, out.columns()

        return label


def resolve_num_gpus(cfg: JobConfig) -> float:
    import ray

    if cfg.pipeline.num_gpus != "auto":
        return float(cfg.pipeline.num_gpus)
    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def build_dataset(cfg: JobConfig, inputs: pa.Table, labelling: Labelling):
    """The pipeline as a short chain of named Ray Data stages (`cfg`: a pseudolabel or
    predict config: input, pipeline, storage).

    Failures: Ray Data retries failed tasks and restarts killed actors (its
    defaults: without limit), and the sink's writes are idempotent.
    """
    import ray
    from ray.data import ActorPoolStrategy

    p, lab = cfg.pipeline, labelling
    step = max(p.read_batch_size, -(-inputs.num_rows // 10_000))  # at most 10k input blocks
    ds = ray.data.from_arrow([inputs.slice(i, step) for i in range(0, inputs.num_rows, step)])
    ds = ds.map_batches(
        read_bytes,
        batch_size=p.read_batch_size,
        batch_format="numpy",
        fn_kwargs={"storage_options": cfg.storage.options(cfg.input)},
    )
    ds = ds.map_batches(
        decode,
        batch_size=p.decode_batch_size,
        batch_format="numpy",
        num_cpus=p.decode_num_cpus,
        fn_kwargs={
            "image_size": lab.image_size,
            "max_pixels": lab.max_pixels,
            "min_side": lab.patch_size,
            "max_pixels_key": lab.max_pixels_key,
        },
    )
    ds = ds.map_batches(
        ModelStage,
        batch_size=p.potnet_batch_size,
        batch_format="numpy",
        fn_constructor_args=(lab.model_factory,),
        compute=ActorPoolStrategy(min_size=p.pool_min, max_size=p.pool_max),
        num_gpus=resolve_num_gpus(cfg),
        num_cpus=p.num_cpus,
    )
    ds = ds.map_batches(
        encode,
        batch_size=p.encode_batch_size,
        batch_format="numpy",
        fn_kwargs={
            "to_masks": lab.to_masks,
            "backbone": lab.model_name,
            "config_hash": lab.config_hash,
        },
    )
    return ds


def pseudolabelling(cfg: PseudolabelConfig) -> Labelling:
    """POTNet as a Labelling; a bad backbone or unreachable weights fail here, before Ray."""
    from .potnet.mask import mask_at_size

    image_size, patch = vit_geometry(cfg.backbone)
    check_backbone(cfg.backbone, cfg.storage.options(cfg.backbone.weights or ""))
    return Labelling(
        job="pseudolabel",
        model_factory=_Labeller(cfg),
        to_masks=mask_at_size,
        model_name=cfg.backbone.name,
        config_hash=cfg.labelling_hash(),
        image_size=image_size,
        patch_size=patch,
        max_pixels=cfg.potnet.max_pixels,
        max_pixels_key="potnet.max_pixels",
        summary_columns=("ot_iterations", "ot_marginal_error"),
        summarize=functools.partial(transport_summary, tol=cfg.potnet.ot_tol),
    )


def _percentiles(values: np.ndarray) -> dict[str, float]:
    q = np.percentile(values, [50, 90, 99]) if len(values) else [np.nan] * 3
    return {"p50": float(q[0]), "p90": float(q[1]), "p99": float(q[2]), "max": float(values.max())}


def transport_summary(masks: pa.Table, tol: float) -> dict:
    """Sinkhorn's iterations and final row-marginal error over the labelled images."""
    iterations = masks.column("ot_iterations").to_numpy()
    error = masks.column("ot_marginal_error").to_numpy()
    ran = iterations > 0  # 0: no Sinkhorn (transport off)
    if not ran.any():
        return {}
    late = int((error[ran] >= tol).sum())
    return {
        "transport": {
            "images": int(ran.sum()),
            "tol": tol,
            "iterations": _percentiles(iterations[ran]),
            "marginal_error": _percentiles(error[ran]),
            "not_converged": late,
            "not_converged_fraction": late / int(ran.sum()),
        }
    }


def run_pseudolabel(cfg: PseudolabelConfig) -> dict:
    """Label every input not yet labelled; returns the run summary (also in run.json)."""
    if not cfg.input or not cfg.output:
        raise InputError("both --input and --output are required")
    return run_labelling(cfg, pseudolabelling(cfg))


def check_resources(cfg: JobConfig) -> list[str]:
    """The model actor pool (pool_min actors at once) beside a decode task, against the
    cluster: an error if it can never be held, warnings if the cluster must grow."""
    from .resources import check_request, cluster_capacity

    p = cfg.pipeline
    return check_request(
        cluster_capacity(),
        {"CPU": p.num_cpus, "GPU": resolve_num_gpus(cfg)},
        p.pool_min,
        f"the model actor pool (pipeline.pool_min={p.pool_min})",
        "lower pipeline.num_cpus / num_gpus / pool_min, or give the cluster more",
        reserve={"CPU": p.decode_num_cpus},
    )


def run_labelling(cfg: JobConfig, labelling: Labelling) -> dict:
    """Label every input of `cfg` not yet in its output; the summary is also in run.json.

    The run holds the output's lease throughout (one run per output). Whatever stops it
    after it started leaves run.json saying "failed" and why.
    """
    opts = cfg.storage.options(cfg.output)
    with OutputLease(cfg.output, opts, f"{labelling.job} by {getpass.getuser()}", cfg.force_unlock):
        return _label_pending(cfg, labelling)


def _label_pending(cfg: JobConfig, labelling: Labelling) -> dict:
    import ray

    config_hash = labelling.config_hash
    check_output(cfg, config_hash)
    clock = [time.perf_counter()]

    def lap() -> float:
        clock.append(time.perf_counter())
        return round(clock[-1] - clock[-2], 3)

    listing = scan_inputs(cfg.input, cfg.storage.options(cfg.input), cfg.manifest_column)
    timings = {"listing_s": lap()}
    inputs, already = pending_inputs(cfg, config_hash, listing.table)
    timings["resume_check_s"] = lap()
    total = inputs.num_rows + already
    write_run_json(cfg, config_hash, status="running", inputs=total)
    start = time.perf_counter()
    try:
        if inputs.num_rows:
            ray.init(ignore_reinit_error=True)
            for warning in check_resources(cfg):
                print(f"WARNING: {warning}", file=sys.stderr)
            ds = build_dataset(cfg, inputs, labelling)
            opts = cfg.storage.options(cfg.output)
            ds.write_datasink(PseudoMaskDatasink(cfg.output, opts, cfg.pipeline.rows_per_file))
    except BaseException as err:
        reason = f"{type(err).__name__}: {err}"
        write_run_json(cfg, config_hash, status="failed", inputs=total, reason=reason[:2000])
        raise
    seconds = time.perf_counter() - start
    timings["labelling_s"] = lap()
    opts = cfg.storage.options(cfg.output)
    ensure_tables(cfg.output, opts)
    masks = read_rows(
        cfg.output, opts, "masks", ["image_id", *labelling.summary_columns], config_hash
    )
    errors = read_rows(cfg.output, opts, "errors", ["image_id", "error_kind"], config_hash)
    transient = int(pc.sum(pc.equal(errors.column("error_kind"), TRANSIENT)).as_py() or 0)
    every = pa.chunked_array(masks.column("image_id").chunks + errors.column("image_id").chunks)
    distinct = pc.count_distinct(every).as_py()
    summary = {
        "status": "complete",
        "inputs": total,
        "labelled": masks.num_rows,
        "errors": errors.num_rows,
        "errors_transient": transient,
        "skipped_already_done": already,
        "duplicates": len(every) - distinct,
        "missing": total - distinct,
        "seconds": round(seconds, 3),
        "images_per_second": round(inputs.num_rows / seconds, 3) if inputs.num_rows else None,
        "output": cfg.output,
        "listing": listing.report(),
        **labelling.summarize(masks),
    }
    summary["timings"] = {**timings, "summary_s": lap()}
    if summary["duplicates"] or summary["missing"]:
        summary["status"] = "incomplete"
    write_run_json(cfg, config_hash, **summary)
    return summary


def print_summary(summary: dict, file=sys.stdout, job: str = "pseudolabel") -> None:
    rate = summary["images_per_second"] or "-"
    print(
        "\n".join(
            [
                "",
                f"{job} {summary['status']}: {summary['inputs']} inputs",
                f"  labelled  {summary['labelled']}",
                f"  errors    {summary['errors']}   (see errors/ for reasons; "
                f"{summary.get('errors_transient', 0)} transient, tried again by a rerun)",
                f"  skipped   {summary['skipped_already_done']}   (done by this config before)",
                *listing_lines(summary.get("listing")),
                f"  speed     {rate} images/s over {summary['seconds']} s",
                *transport_lines(summary.get("transport")),
                f"  output    {summary['output']}  (masks/, errors/, run.json)",
            ]
        ),
        file=file,
    )


def listing_lines(listing: dict | None) -> list[str]:
    if not listing or not (listing["ignored"] or listing["unreadable"]):
        return []
    kinds = ", ".join(f"{n} {ext}" for ext, n in listing["ignored"].items())
    lines = []
    if listing["ignored"]:
        lines.append(f"  ignored   {sum(listing['ignored'].values())}   (not images: {kinds})")
    if listing["unreadable"]:
        lines.append(f"  unlisted  {listing['unreadable']}   (unreadable entries, broken links)")
    return lines


# a run where more than this share of images' Sinkhorn did not converge says so
NOT_CONVERGED_WARNING = 0.01


def transport_lines(t: dict | None) -> list[str]:
    if not t:
        return []
    lines = [
        f"  transport {100 * (1 - t['not_converged_fraction']):.1f}% converged "
        f"(median {t['iterations']['p50']:.0f} iterations, max {t['iterations']['max']:.0f})"
    ]
    if t["not_converged_fraction"] > NOT_CONVERGED_WARNING:
        lines.append(
            f"  WARNING   Sinkhorn did not converge for {t['not_converged']} images "
            f"({100 * t['not_converged_fraction']:.1f}%, row error >= {t['tol']:g}): their "
            "masks may be off; raise potnet.ot_max_iters or potnet.ot_epsilon "
            "(per-image ot_iterations / ot_marginal_error are in masks/)"
        )
    return lines
