"""Where pseudo-labelling time goes: backbone alone, POTNet alone, the whole job.

    python benchmarks/throughput.py --images DIR [--limit N] [--config FILE] \
        [--set k=v ...] [--json FILE] [--scaling] [--skip-pipeline] [--predict MODEL]

In one run, on one machine, with the same images, resolution and batch size:
- backbone_ips: the backbone forward pass alone on decoded, resized uint8 batches;
- potnet_ips: POTNet alone on those batches' precomputed features;
- pipeline_ips: the whole pseudolabel job (`python jobs/pseudolabel.py`: list,
  read, decode, backbone + POTNet, encode, write Parquet) in steady state: the
  job runs on all N images and on the first N / 4; start-up (Ray, model load)
  is the same in both, so (N - N / 4) / (t_N - t_N/4) is its marginal rate;
- predict_ips (with `--predict MODEL`): the same for `jobs/predict.py` with a trained
  AutoSOD and configs/predict-cpu.yaml (the same actors and CPUs as
  configs/cpu-offline.yaml gives POTNet), and
  predict_over_pseudolabel = predict_ips / pipeline_ips: the reason to train;
- ratio = pipeline_ips / backbone_ips; peak_rss_mb / peak_pss_mb: the most
  memory the job's processes (the driver and every Ray process it started) held
  at once, sampled every 0.2 s (RSS double-counts shared pages; PSS does not).
`--scaling` adds POTNet's seconds per image at 224, 320, 448 and 640 px with
this backbone, and at 448 px with a patch-8 ViT-S (3136 tokens; random weights:
the cost, not the masks, is what is measured).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from autosod_ray.config import PseudolabelConfig, load_config
from autosod_ray.data.images import IMAGE_EXTENSIONS, decode_image, resize_square
from autosod_ray.labeller import PseudoLabeller

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "cpu-offline.yaml"


def image_paths(folder: Path, limit: int | None) -> list[Path]:
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    return paths[:limit] if limit else paths


def decoded(paths: list[Path], size: int) -> np.ndarray:
    return np.stack([resize_square(decode_image(p.read_bytes(), 1 << 30), size) for p in paths])


def batches(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def time_stages(labeller: PseudoLabeller, images: np.ndarray, batch: int) -> dict:
    """images/s of the backbone alone and of POTNet alone (one warm-up batch each)."""
    parts = batches(len(images), batch)
    labeller.features(images[parts[0]])  # warm-up
    start = time.perf_counter()
    features = [labeller.features(images[s]) for s in parts]
    backbone_s = time.perf_counter() - start
    labeller.potnet(features[0])
    start = time.perf_counter()
    for f in features:
        labeller.potnet(f)
    potnet_s = time.perf_counter() - start
    return {"backbone_ips": len(images) / backbone_s, "potnet_ips": len(images) / potnet_s}


def _tree(root: int) -> list[int]:
    """root and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _memory_mb(pids: list[int]) -> tuple[float, float]:
    rss = pss = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1])
        except OSError:
            continue
    return rss / 1024, pss / 1024


