"""Typed, validated configuration: YAML defaults, `--set dotted.key=value` overrides.

Config flows one way: a YAML file sets defaults, command-line overrides replace
single keys, and the result is validated once (pydantic) and passed down. An
unknown key or a bad value fails with a message naming the key and what is
allowed, before any work starts.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, values are checked."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class BackboneConfig(Section):
    """Frozen self-supervised ViT that provides patch features."""

    name: str = Field(
        "vit_small_patch8_224.dino",
        description="Any timm ViT name; weights come from timm's hub unless `weights` is set.",
    )
    weights: str | None = Field(
        None,
        description="Local path or fsspec URI (s3://, gs://, file://) of safetensors or torch "
        "weights; None loads the hub weights of `name`.",
    )
    image_size: int = Field(
        448, ge=16, le=4096, description="Square input side in pixels, snapped to the patch size."
    )
    features: Literal["keys", "tokens"] = Field(
        "keys",
        description="Patch features POTNet clusters: last-block attention keys without their "
        "bias (`keys`), or the final normed patch tokens (`tokens`).",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="`auto`: CUDA when available, else CPU."
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="`auto`: bf16 autocast on CUDA, fp32 on CPU."
    )


class POTNetConfig(Section):
    """The POTNet pseudo-labeller (docs/method.md names each step)."""

    backend: Literal["auto", "numpy", "cupy"] = Field(
        "auto", description="Array backend: `auto` follows the features' device."
    )
    seed: Literal["attention", "ncut"] = Field("ncut", description="Step 0: seed classifier.")
    seed_tau: float = Field(0.2, ge=-1.0, le=1.0, description="ncut: affinity edge threshold.")
    seed_orientation: Literal["attention", "max_entry"] = Field(
        "attention",
        description="ncut: which side is foreground: more CLS attention (`attention`), or the "
        "side of the largest eigenvector entry (`max_entry`, TokenCut).",
    )
    select_tau: float = Field(
        0.5, gt=0.0, lt=1.0, description="Step 2: a patch joins class c when its CAM S_c > tau."
    )
    num_clusters: int = Field(3, ge=1, le=16, description="Step 3: K clusters per class.")
    clustering: Literal["dual", "kmeans", "spectral"] = Field(
        "dual", description="Step 3: both clusterings fused (paper), or one alone (ablation)."
    )
    fusion: Literal["smooth", "hard"] = Field(
        "smooth", description="Step 3: gamma-weighted blend (paper) or hard switch at eta_th."
    )
    eta_threshold: float = Field(0.5, ge=0.0, le=1.0, description="Hard fusion: switch point.")
    engine: Literal["native", "sklearn", "cuml"] = Field(
        "native", description="Clustering engine: batched array code, scikit-learn or cuML."
    )
    kmeans_iters: int = Field(20, ge=1, le=500)
    assign_temperature: float = Field(
        0.1, gt=0.0, description="Step 3: softmax temperature of the soft cluster assignments."
    )
    spectral_knn: int = Field(10, ge=2, le=256, description="Step 3: kNN of the affinity graph.")
    transport: bool = Field(
        True, description="Step 4: optimal transport (False: nearest prototype)."
    )
    reweight: bool = Field(True, description="Step 5: OT-mass re-weighting of prototype CAMs.")
    marginal: Literal["class_prior", "softmax"] = Field(
        "class_prior",
        description="Step 4: column marginal. `softmax`: over all (c, k) of cos(Z_ck, w_c); "
        "`class_prior`: each class gets its share of selected patches, split by that softmax.",
    )
    marginal_temperature: float = Field(
        0.1, gt=0.0, description="Step 4: softmax temperature of the prototype marginal."
    )
    ot_epsilon: float = Field(0.05, gt=0.0, description="Step 4: entropic regularisation.")
    ot_max_iters: int = Field(200, ge=1, le=10000)
    ot_tol: float = Field(1e-5, gt=0.0, description="Step 4: stop when marginal error < tol.")
    map_temperature: float = Field(
        0.1, gt=0.0, description="Step 5: temperature t of the prototype maps exp(cos / t)."
    )
    refine_steps: int = Field(0, ge=0, le=100, description="Step 6: gradient steps on w_fg.")
    refine_lr: float = Field(0.1, gt=0.0)
    max_pixels: int = Field(
        89_478_485, ge=1, description="Images with more pixels are refused (decompression bombs)."
    )

    @field_validator("engine")
    @classmethod
    def _engine_exists(cls, v: str) -> str:
        from autosod_ray.potnet.cluster import CLUSTER_ENGINES

        if v not in CLUSTER_ENGINES:
            raise ValueError(f"unknown engine {v!r}; choose one of {sorted(CLUSTER_ENGINES)}")
        return v


class StorageConfig(Section):
    """How to reach object stores; credentials come from the standard AWS / GCP chains."""

    endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint override (MinIO, moto, on-prem)."
    )
    anon: bool = Field(False, description="Anonymous access (public buckets).")

    def options(self, uri: str) -> dict:
        """fsspec storage options for `uri`."""
        if not uri.startswith(("s3://", "s3a://")):
            return {}
        opts: dict = {"anon": self.anon}
        if self.endpoint_url:
            opts["endpoint_url"] = self.endpoint_url
        return opts


class PipelineConfig(Section):
    """Ray Data stages: batch sizes, pool sizes, resources per stage."""

    read_batch_size: int = Field(32, ge=1, description="Images per read task batch.")
    decode_batch_size: int = Field(16, ge=1)
    decode_num_cpus: float = Field(1.0, gt=0)
    potnet_batch_size: int = Field(8, ge=1, description="Images per backbone + POTNet call.")
    pool_min: int = Field(1, ge=1, description="POTNet actor pool: fewest actors.")
    pool_max: int = Field(1, ge=1, description="POTNet actor pool: most actors (autoscaling).")
    num_gpus: float | Literal["auto"] = Field(
        "auto",
        description="GPUs per POTNet actor (fractions allowed); `auto`: 1 if the "
        "cluster has GPUs now, else 0 (CPU actors). Set it on autoscaling GPU clusters.",
    )
    num_cpus: float = Field(1.0, gt=0, description="CPUs per POTNet actor.")
    encode_batch_size: int = Field(16, ge=1)
    rows_per_file: int = Field(1000, ge=1, le=1_000_000, description="Most rows per Parquet file.")


class PseudolabelConfig(Section):
    """`jobs/pseudolabel.py`: label a dataset into Parquet shards."""

    input: str | None = Field(None, description="Folder / URI of images, or a manifest file.")
    output: str | None = Field(None, description="Folder / URI for masks/, errors/, run.json.")
    overwrite: bool = Field(False, description="Replace an output made with another config.")
    manifest_column: str = Field("uri", description="Manifest column that holds image URIs.")
    backbone: BackboneConfig = BackboneConfig()
    potnet: POTNetConfig = POTNetConfig()
    pipeline: PipelineConfig = PipelineConfig()
    storage: StorageConfig = StorageConfig()

    def labelling_hash(self) -> str:
        """Hash of what decides the masks (backbone + POTNet), not of resources or paths."""
        return config_hash({"backbone": self.backbone, "potnet": self.potnet})


class EvaluateConfig(Section):
    """`jobs/evaluate.py`: SOD metrics of predictions against ground-truth masks."""

    predictions: str | None = Field(
        None, description="pseudolabel / predict output (Parquet) or a folder of PNG maps."
    )
    ground_truth: str | None = Field(None, description="Folder / URI of mask PNGs (by stem).")
    output: str | None = Field(None, description="metrics.json path or URI.")
    batch_size: int = Field(16, ge=1, description="Pairs per scoring task.")
    storage: StorageConfig = StorageConfig()


class PreviewConfig(Section):
    """`jobs/preview.py`: a contact sheet of predictions."""

    predictions: str | None = Field(None, description="pseudolabel output or a folder of PNGs.")
    images: str | None = Field(None, description="Folder / URI of the images (matched by stem).")
    ground_truth: str | None = Field(None, description="Optional folder of mask PNGs.")
    output: str | None = Field(None, description="Sheet PNG path or URI.")
    n: int = Field(24, ge=1, le=500, description="Rows on the sheet.")
    worst: bool = Field(False, description="The lowest-IoU images (needs ground truth).")
    storage: StorageConfig = StorageConfig()


class ModelConfig(Section):
    """AutoSOD: ViT encoder, x2 pixel decoder, transformer decoder, mask and objectness heads."""

    num_queries: int = Field(10, ge=1, le=200, description="N_q learnable object queries.")
    decoder_layers: int = Field(6, ge=1, le=24, description="Transformer decoder layers.")
    width: int = Field(384, ge=16, description="Decoder width (queries, pixel features, MLPs).")
    heads: int = Field(8, ge=1, description="Attention heads in the decoder.")
    ffn_width: int = Field(1536, ge=16, description="Hidden width of the decoder FFN.")
    rank_weight: float = Field(
        1.0, ge=0.0, description="lambda: weight of the objectness ranking loss."
    )
    threshold: float = Field(0.5, gt=0.0, lt=1.0, description="Inference: mask threshold.")

    @field_validator("heads")
    @classmethod
    def _heads_divide_width(cls, v: int, info) -> int:
        width = info.data.get("width", 384)
        if width % v:
            raise ValueError(f"heads={v} must divide width={width}")
        return v


class OptimConfig(Section):
    """AdamW with linear warm-up and cosine decay, per-worker batches."""

    batch_size: int = Field(8, ge=1, description="Images per worker per step.")
    max_steps: int = Field(2000, ge=1, description="Optimiser steps in the whole run.")
    lr: float = Field(1e-4, gt=0.0, description="Peak learning rate of the decoder and heads.")
    encoder_lr: float = Field(1e-5, ge=0.0, description="Peak learning rate of the ViT encoder.")
    freeze_encoder: bool = Field(False, description="Keep the encoder fixed (no gradients).")
    weight_decay: float = Field(0.05, ge=0.0)
    warmup_steps: int = Field(100, ge=0, description="Linear warm-up from 0 to the peak.")
    min_lr_ratio: float = Field(0.01, ge=0.0, le=1.0, description="Cosine floor / peak.")
    grad_clip: float = Field(1.0, ge=0.0, description="Max global gradient norm; 0 disables.")


class AugmentConfig(Section):
    """CPU augmentation applied identically to the image and its pseudo-mask."""

    crop_scale: tuple[float, float] = Field(
        (0.5, 1.0), description="Random resized crop: area fraction range."
    )
    crop_ratio: tuple[float, float] = Field((0.75, 1.333), description="Aspect ratio range.")
    flip: bool = Field(True, description="Random horizontal flip.")
    color_jitter: float = Field(
        0.2, ge=0.0, le=1.0, description="Brightness / contrast / saturation jitter strength."
    )
    min_fg_fraction: float = Field(
        0.0, ge=0.0, le=1.0, description="Skip pseudo-masks with less foreground than this."
    )
    max_fg_fraction: float = Field(
        1.0, ge=0.0, le=1.0, description="Skip pseudo-masks with more foreground than this."
    )
    batch_size: int = Field(16, ge=1, description="Rows per augmentation task.")


class ScalingSection(Section):
    """Ray Train workers: one per GPU, or CPU workers on gloo."""

    num_workers: int = Field(1, ge=1, description="Data-parallel workers (DDP ranks).")
    use_gpu: bool | Literal["auto"] = Field(
        "auto", description="`auto`: GPUs when the cluster has them now."
    )
    cpus_per_worker: float = Field(1.0, gt=0)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_SPREAD"] = Field(
        "PACK", description="How workers are placed over nodes."
    )


class CheckpointSection(Section):
    """Checkpoints under <output>/checkpoints and retries after failures."""

    every_steps: int = Field(200, ge=1, description="Save every N optimiser steps (and at end).")
    keep_last: int = Field(3, ge=1, description="Keep the last k checkpoints.")
    max_failures: int = Field(3, ge=0, description="Worker-group restarts before giving up.")


class ValidationSection(Section):
    """Optional SOD metrics on a folder with ground truth, on rank 0."""

    images: str | None = Field(None, description="Folder / URI of validation images.")
    ground_truth: str | None = Field(None, description="Folder / URI of their mask PNGs.")
    every_steps: int = Field(0, ge=0, description="Validate every N steps; 0: only at the end.")
    limit: int = Field(100, ge=1, description="At most this many validation images.")


class TrainConfig(Section):
    """`jobs/train.py`: fit AutoSOD on pseudolabel output with Ray Train."""

    pseudo_masks: str | None = Field(
        None, description="pseudolabel output (its folder or its masks/ folder), local or URI."
    )
    output: str | None = Field(None, description="Folder / URI for checkpoints/, model/.")
    seed: int = Field(0, description="Seed of the model's initial weights.")
    log_every: int = Field(10, ge=1, description="Report metrics every N steps.")
    backbone: BackboneConfig = BackboneConfig()
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    augment: AugmentConfig = AugmentConfig()
    scaling: ScalingSection = ScalingSection()
    checkpoint: CheckpointSection = CheckpointSection()
    validation: ValidationSection = ValidationSection()
    storage: StorageConfig = StorageConfig()


class PredictConfig(Section):
    """`jobs/predict.py`: label images with a trained AutoSOD model."""

    model: str | None = Field(None, description="A train output's model/ folder (or URI).")
    input: str | None = Field(None, description="Folder / URI of images, or a manifest file.")
    output: str | None = Field(None, description="Folder / URI for masks/, errors/, run.json.")
    overwrite: bool = Field(False, description="Replace an output made with another model.")
    manifest_column: str = Field("uri", description="Manifest column that holds image URIs.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto")
    max_pixels: int = Field(89_478_485, ge=1, description="Refuse larger images (bombs).")
    pipeline: PipelineConfig = PipelineConfig()
    storage: StorageConfig = StorageConfig()


ConfigT = TypeVar("ConfigT", bound=BaseModel)


class ConfigError(ValueError):
    """A config file or override that does not validate; the message names the key."""


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: {key!r} is a value, not a section")
        node = child
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", value parsed as YAML: numbers, booleans, null, lists)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected dotted.key=value, e.g. potnet.num_clusters=3")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: empty key")
    return key, yaml.safe_load(raw) if raw.strip() else None


def _format_error(err: ValidationError, schema: type[BaseModel]) -> str:
    lines = [f"invalid {schema.__name__}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            parent = schema
            for part in e["loc"][:-1]:
                field = parent.model_fields.get(str(part))
                ann = field.annotation if field else None
                parent = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
                if parent is None:
                    break
            allowed = sorted(parent.model_fields) if parent else []
            lines.append(f"  {key}: unknown key; allowed keys here: {', '.join(allowed)}")
        else:
            lines.append(f"  {key}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def load_config(
    schema: type[ConfigT], path: str | Path | None = None, overrides: list[str] = ()
) -> ConfigT:
    """Read YAML `path` (optional), apply `overrides` ("dotted.key=value"), validate once."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
        tree = loaded
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    try:
        return schema.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_error(err, schema)) from None


def config_hash(config: BaseModel | dict[str, BaseModel]) -> str:
    """Stable short hash of a resolved config, or of several sections (sorted JSON)."""
    if isinstance(config, BaseModel):
        tree = config.model_dump(mode="json")
    else:
        tree = {name: part.model_dump(mode="json") for name, part in config.items()}
    blob = json.dumps(tree, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
