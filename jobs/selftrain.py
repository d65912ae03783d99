"""Self-training rounds: AutoSOD students relabel the images and new students train on the
masks they are surest of (the first student learns from POTNet's pseudo-masks).

python jobs/selftrain.py --input IMAGES --pseudo-masks PSEUDOLABEL_OUTPUT --output DIR_OR_URI
ray job submit --working-dir . -- python jobs/selftrain.py --input s3://... --pseudo-masks s3://...
"""

from autosod_ray.cli import add_force_unlock, exit_code, job_parser, load_job_config, run_job
from autosod_ray.config import SelfTrainConfig


def main() -> int:
    p = job_parser(__doc__, "selftrain-cpu.yaml")
    p.add_argument("--input", help="the images the pseudo-masks are of (each round relabels them)")
    p.add_argument("--pseudo-masks", help="POTNet's pseudolabel output: the first student's labels")
    p.add_argument("--output", help="folder or URI for student-<k>/, labels-<k>/, selftrain.json")
    p.add_argument("--rounds", type=int, help="relabel-and-retrain rounds after the first student")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a step's output made from other inputs or settings (e.g. after a change "
        "to the pseudo-masks or the recipe)",
    )
    add_force_unlock(p)
    args = p.parse_args()
    from autosod_ray.pseudolabel import print_summary
    from autosod_ray.selftrain import print_selftrain_summary, run_selftrain
    from autosod_ray.train.run import print_train_summary

    def print_step(job: str, summary: dict) -> None:  # each step's own summary, as it ends
        if job == "predict":
            print_summary(summary, job="predict")
        else:
            print_train_summary(summary)

    keys = ("input", "pseudo_masks", "output", "rounds", "overwrite", "force_unlock")
    summary = run_selftrain(load_job_config(SelfTrainConfig, args, keys), on_step=print_step)
    print_selftrain_summary(summary)
    return exit_code(summary)


if __name__ == "__main__":
    run_job(main, supervised=True)
