"""POTNet pseudo-labeller: pure array code (numpy | cupy, torch for refinement), no Ray.

The names below load on first use, so that reading the method's defaults
(`potnet.params`, as the config does) does not import torch.
"""

import importlib

_HOME = {
    "POTNet": ".core",
    "POTNetOutput": ".core",
    "PatchFeatures": ".core",
    "SEEDS": ".seeds",
    "ncut_bipartition": ".seeds",
}
__all__ = list(_HOME)


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_HOME[name], __name__), name)
