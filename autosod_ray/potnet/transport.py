"""Step 4: optimal transport of patches onto prototypes (entropic, log-domain Sinkhorn)."""

from __future__ import annotations

from dataclasses import dataclass

from .backend import array_namespace
from .ops import logsumexp, softmax


@dataclass
class TransportPlan:
    plan: object  # B x N x P, rows sum to 1/N, columns to the prototype marginal
    iterations: int
    marginal_error: object  # B: L1 error of the row marginal at the stop


def prototype_marginal(prototypes, class_weights, k: int, temperature: float, class_prior=None):
    """Column marginal v over the C*k prototypes (class-major), B x (C*k), summing to 1.

    Without `class_prior`: softmax over all (c, k) of cos(Z_ck, w_c). With it
    (B x C, rows summing to 1): v_ck = prior_c * softmax over k of cos(Z_ck, w_c),
    so each class receives the share of patches its CAM selected.
    """
    xp = array_namespace(prototypes)
    b = prototypes.shape[0]
    w = xp.repeat(class_weights, k, axis=1)  # w_c for each of its k prototypes
    logits = (prototypes * w).sum(-1)
    if class_prior is None:
        return softmax(logits, axis=-1, temperature=temperature)
    within = softmax(logits.reshape(b, -1, k), axis=-1, temperature=temperature)
    return (class_prior[..., None] * within).reshape(b, -1)


def sinkhorn(similarity, col_marginal, epsilon: float, max_iters: int, tol: float) -> TransportPlan:
    """Entropic OT in the log domain, batched.

    similarity B x N x P (cost = 1 - similarity), col_marginal B x P (sums to 1);
    row marginal 1/N. Stops when every image's row-marginal L1 error < tol.
    """
    xp = array_namespace(similarity)
    b, n, _ = similarity.shape
    log_k = (similarity - 1.0) / epsilon  # -cost / epsilon
    log_a = xp.full((b, n), -xp.log(n), dtype=similarity.dtype)
    log_b = xp.log(xp.clip(col_marginal, 1e-30, None)).astype(similarity.dtype)
    f = xp.zeros((b, n), dtype=similarity.dtype)
    g = xp.zeros_like(log_b)
    err = xp.full((b,), xp.inf, dtype=similarity.dtype)
    it = 0
    for it in range(1, max_iters + 1):
        # alternate scaling: rows to 1/N, then columns to v (log-sum-exp for stability)
        f = log_a - logsumexp(log_k + g[:, None, :], axis=2)
        g = log_b - logsumexp(log_k + f[:, :, None], axis=1)
        if it % 5 == 0 or it == max_iters:
            rows = xp.exp(logsumexp(log_k + f[:, :, None] + g[:, None, :], axis=2))
            err = xp.abs(rows - 1.0 / n).sum(-1)
            if bool((err < tol).all()):
                break
    plan = xp.exp(log_k + f[:, :, None] + g[:, None, :])
    return TransportPlan(plan=plan, iterations=it, marginal_error=err)


def nearest_prototype_plan(similarity, epsilon: float) -> TransportPlan:
    """Ablation 'without OT': each row a softmax over prototypes, no column constraint."""
    xp = array_namespace(similarity)
    n = similarity.shape[1]
    plan = softmax(similarity, axis=-1, temperature=epsilon) / n
    return TransportPlan(plan=plan, iterations=0, marginal_error=xp.zeros(similarity.shape[0]))
