"""Label a dataset with POTNet into Parquet shards.

python jobs/pseudolabel.py --input DIR_OR_URI --output DIR_OR_URI [--config FILE] [--set k=v]
ray job submit --working-dir . -- python jobs/pseudolabel.py --input s3://... --output s3://...
"""

from autosod_ray.cli import job_parser, run_job
from autosod_ray.config import PseudolabelConfig, load_config
from autosod_ray.pseudolabel import print_summary, run_pseudolabel


def main() -> int:
    p = job_parser(__doc__, "potnet.yaml")
    p.add_argument("--input", help="folder, URI (s3://, gs://, file://) or manifest of images")
    p.add_argument("--output", help="folder or URI for masks/, errors/ and run.json")
    p.add_argument(
        "--overwrite", action="store_true", help="replace an output written under another config"
    )
    args = p.parse_args()
    overrides = list(args.set)
    for key in ("input", "output"):
        if getattr(args, key):
            overrides.append(f"{key}={getattr(args, key)}")
    if args.overwrite:
        overrides.append("overwrite=true")
    summary = run_pseudolabel(load_config(PseudolabelConfig, args.config, overrides))
    print_summary(summary)
    return 0 if summary["status"] == "complete" else 1


if __name__ == "__main__":
    run_job(main)
