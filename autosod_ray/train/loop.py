"""The Ray Train loop that every worker runs (one DDP rank each).

Checkpoints leave only through `ray.train.report` (rank 0 attaches them); a
restarted worker group, or the same command run again, starts from the latest
one. Rank 0 prints and validates.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import tempfile
import time

import numpy as np
import torch

from ..config import OptimConfig, TrainConfig
from ..data.progress import progress_line
from ..metrics import MetricMeans
from ..model import autosod_loss, build_autosod
from ..model.autosod import AutoSOD, to_uint8_batch
from ..model.inference import threshold_at_size

STATE = "state.pt"
# what each worker's batches hold: images and masks, or cached tokens and targets
BATCH_DTYPES = {
    "images": {"image": torch.uint8, "mask": torch.uint8},
    "tokens": {"tokens": torch.float32, "target": torch.float32},
}


def lr_factor(step: int, optim: OptimConfig) -> float:
    """Linear warm-up to 1, then cosine decay to min_lr_ratio at max_steps."""
    if step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    span = max(1, optim.max_steps - optim.warmup_steps)
    progress = min(1.0, (step - optim.warmup_steps) / span)
    floor = optim.min_lr_ratio
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(model: AutoSOD, optim: OptimConfig) -> list[dict]:
    """Encoder and decoder at their own learning rates; no decay on norms and biases."""
    groups = []
    parts = [
        (
            "decoder",
            optim.lr,
            [(n, p) for n, p in model.named_parameters() if not n.startswith("encoder.")],
        )
    ]
    if not optim.freeze_encoder:
        parts.append(("encoder", optim.encoder_lr, list(model.encoder.named_parameters())))
    for name, lr, params in parts:
        decay = [p for _, p in params if p.requires_grad and p.ndim >= 2]
        plain = [p for _, p in params if p.requires_grad and p.ndim < 2]
        groups.append({"name": name, "params": decay, "lr": lr, "weight_decay": optim.weight_decay})
        groups.append({"name": name + "_no_decay", "params": plain, "lr": lr, "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


def build_training(cfg: TrainConfig, storage_options: dict, device: torch.device):
    """(model, optimiser, scheduler) on `device`, encoder frozen if configured."""
    model = build_autosod(cfg.backbone, cfg.model, storage_options=storage_options, seed=cfg.seed)
    model.train().requires_grad_(True)
    if cfg.optim.freeze_encoder:
        model.encoder.eval().requires_grad_(False)
    model.to(device)
    optimiser = torch.optim.AdamW(param_groups(model, cfg.optim))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda step: lr_factor(step, cfg.optim)
    )
    return model, optimiser, scheduler


def train_step(model, optimiser, scheduler, batch: dict, cfg: TrainConfig, autocast) -> dict:
    """One optimiser step on a batch of uint8 images and 0/1 masks, or of cached encoder
    tokens and their targets; returns its metrics."""
    with autocast():
        if "tokens" in batch:
            out, target = model(tokens=batch["tokens"]), batch["target"]
        else:
            out, target = model(batch["image"]), batch["mask"].float()
    loss, parts = autosod_loss(out, target, cfg.model.rank_weight)
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.optim.grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
    else:
        norm = torch.tensor(0.0)
    optimiser.step()
    scheduler.step()
    return {"loss": loss.item(), **parts, "grad_norm": float(norm)}


def validate(model: AutoSOD, pairs, device: torch.device, threshold: float, batch: int = 8) -> dict:
    """SOD metrics of the model's masks on (id, S x S x 3 image, H x W gt) pairs."""
    means = MetricMeans()
    was_training = model.training
    model.eval()
    from ..metrics import image_metrics

    for i in range(0, len(pairs), batch):
        chunk = pairs[i : i + batch]
        images = to_uint8_batch(np.stack([p[1] for p in chunk])).to(device)
        prob, _ = model.predict(images)
        for (_, _, gt), p in zip(chunk, prob.float().cpu().numpy(), strict=True):
            soft, binary = threshold_at_size(p, *gt.shape, threshold)
            means.add(image_metrics(soft, gt, binary))
    model.train(was_training)
    if getattr(model, "encoder", None) is not None and not any(
        p.requires_grad for p in model.encoder.parameters()
    ):
        model.encoder.eval()
    return {f"val_{k}": v for k, v in means.results().items()}


