"""The train job's driver: check everything, then one TorchTrainer.fit().

pseudolabel masks/ -> Ray Data (read image, augment) -> TorchTrainer (DDP)
  -> <output>/checkpoints/  (every N steps, last k kept; resumes)
  -> <output>/model/        (model.safetensors + model.json)
  -> <output>/train.json    (what made the model, by content, and every run's history)

Training resumes only onto what it started from: the pseudo-masks (their config
hashes and a digest of the rows kept), the backbone weights (by sha256) and the
settings that decide the model (all but optim.max_steps, which may grow). Any
other difference is refused, naming it, unless --overwrite.
"""

from __future__ import annotations

import math
import os
import posixpath
import sys
import time

from ..backbone import check_backbone, vit_geometry
from ..config import TrainConfig, config_hash
from ..data.provenance import weights_provenance
from ..data.run_output import RunOutput
from ..data.training import TrainingSet, load_pairs, read_pseudo_masks, select_pseudo_masks
from ..data.uris import InputError, absolute, list_inputs, open_fs, pngs_by_stem
from ..model.inference import save_model
from .loop import STATE, train_loop_per_worker

# Ray Train's run name: checkpoints land in <output>/checkpoints/checkpoint_*/
RUN_NAME = "checkpoints"


def with_absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """The config with local paths made absolute, as Ray Train workers see another cwd."""
    out = cfg.model_copy(deep=True)
    out.pseudo_masks, out.output = absolute(cfg.pseudo_masks), absolute(cfg.output)
    out.backbone.weights = absolute(cfg.backbone.weights)
    out.validation.images = absolute(cfg.validation.images)
    out.validation.ground_truth = absolute(cfg.validation.ground_truth)
    return out


def check_train_inputs(cfg: TrainConfig) -> tuple[tuple[int, int], TrainingSet]:
    """Fail before any cluster work on a bad input; returns ((input side, patch size),
    the pseudo-masks that pass the data filters)."""
    if not cfg.pseudo_masks or not cfg.output:
        raise InputError("both --pseudo-masks and --output are required")
    selection = select_pseudo_masks(
        cfg.pseudo_masks, cfg.storage.options(cfg.pseudo_masks), cfg.data
    )
    geometry = vit_geometry(cfg.backbone)
    check_backbone(cfg.backbone, cfg.storage.options(cfg.backbone.weights or ""))
    val = cfg.validation
    if bool(val.images) != bool(val.ground_truth):
        raise InputError("validation needs both validation.images and validation.ground_truth")
    if val.images:
        list_inputs(val.images, cfg.storage.options(val.images))
        opts = cfg.storage.options(val.ground_truth)
        pngs_by_stem(val.ground_truth, opts, "validation.ground_truth")
    return geometry, selection


def train_storage(output: str, storage_options: dict):
    """(storage_path, pyarrow filesystem) for Ray Train's checkpoints under `output`."""
    import pyarrow.fs as pafs

    fs, root = open_fs(output, storage_options)
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        root = os.path.abspath(root)
        os.makedirs(root, exist_ok=True)
        return root, None
    fs.makedirs(root, exist_ok=True)
    return root, pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def resolve_scaling(cfg: TrainConfig) -> TrainConfig:
    """The config with `auto` scaling sized from the cluster, after checking that the cluster
    can hold the workers beside the CPUs data ingest needs (ResourceError if it never can)."""
    from ..resources import (
        DATA_CPUS,
        ResourceError,
        check_request,
        cluster_capacity,
        resolve_workers,
    )

    s, capacity = cfg.scaling, cluster_capacity()
    use_gpu = capacity.total.get("GPU", 0) > 0 if s.use_gpu == "auto" else bool(s.use_gpu)
    workers, cpus = resolve_workers(s.num_workers, s.cpus_per_worker, use_gpu, capacity)
    threads = s.torch_threads
    if threads == "auto":  # cached tokens barely use the data CPU: its core computes too
        spare = DATA_CPUS / workers if cfg.data.cache_tokens else 0.0
        threads = max(1, math.floor(cpus + spare))
    fix = "lower scaling.num_workers / cpus_per_worker (or set them to auto)"
    bundle = {"CPU": cpus, "GPU": 1.0 if use_gpu else 0.0}
    what = f"the training worker group (scaling.num_workers={workers}, cpus_per_worker={cpus:g})"
    for warning in check_request(capacity, bundle, workers, what, fix, {"CPU": DATA_CPUS}):
        print(f"WARNING: {warning}", file=sys.stderr)
    if s.placement_strategy == "STRICT_SPREAD" and len(capacity.nodes) < workers:
        if not capacity.autoscaling:
            raise ResourceError(
                f"scaling.placement_strategy=STRICT_SPREAD puts each of {workers} workers on "
                f"its own node, but this cluster has {len(capacity.nodes)}; use PACK or SPREAD"
            )
    scaling = s.model_copy(
        update={
            "num_workers": workers,
            "cpus_per_worker": cpus,
            "use_gpu": use_gpu,
            "torch_threads": threads,
        }
    )
    return cfg.model_copy(update={"scaling": scaling})


