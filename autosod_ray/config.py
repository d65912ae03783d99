"""Typed, validated configuration: YAML defaults, `--set dotted.key=value` overrides.

Config flows one way: a YAML file sets defaults, command-line overrides replace
single keys, and the result is validated once (pydantic) and passed down. An
unknown key or a bad value fails with a message naming the key and what is
allowed, before any work starts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)

from autosod_ray.potnet.params import POTNetParams


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


# the largest image (in pixels) a job decodes unless told otherwise: a decompression-bomb guard
DEFAULT_MAX_PIXELS = 89_478_485


def _registry(name: str) -> dict:
    """POTNet's registries by the config key that names one of their entries."""
    from autosod_ray.potnet.cluster import CLUSTER_ENGINES, CLUSTERINGS, FUSIONS
    from autosod_ray.potnet.seeds import SEEDS
    from autosod_ray.potnet.transport import MARGINALS

    return {
        "seed": SEEDS,
        "clustering": CLUSTERINGS,
        "fusion": FUSIONS,
        "engine": CLUSTER_ENGINES,
        "marginal": MARGINALS,
    }[name]


_P = POTNetParams()  # the method's defaults live in one place: potnet/params.py


class POTNetConfig(Section):
    """The POTNet pseudo-labeller (docs/method.md names each step)."""

    backend: Literal["auto", "numpy", "cupy"] = Field(
        "auto", description="Array backend: `auto` follows the features' device."
    )
    seed: str = Field(_P.seed, description="Step 0: seed classifier (`ncut`, `attention`).")
    seed_tau: float = Field(_P.seed_tau, ge=-1.0, le=1.0, description="ncut: affinity threshold.")
    seed_orientation: Literal["attention", "max_entry"] = Field(
        _P.seed_orientation,
        description="ncut: which side is foreground: more CLS attention (`attention`), or the "
        "side of the largest eigenvector entry (`max_entry`, TokenCut).",
    )
    select_tau: float = Field(
        _P.select_tau,
        gt=0.0,
        lt=1.0,
        description="Step 2: a patch joins class c when its CAM S_c > tau.",
    )
    num_clusters: int = Field(_P.num_clusters, ge=1, le=16, description="Step 3: K per class.")
    clustering: str = Field(
        _P.clustering,
        description="Step 3: `dual` (k-means and spectral, fused: the paper), or `kmeans` / "
        "`spectral` alone (ablations).",
    )
    fusion: str = Field(
        _P.fusion,
        description="Step 3: `smooth` (gamma-weighted blend, the paper) or `hard` (switch at "
        "eta_threshold).",
    )
    eta_threshold: float = Field(
        _P.eta_threshold, ge=0.0, le=1.0, description="Hard fusion: switch point."
    )
    engine: str = Field(
        _P.engine,
        description="Clustering engine: `native` (batched numpy / cupy), `sklearn`, `cuml`.",
    )
    kmeans_iters: int = Field(_P.kmeans_iters, ge=1, le=500)
    assign_temperature: float = Field(
        _P.assign_temperature,
        gt=0.0,
        description="Step 3: temperature of the soft cluster assignments (both clusterings).",
    )
    spectral_knn: int = Field(
        _P.spectral_knn, ge=2, le=256, description="Step 3: kNN of the affinity graph."
    )
    transport: bool = Field(
        _P.transport, description="Step 4: optimal transport (False: nearest prototype)."
    )
    reweight: bool = Field(
        _P.reweight, description="Step 5: OT-mass re-weighting of prototype CAMs."
    )
    marginal: str = Field(
        _P.marginal,
        description="Step 4: column marginal. `softmax`: over all (c, k) of cos(Z_ck, w_c); "
        "`class_prior`: each class gets its share of selected patches, split by that softmax.",
    )
    marginal_temperature: float = Field(
        _P.marginal_temperature,
        gt=0.0,
        description="Step 4: softmax temperature of the prototype marginal (1: the paper's "
        "plain softmax).",
    )
    ot_epsilon: float = Field(_P.ot_epsilon, gt=0.0, description="Step 4: entropic regulariser.")
    ot_max_iters: int = Field(_P.ot_max_iters, ge=1, le=10000)
    ot_tol: float = Field(
        _P.ot_tol, gt=0.0, description="Step 4: stop when the row-marginal L1 error < tol."
    )
    map_temperature: float = Field(
        _P.map_temperature,
        gt=0.0,
        description="Step 5: temperature t of the prototype maps exp(cos / t).",
    )
    refine_steps: int = Field(
        _P.refine_steps,
        ge=0,
        le=100,
        description="Step 6: gradient steps of L_con on the prototypes and w_fg (0: none).",
    )
    refine_lr: float = Field(_P.refine_lr, gt=0.0, description="Step 6: SGD step size.")
    border_prior: Literal["none", "prototypes", "saliency"] = Field(
        _P.border_prior,
        description="Boundary prior (objects seldom fill the image border; docs/method.md): "
        "`prototypes` moves foreground prototypes on border-connected regions to the "
        "background before step 5; `saliency` damps the final map by 1 - w_bg; `none`.",
    )
    border_sigma: float = Field(
        _P.border_sigma, gt=0.0, description="Boundary prior: geodesic scale of a region."
    )
    border_threshold: float = Field(
        _P.border_threshold,
        ge=0.0,
        le=1.0,
        description="Boundary prior `prototypes`: the background probability above which a "
        "foreground prototype moves to the background.",
    )
    max_pixels: int = Field(
        DEFAULT_MAX_PIXELS,
        ge=1,
        description="Images with more pixels are refused (decompression bombs).",
    )

    @field_validator("seed", "clustering", "fusion", "engine", "marginal")
    @classmethod
    def _registered(cls, v: str, info) -> str:
        names = _registry(info.field_name)
        if v not in names:
            raise ValueError(f"unknown {info.field_name} {v!r}; choose one of {sorted(names)}")
        return v

    def params(self) -> POTNetParams:
        """The plain parameters POTNet runs on (everything but backend and input guards)."""
        return POTNetParams(**{f: getattr(self, f) for f in POTNetParams.__dataclass_fields__})


