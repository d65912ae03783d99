"""A trained AutoSOD model as a predictor: model/ folder in, masks out.

`<train output>/model/` holds `model.safetensors` (every weight, encoder
included) and `model.json` (the backbone and model config that rebuild it).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import posixpath
from typing import NamedTuple

import numpy as np
import torch

from ..backbone import resolve_device
from ..config import BackboneConfig, ModelConfig
from ..data.uris import InputError, open_fs
from ..potnet.mask import upsample
from .autosod import AutoSOD, build_autosod, to_uint8_batch
from .quality import NOISE_DRAWS, noise_agreement

WEIGHTS, META = "model.safetensors", "model.json"


def save_model(uri: str, state: dict[str, torch.Tensor], meta: dict, storage_options: dict) -> dict:
    """Write weights + config to the folder `uri`; returns the metadata written."""
    from safetensors.torch import save

    blob = save({k: v.detach().cpu().contiguous() for k, v in state.items()})
    meta = {**meta, "sha256": hashlib.sha256(blob).hexdigest()}
    fs, root = open_fs(uri, storage_options)
    fs.makedirs(root, exist_ok=True)
    fs.pipe_file(posixpath.join(root, WEIGHTS), blob)
    fs.pipe_file(posixpath.join(root, META), json.dumps(meta, indent=2).encode())
    return meta


def read_model_meta(uri: str, storage_options: dict) -> dict:
    fs, root = open_fs(uri, storage_options)
    path = posixpath.join(root.rstrip("/"), META)
    if not fs.exists(path) or not fs.exists(posixpath.join(root.rstrip("/"), WEIGHTS)):
        raise InputError(
            f"--model {uri!r} is not a trained model folder (no {META} / {WEIGHTS}); "
            "give the model/ folder that jobs/train.py wrote"
        )
    return json.loads(fs.cat_file(path))


def load_model(uri: str, storage_options: dict) -> tuple[AutoSOD, dict]:
    """Rebuild the network from model.json and load model.safetensors strictly."""
    from safetensors.torch import load

    meta = read_model_meta(uri, storage_options)
    fs, root = open_fs(uri, storage_options)
    try:
        state = load(fs.cat_file(posixpath.join(root.rstrip("/"), WEIGHTS)))
        backbone = BackboneConfig.model_validate(meta["backbone"])
        net = build_autosod(backbone, ModelConfig.model_validate(meta["model"]), pretrained=False)
        net.load_state_dict(state, strict=True)
    except Exception as err:  # noqa: BLE001 - a damaged or foreign model folder
        raise InputError(
            f"--model {uri!r}: {WEIGHTS} does not load into the network {META} describes "
            f"({type(err).__name__}: {str(err)[:300]}); give the model/ folder jobs/train.py "
            "wrote, unchanged"
        ) from None
    return net.eval(), meta


def threshold_at_size(
    prob: np.ndarray, height: int, width: int, threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    """h x w mask probability -> (soft uint8 H x W, binary bool H x W) at the image's size."""
    soft = np.clip(upsample(prob, height, width), 0.0, 1.0)
    return np.round(soft * 255).astype(np.uint8), soft > threshold


class Prediction(NamedTuple):
    """A batch's answer, B rows each: what predict writes and what its `quality` reads."""

    prob: np.ndarray  # B x 2h x 2w float32 mask probability of the best query
    objectness: np.ndarray  # B, that query's
    tokens: np.ndarray  # B x h x w x D float32 encoder tokens on their grid
    noise_agreement: np.ndarray  # B (model/quality.py)
    cls_attention: np.ndarray  # B x h x w float32: the encoder's last-block CLS attention


class AutoSODPredictor:
    """Batches of square uint8 images -> best-query mask probability and objectness."""

    def __init__(
        self,
        uri: str,
        storage_options: dict,
        device: str = "auto",
        precision: str = "auto",
        nudges: int = NOISE_DRAWS,
    ):
        """`nudges`: the decoder passes on nudged tokens of `noise_agreement`, which
        predict's `quality` is fit to; 0 skips them (NaN agreement: a benchmark's view of
        what they cost)."""
        self.nudges = nudges
        self.model, self.meta = load_model(uri, storage_options)
        self.device = resolve_device(device)
        self.model.to(self.device)
        bf16 = precision == "bf16" or (precision == "auto" and self.device.type == "cuda")
        self.autocast = torch.bfloat16 if bf16 else None

    @property
    def image_size(self) -> int:
        return self.model.image_size

    @property
    def threshold(self) -> float:
        return float(self.meta["model"]["threshold"])

    def __call__(self, images: np.ndarray) -> Prediction:
        """B x S x S x 3 uint8 (S: the model's image_size) -> the mask probability, its
        objectness, and what predict's `quality` reads the mask against: the encoder
        tokens and the masks' agreement with the decoder's on nudged tokens; and the CLS
        attention the report's no-object rule reads (`attention_border`)."""
        x = to_uint8_batch(images).to(self.device)
        if tuple(x.shape[1:3]) != (self.image_size, self.image_size):
            raise ValueError(
                f"images of {tuple(x.shape[1:3])} pixels; the model takes squares of "
                f"{self.image_size} (resize_square them first)"
            )
        ctx = (
            torch.autocast(self.device.type, dtype=self.autocast)
            if self.autocast
            else contextlib.nullcontext()
        )
        with torch.inference_mode(), ctx:
            tokens, attention = self.model.encode_with_attention(x)
            prob, obj = self.model.predict(tokens=tokens)
            agreement = (
                noise_agreement(
                    lambda t: self.model.predict(tokens=t)[0],
                    tokens,
                    prob,
                    self.threshold,
                    draws=self.nudges,
                )
                if self.nudges
                else torch.full((len(x),), float("nan"))
            )
        grid = tokens.float().reshape(len(x), *self.model.grid, -1)
        return Prediction(
            prob.float().cpu().numpy(),
            obj.float().cpu().numpy(),
            grid.cpu().numpy(),
            agreement.float().cpu().numpy(),
            attention.reshape(len(x), *self.model.grid).cpu().numpy(),
        )
