"""The pseudolabel job: a whole dataset -> Parquet shards of POTNet masks.

    list -> read bytes -> decode + resize -> backbone + POTNet (actor pool)
         -> encode PNGs -> write Parquet (masks/, errors/) ; run.json

Everything that can be checked before the cluster is touched (config, input,
output) is checked first. Reruns resume: images already written under the same
config hash are skipped.
"""

from __future__ import annotations

import json
import posixpath
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from .backbone import check_weights_reachable, vit_geometry
from .config import PredictConfig, PseudolabelConfig
from .data.parquet import TABLES, PseudoMaskDatasink, read_ids
from .data.stages import ModelStage, decode, encode, read_bytes
from .data.uris import InputError, list_inputs, open_fs

# the jobs that label images into the pseudo-mask schema (pseudolabel, predict)
JobConfig = PseudolabelConfig | PredictConfig


class OutputError(ValueError):
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


def pending_inputs(cfg: JobConfig, config_hash: str) -> tuple[pa.Table, int]:
    """Inputs not yet in masks/ or errors/ under this config hash, and how many are done."""
    inputs = list_inputs(cfg.input, cfg.storage.options(cfg.input), cfg.manifest_column)
    opts = cfg.storage.options(cfg.output)
    done = set()
    for table in TABLES:
        done.update(read_ids(cfg.output, opts, table, config_hash))
    if not done:
        return inputs, 0
    todo = pc.invert(pc.is_in(inputs.column("image_id"), value_set=pa.array(sorted(done))))
    return inputs.filter(todo), inputs.num_rows - int(pc.sum(todo).as_py() or 0)


@dataclass
class Labelling:
    """What a labelling job runs: POTNet here, a trained AutoSOD in predict."""

    model_factory: Callable[[], Callable]  # built once per actor (ModelStage)
    to_masks: Callable  # (saliency, height, width) -> (soft uint8, binary bool)
    model_name: str  # the `backbone` column
    config_hash: str  # what decides the masks; resume and --overwrite key on it
    image_size: int
    patch_size: int
    max_pixels: int


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
            return out.saliency, out.confidence, out.consistency_loss

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
    check_weights_reachable(cfg.backbone, cfg.storage.options(cfg.backbone.weights or ""))
    return Labelling(
        model_factory=_Labeller(cfg),
        to_masks=mask_at_size,
        model_name=cfg.backbone.name,
        config_hash=cfg.labelling_hash(),
        image_size=image_size,
        patch_size=patch,
        max_pixels=cfg.potnet.max_pixels,
    )


def run_pseudolabel(cfg: PseudolabelConfig) -> dict:
    """Label every input not yet labelled; returns the run summary (also in run.json)."""
    if not cfg.input or not cfg.output:
        raise InputError("both --input and --output are required")
    return run_labelling(cfg, pseudolabelling(cfg))


def run_labelling(cfg: JobConfig, labelling: Labelling) -> dict:
    """Label every input of `cfg` not yet in its output; the summary is also in run.json."""
    import ray

    config_hash = labelling.config_hash
    check_output(cfg, config_hash)
    inputs, already = pending_inputs(cfg, config_hash)
    total = inputs.num_rows + already
    write_run_json(cfg, config_hash, status="running", inputs=total)
    start = time.perf_counter()
    if inputs.num_rows:
        ray.init(ignore_reinit_error=True)
        ds = build_dataset(cfg, inputs, labelling)
        opts = cfg.storage.options(cfg.output)
        ds.write_datasink(PseudoMaskDatasink(cfg.output, opts, cfg.pipeline.rows_per_file))
    seconds = time.perf_counter() - start
    opts = cfg.storage.options(cfg.output)
    ids = {t: read_ids(cfg.output, opts, t, config_hash) for t in TABLES}
    every = ids["masks"] + ids["errors"]
    summary = {
        "status": "complete",
        "inputs": total,
        "labelled": len(ids["masks"]),
        "errors": len(ids["errors"]),
        "skipped_already_done": already,
        "duplicates": len(every) - len(set(every)),
        "missing": total - len(set(every)),
        "seconds": round(seconds, 3),
        "images_per_second": round(inputs.num_rows / seconds, 3) if inputs.num_rows else None,
        "output": cfg.output,
    }
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
                f"  errors    {summary['errors']}   (see errors/ for reasons)",
                f"  skipped   {summary['skipped_already_done']}   (done by this config before)",
                f"  speed     {rate} images/s over {summary['seconds']} s",
                f"  output    {summary['output']}  (masks/, errors/, run.json)",
            ]
        ),
        file=file,
    )
