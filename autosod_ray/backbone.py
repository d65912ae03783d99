"""Frozen self-supervised ViT backbone (timm) that yields POTNet's patch features.

One place for checkpoint surgery: `load_weights` reads a local path or fsspec
URI (safetensors or torch, `weights_only=True`), unwraps DINO / DINOv2 / Ray
checkpoint containers and hands the state dict to timm's own filter, which
renames keys and resizes position embeddings for the model.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass

import fsspec
import numpy as np
import torch
import torch.nn.functional as F

from .config import BackboneConfig, UserError

_WRAPPERS = ("teacher", "student", "model", "state_dict", "module")
_PREFIXES = ("module.", "backbone.", "encoder.")


class BackboneError(UserError, ValueError):
    """A backbone name or weights file that cannot give the configured ViT."""


class WeightsNotFound(UserError, FileNotFoundError):
    """Backbone weights that are not where the config says (or a hub that cannot be reached)."""


def missing_weights(uri: str) -> WeightsNotFound:
    return WeightsNotFound(
        f"backbone.weights: no file at {uri!r}; give a local path or URI of safetensors or "
        "torch weights, or leave it empty to use timm's hub weights"
    )


def read_state_dict(uri: str, storage_options: dict | None = None) -> dict[str, torch.Tensor]:
    """Weights file at a local path or fsspec URI -> float32 state dict."""
    try:
        with fsspec.open(uri, "rb", **(storage_options or {})) as fh:
            blob = fh.read()
    except FileNotFoundError:
        raise missing_weights(uri) from None
    try:
        if blob[8:9] == b"{":  # safetensors: 8-byte header length, then a JSON header
            from safetensors.torch import load

            state = load(blob)
        else:
            state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise TypeError(f"it holds a {type(state).__name__}, not a state dict")
    except Exception as err:  # noqa: BLE001 - whatever the parsers say of a bad file
        raise BackboneError(
            f"weights {uri!r} are not a readable safetensors or torch state dict "
            f"({type(err).__name__}: {str(err)[:200]}); give a weights file"
        ) from None
    for key in _WRAPPERS:  # DINO saves {"teacher": ...}, others {"model": ...}
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    out = {}
    for name, tensor in state.items():
        for prefix in _PREFIXES:
            name = name.removeprefix(prefix)
        out[name] = tensor.float() if tensor.is_floating_point() else tensor
    return out


def load_weights(model: torch.nn.Module, uri: str, storage_options: dict | None = None) -> None:
    """Load a checkpoint into a timm ViT, strictly (every key must match)."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    hint = "; pick the timm model (backbone.name) these weights belong to"
    try:
        state = checkpoint_filter_fn(read_state_dict(uri, storage_options), model)
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise BackboneError(
            f"backbone.weights {uri!r} does not fit backbone.name: {err}{hint}"
        ) from None
    if missing or unexpected:
        raise BackboneError(
            f"backbone.weights {uri!r} does not fit backbone.name: missing keys {missing[:5]}, "
            f"unexpected keys {unexpected[:5]}{hint}"
        )


def _timm_vit(name: str, pretrained: bool) -> torch.nn.Module:
    import timm

    try:
        model = timm.create_model(name, pretrained=pretrained, num_classes=0, dynamic_img_size=True)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise BackboneError(f"backbone.name {name!r} is not a timm model: {err}") from None
        raise
    except TypeError:  # a timm model without ViT arguments (a CNN, say)
        raise BackboneError(f"backbone.name {name!r} is not a ViT; pick a timm ViT") from None
    if not hasattr(model, "blocks") or not hasattr(model, "patch_embed"):
        raise BackboneError(f"backbone.name {name!r} is not a ViT (no patch_embed/blocks)")
    return model


def create_vit(
    name: str, weights: str | None, storage_options: dict | None = None
) -> torch.nn.Module:
    """timm ViT by name; hub weights unless `weights` names a local path or URI."""
    model = _timm_vit(name, pretrained=weights is None)
    if weights is not None:
        load_weights(model, weights, storage_options)
    return model.eval().requires_grad_(False)


def snap_to_patch(size: int, patch: int) -> int:
    """Input side rounded to a whole number of patches."""
    return max(1, round(size / patch)) * patch


def vit_geometry(cfg: BackboneConfig) -> tuple[int, int]:
    """(input side, patch size) of the configured backbone, without loading any weights."""
    patch = int(_timm_vit(cfg.name, pretrained=False).patch_embed.patch_size[0])
    return snap_to_patch(cfg.image_size, patch), patch


def _hub_source(name: str) -> tuple[str | None, str | None]:
    """(Hugging Face repo id, download URL) timm fetches `name`'s weights from."""
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        return None, None
    return cfg.hf_hub_id, cfg.url