def redact_url(url: str) -> str:
    """`url` with its credentials (`user:password@`) replaced by `***@`. Everything up to the
    last `@` before any query goes, so a password with an unescaped `/` goes too."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    ends = [i for i in (rest.find(c) for c in "?#") if i >= 0]
    head, tail = rest[: min(ends, default=len(rest))], rest[min(ends, default=len(rest)) :]
    if "@" not in head:
        return url
    return f"{scheme}{sep}***@{head.rpartition('@')[2]}{tail}"


def redact_text(text: str) -> str:
    """Free text (an error message) with every URL's `user:password@` replaced by `***@`."""
    return re.sub(r"[A-Za-z][A-Za-z0-9+.-]*://\S+", lambda m: redact_url(m.group(0)), text)


class StorageConfig(Section):
    """How to reach object stores; credentials come from the standard AWS / GCP chains.

    An endpoint URL is never shown with credentials in it: its dumps (run.json, train.json)
    and its repr hold `***@` where a `user:password@` was; `options` passes it on as given.
    """

    endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint override (MinIO, moto, on-prem)."
    )
    anon: bool = Field(False, description="Anonymous access (public buckets).")

    @field_serializer("endpoint_url")
    def _redact_endpoint(self, url: str | None) -> str | None:
        return None if url is None else redact_url(url)

    def __repr_args__(self):
        for name, value in super().__repr_args__():
            yield name, redact_url(value) if name == "endpoint_url" and value else value

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
    max_error_fraction: float = Field(
        0.05,
        ge=0.0,
        le=1.0,
        description="Stop the run when more than this share of the images a model actor "
        "labelled failed inside our code (`internal` errors; at least 4 of them): a bug, "
        "not bad input, so the rest would fail too.",
    )
    progress_every_s: float = Field(
        10.0,
        gt=0,
        description="Seconds between progress lines in a log (a terminal gets a live line).",
    )
    max_attempts: int = Field(
        3,
        ge=1,
        le=100,
        description="Runs an image may fail for a passing reason (`transient`: I/O, out of "
        "memory) before its error becomes `permanent` and reruns stop trying it.",
    )

    @model_validator(mode="after")
    def _pool_bounds(self) -> PipelineConfig:
        if self.pool_min > self.pool_max:
            raise ValueError(
                f"pipeline.pool_min ({self.pool_min}) is above pipeline.pool_max "
                f"({self.pool_max}); the actor pool scales between them"
            )
        return self


class RefineSection(Section):
    """Edge-aware refinement of each mask before it is cut at its image's size
    (autosod_ray/edge_refine.py), in pseudolabel and predict alike."""

    method: Literal["guided", "none"] = Field(
        "guided",
        description="guided: the guided filter moves the mask's edges onto the image's; "
        "none: the grid's map, upsampled.",
    )
    radius: float = Field(
        1 / 32,
        gt=0,
        le=0.25,
        description="Filter window half-width, as a share of the input side (1/32: 14 px at "
        "448, two cells of AutoSOD's 64 x 64 grid, one of POTNet's 32 x 32 patches).",
    )
    eps: float = Field(1e-3, gt=0, description="Colour variance below which a window is flat.")

    def settings(self) -> dict:
        """What of it decides the masks, for a job's config_hash: nothing when off, so
        outputs made before the refinement existed keep their hash."""
        return {} if self.method == "none" else {"refine": self.model_dump(mode="json")}


