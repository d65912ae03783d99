"""The HTML report at scale: time and page size of `write_report` on a synthetic run.

    python benchmarks/report_scale.py --rows 10000 [--data /tmp/report_scale] [--json FILE]

Makes (once, under --data, never in the repo) a predictions folder like pseudolabel's:
--rows masks in shards of 1000 rows (numpy ellipses at the size of their source image,
one or two objects, some empty or covering everything; random quality), a few real
ECSSD images as the sources, 1% error rows and a run.json. Then writes the report
twice: in the driver (ray_above above the row count) and in Ray tasks (ray_above 0,
as the default 2000 chooses for 10k rows; the local Ray it starts is timed apart).
Prints a table; --json keeps it.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from autosod_ray.data.parquet import ERROR_SCHEMA, MASK_SCHEMA, write_table_atomic  # noqa: E402
from autosod_ray.data.uris import open_fs  # noqa: E402
from autosod_ray.report import ReportSettings, write_report  # noqa: E402

ROWS_PER_FILE = 1000


def png(mask: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def synthetic_mask(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """H x W bool: 1 ellipse (most), 2 ellipses (15%), empty (2%) or all but a rim (2%)."""
    kind = rng.random()
    if kind < 0.02:
        return np.zeros((h, w), bool)
    if kind < 0.04:
        out = np.ones((h, w), bool)
        out[:4] = False
        return out
    yy, xx = np.ogrid[:h, :w]
    mask = np.zeros((h, w), bool)
    n = 2 if kind < 0.19 else 1
    for i in range(n):
        cy = rng.uniform(0.3, 0.7) * h if n == 1 else (0.25 + 0.5 * i) * h
        cx = rng.uniform(0.3, 0.7) * w if n == 1 else (0.25 + 0.5 * i) * w
        ry, rx = rng.uniform(0.08, 0.35 / n) * h, rng.uniform(0.08, 0.35 / n) * w
        mask |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    return mask


def make_run(root: Path, rows: int, sources: list[Path]) -> Path:
    run = root / f"run_{rows}"
    if (run / "run.json").exists():
        return run
    rng = np.random.default_rng(0)
    sizes = [Image.open(p).size for p in sources]  # (w, h); ECSSD JPEGs carry no rotation
    fs, out = open_fs(str(run), {})
    for start in range(0, rows, ROWS_PER_FILE):
        batch = []
        for k in range(start, min(rows, start + ROWS_PER_FILE)):
            src = k % len(sources)
            w, h = sizes[src]
            mask = synthetic_mask(rng, h, w)
            data = png(mask)
            batch.append(
                {
                    "image_id": f"{k // 100:04d}/{k:07d}.jpg",
                    "source_uri": str(sources[src]),
                    "height": h,
                    "width": w,
                    "mask_png": data,
                    "saliency_png": data,
                    "fg_fraction": float(mask.mean()),
                    "confidence": float(rng.uniform(0.2, 0.9)),
                    "consistency_loss": float(rng.uniform(0.01, 0.2)),
                    "quality": float(rng.beta(5, 2)),
                    "ot_iterations": int(rng.integers(20, 400)),
                    "ot_marginal_error": float(rng.uniform(1e-6, 1e-4)),
                    "backbone": "vit_small_patch14_dinov2.lvd142m",
                    "config_hash": "bench",
                }
            )
        write_table_atomic(fs, f"{out}/masks", pa.Table.from_pylist(batch, schema=MASK_SCHEMA))
    reasons = [
        "could not read: FileNotFoundError: [Errno 2] No such file: '/data/x/{k}.jpg'",
        "corrupt or truncated image: image file is truncated ({k} bytes not processed)",
        "image is {k}x3 pixels, smaller than one patch (14 px)",
    ]
    errors = [
        {
            "image_id": f"bad/{k}.jpg",
            "source_uri": f"/data/bad/{k}.jpg",
            "error": reasons[k % 3].format(k=k),
            "error_kind": "permanent",
            "config_hash": "bench",
        }
        for k in range(rows // 100)
    ]
    write_table_atomic(fs, f"{out}/errors", pa.Table.from_pylist(errors, schema=ERROR_SCHEMA))
    record = {
        "config_hash": "bench",
        "status": "complete",
        "inputs": rows + len(errors),
        "labelled": rows,
        "errors": len(errors),
        "runs": [{"run": 1, "status": "complete", "seconds": 1.0, "images_per_second": 1.0}],
    }
    (run / "run.json").write_text(json.dumps(record))
    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rows", type=int, default=10000)
    p.add_argument("--data", default="/tmp/report_scale")
    p.add_argument("--sources", default=str(REPO.parent / "shared" / "data" / "ecssd" / "images"))
    p.add_argument("--n-sources", type=int, default=8)
    p.add_argument("--json")
    args = p.parse_args()
    sources = sorted(Path(args.sources).glob("*.jpg"))[: args.n_sources]
    t = time.perf_counter()
    run = make_run(Path(args.data), args.rows, sources)
    print(f"predictions: {run} ({args.rows} rows, made in {time.perf_counter() - t:.1f} s)")
    results = []
    driver = ReportSettings(ray_above=args.rows + 1)
    r = write_report(str(run), str(Path(args.data) / "driver.html"), {}, settings=driver)
    results.append({"ray_start_s": 0.0, **r})

    import ray

    t = time.perf_counter()
    ray.init(ignore_reinit_error=True, include_dashboard=False)
    ray_start = time.perf_counter() - t
    tasks = ReportSettings(ray_above=0)  # the default (2000) picks Ray tasks at 10k rows too
    r = write_report(str(run), str(Path(args.data) / "ray.html"), {}, settings=tasks)
    ray.shutdown()
    results.append({"ray_start_s": round(ray_start, 1), **r})

    print(
        "\n| masks | errors | mode | report s | (Ray start s) | page KB | thumbnails "
        "| masks counted for objects |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for x in results:
        print(
            f"| {x['rows']} | {x['errors']} | {'in Ray tasks' if x['ray'] else 'in the driver'} "
            f"| {x['seconds']:.1f} | "
            f"{x['ray_start_s']:.1f} | {x['bytes'] / 1024:.0f} | {x['thumbnails']} | "
            f"{x['scanned_for_objects']} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
