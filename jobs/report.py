"""One static HTML page about a pseudolabel / predict output: summary, errors by reason,
histograms, galleries of what to check and what to trust (and IoU with ground truth).

    python jobs/report.py --predictions RUN [--images URI] [--ground-truth URI] \
        [--output RUN/report.html]
"""

from autosod_ray.cli import job_parser, load_job_config, run_job
from autosod_ray.config import ReportConfig
from autosod_ray.report import run_report


def main() -> int:
    p = job_parser(__doc__, "report.yaml")
    p.add_argument("--predictions", required=True, help="pseudolabel / predict output")
    p.add_argument("--images", help="folder / URI of the images (default: source_uri)")
    p.add_argument("--ground-truth", help="folder / URI of mask PNGs, matched by stem")
    p.add_argument("--output", help="report .html or a folder (default: RUN/report.html)")
    args = p.parse_args()
    keys = ("predictions", "images", "ground_truth", "output")
    r = run_report(load_job_config(ReportConfig, args, keys))
    print(
        f"wrote {r['output']} ({r['bytes'] / 1e6:.2f} MB, {r['thumbnails']} thumbnails) for "
        f"{r['rows']} masks and {r['errors']} errors in {r['seconds']} s"
    )
    return 0


if __name__ == "__main__":
    run_job(main)
