"""The pseudolabel job: a whole dataset -> Parquet shards of POTNet masks.

    list -> read bytes -> decode + resize -> backbone + POTNet (actor pool)
         -> encode PNGs -> write Parquet (masks/, errors/) ; run.json

A driver is a straight line: list, check, lease, label, summarise. Everything
that can be checked before the cluster is touched (config, input, output) is
checked first, and fails with nothing written. Reruns resume: images already
written under the same config hash are skipped. The output is one `RunOutput`:
its lease, its run.json history and identity, its tables.
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .backbone import check_backbone, vit_geometry
from .config import PredictConfig, PseudolabelConfig, config_hash
from .data.parquet import TABLES, ShardDatasink, drop_rows, ensure_tables, read_rows
from .data.progress import ProgressPrinter, WriteLedger, use_our_progress
from .data.provenance import listing_digest, weights_provenance
from .data.run_output import OutputError, RunOutput
from .data.stages import (
    INTERNAL,
    PERMANENT,
    RETRIED,
    TRANSIENT,
    ModelStage,
    decode,
    encode,
    labelled_rows,
    read_bytes,
)
from .data.uris import InputError, absolute, scan_inputs
from .edge_refine import refiner
from .endings import status_of

# the jobs that label images into the pseudo-mask schema (pseudolabel, predict)
JobConfig = PseudolabelConfig | PredictConfig

__all__ = ["OutputError", "run_labelling", "run_pseudolabel", "print_summary"]


def pending_inputs(out: RunOutput, config_hash: str, inputs: pa.Table) -> tuple[pa.Table, int]:
    """The inputs not yet done under this config hash (in masks/, or in errors/ for a
    permanent reason), with an `attempts` column (earlier runs that failed on each), and
    how many are done. The retried rows of earlier runs (transient, internal) are taken
    out of errors/ first: those images are tried again."""
    opts = out.storage_options
    errors = read_rows(out.uri, opts, "errors", ["image_id", "error_kind", "attempts"], config_hash)
    retried = errors.filter(pc.is_in(pc.fill_null(errors.column("error_kind"), ""),
                                     value_set=pa.array(RETRIED)))  # fmt: skip
    if retried.num_rows:
        mine = functools.partial(_retried_rows, config_hash=config_hash)
        drop_rows(out.uri, opts, "errors", mine)
    ids = [
        read_rows(out.uri, opts, t, ["image_id"], config_hash).column("image_id") for t in TABLES
    ]
    done = pa.concat_arrays([i.combine_chunks() for i in ids])
    todo = pc.invert(pc.is_in(inputs.column("image_id"), value_set=done))
    pending = inputs.filter(todo)
    where = pc.index_in(pending.column("image_id"), value_set=retried.column("image_id"))
    earlier = pc.fill_null(pc.take(retried.column("attempts"), where), 0)
    pending = pending.append_column("attempts", pc.fill_null(pc.cast(earlier, pa.int32()), 0))
    return pending, inputs.num_rows - pending.num_rows


def _retried_rows(errors: pa.Table, config_hash: str):
    """Which rows of an errors table are this config's failures that a rerun retries."""
    mine = pc.equal(errors.column("config_hash"), config_hash)
    kind = pc.fill_null(errors.column("error_kind"), "")
    return pc.and_(mine, pc.is_in(kind, value_set=pa.array(RETRIED)))


@dataclass
class Labelling:
    """What a labelling job runs: POTNet here, a trained AutoSOD in predict."""

    job: str  # "pseudolabel" or "predict"
    model_factory: Callable[[], Callable]  # built once per actor (ModelStage)
    to_masks: Callable  # (saliency, height, width) -> (soft uint8, binary bool)
    model_name: str  # the `backbone` column
    settings: dict  # what decides the masks, by content; hashed into config_hash
    provenance: dict  # what the masks were made with (weights or model digests)
    image_size: int
    patch_size: int
    max_pixels: int
    max_pixels_key: str  # the config key of max_pixels, named when an image is refused
    # masks/ columns the run summary reads, and what it makes of them
    summary_columns: tuple[str, ...] = ()
    summarize: Callable[[pa.Table], dict] = lambda masks: {}

    @property
    def config_hash(self) -> str:
        """Resume and --overwrite key on it: same hash, same masks."""
        return config_hash(self.settings)