def save_state(directory: str, model: AutoSOD, optimiser, scheduler, step: int) -> None:
    torch.save(
        {
            "model": model.state_dict(),
            "optimiser": optimiser.state_dict(),
            "scheduler": scheduler.state_dict(),
            "step": step,
        },
        os.path.join(directory, STATE),
    )


def load_state(directory: str, model: AutoSOD, optimiser, scheduler) -> int:
    state = torch.load(os.path.join(directory, STATE), map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimiser.load_state_dict(state["optimiser"])
    scheduler.load_state_dict(state["scheduler"])
    return int(state["step"])


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point; `config["train"]` is a TrainConfig as JSON."""
    import ray.train
    import ray.train.torch

    from ..data.training import load_validation_set  # Ray Data; the steps above need no Ray

    cfg = TrainConfig.model_validate(config["train"])
    if cfg.scaling.torch_threads != "auto":  # resolved by the train driver
        torch.set_num_threads(cfg.scaling.torch_threads)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    opts = cfg.storage.options(cfg.backbone.weights or "")
    model, optimiser, scheduler = build_training(cfg, opts, device)
    val, validation = cfg.validation, None
    if val.images and rank == 0:
        validation = load_validation_set(
            val.images,
            val.ground_truth,
            cfg.storage.options(val.images),
            model.image_size,
            val.limit,
        )
    step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            step = load_state(d, model, optimiser, scheduler)
        if rank == 0:
            say(f"train: resumed from step {step}")
    bare = model
    model = ray.train.torch.prepare_model(
        model, parallel_strategy_kwargs={"find_unused_parameters": False}
    )
    bf16 = device.type == "cuda" and cfg.backbone.precision in ("auto", "bf16")

    def autocast():
        if bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    shard = ray.train.get_dataset_shard("train")
    window, images_seen, tick = [], 0, time.perf_counter()
    first_step, started = step, time.perf_counter()
    while step < cfg.optim.max_steps:
        batches = shard.iter_torch_batches(
            batch_size=cfg.optim.batch_size,
            device=device,
            drop_last=True,
            dtypes=BATCH_DTYPES["tokens" if cfg.data.cache_tokens else "images"],
            local_shuffle_buffer_size=cfg.data.shuffle_buffer or None,
        )
        seen_any = False
        for batch in batches:
            seen_any = True
            metrics = train_step(model, optimiser, scheduler, batch, cfg, autocast)
            step += 1
            window.append(metrics)
            images_seen += cfg.optim.batch_size * world
            last = step == cfg.optim.max_steps
            save = last or step % cfg.checkpoint.every_steps == 0
            val_due = bool(val.images) and (
                last or (cfg.validation.every_steps and step % cfg.validation.every_steps == 0)
            )
            if save or val_due or step % cfg.log_every == 0:
                now = time.perf_counter()
                report = {k: float(np.mean([m[k] for m in window])) for k in window[0]}
                report.update(
                    step=step,
                    lr=scheduler.get_last_lr()[0],
                    images_per_second=images_seen / max(now - tick, 1e-9),
                )
                if val_due and validation is not None:
                    report.update(validate(bare, validation, device, cfg.model.threshold))
                window, images_seen = [], 0
                _report(report, save and rank == 0, bare, optimiser, scheduler, step)
                tick = time.perf_counter()
                if rank == 0:
                    # 4 significant digits: a learning rate of 3e-06 is not 0.0
                    shown = {
                        k: float(f"{v:.4g}") if isinstance(v, float) else v
                        for k, v in report.items()
                    }
                    seconds = time.perf_counter() - started
                    loss = f"  loss {report['loss']:.4f}"
                    line = progress_line("train", step, cfg.optim.max_steps, seconds,
                                         unit="steps", since=first_step, extra=loss)  # fmt: skip
                    say(line)
                    say(f"train: {shown}")
            if last:
                break
        if not seen_any:
            raise RuntimeError(
                f"worker {rank} received no training batch of {cfg.optim.batch_size} images; "
                "give more pseudo-masks or a smaller optim.batch_size"
            )


def say(line: str) -> None:
    """One line to the driver's log. Not print(): Ray Train 2.60 turns a worker's print into
    a log record and, as Ray wraps the worker's stdout, writes it there as well, so every
    printed line reached the driver twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _report(metrics: dict, with_checkpoint: bool, model, optimiser, scheduler, step: int) -> None:
    import ray.train

    if not with_checkpoint:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as d:
        save_state(d, model, optimiser, scheduler, step)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
