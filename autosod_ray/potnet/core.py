"""POTNet: the whole pseudo-labeller, one pass per batch of images.

Reads top to bottom as the method (docs/method.md): seed -> CAMs -> entropy
gate -> dual clustering -> prototypes -> optimal transport -> (boundary prior)
-> re-weighting -> consistency refinement -> saliency, quality. Arrays stay in
the namespace of the input features (numpy or cupy) until the small per-image
outputs are copied to the host; the boundary prior's geodesic distances run on
the host (SciPy's Dijkstra) for either backend. Every named choice (seed,
clustering, fusion, engine, marginal) is looked up in a registry.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .backend import array_namespace, to_numpy
from .boundary import border_prototypes, boundary_connectivity, damp_saliency
from .cam import Gate, class_activation_maps, entropy_gate
from .cluster import CLUSTER_ENGINES, CLUSTERINGS
from .mask import mask_at_size
from .ops import cosine, l2_normalize, masked_mean
from .params import POTNetParams
from .quality import quality_score, quality_signals, transport_signals
from .refine import refine_by_consistency
from .reweight import consistency_loss, reweighted_class_maps, transport_confidence
from .seeds import SEEDS
from .transport import MARGINALS, TransportPlan, nearest_prototype_plan, sinkhorn


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
    cam: np.ndarray  # B x h x w float32: the CAM S_fg (of the refined classifier)
    confidence: np.ndarray  # B: mean transport confidence omega
    consistency_loss: np.ndarray  # B: L_con
    quality: np.ndarray  # B in [0, 1]: how much to trust the mask (higher is better)
    ot_iterations: np.ndarray  # B int32: Sinkhorn iterations to converge (max if never)
    ot_marginal_error: np.ndarray  # B: Sinkhorn's row-marginal L1 error when it stopped
    quality_signals: dict[str, np.ndarray]  # name -> B: what `quality` was computed from

    def masks(self, sizes: list[tuple[int, int]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Step 7 for each image: (soft uint8, binary bool) at its own (height, width)."""
        return [mask_at_size(s, h, w) for s, (h, w) in zip(self.saliency, sizes, strict=True)]

    def columns(self) -> dict[str, np.ndarray]:
        """The per-image scalars, by output column name."""
        return {
            "confidence": self.confidence,
            "consistency_loss": self.consistency_loss,
            "quality": self.quality,
            "ot_iterations": self.ot_iterations,
            "ot_marginal_error": self.ot_marginal_error,
            "attention_border": self.quality_signals["attention_border"],
        }


class POTNet:
    """Prototype optimal transport pseudo-labeller; `POTNet(params)(patch_features)`."""

    def __init__(self, params: POTNetParams):
        self.p = params
        self.seed = SEEDS[params.seed]
        self.engine = CLUSTER_ENGINES[params.engine]()
        self.assign = CLUSTERINGS[params.clustering]
        self.marginal = MARGINALS[params.marginal]

    def __call__(self, batch: PatchFeatures) -> POTNetOutput:
        p, x, k = self.p, batch.features, self.p.num_clusters
        w_fg = self.seed(  # step 0
            x, batch.cls_attention, tau=p.seed_tau, orientation=p.seed_orientation
        )
        cams = class_activation_maps(x, w_fg)  # step 1
        gate = entropy_gate(cams.scores, p.select_tau, min_count=k)  # step 2
        prototypes = self.prototypes(x, gate)  # step 3
        ot = self.transport(x, prototypes, cams.weights, gate)  # step 4
        w_bg = (  # boundary prior: background probability of each patch
            boundary_connectivity(x, batch.grid, p.border_sigma)
            if p.border_prior != "none"
            else None
        )
        foreground = None
        if p.border_prior == "prototypes":  # foreground prototypes on the border -> background
            foreground = border_prototypes(w_bg, ot.plan, self.first_k(ot.plan), p.border_threshold)
        # step 5: re-weighted prototype maps
        maps = reweighted_class_maps(
            x, prototypes, ot.plan, k, p.map_temperature, p.reweight, foreground
        )
        confidence = transport_confidence(ot.plan)  # step 6: omega_i
        if p.refine_steps:  # step 6: L_con refines the prototype CAMs and the CAM
            refined = refine_by_consistency(
                x, w_fg, maps.prototypes, maps.weight, confidence, k,
                p.refine_steps, p.refine_lr, p.map_temperature, foreground,
            )  # fmt: skip
            saliency, cam, loss = refined.saliency, refined.cam, refined.loss
        else:
            saliency, cam = maps.saliency, cams.scores[:, 0]
            loss = consistency_loss(saliency, cam, confidence)
        if p.border_prior == "saliency":  # boundary prior as a final clean-up
            saliency = damp_saliency(saliency, w_bg)
        b, (h, w) = x.shape[0], batch.grid

        def grid(a):  # B x N on the device -> B x h x w on the host
            return to_numpy(a).reshape(b, h, w).astype(np.float32)

        saliency = grid(saliency)
        confidence = to_numpy(confidence.mean(-1)).astype(np.float32)
        loss = to_numpy(loss).astype(np.float32)
        iterations = to_numpy(ot.iterations).astype(np.int32)
        signals = {
            **quality_signals(
                saliency,
                grid(cams.scores[:, 0]),
                grid(batch.cls_attention),
                to_numpy(x).reshape(b, h, w, -1),
            ),
            **transport_signals(iterations, loss, confidence),
        }
        return POTNetOutput(
            saliency=saliency,
            cam=grid(cam),
            confidence=confidence,
            consistency_loss=loss,
            quality=quality_score(signals),
            quality_signals=signals,
            ot_iterations=iterations,
            ot_marginal_error=to_numpy(ot.marginal_error).astype(np.float32),
        )

    def first_k(self, plan):
        """B x P foreground membership of the class-major prototypes: the first K."""
        xp = array_namespace(plan)
        b, _, p = plan.shape
        return xp.broadcast_to((xp.arange(p) < self.p.num_clusters).astype(plan.dtype), (b, p))

    def prototypes(self, x, gate: Gate):
        """Step 3: per-class soft clusters M of the selected patches -> B x 2K x D prototypes."""
        p, k, xp = self.p, self.p.num_clusters, array_namespace(x)
        b, n, d = x.shape
        c = gate.select.shape[1]
        xg = xp.broadcast_to(x[:, None], (b, c, n, d)).reshape(b * c, n, d)
        mask = gate.select.reshape(b * c, n)
        gamma = gate.gamma.reshape(b * c, n)[..., None]
        fused = self.assign(xg, mask, gamma, k, p, self.engine) * mask[..., None]
        # Z_ck = sum_i M_ick f_i / sum_i M_ick
        z = l2_normalize(masked_mean(xg, fused.swapaxes(1, 2)))
        return z.reshape(b, c * k, d)

    def transport(self, x, prototypes, class_weights, gate: Gate) -> TransportPlan:
        """Step 4: S_ij = cos(f_i, Z_j); Sinkhorn to the marginals (or nearest prototype)."""
        p = self.p
        similarity = cosine(x, prototypes)
        if not p.transport:
            return nearest_prototype_plan(similarity, p.ot_epsilon)
        v = self.marginal(
            prototypes, class_weights, gate.select, p.num_clusters, p.marginal_temperature
        )
        return sinkhorn(similarity, v, p.ot_epsilon, p.ot_max_iters, p.ot_tol)
