"""Train AutoSOD on pseudolabel output with Ray Train (DDP).

python jobs/train.py --pseudo-masks DIR_OR_URI --output DIR_OR_URI [--config FILE] [--set k=v]
ray job submit --working-dir . -- python jobs/train.py --pseudo-masks s3://... --output s3://...
"""

from autosod_ray.cli import add_force_unlock, exit_code, job_parser, load_job_config, run_job
from autosod_ray.config import TrainConfig


def main() -> int:
    p = job_parser(__doc__, "train.yaml")
    p.add_argument("--pseudo-masks", help="pseudolabel output folder / URI (or its masks/)")
    p.add_argument("--output", help="folder or URI for checkpoints/, model/ and train.json")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a training in --output made from other pseudo-masks, weights or settings",
    )
    add_force_unlock(p)
    args = p.parse_args()
    from autosod_ray.train.run import print_train_summary, run_train

    keys = ("pseudo_masks", "output", "overwrite", "force_unlock")
    summary = run_train(load_job_config(TrainConfig, args, keys))
    print_train_summary(summary)
    return exit_code(summary)


if __name__ == "__main__":
    run_job(main, supervised=True)
