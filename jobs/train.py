"""Train AutoSOD on pseudolabel output with Ray Train (DDP).

python jobs/train.py --pseudo-masks DIR_OR_URI --output DIR_OR_URI [--config FILE] [--set k=v]
ray job submit --working-dir . -- python jobs/train.py --pseudo-masks s3://... --output s3://...
"""

from autosod_ray.cli import add_force_unlock, job_parser, load_job_config, run_job
from autosod_ray.config import TrainConfig
from autosod_ray.train.run import print_train_summary, run_train


def main() -> int:
    p = job_parser(__doc__, "train.yaml")
    p.add_argument("--pseudo-masks", help="pseudolabel output folder / URI (or its masks/)")
    p.add_argument("--output", help="folder or URI for checkpoints/, model/ and train.json")
    add_force_unlock(p)
    args = p.parse_args()
    keys = ("pseudo_masks", "output", "force_unlock")
    print_train_summary(run_train(load_job_config(TrainConfig, args, keys)))
    return 0


if __name__ == "__main__":
    run_job(main)
