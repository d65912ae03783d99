"""Scale rehearsal: the real pseudolabel job on many small synthetic images.

    python benchmarks/scale.py --data DIR --images 10000 100000 [--json FILE] [--kill-up-to N]

For each count N: N synthetic 64 x 64 JPEGs in nested folders (100 per folder,
made once under DIR, never in the repo) are labelled by `jobs/pseudolabel.py`
with a tiny randomly initialised ViT (timm's vit_tiny_patch16_224 at 64 px: 16
tokens; the cost under test is the plumbing, not the model). Measured per N:
listing and resume-check time, the driver's peak RSS, rows per second, the
number and size of Parquet files; then the same command again with everything
done (resume time); then (for counts up to --kill-up-to) a fresh run whose
driver is SIGKILLed at about half way and rerun, which must end exactly once.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
PER_FOLDER = 100


def make_images(root: Path, n: int) -> Path:
    """N 64 x 64 JPEGs: a bright disc on a textured background, 100 per folder."""
    folder = root / f"images_{n}"
    done = folder / ".complete"
    if done.exists():
        return folder
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:64, :64]
    for i in range(n):
        sub = (
            folder
            / f"{i // (PER_FOLDER * PER_FOLDER):03d}"
            / f"{(i // PER_FOLDER) % PER_FOLDER:03d}"
        )
        sub.mkdir(parents=True, exist_ok=True)
        cy, cx, r = rng.integers(16, 48, 2).tolist() + [int(rng.integers(6, 16))]
        img = rng.integers(0, 80, (64, 64, 3), dtype=np.uint8)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(150, 255, 3, dtype=np.uint8)
        Image.fromarray(img).save(sub / f"{i:07d}.jpg", quality=85)
    done.touch()
    return folder


def tiny_weights(root: Path) -> Path:
    """A randomly initialised vit_tiny_patch16_224, as a safetensors file."""
    path = root / "vit_tiny_random.safetensors"
    if not path.exists():
        import timm
        import torch
        from safetensors.torch import save_file

        torch.manual_seed(0)
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def job_args(images: Path, out: Path, weights: Path) -> list[str]:
    sets = [
        "backbone.name=vit_tiny_patch16_224",
        f"backbone.weights={weights}",
        "backbone.image_size=64",
        "backbone.device=cpu",
        "pipeline.read_batch_size=256",
        "pipeline.decode_batch_size=256",
        "pipeline.potnet_batch_size=128",
        "pipeline.encode_batch_size=256",
        "pipeline.rows_per_file=5000",
        "pipeline.num_gpus=0",
        "pipeline.pool_min=1",
        "pipeline.pool_max=1",
        "pipeline.num_cpus=1",
    ]
    args = ["--config", "configs/potnet.yaml", "--input", str(images), "--output", str(out)]
    for s in sets:
        args += ["--set", s]
    return args


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def run(args: list[str], kill_at_rows: int | None = None, out: Path | None = None) -> dict:
    """Run the job; the driver's peak RSS; SIGKILL it once `kill_at_rows` masks exist."""
    env = {**os.environ, "RAY_ADDRESS": "local", "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "jobs/pseudolabel.py", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    peak, lines = [0.0], []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    killed = False
    while proc.poll() is None:
        peak[0] = max(peak[0], _rss_mb(proc.pid))
        if kill_at_rows and not killed and _rows(out) >= kill_at_rows:
            os.killpg(proc.pid, signal.SIGKILL)
            killed = True
        time.sleep(0.2)
    reader.join()
    return {
        "returncode": proc.returncode,
        "wall_s": round(time.perf_counter() - start, 2),
        "driver_peak_rss_mb": round(peak[0], 1),
        "killed": killed,
        "log_tail": "".join(lines[-15:]),
    }


def _rows(out: Path) -> int:
    import pyarrow.parquet as pq

    masks = out / "masks"
    if not masks.exists():
        return 0
    total = 0
    for f in masks.glob("part-*.parquet"):
        try:
            total += pq.ParquetFile(f).metadata.num_rows
        except Exception:  # noqa: BLE001 - a file being renamed into place
            pass
    return total


def files_of(out: Path) -> dict:
    files = [f for f in (out / "masks").glob("*.parquet")] + list(
        (out / "errors").glob("*.parquet")
    )
    sizes = [f.stat().st_size for f in files]
    return {"parquet_files": len(files), "parquet_mb": round(sum(sizes) / 2**20, 2)}


def rehearse(root: Path, n: int, kill: bool = True) -> dict:
    images, weights = make_images(root, n), tiny_weights(root)
    out = root / f"out_{n}"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    first = run(job_args(images, out, weights))
    summary = json.loads((out / "run.json").read_text())
    again = run(job_args(images, out, weights))
    resumed = json.loads((out / "run.json").read_text())
    result = {
        "images": n,
        "first_run": {
            **first,
            **{
                k: summary[k]
                for k in ("labelled", "errors", "duplicates", "missing", "images_per_second")
            },
            "timings": summary["timings"],
            **files_of(out),
        },  # fmt: skip
        "resume_all_done": {
            **again,
            "timings": resumed["timings"],
            "skipped": resumed["skipped_already_done"],
        },  # fmt: skip
    }
    if not kill:
        return result
    killed_out = root / f"out_{n}_killed"
    subprocess.run(["rm", "-rf", str(killed_out)], check=True)
    killed = run(job_args(images, killed_out, weights), kill_at_rows=n // 2, out=killed_out)
    rows_at_kill = _rows(killed_out)
    rerun = run(job_args(images, killed_out, weights))
    after = json.loads((killed_out / "run.json").read_text())
    result["kill_at_half"] = {
        "rows_at_kill": rows_at_kill,
        "killed": killed["killed"],
        "rerun_returncode": rerun["returncode"],
        "skipped": after["skipped_already_done"],
        "labelled": after["labelled"],
        "duplicates": after["duplicates"],
        "missing": after["missing"],
        "status": after["status"],
    }
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", required=True, help="folder for the synthetic images and outputs")
    p.add_argument("--images", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--json", help="write the results here")
    p.add_argument(
        "--kill-up-to",
        type=int,
        default=None,
        help="run the driver-kill check only for counts up to this (default: every count)",
    )
    args = p.parse_args(argv)
    root = Path(args.data)
    root.mkdir(parents=True, exist_ok=True)
    results = [
        rehearse(root, n, kill=args.kill_up_to is None or n <= args.kill_up_to) for n in args.images
    ]
    for r in results:
        for part in ("first_run", "resume_all_done"):
            r[part].pop("log_tail", None)
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
