"""Label a dataset with POTNet into Parquet shards.

python jobs/pseudolabel.py --input DIR_OR_URI --output DIR_OR_URI [--config FILE] [--set k=v]
ray job submit --working-dir . -- python jobs/pseudolabel.py --input s3://... --output s3://...
"""

from autosod_ray.cli import add_labelling_args, exit_code, job_parser, load_job_config, run_job
from autosod_ray.config import PseudolabelConfig


def main() -> int:
    p = job_parser(__doc__, "potnet.yaml")
    add_labelling_args(p, source="config")
    args = p.parse_args()
    from autosod_ray.pseudolabel import print_summary, run_pseudolabel

    summary = run_pseudolabel(
        load_job_config(
            PseudolabelConfig, args, ("input", "output", "overwrite", "force_unlock", "report")
        )
    )
    print_summary(summary)
    return exit_code(summary)


if __name__ == "__main__":
    run_job(main, supervised=True)
