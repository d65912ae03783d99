"""POTNet: the whole pseudo-labeller, one pass per batch of images.

Reads top to bottom as the method (docs/method.md): seed -> CAMs -> entropy
gate -> dual clustering -> prototypes -> optimal transport -> re-weighting ->
consistency -> (optional seed refinement) -> saliency. Arrays stay in the
namespace of the input features (numpy or cupy) until the small per-image
outputs are copied to the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config import POTNetConfig
from .backend import array_namespace, to_numpy
from .cam import CAMs, Gate, class_activation_maps, entropy_gate
from .cluster import CLUSTER_ENGINES, align_clusters, soft_assignment
from .mask import mask_at_size
from .ops import cosine, l2_normalize, masked_mean
from .reweight import (
    consistency_loss,
    reweighted_class_maps,
    transport_confidence,
)
from .seeds import SEEDS
from .transport import nearest_prototype_plan, prototype_marginal, sinkhorn


@dataclass
class PatchFeatures:
    """What POTNet needs from the backbone, for a batch of equally sized images."""

    features: object  # B x N x D float32, unit rows (numpy or cupy)
    cls_attention: object  # B x N float32, last block's CLS attention (mean over heads)
    grid: tuple[int, int]  # (h, w) with h * w = N


@dataclass
class POTNetOutput:
    """Per-image results on the patch grid, on the host."""

    saliency: np.ndarray  # B x h x w float32 in [0, 1]: the foreground map
    cam: np.ndarray  # B x h x w float32: the seed CAM S_fg
    confidence: np.ndarray  # B: mean transport confidence omega
    consistency_loss: np.ndarray  # B: L_con

    def masks(self, sizes: list[tuple[int, int]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Step 7 for each image: (soft uint8, binary bool) at its own (height, width)."""
        return [mask_at_size(s, h, w) for s, (h, w) in zip(self.saliency, sizes, strict=True)]


@dataclass
class _Pass:
    cams: CAMs
    saliency: object  # B x N
    confidence: object  # B x N
    loss: object  # B


