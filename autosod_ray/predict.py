"""The predict job: a trained AutoSOD model labels images into the pseudo-mask schema.

The same pipeline as pseudolabel (list, read, decode, model actors, encode,
Parquet with masks/ errors/ run.json, resume), with the trained network in the
actor stage. `confidence` is the chosen query's objectness; `quality` is the
model's own estimate of the mask's IoU (model/quality.py); `attention_border` is
read from its encoder's last block as POTNet's backbone reads it; `consistency_loss` is
NaN (a POTNet quantity). `refine` (default: the guided filter, edge_refine.py)
moves each mask's edges onto the image's before the mask is cut at its size.
"""

from __future__ import annotations

import functools

from .backbone import snap_to_patch
from .config import PredictConfig
from .data.uris import InputError, absolute
from .edge_refine import refiner
from .model.inference import AutoSODPredictor, load_model, threshold_at_size
from .model.quality import prediction_quality, quality_settings
from .potnet.quality import attention_border
from .pseudolabel import Labelling, run_labelling


class _Predictor:
    """Model factory for the actor stage: loads the trained model once per actor."""

    def __init__(self, cfg: PredictConfig):
        self.cfg = cfg

    def __call__(self):
        cfg = self.cfg
        predictor = AutoSODPredictor(
            cfg.model, cfg.storage.options(cfg.model), cfg.device, cfg.precision
        )

        refine = refiner(cfg.refine, predictor.device)  # on the model's device

        def label(images):
            out = predictor(images)
            refined = refine(out.prob, images)
            quality = prediction_quality(
                out.prob,
                out.objectness,
                out.tokens,
                out.noise_agreement,
                refined,
                threshold=predictor.threshold,
                refine=cfg.refine.method,
            )
            return refined, {
                "confidence": out.objectness,
                "quality": quality,
                "attention_border": attention_border(out.cls_attention),
            }

        return label


def predict_labelling(cfg: PredictConfig) -> Labelling:
    """The trained model as a Labelling; a missing, damaged or foreign model folder fails
    here, on the driver (the model is loaded once, as each actor will load it)."""
    _, meta = load_model(cfg.model, cfg.storage.options(cfg.model))
    patch = int(meta["patch_size"])
    return Labelling(
        job="predict",
        model_factory=_Predictor(cfg),
        to_masks=functools.partial(threshold_at_size, threshold=meta["model"]["threshold"]),
        model_name=f"autosod:{meta['backbone']['name']}",
        settings={
            "model_sha256": meta["sha256"],
            "threshold": meta["model"]["threshold"],
            **cfg.refine.settings(),
            "quality": quality_settings(cfg.refine.method),
        },
        provenance={
            "model": {"uri": cfg.model, "sha256": meta["sha256"], "steps": meta.get("steps")},
            "trained_on": meta.get("trained_on"),
        },
        image_size=snap_to_patch(int(meta["image_size"]), patch),
        patch_size=patch,
        max_pixels=cfg.max_pixels,
        max_pixels_key="max_pixels",
    )


def run_predict(cfg: PredictConfig) -> dict:
    """Label every input not yet labelled by this model; returns the run summary."""
    if not cfg.model or not cfg.input or not cfg.output:
        raise InputError("--model, --input and --output are all required")
    cfg = cfg.model_copy(update={"model": absolute(cfg.model)})
    return run_labelling(cfg, predict_labelling(cfg))