def training_data(
    cfg: TrainConfig, geometry: tuple[int, int], selection: TrainingSet, weights_sha256
):
    """(the Ray Dataset the workers train on, what the token cache did or None).

    Images: read, decoded and augmented with their masks on CPU tasks. Cached tokens
    (`data.cache_tokens`): the frozen encoder runs once per image and view first.
    """
    image_size, patch = geometry
    if cfg.data.cache_tokens:
        from .token_cache import fill_token_cache, read_token_cache

        gpus = 1.0 if cfg.scaling.use_gpu else 0.0
        pool = (cfg.scaling.cpus_per_worker, gpus, cfg.scaling.num_workers)
        cache, pairs = fill_token_cache(cfg, selection, image_size, weights_sha256, pool)
        opts = cfg.storage.options(cache["location"])
        grid = (image_size // patch, image_size // patch)
        return read_token_cache(cache["location"], opts, pairs, grid), cache
    ds = read_pseudo_masks(selection).map_batches(
        load_pairs,
        batch_size=cfg.augment.batch_size,
        batch_format="numpy",
        fn_kwargs={
            "storage_options": cfg.storage.options(cfg.pseudo_masks),
            "augment": cfg.augment,
            "image_size": image_size,
            "max_pixels": cfg.max_pixels,
        },
    )
    return ds, None


def build_trainer(cfg: TrainConfig, ds):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    storage_path, storage_fs = train_storage(cfg.output, cfg.storage.options(cfg.output))
    s = cfg.scaling
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"train": cfg.model_dump(mode="json")},
        scaling_config=ScalingConfig(
            num_workers=s.num_workers,
            use_gpu=bool(s.use_gpu),
            resources_per_worker={"CPU": s.cpus_per_worker},
            placement_strategy=s.placement_strategy,
        ),
        run_config=RunConfig(
            name=RUN_NAME,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=cfg.checkpoint.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep_last),
        ),
        datasets={"train": ds},
    )


def export_model(
    cfg: TrainConfig, checkpoint, geometry: tuple[int, int], metrics: dict, provenance: dict
) -> dict:
    """The last checkpoint's weights -> <output>/model/ (safetensors + model.json)."""
    import torch

    with checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, STATE), map_location="cpu", weights_only=True)
    meta = {
        "backbone": {**cfg.backbone.model_dump(mode="json"), "weights": None},
        "model": cfg.model.model_dump(mode="json"),
        "image_size": geometry[0],
        "patch_size": geometry[1],
        "steps": state["step"],
        "trained_on": cfg.pseudo_masks,
        "provenance": provenance,
        "final_metrics": metrics,
    }
    uri = posixpath.join(cfg.output, "model")
    return save_model(uri, state["model"], meta, cfg.storage.options(cfg.output))


