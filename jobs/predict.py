"""Label images with a trained AutoSOD model (pseudo-mask Parquet schema).

python jobs/predict.py --model TRAIN_OUTPUT/model --input DIR_OR_URI --output DIR_OR_URI
ray job submit --working-dir . -- python jobs/predict.py --model s3://... --input s3://... ...
"""

from autosod_ray.cli import job_parser, run_job
from autosod_ray.config import PredictConfig, load_config
from autosod_ray.predict import run_predict
from autosod_ray.pseudolabel import print_summary


def main() -> int:
    p = job_parser(__doc__, "predict.yaml")
    p.add_argument("--model", help="the model/ folder (or URI) that jobs/train.py wrote")
    p.add_argument("--input", help="folder, URI (s3://, gs://, file://) or manifest of images")
    p.add_argument("--output", help="folder or URI for masks/, errors/ and run.json")
    p.add_argument(
        "--overwrite", action="store_true", help="replace an output written by another model"
    )
    args = p.parse_args()
    overrides = list(args.set)
    for key in ("model", "input", "output"):
        if getattr(args, key):
            overrides.append(f"{key}={getattr(args, key)}")
    if args.overwrite:
        overrides.append("overwrite=true")
    summary = run_predict(load_config(PredictConfig, args.config, overrides))
    print_summary(summary, job="predict")
    return 0 if summary["status"] == "complete" else 1


if __name__ == "__main__":
    run_job(main)
