"""A contact sheet: per row the image, the soft map, the mask overlay, the ground truth.

    python jobs/preview.py --predictions URI --images URI [--ground-truth URI] \
        --output sheet.png [--n 24] [--worst]
"""

from autosod_ray.cli import job_parser, load_job_config, run_job
from autosod_ray.config import PreviewConfig
from autosod_ray.preview import render_sheet


def main() -> int:
    p = job_parser(__doc__, "preview.yaml")
    p.add_argument(
        "--predictions", required=True, help="pseudolabel / predict output, or a PNG folder"
    )
    p.add_argument("--images", required=True, help="folder or URI of the images (by file stem)")
    p.add_argument("--ground-truth", help="folder or URI of ground-truth mask PNGs (optional)")
    p.add_argument("--output", required=True, help="the sheet's PNG path or URI")
    p.add_argument("--n", type=int, help="rows on the sheet (default 24)")
    p.add_argument(
        "--worst", action="store_true", help="the lowest-IoU images (needs --ground-truth)"
    )
    args = p.parse_args()
    keys = ("predictions", "images", "ground_truth", "output", "n", "worst")
    result = render_sheet(load_job_config(PreviewConfig, args, keys))
    print(f"wrote {result['rows']} rows to {result['output']}")
    return 0


if __name__ == "__main__":
    run_job(main)
