"""The folds protocol every quality figure follows: choose on some folds, report the others.

ECSSD's images are split, in stem order, into `folds` contiguous blocks (five
blocks of 200: 0001-0200 is fold 0, ...). A setting or a fitted score is chosen
on some folds and its figures are reported on the folds it never saw; README's
tables say which were which.
"""

from __future__ import annotations

import numpy as np


def fold_of(stems, folds: int = 5) -> np.ndarray:
    """Each stem's fold: contiguous blocks of the stems in sorted order (the same stems
    always give the same folds)."""
    stems = list(stems)
    rank = {s: i for i, s in enumerate(sorted(set(stems)))}
    n = len(rank)
    # fold of rank r: r * folds // n, so every fold is used and sizes differ by at most one
    return np.array([rank[s] * folds // n for s in stems], dtype=np.int64)
