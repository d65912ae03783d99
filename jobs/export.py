"""A pseudolabel / predict output for other tools: COCO (RLE), a PNG folder, HF Parquet.

python jobs/export.py --predictions runs/first --format coco --output runs/first/coco.json
python jobs/export.py --predictions runs/first --format png --output runs/first/png
python jobs/export.py --predictions s3://b/run --format hf --output s3://b/run_hf --with-images
"""

from autosod_ray.cli import job_parser, load_job_config, run_job
from autosod_ray.config import ExportConfig
from autosod_ray.export import run_export


def main() -> int:
    p = job_parser(__doc__, "export.yaml")
    p.add_argument("--predictions", help="pseudolabel / predict output (or its masks/ folder)")
    p.add_argument("--output", help="coco: JSON file; png / hf: a new or empty folder")
    p.add_argument("--format", choices=["coco", "png", "hf"])
    p.add_argument("--min-area", type=int, help="coco: smallest object kept, in pixels")
    p.add_argument("--min-quality", type=float, help="leave out masks of lower quality")
    p.add_argument("--top-fraction", type=float, help="keep this best fraction by quality")
    p.add_argument("--file-name", choices=["image_id", "source_uri"], help="coco: file_name")
    p.add_argument("--png-layout", choices=["flat", "tree"], help="png: <stem>.png or sub-folders")
    p.add_argument("--png-map", choices=["mask", "saliency"], help="png: which map")
    p.add_argument("--with-images", action="store_true", help="hf: embed the images' bytes")
    args = p.parse_args()
    keys = (
        "predictions",
        "output",
        "format",
        "min_area",
        "min_quality",
        "top_fraction",
        "file_name",
        "png_layout",
        "png_map",
        "with_images",
    )
    summary = run_export(load_job_config(ExportConfig, args, keys))
    print(
        f"export complete: {summary['exported']} of {summary['rows']} masks as {summary['format']}"
    )
    for key, value in summary.items():
        if key not in ("format", "exported", "rows"):
            print(f"  {key:<24}{value}")
    return 0


if __name__ == "__main__":
    run_job(main)