class PseudolabelConfig(Section):
    """`jobs/pseudolabel.py`: label a dataset into Parquet shards."""

    input: str | None = Field(None, description="Folder / URI of images, or a manifest file.")
    output: str | None = Field(None, description="Folder / URI for masks/, errors/, run.json.")
    overwrite: bool = Field(False, description="Replace an output made with another config.")
    force_unlock: bool = Field(
        False, description="Take the output's lease from a run that looks alive (if it is dead)."
    )
    manifest_column: str = Field("uri", description="Manifest column that holds image URIs.")
    report: bool = Field(True, description="Write <output>/report.html at the end of the run.")
    backbone: BackboneConfig = BackboneConfig()
    potnet: POTNetConfig = POTNetConfig()
    refine: RefineSection = RefineSection()
    pipeline: PipelineConfig = PipelineConfig()
    storage: StorageConfig = StorageConfig()

    def labelling_settings(self, weights_sha256: str | None) -> dict:
        """What decides the masks, hashed into `config_hash`: the backbone (the weights by
        their content, not their path; not the device it runs on) and the parameters
        POTNet runs on; not resources, paths or input guards (max_pixels)."""
        return {
            "backbone": self.backbone.model_dump(mode="json", exclude={"device", "weights"}),
            "weights_sha256": weights_sha256,
            "potnet": dataclasses.asdict(self.potnet.params()),
            **self.refine.settings(),
        }


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


class ReportConfig(Section):
    """`jobs/report.py`: one static HTML page about a pseudolabel / predict output."""

    predictions: str | None = Field(None, description="pseudolabel / predict output folder.")
    images: str | None = Field(
        None, description="Folder / URI of the images by stem (default: each row's source_uri)."
    )
    ground_truth: str | None = Field(None, description="Optional folder of mask PNGs (by stem).")
    output: str | None = Field(
        None, description="report .html path, or a folder for report.html; default: in the run."
    )
    thumbnails: int = Field(24, ge=1, le=200, description="Thumbnails per gallery.")
    thumbnail_px: int = Field(160, ge=32, le=512, description="Longest side of a thumbnail.")
    empty_fg_fraction: float = Field(
        0.005, ge=0.0, le=1.0, description="No object: masks covering less than this share."
    )
    background_fg_fraction: float = Field(
        0.9, ge=0.0, le=1.0, description="No object: masks covering more (background taken)."
    )
    low_quality: float = Field(
        0.4,
        ge=0.0,
        le=1.0,
        description="No object (or a wrong one): quality below this (README: it flags 50% of "
        "object-free crops and 2.8% of ECSSD's masks, whose mean IoU is 0.29).",
    )
    diffuse_attention: float = Field(
        0.8,
        gt=0.0,
        description="No object: the image's CLS attention on its border over its mean at or "
        'above this (README "No salient object": chosen for DINOv2 ViT-S/14 at 448 px).',
    )
    min_object_fraction: float = Field(
        0.005, gt=0.0, le=1.0, description="Several objects: pieces of at least this share."
    )
    object_scan_limit: int = Field(
        5000, ge=0, description="Count objects in whole shard files up to this many masks."
    )
    ray_above: int = Field(
        2000, ge=0, description="Runs with more masks decode them in Ray tasks (one per shard)."
    )
    storage: StorageConfig = StorageConfig()


