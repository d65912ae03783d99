"""Ray Train's training loop vs a plain single-process torch loop, in one run.

    python benchmarks/train_throughput.py --pseudo-masks DIR [--config FILE] \
        [--set k=v ...] [--steps N] [--json FILE]

Both loops train the same AutoSOD (same config, same `train_step`) on the same
pseudo-masks with the same augmentation (`load_pairs`), on this machine, with
the same number of torch threads (`scaling.cpus_per_worker`). Each runs N
warm-up steps, then N timed steps; images/s is over the timed steps only.

- plain: one process; reads the Parquet with pyarrow and augments in the loop.
- ray_train: `jobs/train.py`'s TorchTrainer with one worker (DDP world of 1),
  Ray Data augmenting in parallel tasks, checkpoints as configured.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

from autosod_ray.backbone import vit_geometry
from autosod_ray.config import TrainConfig, load_config
from autosod_ray.data.training import COLUMNS, load_pairs, masks_folder, select_pseudo_masks
from autosod_ray.train.loop import build_training, train_step
from autosod_ray.train.run import (
    build_trainer,
    resolve_scaling,
    training_data,
    with_absolute_paths,
)

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "train-smoke.yaml"


def plain_loop_ips(cfg: TrainConfig, image_size: int, steps: int) -> float:
    """Images/s of a single-process loop over the same data and step."""
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    opts = cfg.storage.options(cfg.pseudo_masks)
    fs, root = masks_folder(cfg.pseudo_masks, opts)
    table = pq.read_table(root, filesystem=fs, columns=COLUMNS)
    model, optimiser, scheduler = build_training(
        cfg, cfg.storage.options(cfg.backbone.weights or ""), torch.device("cpu")
    )
    b, rows = cfg.optim.batch_size, table.num_rows
    start = 0.0
    for step in range(2 * steps):
        if step == steps:
            start = time.perf_counter()
        idx = [(step * b + i) % rows for i in range(b)]
        batch = load_pairs(
            table.take(idx).to_pydict(), opts, cfg.augment, image_size, cfg.max_pixels
        )
        tensors = {k: torch.as_tensor(v) for k, v in batch.items()}
        train_step(model, optimiser, scheduler, tensors, cfg, contextlib.nullcontext)
    return steps * b / (time.perf_counter() - start)


def ray_train_ips(cfg: TrainConfig, geometry: tuple[int, int], steps: int) -> float:
    """Images/s of the TorchTrainer loop (1 worker) over its second window of `steps`."""
    with tempfile.TemporaryDirectory() as out:
        run = cfg.model_copy(deep=True)
        run.output = out
        run.optim.max_steps = 2 * steps
        run.log_every = steps  # one report after the warm-up window, one after the timed one
        run.checkpoint.every_steps = 2 * steps
        run.validation.images = run.validation.ground_truth = None
        selection = select_pseudo_masks(run.pseudo_masks, {}, run.data)
        ds, _ = training_data(run, geometry, selection)
        result = build_trainer(run, ds).fit()
        return float(result.metrics["images_per_second"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--pseudo-masks", required=True, help="pseudolabel output folder")
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--steps", type=int, default=20, help="warm-up steps, then timed steps")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    import ray

    sets = [*args.set, f"pseudo_masks={args.pseudo_masks}", "scaling.num_workers=1"]
    cfg = with_absolute_paths(load_config(TrainConfig, args.config, sets))
    geometry = vit_geometry(cfg.backbone)
    ray.init(ignore_reinit_error=True)
    cfg = resolve_scaling(cfg)  # both loops get the same CPUs (threads)
    ray_ips = ray_train_ips(cfg, geometry, args.steps)
    plain_ips = plain_loop_ips(cfg, geometry[0], args.steps)
    result = {
        "plain_ips": round(plain_ips, 3),
        "ray_train_ips": round(ray_ips, 3),
        "ratio": round(ray_ips / plain_ips, 3),
        "steps": args.steps,
        "batch_size": cfg.optim.batch_size,
        "image_size": geometry[0],
        "torch_threads": max(1, int(cfg.scaling.cpus_per_worker)),
        "freeze_encoder": cfg.optim.freeze_encoder,
        "backbone": cfg.backbone.name,
        "cpu_count": os.cpu_count(),
    }
    print("\n| loop | images/s |\n|---|---|")
    print(f"| plain torch, 1 process | {result['plain_ips']} |")
    print(f"| Ray Train, 1 worker | {result['ray_train_ips']} |")
    print(f"| ratio | {result['ratio']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
