"""SOD metrics of predictions against ground truth.

python jobs/evaluate.py --predictions URI --ground-truth URI --output metrics.json
"""

import json

from autosod_ray.cli import job_parser, load_job_config, run_job
from autosod_ray.config import EvaluateConfig
from autosod_ray.evaluate import run_evaluate
from autosod_ray.metrics import METRIC_KEYS


def main() -> int:
    p = job_parser(__doc__, "evaluate.yaml")
    p.add_argument("--predictions", help="pseudolabel/predict output, or a folder of PNG maps")
    p.add_argument("--ground-truth", help="folder or URI of ground-truth mask PNGs")
    p.add_argument("--output", help="metrics.json path or URI")
    args = p.parse_args()
    metrics = run_evaluate(
        load_job_config(EvaluateConfig, args, ("predictions", "ground_truth", "output"))
    )
    print(
        json.dumps(
            {
                k: metrics[k]
                for k in (
                    *METRIC_KEYS,
                    "n",
                    "predictions_without_gt",
                    "gt_without_predictions",
                    "resized",
                )
            },
            indent=2,
        )
    )
    ranking = metrics["quality_ranking"]
    if ranking:
        print(
            f"quality vs IoU: Spearman {ranking['spearman']:.3f} over {ranking['n']} images; "
            f"mean IoU {ranking['iou_all']:.3f}, best quarter by quality "
            f"{ranking['iou_best_quarter']:.3f}"
        )
    print(f"unreadable: {len(metrics['unreadable'])}")
    return 0


if __name__ == "__main__":
    run_job(main)