def hub_reachable(url: str, timeout: float = 2.0) -> bool:
    """Whether `url`'s host answers at all within `timeout` s (any HTTP status will do)."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout)
    except urllib.error.HTTPError:
        return True  # it answered
    except (OSError, ValueError):
        return False
    return True


def _cached_on_hub(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return any(
        isinstance(try_to_load_from_cache(repo_id, f), str)
        for f in ("model.safetensors", "pytorch_model.bin")
    )


def check_backbone(cfg: BackboneConfig, storage_options: dict | None = None) -> None:
    """Fail early, with a clear message, when the backbone weights cannot be had.

    A weights path or URI is loaded here, on the driver, into the configured ViT, exactly
    as the actors will load it (a missing, unreadable or mismatched file fails now, not
    in every actor). Hub weights must be in the local cache, or the hub must answer within
    two seconds (no network is found at once, not after the hub client's retries); then
    they are fetched once here, into the cache the workers reuse.
    """
    if cfg.weights:
        create_vit(cfg.name, cfg.weights, storage_options)
        return
    _timm_vit(cfg.name, pretrained=False)  # a bad name fails here, with its own message
    repo_id, url = _hub_source(cfg.name)
    source = "https://huggingface.co" if repo_id else url
    offline = f"backbone.weights is empty, so the weights of {cfg.name!r} come from timm's hub"
    fix = "; without internet, set backbone.weights to a local path or URI (see README, 'Offline')"
    cached = bool(repo_id) and _cached_on_hub(repo_id)
    if source and not cached and not hub_reachable(source):
        raise WeightsNotFound(f"{offline}, and {source} cannot be reached{fix}")
    try:
        _timm_vit(cfg.name, pretrained=True)
    except BackboneError:
        raise
    except Exception as err:  # noqa: BLE001 - any hub or network failure
        raise WeightsNotFound(f"{offline}, which failed ({type(err).__name__}){fix}") from None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise BackboneError("backbone.device=cuda but no CUDA device is visible; use auto or cpu")
    return torch.device(name)


@dataclass
class BackboneOutput:
    """Last-block features of a batch, each B x N x D (unit rows) or B x N, on the device."""

    keys: torch.Tensor | None  # attention keys with the key bias removed
    tokens: torch.Tensor | None  # final normed patch tokens
    cls_attention: torch.Tensor  # CLS-to-patch attention of the last block, mean over heads
    grid: tuple[int, int]


def cls_attention_of(attn: torch.nn.Module, y: torch.Tensor, prefix: int) -> torch.Tensor:
    """A timm ViT block's attention module and its normed input y (B x T x C, `prefix`
    CLS / register tokens first) -> the CLS token's attention over the patch tokens, mean
    over heads (B x N float32)."""
    b, t, _ = y.shape
    qkv = attn.qkv(y).reshape(b, t, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    cls = (q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)  # B x heads x 1 x T
    return cls.float().softmax(-1)[:, :, 0, prefix:].mean(1)


class ViTFeatures(torch.nn.Module):
    """timm ViT -> last-block keys (bias removed), tokens and CLS attention, batched."""

    def __init__(
        self,
        cfg: BackboneConfig,
        model: torch.nn.Module | None = None,
        storage_options: dict | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        if model is None:
            model = create_vit(cfg.name, cfg.weights, storage_options)
        self.model = model
        self.patch_size = int(self.model.patch_embed.patch_size[0])
        # input side snapped to a multiple of the patch size
        self.image_size = snap_to_patch(cfg.image_size, self.patch_size)
        self.device = resolve_device(cfg.device)
        self.model.to(self.device)
        data_cfg = self.model.pretrained_cfg
        self.register_buffer("mean", torch.tensor(data_cfg.get("mean", (0.485, 0.456, 0.406))))
        self.register_buffer("std", torch.tensor(data_cfg.get("std", (0.229, 0.224, 0.225))))
        self.mean, self.std = self.mean.to(self.device), self.std.to(self.device)
        bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and self.device.type == "cuda")
        self.autocast_dtype = torch.bfloat16 if bf16 else None

    @property
    def grid(self) -> tuple[int, int]:
        side = self.image_size // self.patch_size
        return side, side

    def preprocess(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """B x H x W x 3 uint8 (any H, W) -> B x 3 x S x S normalised float on the device."""
        if isinstance(images, np.ndarray) and not images.flags.writeable:
            images = images.copy()  # torch cannot wrap read-only memory (e.g. Arrow buffers)
        x = torch.as_tensor(images).to(self.device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size,) * 2, mode="bilinear", antialias=True)
        return (x - self.mean[:, None, None]) / self.std[:, None, None]

    @torch.inference_mode()
    def forward(self, images, features: tuple[str, ...] = ("keys", "tokens")) -> BackboneOutput:
        m = self.model
        x = self.preprocess(images)
        ctx = (
            torch.autocast(self.device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype
            else contextlib.nullcontext()
        )
        with ctx:
            x = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))
            for blk in m.blocks[:-1]:
                x = blk(x)
            last, prefix = m.blocks[-1], m.num_prefix_tokens
            y = last.norm1(x)
            cls_attention = cls_attention_of(last.attn, y, prefix)
            keys = tokens = None
            if "keys" in features:
                # the key bias adds the same term to every logit of a query, so attention
                # ignores it, but it dominates cosine similarity between keys: drop it
                c = y.shape[-1]
                w_k = last.attn.qkv.weight[c : 2 * c]
                keys = F.normalize(F.linear(y[:, prefix:], w_k).float(), dim=-1)
            if "tokens" in features:
                tokens = F.normalize(m.norm(last(x))[:, prefix:].float(), dim=-1)
        return BackboneOutput(keys=keys, tokens=tokens, cls_attention=cls_attention, grid=self.grid)