class POTNet:
    """Prototype optimal transport pseudo-labeller; `POTNet(cfg)(patch_features)`."""

    def __init__(self, cfg: POTNetConfig):
        self.cfg = cfg
        self.seed = SEEDS[cfg.seed]
        self.engine = CLUSTER_ENGINES[cfg.engine]

    def __call__(self, batch: PatchFeatures) -> POTNetOutput:
        cfg, x = self.cfg, batch.features
        w_fg = self.seed(  # step 0
            x, batch.cls_attention, tau=cfg.seed_tau, orientation=cfg.seed_orientation
        )
        result = self.one_pass(x, w_fg)
        if cfg.refine_steps:
            # step 6: move w_fg toward the class map it produced, then run once more
            w_fg = refine_seed(x, w_fg, result.saliency, result.confidence, cfg)
            result = self.one_pass(x, w_fg)
        b, (h, w) = x.shape[0], batch.grid
        return POTNetOutput(
            saliency=to_numpy(result.saliency).reshape(b, h, w).astype(np.float32),
            cam=to_numpy(result.cams.scores[:, 0]).reshape(b, h, w).astype(np.float32),
            confidence=to_numpy(result.confidence.mean(-1)).astype(np.float32),
            consistency_loss=to_numpy(result.loss).astype(np.float32),
        )

    def one_pass(self, x, w_fg) -> _Pass:
        cfg, k = self.cfg, self.cfg.num_clusters
        cams = class_activation_maps(x, w_fg)  # step 1
        gate = entropy_gate(cams.scores, cfg.select_tau, min_count=k)  # step 2
        prototypes = self.prototypes(x, gate)  # step 3
        similarity = cosine(x, prototypes)  # step 4: S_ij = cos(f_i, Z_j)
        if cfg.transport:
            prior = None
            if cfg.marginal == "class_prior":  # each class's share of the selected patches
                share = gate.select.sum(-1).astype(x.dtype)
                prior = share / share.sum(-1, keepdims=True)
            v = prototype_marginal(prototypes, cams.weights, k, cfg.marginal_temperature, prior)
            plan = sinkhorn(similarity, v, cfg.ot_epsilon, cfg.ot_max_iters, cfg.ot_tol).plan
        else:
            plan = nearest_prototype_plan(similarity, cfg.ot_epsilon).plan
        # step 5: re-weighted prototype maps
        saliency = reweighted_class_maps(
            x, prototypes, plan, k, cfg.map_temperature, cfg.reweight
        ).saliency
        confidence = transport_confidence(plan)  # step 6
        loss = consistency_loss(saliency, cams.scores[:, 0], confidence)
        return _Pass(cams=cams, saliency=saliency, confidence=confidence, loss=loss)

    def prototypes(self, x, gate: Gate):
        """Step 3: per-class k-means and spectral clustering, aligned and fused -> B x 2K x D."""
        cfg, k, xp = self.cfg, self.cfg.num_clusters, array_namespace(x)
        b, n, d = x.shape
        c = gate.select.shape[1]
        xg = xp.broadcast_to(x[:, None], (b, c, n, d)).reshape(b * c, n, d)
        mask = gate.select.reshape(b * c, n)
        gamma = gate.gamma.reshape(b * c, n)[..., None]
        soft = {}
        if cfg.clustering in ("dual", "kmeans"):
            labels = self.engine.kmeans(xg, mask, k, cfg.kmeans_iters)
            soft["kmeans"] = soft_assignment(xg, labels, k, cfg.assign_temperature)
        if cfg.clustering in ("dual", "spectral"):
            labels = self.engine.spectral(xg, mask, k, cfg.spectral_knn, cfg.kmeans_iters)
            soft["spectral"] = soft_assignment(xg, labels, k, cfg.assign_temperature)
        if cfg.clustering == "dual":
            (c_km, cent_km), (c_sp, cent_sp) = soft["kmeans"], soft["spectral"]
            # spectral labels are a permutation of k-means labels: match them first
            c_sp = xp.take_along_axis(c_sp, align_clusters(cent_km, cent_sp)[:, None, :], axis=2)
            if cfg.fusion == "smooth":
                fused = gamma * c_sp + (1.0 - gamma) * c_km  # M = gamma C_spc + (1 - gamma) C_km
            else:
                fused = xp.where(gamma >= cfg.eta_threshold, c_sp, c_km)  # hard switch
        else:
            fused = soft[cfg.clustering][0]
        fused = fused * mask[..., None]
        # Z_ck = sum_i M_ick f_i / sum_i M_ick
        z = l2_normalize(masked_mean(xg, fused.swapaxes(1, 2)))
        return z.reshape(b, c * k, d)


def refine_seed(features, w_fg, target, confidence, cfg: POTNetConfig):
    """Gradient steps on w_fg minimising L_con with the class map held fixed (torch autograd)."""
    import torch

    xp = array_namespace(features)
    f = torch.from_dlpack(xp.ascontiguousarray(features))
    t = torch.from_dlpack(xp.ascontiguousarray(target))
    omega = torch.from_dlpack(xp.ascontiguousarray(confidence))
    w = torch.from_dlpack(xp.ascontiguousarray(w_fg)).clone().requires_grad_(True)
    opt = torch.optim.SGD([w], lr=cfg.refine_lr)
    for _ in range(cfg.refine_steps):
        unit = w / w.norm(dim=-1, keepdim=True)
        s = torch.relu(torch.einsum("bnd,bd->bn", f, unit))
        cam = (s - s.amin(-1, keepdim=True)) / (
            s.amax(-1, keepdim=True) - s.amin(-1, keepdim=True) + 1e-8
        )
        loss = (omega * (t - cam).abs()).mean(-1).sum()  # L_con summed over the batch
        opt.zero_grad()
        loss.backward()
        opt.step()
    return l2_normalize(xp.from_dlpack(w.detach()))