class ExportConfig(Section):
    """`jobs/export.py`: a pseudolabel / predict output as COCO, a PNG folder or HF Parquet."""

    predictions: str | None = Field(
        None, description="pseudolabel / predict output (with masks/ and run.json) or masks/."
    )
    output: str | None = Field(
        None, description="coco: the JSON file; png / hf: a new or empty folder (path or URI)."
    )
    format: Literal["coco", "png", "hf"] = Field(
        "coco",
        description="`coco`: instances JSON, one RLE annotation per connected object; `png`: "
        "one PNG per image; `hf`: Parquet whose masks load as images in Hugging Face datasets.",
    )
    min_area: int = Field(
        64, ge=1, description="coco: connected objects of fewer pixels are left out."
    )
    min_quality: float = Field(
        0.0, ge=0.0, le=1.0, description="Leave out masks whose `quality` is below this."
    )
    top_fraction: float = Field(
        1.0,
        gt=0.0,
        le=1.0,
        description="Keep this best fraction of the masks by `quality` (1: all); as train's "
        "data.keep_top_fraction.",
    )
    file_name: Literal["image_id", "source_uri"] = Field(
        "image_id",
        description="coco: what `file_name` holds: the image id (the path relative to the "
        "labelled folder; join it with that folder) or the URI the image was read from.",
    )
    png_layout: Literal["flat", "tree"] = Field(
        "flat",
        description="png: `flat`: <stem>.png in one folder, as SOD tools read them (two images "
        "of one stem are refused); `tree`: the image id's sub-folders kept, <id less ext>.png.",
    )
    png_map: Literal["mask", "saliency"] = Field(
        "mask", description="png: the binary mask (0/255) or the soft saliency map (uint8)."
    )
    with_images: bool = Field(
        False, description="hf: embed each image's bytes (read from source_uri) as `image`."
    )
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
    pixel_decoder: Literal["upsample_project", "project_upsample"] = Field(
        "upsample_project",
        description="Order of the pixel decoder's steps: `upsample_project` (the paper's: "
        "bilinear x2, then the projection at 2h x 2w) or `project_upsample` (the projection "
        "on the token grid, then x2: a quarter of the projection's FLOPs, masks made of "
        "h x w logits upsampled).",
    )

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
    batch_size: int = Field(16, ge=1, description="Rows per augmentation task.")


class DataSection(Section):
    """Which pseudo-masks train the model (filters applied before any training)."""

    min_fg_fraction: float = Field(
        0.0, ge=0.0, le=1.0, description="Skip pseudo-masks with less foreground than this."
    )
    max_fg_fraction: float = Field(
        1.0, ge=0.0, le=1.0, description="Skip pseudo-masks with more foreground than this."
    )
    min_quality: float = Field(
        0.0, ge=0.0, le=1.0, description="Skip pseudo-masks whose `quality` is below this."
    )
    keep_top_fraction: float = Field(
        1.0,
        gt=0.0,
        le=1.0,
        description="Train on this best fraction of the pseudo-masks by `quality` (1: all).",
    )
    cache_tokens: bool = Field(
        False,
        description="With a frozen encoder: encode each image (and its mirror) once into a "
        "token cache, and train the decoder on the cached tokens (no crop or colour jitter).",
    )
    token_cache: str | None = Field(
        None, description="Where the token cache lives (default <output>/token_cache)."
    )
    shuffle_buffer: int = Field(
        256, ge=0, description="Rows each worker shuffles among before batching (0: none)."
    )

    @property
    def filters_quality(self) -> bool:
        return self.min_quality > 0 or self.keep_top_fraction < 1


class ScalingSection(Section):
    """Ray Train workers: one per GPU, or CPU workers on gloo."""

    num_workers: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto",
        description="Data-parallel workers (DDP ranks); `auto`: one per GPU in the cluster now, "
        "one on a CPU cluster.",
    )
    use_gpu: bool | Literal["auto"] = Field(
        "auto", description="`auto`: GPUs when the cluster has them now."
    )
    cpus_per_worker: Annotated[float, Field(gt=0)] | Literal["auto"] = Field(
        "auto",
        description="CPUs per worker; `auto`: the cluster's CPUs, less one for data ingest, "
        "shared by the workers.",
    )
    torch_threads: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto",
        description="torch threads per worker (and per token-cache encoder); `auto`: its CPUs, "
        "plus its share of the data CPU when training on cached tokens (light to read).",
    )
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
    force_unlock: bool = Field(
        False, description="Take the output's lease from a run that looks alive (if it is dead)."
    )
    overwrite: bool = Field(
        False,
        description="Replace a training in --output made from other pseudo-masks, weights or "
        "settings (its checkpoints, model and train.json).",
    )
    seed: int = Field(0, description="Seed of the model's initial weights.")
    log_every: int = Field(10, ge=1, description="Report metrics every N steps.")
    max_pixels: int = Field(
        DEFAULT_MAX_PIXELS, ge=1, description="Training images with more pixels are skipped."
    )
    backbone: BackboneConfig = BackboneConfig()
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    data: DataSection = DataSection()
    augment: AugmentConfig = AugmentConfig()
    scaling: ScalingSection = ScalingSection()
    checkpoint: CheckpointSection = CheckpointSection()
    validation: ValidationSection = ValidationSection()
    storage: StorageConfig = StorageConfig()

    @model_validator(mode="after")
    def _cached_tokens_need_a_frozen_encoder(self) -> TrainConfig:
        if self.data.cache_tokens and not self.optim.freeze_encoder:
            raise ValueError(
                "data.cache_tokens needs optim.freeze_encoder: true (cached tokens cannot "
                "train the encoder)"
            )
        return self


