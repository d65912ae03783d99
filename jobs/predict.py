"""Label images with a trained AutoSOD model (pseudo-mask Parquet schema).

python jobs/predict.py --model TRAIN_OUTPUT/model --input DIR_OR_URI --output DIR_OR_URI
ray job submit --working-dir . -- python jobs/predict.py --model s3://... --input s3://... ...
"""

from autosod_ray.cli import add_labelling_args, exit_code, job_parser, load_job_config, run_job
from autosod_ray.config import PredictConfig


def main() -> int:
    p = job_parser(__doc__, "predict.yaml")
    p.add_argument("--model", help="the model/ folder (or URI) that jobs/train.py wrote")
    add_labelling_args(p, source="model")
    args = p.parse_args()
    from autosod_ray.predict import run_predict
    from autosod_ray.pseudolabel import print_summary

    summary = run_predict(
        load_job_config(
            PredictConfig, args, ("model", "input", "output", "overwrite", "force_unlock", "report")
        )
    )
    print_summary(summary, job="predict")
    return exit_code(summary)


if __name__ == "__main__":
    run_job(main, supervised=True)
