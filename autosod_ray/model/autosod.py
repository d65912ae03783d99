"""The AutoSOD network (docs/method.md, "AutoSOD").

    image -> ViT encoder tokens (B x N x D)
          -> pixel decoder: bilinear x2 + light projection   (B x C x 2h x 2w)
          -> transformer decoder: N_q queries, L layers       (L x B x Q x C)
          -> per layer: mask logits <q_i, pixel feature>      (L x B x Q x 2h x 2w)
                        objectness logits MLP(q_i)            (L x B x Q)

Inference keeps the last layer's mask of the query with the highest objectness.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..backbone import _timm_vit, cls_attention_of, load_weights, snap_to_patch
from ..config import BackboneConfig, ModelConfig


@dataclass
class AutoSODOutput:
    mask_logits: torch.Tensor  # L x B x Q x H x W, H x W = 2 x the patch grid
    objectness_logits: torch.Tensor  # L x B x Q


class PixelDecoder(nn.Module):
    """B x D x h x w encoder map -> B x C x 2h x 2w pixel features: bilinear x2 and a light
    projection, in the configured order (`model.pixel_decoder`; same weights either way)."""

    def __init__(self, in_dim: int, width: int, order: str = "upsample_project"):
        super().__init__()
        self.project_first = order == "project_upsample"
        self.proj = nn.Sequential(
            nn.Conv2d(in_dim, width, 1),
            nn.GroupNorm(math.gcd(32, width), width),
            nn.GELU(),
            nn.Conv2d(width, width, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.project_first:  # the projection at h x w: a quarter of its cost
            return F.interpolate(self.proj(x), scale_factor=2, mode="bilinear", align_corners=False)
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        return self.proj(x)


class DecoderLayer(nn.Module):
    """Queries attend to the encoder tokens, then to each other, then an FFN (post-norm)."""

    def __init__(self, width: int, heads: int, ffn_width: int):
        super().__init__()
        self.cross = nn.MultiheadAttention(width, heads, batch_first=True)
        self.self_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ffn = nn.Sequential(
            nn.Linear(width, ffn_width), nn.GELU(), nn.Linear(ffn_width, width)
        )
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(3))

    def forward(self, q: torch.Tensor, pos: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        q = self.norms[0](q + self.cross(q + pos, memory, memory, need_weights=False)[0])
        k = q + pos
        q = self.norms[1](q + self.self_attn(k, k, q, need_weights=False)[0])
        return self.norms[2](q + self.ffn(q))


def mlp(width: int, out: int, layers: int) -> nn.Sequential:
    """`layers` linear layers of hidden width `width` with ReLU between them."""
    mods: list[nn.Module] = []
    for i in range(layers):
        mods.append(nn.Linear(width, out if i == layers - 1 else width))
        if i < layers - 1:
            mods.append(nn.ReLU())
    return nn.Sequential(*mods)


class AutoSOD(nn.Module):
    """ViT encoder + pixel decoder + query decoder + mask / objectness heads."""

    def __init__(self, encoder: nn.Module, cfg: ModelConfig, image_size: int):
        super().__init__()
        self.cfg = cfg
        self.encoder = encoder
        self.patch_size = int(encoder.patch_embed.patch_size[0])
        self.image_size = snap_to_patch(image_size, self.patch_size)
        data_cfg = getattr(encoder, "pretrained_cfg", None) or {}
        self.register_buffer("mean", torch.tensor(data_cfg.get("mean", (0.485, 0.456, 0.406))))
        self.register_buffer("std", torch.tensor(data_cfg.get("std", (0.229, 0.224, 0.225))))
        dim, w = encoder.embed_dim, cfg.width
        self.pixel_decoder = PixelDecoder(dim, w, cfg.pixel_decoder)
        self.memory_proj = nn.Linear(dim, w)
        self.query_feat = nn.Embedding(cfg.num_queries, w)
        self.query_pos = nn.Embedding(cfg.num_queries, w)
        self.layers = nn.ModuleList(
            DecoderLayer(w, cfg.heads, cfg.ffn_width) for _ in range(cfg.decoder_layers)
        )
        self.query_norm = nn.LayerNorm(w)
        self.mask_embed = nn.Linear(w, w)
        self.objectness = mlp(w, 1, layers=3)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """B x H x W x 3 uint8 -> B x 3 x H x W float, normalised like the encoder's training."""
        x = images.permute(0, 3, 1, 2).float().div(255.0)
        return (x - self.mean[:, None, None]) / self.std[:, None, None]

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """B x H x W x 3 uint8 -> B x N x D encoder patch tokens (prefix tokens dropped)."""
        tokens = self.encoder.forward_features(self.normalise(images))
        return tokens[:, self.encoder.num_prefix_tokens :]

    def encode_with_attention(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`encode`, and the last block's CLS-to-patch attention (B x N, mean over heads) from
        the same pass: what POTNet's backbone reads it from (backbone.py), for the report's
        no-object rule."""
        last, seen = self.encoder.blocks[-1], {}
        hook = last.register_forward_pre_hook(lambda _, args: seen.update(x=args[0]))
        try:
            tokens = self.encode(images)
        finally:
            hook.remove()
        prefix = self.encoder.num_prefix_tokens
        return tokens, cls_attention_of(last.attn, last.norm1(seen["x"]), prefix)

    @property
    def grid(self) -> tuple[int, int]:
        """The token grid of an input at the model's own size."""
        side = self.image_size // self.patch_size
        return side, side

    def forward(
        self, images: torch.Tensor | None = None, *, tokens: torch.Tensor | None = None
    ) -> AutoSODOutput:
        """B x H x W x 3 uint8 images (H, W multiples of the patch), or the B x N x D
        encoder tokens of images at the model's own size -> every layer's predictions."""
        if tokens is not None:
            return self.decode(tokens, self.grid)
        grid = (images.shape[1] // self.patch_size, images.shape[2] // self.patch_size)
        return self.decode(self.encode(images), grid)

    def decode(self, tokens: torch.Tensor, grid: tuple[int, int]) -> AutoSODOutput:
        """B x N x D encoder tokens on an h x w grid -> every layer's predictions (the part
        that trains when the encoder is frozen, e.g. from cached tokens)."""
        (b, _, d), (h, w) = tokens.shape, grid
        pixels = self.pixel_decoder(tokens.transpose(1, 2).reshape(b, d, h, w))  # B x C x 2h x 2w
        memory = self.memory_proj(tokens)
        q = self.query_feat.weight[None].expand(b, -1, -1)
        pos = self.query_pos.weight[None].expand(b, -1, -1)
        masks, objectness = [], []
        for layer in self.layers:
            q = layer(q, pos, memory)
            qn = self.query_norm(q)
            # mask i = <q_i, pixel feature> at every pixel (sigmoid in the loss)
            masks.append(torch.einsum("bqc,bchw->bqhw", self.mask_embed(qn), pixels))
            objectness.append(self.objectness(qn)[..., 0])  # o_i = MLP(q_i) (sigmoid later)
        return AutoSODOutput(torch.stack(masks), torch.stack(objectness))

    @torch.inference_mode()
    def predict(
        self, images: torch.Tensor | None = None, *, tokens: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """B x S x S x 3 uint8 (or their encoder tokens) -> (B x 2h x 2w mask probability
        of the best query, B objectness)."""
        out = self.forward(images, tokens=tokens)
        logits, obj = out.mask_logits[-1].float(), out.objectness_logits[-1].float().sigmoid()
        best = obj.argmax(dim=1)  # the highest-objectness query
        rows = torch.arange(logits.shape[0], device=logits.device)
        return logits[rows, best].sigmoid(), obj[rows, best]


def build_autosod(
    backbone: BackboneConfig,
    model: ModelConfig,
    pretrained: bool = True,
    storage_options: dict | None = None,
    seed: int = 0,
) -> AutoSOD:
    """AutoSOD on the configured timm ViT; `pretrained` loads the encoder's weights
    (from backbone.weights, else the hub); False builds the bare shapes (to load a
    trained model into)."""
    encoder = _timm_vit(backbone.name, pretrained=pretrained and backbone.weights is None)
    if pretrained and backbone.weights is not None:
        load_weights(encoder, backbone.weights, storage_options)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = AutoSOD(encoder, model, backbone.image_size)
    return net


def to_uint8_batch(images: np.ndarray) -> torch.Tensor:
    """A numpy batch (possibly read-only, from Arrow) -> a torch uint8 tensor."""
    if not images.flags.writeable:
        images = images.copy()
    return torch.as_tensor(images)