class PredictConfig(Section):
    """`jobs/predict.py`: label images with a trained AutoSOD model."""

    model: str | None = Field(None, description="A train output's model/ folder (or URI).")
    input: str | None = Field(None, description="Folder / URI of images, or a manifest file.")
    output: str | None = Field(None, description="Folder / URI for masks/, errors/, run.json.")
    overwrite: bool = Field(False, description="Replace an output made with another model.")
    force_unlock: bool = Field(
        False, description="Take the output's lease from a run that looks alive (if it is dead)."
    )
    manifest_column: str = Field("uri", description="Manifest column that holds image URIs.")
    report: bool = Field(True, description="Write <output>/report.html at the end of the run.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto")
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1, description="Refuse larger images (bombs).")
    refine: RefineSection = RefineSection()
    pipeline: PipelineConfig = PipelineConfig()
    storage: StorageConfig = StorageConfig()


class SelfTrainConfig(Section):
    """`jobs/selftrain.py`: students relabel the images and new students train on the masks
    they are surest of (autosod_ray/selftrain.py); `train` and `predict` are the two jobs'
    configs, their paths set by each round."""

    input: str | None = Field(None, description="The images the pseudo-masks are of (to relabel).")
    pseudo_masks: str | None = Field(None, description="POTNet's pseudolabel output (round 0).")
    output: str | None = Field(
        None, description="Folder / URI for student-<k>/, labels-<k>/, selftrain.json."
    )
    rounds: int = Field(
        1, ge=0, le=10, description="Relabel-and-retrain rounds after the first student."
    )
    force_unlock: bool = Field(
        False, description="Take each step's lease from a run that looks alive (if it is dead)."
    )
    overwrite: bool = Field(
        False,
        description="Replace a step's output made from other inputs or settings (a student "
        "retrained on changed masks, labels of a changed student).",
    )
    train: TrainConfig = TrainConfig()
    predict: PredictConfig = PredictConfig()
    storage: StorageConfig = Field(
        StorageConfig(), description="How every step reaches object stores (set here only)."
    )

    @model_validator(mode="after")
    def _paths_are_the_rounds(self) -> SelfTrainConfig:
        given = [
            f"{section}.{key}"
            for section, keys in (
                ("train", ("pseudo_masks", "output", "storage", "force_unlock", "overwrite")),
                ("predict", ("model", "input", "output", "storage", "force_unlock", "overwrite")),
            )
            for key in keys
            if key in getattr(self, section).model_fields_set
        ]
        if given:
            raise ValueError(
                f"{', '.join(given)}: each round sets these (its paths under --output, the "
                "top-level storage, force_unlock and overwrite); give --input, --pseudo-masks, "
                "--output and those top-level keys instead"
            )
        return self


ConfigT = TypeVar("ConfigT", bound=BaseModel)


class UserError(Exception):
    """A mistake in what the user asked for (config, input, output, resources): the jobs
    print its message alone and exit 2. Anything else is a bug and keeps its traceback."""


class ConfigError(UserError, ValueError):
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
    if not raw.strip():
        return key, None
    try:
        return key, yaml.safe_load(raw)
    except yaml.YAMLError:
        raise ConfigError(
            f"--set {text!r}: the value is not a YAML scalar or list; quote it"
        ) from None


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
    schema: type[ConfigT],
    path: str | Path | None = None,
    overrides: list[str] = (),
    flags: dict[str, Any] | None = None,
) -> ConfigT:
    """Read YAML `path` (optional), apply `overrides` ("dotted.key=value", the value a YAML
    scalar), then `flags` (dotted key -> value, taken as given: a path stays a string),
    and validate once."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ConfigError(
                f"config file {str(path)!r} is not valid YAML:{where}: {problem}"
            ) from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
        tree = loaded
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    for key, value in (flags or {}).items():
        _set_dotted(tree, key, value)
    try:
        return schema.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_error(err, schema)) from None


def config_hash(config: BaseModel | dict[str, Any]) -> str:
    """Stable short hash of a resolved config, or of named sections and plain values."""
    if isinstance(config, BaseModel):
        tree = config.model_dump(mode="json")
    else:
        tree = {
            name: part.model_dump(mode="json") if isinstance(part, BaseModel) else part
            for name, part in config.items()
        }
    blob = json.dumps(tree, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