class _Labeller:
    """Model factory for the actor stage: builds the backbone + POTNet once per actor."""

    def __init__(self, cfg: PseudolabelConfig):
        self.cfg = cfg

    def __call__(self):
        from .labeller import PseudoLabeller

        cfg = self.cfg
        opts = cfg.storage.options(cfg.backbone.weights or "")
        labeller = PseudoLabeller(cfg.backbone, cfg.potnet, storage_options=opts)
        refine = refiner(cfg.refine, labeller.extractor.device)  # on the model's device

        def label(images):
            out = labeller.potnet(labeller.features(images))
            return refine(out.saliency, images), out.columns()

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
    # the model stage gets at least this many inputs: Ray Data bundles blocks up to each
    # stage's batch size, so its inputs hold at least the largest batch upstream of it
    model_inputs = -(-inputs.num_rows // max(step, p.decode_batch_size, p.potnet_batch_size))
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
        fn_constructor_args=(lab.model_factory, p.max_error_fraction),
        compute=ActorPoolStrategy(**pool_size(p.pool_min, p.pool_max, model_inputs)),
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


def pool_size(pool_min: int, pool_max: int, inputs: int) -> dict[str, int]:
    """The model actor pool, never larger than the work: an actor per model-stage input at
    most (a pool whose minimum exceeds its inputs starts actors that never get one, and
    Ray Data warns "the operator only received N input(s)")."""
    low = max(1, min(pool_min, inputs))
    return {"min_size": low, "max_size": max(low, min(pool_max, inputs))}


def pseudolabelling(cfg: PseudolabelConfig) -> Labelling:
    """POTNet as a Labelling; a bad backbone or unreachable weights fail here, before Ray.
    The weights are known by their sha256 (computed once per file version)."""
    from .potnet.mask import mask_at_size

    image_size, patch = vit_geometry(cfg.backbone)
    opts = cfg.storage.options(cfg.backbone.weights or "")
    check_backbone(cfg.backbone, opts)
    weights = weights_provenance(cfg.backbone.weights, cfg.backbone.name, opts)
    return Labelling(
        job="pseudolabel",
        model_factory=_Labeller(cfg),
        to_masks=mask_at_size,
        model_name=cfg.backbone.name,
        settings=cfg.labelling_settings(weights["sha256"]),
        provenance={"backbone": weights},
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

    Checked before anything is written: the input (listed), the output (made by these
    settings, or --overwrite; writable). The run holds the output's lease throughout
    (one run per output); however it ends, its run.json entry says how.
    """
    cfg = cfg.model_copy(update={"input": absolute(cfg.input), "output": absolute(cfg.output)})
    start = time.perf_counter()
    listing = scan_inputs(cfg.input, cfg.storage.options(cfg.input), cfg.manifest_column)
    listing_s = round(time.perf_counter() - start, 3)
    out = RunOutput(cfg.output, cfg.storage.options(cfg.output), labelling.job)
    identity = {
        "config_hash": labelling.config_hash,
        "settings": labelling.settings,
        "config": cfg.model_dump(mode="json"),
        "provenance": labelling.provenance,
    }
    out.refuse_mixing(identity, cfg.overwrite, "masks", clear=list(TABLES))
    out.check_writable()
    entry = {
        "input": {
            "uri": cfg.input,
            "images": listing.table.num_rows,
            "listing_sha256": listing_digest(listing.table),
        },
        "listing": listing.report(),
        "pipeline": cfg.pipeline.model_dump(mode="json"),
    }
    counts = functools.partial(output_counts, out, labelling, listing.table.num_rows)
    with out.run(cfg.force_unlock, identity, entry, counts) as run:
        return _label_pending(cfg, labelling, run, listing.table, {"listing_s": listing_s})


def admit_write(ledger) -> bool:
    """The sink asks the ledger before each write (in its task). A ledger it cannot reach
    raises: the driver is gone, so the write is not made."""
    import ray

    return ray.get(ledger.admit.remote(), timeout=60)


def count_written(ledger, counts: dict[str, int]) -> None:
    """The sink's report of one write, to the ledger actor."""
    errors = counts.get("errors", 0)
    ledger.add.remote(counts.get("masks", 0) + errors, errors)


def read_ledger(ledger) -> tuple[int, int]:
    """What the writers have reported so far: (rows written, of them errors)."""
    import ray

    return ray.get(ledger.read.remote(), timeout=10)


def stop_writes(ledger, wait_s: float = 10.0) -> None:
    """The run ends early (a signal, a failure): admit no more writes and wait, at most
    `wait_s`, for those under way, so that the counts run.json records are what the
    output holds (Ray Data's tasks outlive the driver's exception by a moment). A write
    whose worker was killed never reports; its wait runs out."""
    import ray

    deadline = time.monotonic() + wait_s
    try:
        while ray.get(ledger.close.remote(), timeout=wait_s) > 0 and time.monotonic() < deadline:
            time.sleep(0.1)
    except Exception:  # noqa: BLE001 - the cluster may be what ended the run
        pass


def output_counts(out: RunOutput, labelling: Labelling, inputs: int) -> dict:
    """What the output holds for this config: rows by table and error kind, and how they
    add up against the inputs (each exactly once)."""
    opts, key = out.storage_options, labelling.config_hash
    ensure_tables(out.uri, opts)
    masks = read_rows(out.uri, opts, "masks", ["image_id", *labelling.summary_columns], key)
    errors = read_rows(out.uri, opts, "errors", ["image_id", "error_kind"], key)
    kinds = pc.fill_null(errors.column("error_kind"), PERMANENT)
    every = pa.chunked_array(masks.column("image_id").chunks + errors.column("image_id").chunks)
    distinct = pc.count_distinct(every).as_py()
    return {
        "inputs": inputs,
        "labelled": masks.num_rows,
        "errors": errors.num_rows,
        **{
            f"errors_{kind}": int(pc.sum(pc.equal(kinds, kind)).as_py() or 0)
            for kind in (PERMANENT, TRANSIENT, INTERNAL)
        },
        "duplicates": len(every) - distinct,
        "missing": inputs - distinct,
        **labelling.summarize(masks),
    }


def _label_pending(
    cfg: JobConfig, labelling: Labelling, run: RunOutput, listing: pa.Table, timings: dict
) -> dict:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    clock = [time.perf_counter()]

    def lap() -> float:
        clock.append(time.perf_counter())
        return round(clock[-1] - clock[-2], 3)

    inputs, already = pending_inputs(run, labelling.config_hash, listing)
    timings["resume_check_s"] = lap()
    if inputs.num_rows:
        ray.init(ignore_reinit_error=True)
        use_our_progress()
        for warning in check_resources(cfg):
            print(f"WARNING: {warning}", file=sys.stderr)
        ds = build_dataset(cfg, inputs, labelling)
        route = functools.partial(labelled_rows, max_attempts=cfg.pipeline.max_attempts)
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        ledger = ray.remote(num_cpus=0)(WriteLedger).options(scheduling_strategy=here).remote()
        sink = ShardDatasink(run.uri, run.storage_options, cfg.pipeline.rows_per_file, route,
                             on_written=functools.partial(count_written, ledger),
                             admit=functools.partial(admit_write, ledger))  # fmt: skip
        read = functools.partial(read_ledger, ledger)
        with ProgressPrinter(labelling.job, inputs.num_rows, read, cfg.pipeline.progress_every_s):
            try:
                ds.write_datasink(sink)
            except BaseException:
                stop_writes(ledger)
                raise
    seconds = lap()
    timings["labelling_s"] = seconds
    totals = output_counts(run, labelling, listing.num_rows)
    timings["summary_s"] = lap()
    status = status_of(totals["errors_permanent"], totals["errors_transient"],
                       totals["errors_internal"])  # fmt: skip
    reason = None
    if totals["duplicates"] or totals["missing"]:
        status = "failed"
        reason = f"{totals['duplicates']} duplicate rows, {totals['missing']} inputs missing"
    elif totals["errors_internal"]:
        reason = f"{totals['errors_internal']} images failed inside the model (internal errors)"
    summary = run.finish(
        status,
        totals,
        reason,
        labelled_this_run=inputs.num_rows,
        skipped_already_done=already,
        seconds=round(seconds, 3),
        images_per_second=round(inputs.num_rows / seconds, 3) if inputs.num_rows else None,
        timings=timings,
        warnings=transport_warnings(totals.get("transport")),
        output=cfg.output,
    )
    if cfg.report:
        summary["report"] = report_of(cfg, run)
    return summary


def report_of(cfg: JobConfig, run: RunOutput) -> str | None:
    """Write <output>/report.html (still under the run's lease); a report that fails is a
    warning in run.json, never a failed run. Returns its path."""
    from .report import write_report

    try:
        written = write_report(cfg.output, storage=cfg.storage)["output"]
    except Exception as err:  # noqa: BLE001 - the masks are done; the page is extra
        run.entry.setdefault("warnings", []).append(
            f"the report could not be written: {type(err).__name__}: {err}"
        )
        written = None
    run.entry["report"] = written
    run.write_record()
    return written


def print_summary(summary: dict, file=sys.stdout, job: str = "pseudolabel") -> None:
    rate = summary["images_per_second"] or "-"
    retried = summary.get("errors_transient", 0) + summary.get("errors_internal", 0)
    print(
        "\n".join(
            [
                "",
                f"{job} {summary['status']}: {summary['inputs']} inputs",
                f"  labelled  {summary['labelled']}",
                f"  errors    {summary['errors']}   (see errors/ for reasons; "
                f"{summary.get('errors_permanent', 0)} permanent, {retried} tried again by a "
                f"rerun: {summary.get('errors_transient', 0)} transient, "
                f"{summary.get('errors_internal', 0)} internal)",
                f"  skipped   {summary['skipped_already_done']}   (done by this config before)",
                *listing_lines(summary.get("listing")),
                f"  speed     {rate} images/s over {summary['seconds']} s",
                *transport_lines(summary.get("transport")),
                *[f"  WARNING   {w}" for w in summary.get("warnings", [])],
                *([f"  reason    {summary['reason']}"] if summary.get("reason") else []),
                f"  output    {summary['output']}  (masks/, errors/, run.json"
                + (", report.html)" if summary.get("report") else ")"),
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
    return [
        f"  transport {100 * (1 - t['not_converged_fraction']):.1f}% converged "
        f"(median {t['iterations']['p50']:.0f} iterations, max {t['iterations']['max']:.0f})"
    ]


def transport_warnings(t: dict | None) -> list[str]:
    """What run.json and the summary warn of in Sinkhorn's convergence."""
    if not t or t["not_converged_fraction"] <= NOT_CONVERGED_WARNING:
        return []
    return [
        f"Sinkhorn did not converge for {t['not_converged']} images "
        f"({100 * t['not_converged_fraction']:.1f}%, row error >= {t['tol']:g}): their "
        "masks may be off; raise potnet.ot_max_iters or potnet.ot_epsilon "
        "(per-image ot_iterations / ot_marginal_error are in masks/)"
    ]