def job_command(inputs: Path, out: Path, config: str, sets: list[str], model: str | None):
    """The pseudolabel job with the benchmark's config, or (with `model`) the predict job
    with that trained model (its own input size), configs/predict-cpu.yaml and the same
    pipeline overrides."""
    if model is None:
        cmd = [sys.executable, "jobs/pseudolabel.py", "--config", config]
    else:
        cmd = [sys.executable, "jobs/predict.py", "--model", model]
        cmd += ["--config", "configs/predict-cpu.yaml"]
        sets = [s for s in sets if s.startswith("pipeline.")]
    cmd += ["--input", str(inputs), "--output", str(out)]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def time_pipeline(
    paths: list[Path], config: str, sets: list[str], batch: int, model: str | None = None
) -> dict:
    """Run the pseudolabel job (or predict with `model`) on `paths`: wall time, peak memory."""
    with tempfile.TemporaryDirectory() as tmp:
        inputs = Path(tmp) / "images"
        inputs.mkdir()
        for p in paths:
            (inputs / p.name).symlink_to(p.resolve())
        out = Path(tmp) / "out"
        cmd = job_command(inputs, out, config, [*sets, f"pipeline.rows_per_file={batch}"], model)
        env = {**os.environ, "RAY_ADDRESS": "local"}  # its own Ray, measured whole
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        peak = [0.0, 0.0]

        def sample():
            while proc.poll() is None:
                rss, pss = _memory_mb(_tree(proc.pid))
                peak[0], peak[1] = max(peak[0], rss), max(peak[1], pss)
                time.sleep(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        start = time.perf_counter()
        log, _ = proc.communicate()
        total_s = time.perf_counter() - start
        sampler.join()
        if proc.returncode != 0:
            raise RuntimeError(f"{cmd[1]} failed:\n" + log[-3000:])
        return {"seconds": total_s, "peak_rss_mb": peak[0], "peak_pss_mb": peak[1]}


def pipeline(
    paths: list[Path], config: str, sets: list[str], batch: int, model: str | None = None
) -> dict:
    """Steady-state images/s of the job (start-up cancels out) and its peak memory; with
    `model`, of the predict job (keys prefixed `predict_`)."""
    few = paths[: max(2 * batch, len(paths) // 4)]
    small = time_pipeline(few, config, sets, batch, model)
    full = time_pipeline(paths, config, sets, batch, model)
    name = "pipeline" if model is None else "predict"
    return {
        f"{name}_ips": (len(paths) - len(few)) / max(full["seconds"] - small["seconds"], 1e-9),
        f"{name}_ips_with_startup": len(paths) / full["seconds"],
        f"{name}_startup_s": small["seconds"]
        - len(few) * (full["seconds"] - small["seconds"]) / (len(paths) - len(few)),
        f"{name}_peak_rss_mb" if model else "peak_rss_mb": full["peak_rss_mb"],
        f"{name}_peak_pss_mb" if model else "peak_pss_mb": full["peak_pss_mb"],
    }


def potnet_scaling(cfg: PseudolabelConfig, paths: list[Path], sizes=(224, 320, 448, 640)) -> list:
    """POTNet seconds per image against the number of tokens."""
    rows = []
    variants = [(cfg.backbone, s) for s in sizes]
    variants.append(
        (
            cfg.backbone.model_copy(update={"name": "vit_small_patch8_224.dino", "weights": None}),
            448,
        )
    )
    for backbone, size in variants:
        bb = backbone.model_copy(update={"image_size": size})
        if bb.weights is None:  # cost only: random weights, no hub
            from autosod_ray.backbone import ViTFeatures, _timm_vit

            extractor = ViTFeatures(bb, model=_timm_vit(bb.name, pretrained=False).eval())
            labeller = PseudoLabeller(bb, cfg.potnet, extractor=extractor)
        else:
            labeller = PseudoLabeller(bb, cfg.potnet)
        images = decoded(paths, labeller.image_size)
        feats = [
            labeller.features(images[s])
            for s in batches(len(images), cfg.pipeline.potnet_batch_size)
        ]
        labeller.potnet(feats[0])
        start = time.perf_counter()
        for f in feats:
            labeller.potnet(f)
        per_image = (time.perf_counter() - start) / len(images)
        tokens = (labeller.image_size // labeller.extractor.patch_size) ** 2
        rows.append(
            {
                "backbone": bb.name,
                "image_size": labeller.image_size,
                "tokens": tokens,
                "potnet_s_per_image": per_image,
            }
        )
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--images", required=True, type=Path)
    p.add_argument("--limit", type=int, default=64)
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json")
    p.add_argument("--scaling", action="store_true", help="POTNet cost against tokens")
    p.add_argument("--skip-pipeline", action="store_true")
    p.add_argument("--pipeline-only", action="store_true", help="the job once (memory runs)")
    p.add_argument("--skip-stages", action="store_true", help="no backbone / POTNet alone")
    p.add_argument("--scaling-limit", type=int, default=16)
    p.add_argument(
        "--predict", metavar="MODEL", help="also time jobs/predict.py with this trained model"
    )
    args = p.parse_args()
    cfg = load_config(PseudolabelConfig, args.config, args.set)
    paths = image_paths(args.images, args.limit)
    batch = cfg.pipeline.potnet_batch_size
    result: dict = {
        "images": len(paths),
        "image_size": cfg.backbone.image_size,
        "batch_size": batch,
        "backbone": cfg.backbone.name,
        "cpu_count": os.cpu_count(),
    }
    if args.pipeline_only:  # memory runs: the job once, on all the images
        run = time_pipeline(paths, args.config, args.set, batch)
        result.update(pipeline_ips_with_startup=len(paths) / run.pop("seconds"), **run)
    elif not args.skip_pipeline:  # first, on a quiet machine
        result.update(pipeline(paths, args.config, args.set, batch))
    if not (args.pipeline_only or args.skip_stages):
        labeller = PseudoLabeller(cfg.backbone, cfg.potnet)
        result.update(time_stages(labeller, decoded(paths, labeller.image_size), batch))
    if "pipeline_ips" in result and "backbone_ips" in result:
        result["ratio"] = result["pipeline_ips"] / result["backbone_ips"]
    if args.predict:  # the trained model against its teacher, on the same images
        result.update(pipeline(paths, args.config, args.set, batch, model=args.predict))
        if "pipeline_ips" in result:
            result["predict_over_pseudolabel"] = result["predict_ips"] / result["pipeline_ips"]
    if args.scaling:
        result["scaling"] = potnet_scaling(cfg, paths[: args.scaling_limit])
    print("\n| measure | value |\n|---|---|")
    for k, v in result.items():
        if k != "scaling":
            print(f"| {k} | {round(v, 3) if isinstance(v, float) else v} |")
    if args.scaling:
        print("\n| backbone | px | tokens | POTNet s/image |\n|---|---|---|---|")
        for r in result["scaling"]:
            cells = [r["backbone"], r["image_size"], r["tokens"], f"{r['potnet_s_per_image']:.3f}"]
            print("| " + " | ".join(str(c) for c in cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
