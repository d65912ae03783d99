"""The train job's driver: check everything, then one TorchTrainer.fit().

pseudolabel masks/ -> Ray Data (read image, augment) -> TorchTrainer (DDP)
  -> <output>/checkpoints/  (every N steps, last k kept; resumes)
  -> <output>/model/        (model.safetensors + model.json)
  -> <output>/train.json    (config, final metrics, timing)
"""

from __future__ import annotations

import json
import os
import posixpath
import sys
import time

from ..backbone import check_weights_reachable, vit_geometry
from ..config import TrainConfig
from ..data.training import load_pairs, masks_folder, read_pseudo_masks
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


def check_train_inputs(cfg: TrainConfig) -> int:
    """Fail before any cluster work on a bad input; returns (input side, patch size)."""
    if not cfg.pseudo_masks or not cfg.output:
        raise InputError("both --pseudo-masks and --output are required")
    masks_folder(cfg.pseudo_masks, cfg.storage.options(cfg.pseudo_masks))
    geometry = vit_geometry(cfg.backbone)
    check_weights_reachable(cfg.backbone, cfg.storage.options(cfg.backbone.weights or ""))
    val = cfg.validation
    if bool(val.images) != bool(val.ground_truth):
        raise InputError("validation needs both validation.images and validation.ground_truth")
    if val.images:
        list_inputs(val.images, cfg.storage.options(val.images))
        opts = cfg.storage.options(val.ground_truth)
        pngs_by_stem(val.ground_truth, opts, "validation.ground_truth")
    return geometry


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


def resolve_use_gpu(cfg: TrainConfig) -> bool:
    import ray

    if cfg.scaling.use_gpu != "auto":
        return bool(cfg.scaling.use_gpu)
    return ray.cluster_resources().get("GPU", 0) > 0


def build_trainer(cfg: TrainConfig, image_size: int):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    data_opts = cfg.storage.options(cfg.pseudo_masks)
    ds = read_pseudo_masks(cfg.pseudo_masks, data_opts, cfg.augment).map_batches(
        load_pairs,
        batch_size=cfg.augment.batch_size,
        batch_format="numpy",
        fn_kwargs={
            "storage_options": data_opts,
            "augment": cfg.augment,
            "image_size": image_size,
            "max_pixels": 89_478_485,
        },
    )
    storage_path, storage_fs = train_storage(cfg.output, cfg.storage.options(cfg.output))
    s = cfg.scaling
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"train": cfg.model_dump(mode="json")},
        scaling_config=ScalingConfig(
            num_workers=s.num_workers,
            use_gpu=resolve_use_gpu(cfg),
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


def export_model(cfg: TrainConfig, checkpoint, geometry: tuple[int, int], metrics: dict) -> dict:
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
        "final_metrics": metrics,
    }
    uri = posixpath.join(cfg.output, "model")
    return save_model(uri, state["model"], meta, cfg.storage.options(cfg.output))


def run_train(cfg: TrainConfig) -> dict:
    """Train (or resume) and export the model; returns the summary (also train.json)."""
    import ray

    cfg = with_absolute_paths(cfg)
    geometry = check_train_inputs(cfg)
    ray.init(ignore_reinit_error=True)
    start = time.perf_counter()
    result = build_trainer(cfg, geometry[0]).fit()
    seconds = time.perf_counter() - start
    if result.checkpoint is None:
        raise RuntimeError("training ended without a checkpoint; see the worker logs above")
    metrics = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, int | float)}
    meta = export_model(cfg, result.checkpoint, geometry, metrics)
    summary = {
        "status": "complete",
        "steps": meta["steps"],
        "metrics": metrics,
        "seconds": round(seconds, 3),
        "model": posixpath.join(cfg.output, "model"),
        "checkpoints": posixpath.join(cfg.output, RUN_NAME),
        "config": cfg.model_dump(mode="json"),
    }
    fs, root = open_fs(cfg.output, cfg.storage.options(cfg.output))
    fs.pipe_file(posixpath.join(root, "train.json"), json.dumps(summary, indent=2).encode())
    return summary


def print_train_summary(summary: dict, file=sys.stdout) -> None:
    m = summary["metrics"]
    shown = ", ".join(f"{k} {m[k]:.4g}" for k in sorted(m) if k != "step")
    print(
        f"\ntrain {summary['status']}: {summary['steps']} steps in {summary['seconds']} s\n"
        f"  last metrics  {shown}\n  model         {summary['model']}\n"
        f"  checkpoints   {summary['checkpoints']}",
        file=file,
    )
