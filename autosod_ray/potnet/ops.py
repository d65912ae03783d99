"""Small array helpers shared by the POTNet steps (numpy or cupy)."""

from __future__ import annotations

from .backend import array_namespace

EPS = 1e-8


def l2_normalize(x, axis: int = -1):
    """Unit vectors along `axis` (zero vectors stay zero)."""
    xp = array_namespace(x)
    return x / (xp.linalg.norm(x, axis=axis, keepdims=True) + EPS)


def cosine(a, b):
    """B x N x D and B x P x D, both unit-norm -> B x N x P cosine similarities."""
    return a @ b.swapaxes(-1, -2)


def softmax(x, axis: int = -1, temperature: float = 1.0):
    xp = array_namespace(x)
    z = x / temperature
    z = z - z.max(axis=axis, keepdims=True)
    e = xp.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def logsumexp(x, axis: int):
    xp = array_namespace(x)
    m = x.max(axis=axis, keepdims=True)
    return (m + xp.log(xp.exp(x - m).sum(axis=axis, keepdims=True))).squeeze(axis)


def minmax(x, axis: int = -1):
    """Rescale to [0, 1] along `axis` (a constant row becomes zeros)."""
    lo = x.min(axis=axis, keepdims=True)
    hi = x.max(axis=axis, keepdims=True)
    return (x - lo) / (hi - lo + EPS)


def masked_mean(x, weights):
    """B x N x D features, B x K x N weights -> B x K x D weighted means."""
    xp = array_namespace(x)
    return (weights @ x) / xp.maximum(weights.sum(-1, keepdims=True), EPS)


def entropy(p, axis: int = -1):
    """Shannon entropy (nats) of distributions along `axis`."""
    xp = array_namespace(p)
    return -(p * xp.log(xp.clip(p, EPS, None))).sum(axis=axis)
