"""POTNet pseudo-labeller: pure array code (numpy | cupy, torch for refinement), no Ray."""

from .core import PatchFeatures, POTNet, POTNetOutput
from .seeds import SEEDS, ncut_bipartition

__all__ = ["POTNet", "POTNetOutput", "PatchFeatures", "SEEDS", "ncut_bipartition"]