def training_identity(cfg: TrainConfig, selection: TrainingSet, weights: dict) -> dict:
    """What decides the model a run trains, by content (not where or on what it runs; not
    optim.max_steps, which a resume may raise): the settings, hashed, and the provenance."""
    settings = {
        "backbone": cfg.backbone.model_dump(mode="json", exclude={"device", "weights"}),
        "weights_sha256": weights["sha256"],
        "model": cfg.model.model_dump(mode="json"),
        "optim": cfg.optim.model_dump(mode="json", exclude={"max_steps"}),
        "data": cfg.data.model_dump(mode="json", exclude={"token_cache"}),
        "augment": cfg.augment.model_dump(mode="json"),
        "seed": cfg.seed,
        "pseudo_masks": {
            "config_hashes": selection.config_hashes,
            "rows_sha256": selection.rows_sha256,
        },
    }
    return {
        "config_hash": config_hash(settings),
        "settings": settings,
        "config": cfg.model_dump(mode="json"),
        "provenance": {
            "backbone": weights,
            "pseudo_masks": selection.provenance(cfg.pseudo_masks),
        },
    }


# what --overwrite replaces in a train output (the token cache is keyed by content: it stays)
TRAINING_FILES = [RUN_NAME, "model", "train.json"]


def run_train(cfg: TrainConfig) -> dict:
    """Train (or resume) and export the model; returns the summary (also train.json).

    Checked before anything is written: the inputs, and that the output holds nothing
    or a training of the same pseudo-masks, weights and settings. The run holds the
    output's lease. A rerun of a training that already reached optim.max_steps does
    nothing and says so (raise max_steps to train on).
    """
    cfg = with_absolute_paths(cfg)
    geometry, selection = check_train_inputs(cfg)
    opts = cfg.storage.options(cfg.backbone.weights or "")
    weights = weights_provenance(cfg.backbone.weights, cfg.backbone.name, opts)
    identity = training_identity(cfg, selection, weights)
    out = RunOutput(cfg.output, cfg.storage.options(cfg.output), "train", "train.json")
    out.refuse_mixing(identity, cfg.overwrite, "a training", clear=TRAINING_FILES)
    out.check_writable()
    previous = out.read_record() or {}
    entry = {"scaling": cfg.scaling.model_dump(mode="json"), "max_steps": cfg.optim.max_steps}
    with out.run(cfg.force_unlock, identity, entry) as run:
        if (
            not out.clear_on_start
            and previous.get("status") == "complete"
            and previous.get("steps", 0) >= cfg.optim.max_steps
        ):
            note = (
                f"{cfg.output} already holds a model trained for {previous['steps']} steps "
                "(train.json); nothing to do. Raise optim.max_steps to train on"
            )
            return {**run.finish("complete", {}, note=note, outcome="already complete"),
                    "status": "already complete", "note": note}  # fmt: skip
        return _train(cfg, geometry, selection, weights, run)


def _train(
    cfg: TrainConfig, geometry: tuple[int, int], selection: TrainingSet, weights: dict, run
) -> dict:
    import ray

    ray.init(ignore_reinit_error=True)
    cfg = resolve_scaling(cfg)
    start = time.perf_counter()
    ds, cache = training_data(cfg, geometry, selection, weights["sha256"])
    result = build_trainer(cfg, ds).fit()
    seconds = time.perf_counter() - start
    if result.checkpoint is None:
        raise RuntimeError("training ended without a checkpoint; see the worker logs above")
    metrics = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, int | float)}
    meta = export_model(cfg, result.checkpoint, geometry, metrics, run.record["provenance"])
    totals = {
        "steps": meta["steps"],
        "metrics": metrics,
        "pseudo_masks": {
            "rows": selection.rows,
            "kept": selection.kept,
            "min_quality": selection.min_quality,
        },
        "token_cache": cache,
        "model": posixpath.join(cfg.output, "model"),
        "checkpoints": posixpath.join(cfg.output, RUN_NAME),
        "config": cfg.model_dump(mode="json"),  # the model's: the last run's schedule
    }
    return run.finish("complete", totals, seconds=round(seconds, 3))


def print_train_summary(summary: dict, file=sys.stdout) -> None:
    if summary.get("note"):
        print(f"\ntrain {summary['status']}: {summary['note']}", file=file)
        return
    m = summary["metrics"]
    shown = ", ".join(f"{k} {m[k]:.4g}" for k in sorted(m) if k != "step")
    print(
        f"\ntrain {summary['status']}: {summary['steps']} steps in {summary['seconds']} s\n"
        f"  last metrics  {shown}\n  model         {summary['model']}\n"
        f"  checkpoints   {summary['checkpoints']}",
        file=file,
    )
