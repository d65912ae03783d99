"""AutoSOD's training objective: per-query Dice plus an objectness ranking hinge,
applied to every decoder layer's predictions."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .autosod import AutoSODOutput


def dice_loss(mask_logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """B x Q x H x W logits, B x H x W target in [0, 1] -> B x Q Dice losses."""
    p = mask_logits.sigmoid().flatten(2)
    t = target.flatten(1)[:, None, :]
    # Dice(mask_i, pseudo-mask) = 1 - (2 |p t| + s) / (|p| + |t| + s)
    return 1.0 - (2.0 * (p * t).sum(-1) + smooth) / (p.sum(-1) + t.sum(-1) + smooth)


def ranking_loss(objectness: torch.Tensor, dice: torch.Tensor) -> torch.Tensor:
    """B x Q objectness in [0, 1], B x Q Dice losses -> B ranking losses.

    Queries are ordered by Dice loss, best first; every pair i < j in that order
    costs max(0, o_j - o_i): a worse mask must not score a higher objectness.
    """
    order = dice.detach().argsort(dim=1)  # ascending Dice loss: best mask first
    o = objectness.gather(1, order)
    q = o.shape[1]
    later_minus_earlier = o[:, None, :] - o[:, :, None]  # [b, i, j] = o_j - o_i
    pairs = torch.triu(torch.ones(q, q, dtype=torch.bool, device=o.device), diagonal=1)
    # sum over pairs i < j of max(0, o_j - o_i)
    return (F.relu(later_minus_earlier) * pairs).sum(dim=(1, 2))


def autosod_loss(
    out: AutoSODOutput, target: torch.Tensor, rank_weight: float = 1.0
) -> tuple[torch.Tensor, dict[str, float]]:
    """Every layer's predictions and a B x H x W pseudo-mask in [0, 1] -> scalar loss.

    Per layer and image: (sum_i Dice_i + lambda * ranking) / N_q; averaged over
    images and layers. The target is area-resized to the mask logits' grid.
    """
    h, w = out.mask_logits.shape[-2:]
    if target.shape[-2:] != (h, w):
        target = F.interpolate(target[:, None].float(), size=(h, w), mode="area")[:, 0]
    dice_total, rank_total = 0.0, 0.0
    layers = out.mask_logits.shape[0]
    q = out.mask_logits.shape[2]
    for logits, obj in zip(out.mask_logits.float(), out.objectness_logits.float(), strict=True):
        dice = dice_loss(logits, target)
        dice_total = dice_total + dice.sum(1).mean() / q
        rank_total = rank_total + ranking_loss(obj.sigmoid(), dice).mean() / q
    dice_total, rank_total = dice_total / layers, rank_total / layers
    loss = dice_total + rank_weight * rank_total
    return loss, {"dice": float(dice_total.detach()), "rank": float(rank_total.detach())}
