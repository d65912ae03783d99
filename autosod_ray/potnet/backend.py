"""Array backends: NumPy on CPU, CuPy on GPU, looked up by name.

Every POTNet step takes arrays and works in the namespace of its input
(`xp = array_namespace(x)`), so one code path serves both backends. The few
operations whose best implementation differs (partial eigensolvers, moving data
from torch) live here, one small function per backend.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.linalg
import scipy.sparse.linalg


def _cupy():
    try:
        import cupy
    except ImportError as err:  # pragma: no cover - exercised only without the gpu extra
        raise ImportError(
            "the cupy backend needs CuPy: pip install 'autosod-ray[gpu]' (CUDA 13 wheels)"
        ) from err
    return cupy


def array_namespace(x: Any):
    """numpy or cupy, whichever module `x` belongs to."""
    if type(x).__module__.startswith("cupy"):
        return _cupy()
    return np


def to_numpy(x: Any) -> np.ndarray:
    """Host copy of a numpy or cupy array."""
    return x.get() if hasattr(x, "get") and not isinstance(x, np.ndarray) else np.asarray(x)


@dataclass(frozen=True)
class ArrayBackend:
    """How one backend takes torch tensors in and solves symmetric eigenproblems."""

    name: str
    from_torch: Callable[[Any], Any]
    top_eigenvectors: Callable[..., Any]


def _numpy_from_torch(t):
    return t.detach().float().cpu().numpy()


# from this many rows on, Lanczos (ARPACK) beats LAPACK's dense partial solver
# (single thread, float32: 1024 rows 0.012 s against 0.075 s; 300 rows about even)
LANCZOS_MIN_N = 256


def _top_k_symmetric(sub: np.ndarray, k: int) -> np.ndarray:
    """n x n symmetric -> n x k eigenvectors of its k largest eigenvalues, descending.

    Dense LAPACK (syevr, O(n^3)) for small n; Lanczos (ARPACK, O(n^2) per
    iteration, in the matrix's own precision, from a fixed start vector so the
    result is deterministic) for large n, falling back to LAPACK if it stalls.
    """
    n = sub.shape[0]
    if n >= LANCZOS_MIN_N and k < n // 10:
        v0 = np.random.default_rng(0).standard_normal(n).astype(sub.dtype)
        try:
            vals, vecs = scipy.sparse.linalg.eigsh(sub, k=k, which="LA", v0=v0)
            return vecs[:, np.argsort(vals)[::-1]]
        except scipy.sparse.linalg.ArpackNoConvergence:
            pass
    _, vecs = scipy.linalg.eigh(sub, subset_by_index=[n - k, n - 1], check_finite=False)
    return vecs[:, ::-1]


def _numpy_top_eigenvectors(m: np.ndarray, k: int, mask: np.ndarray | None = None) -> np.ndarray:
    """B x n x n symmetric -> B x n x k eigenvectors of the k largest eigenvalues, descending.

    With `mask` (B x n bool) each problem is solved on its masked rows and columns
    only (zeros elsewhere), which is what makes per-class spectral clustering cheap.
    """
    out = np.zeros(m.shape[:-1] + (k,), dtype=m.dtype)
    for b in range(m.shape[0]):  # LAPACK's and ARPACK's solvers are per matrix
        idx = np.arange(m.shape[-1]) if mask is None else np.flatnonzero(mask[b])
        if len(idx) == 0:
            continue
        sub = m[b] if mask is None else m[b][np.ix_(idx, idx)]
        kk = min(k, len(idx))
        out[b, idx, :kk] = _top_k_symmetric(sub, kk)
    return out


def _cupy_from_torch(t):
    cupy = _cupy()
    return cupy.from_dlpack(t.detach().float().contiguous())  # zero-copy on the same device


def batched_top_eigenvectors(m, k: int, mask=None):
    """B x n x n normalised affinities (eigenvalues in [-1, 1]) -> B x n x k eigenvectors of
    the k largest eigenvalues, descending, from one batched dense `eigh` in the input's
    namespace (cupy's batched solver on a GPU; numpy runs the same code on a CPU).

    With `mask` (B x n bool) each problem is its masked sub-matrix: masked-out rows and
    columns become an isolated block of eigenvalue -2, below every eigenvalue of the
    sub-matrix, so the top k come from it; vectors are zero off the mask (and columns
    beyond a problem's own size are zero, as in the per-matrix path).
    """
    xp = array_namespace(m)
    if mask is not None:
        off = ~mask
        m = xp.where(mask[:, :, None] & mask[:, None, :], m, 0.0)
        n = m.shape[-1]
        m = m - 2.0 * xp.eye(n, dtype=m.dtype)[None] * off[:, None, :].astype(m.dtype)
    _, vecs = xp.linalg.eigh(m)
    top = vecs[..., ::-1][..., :k]
    if mask is not None:
        top = top * mask[..., None]
        # a problem smaller than k: its extra vectors came from the -2 block, now all zero
    return top


ARRAY_BACKENDS: dict[str, ArrayBackend] = {
    "numpy": ArrayBackend("numpy", _numpy_from_torch, _numpy_top_eigenvectors),
    "cupy": ArrayBackend("cupy", _cupy_from_torch, batched_top_eigenvectors),
}


def backend_for(x: Any) -> ArrayBackend:
    """The backend whose arrays `x` is."""
    return ARRAY_BACKENDS["cupy" if array_namespace(x) is not np else "numpy"]


def resolve_backend(name: str, torch_device: str) -> ArrayBackend:
    """`auto` follows the torch device the features live on."""
    if name == "auto":
        name = "cupy" if torch_device.startswith("cuda") else "numpy"
    return ARRAY_BACKENDS[name]
