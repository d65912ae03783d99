"""Backbone features computed once and reused by every POTNet variant of a benchmark.

    python benchmarks/feature_cache.py --images DIR --cache DIR [--config FILE] [--set k=v ...]

One `.npz` per image under `<cache>/<backbone hash>/<stem>.npz` (features N x D
float32 unit rows, cls_attention N, grid, the image's own height and width), so
a benchmark that compares ten POTNet variants on 1000 images pays for the
backbone once. This is a benchmark tool: the product never caches POTNet's
input features (its jobs stream).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from autosod_ray.config import BackboneConfig, PseudolabelConfig, config_hash, load_config
from autosod_ray.data.images import IMAGE_EXTENSIONS, decode_image, resize_square

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "potnet.yaml"


@dataclass
class CachedImage:
    stem: str
    features: np.ndarray  # N x D float32, unit rows
    cls_attention: np.ndarray  # N float32
    grid: tuple[int, int]
    size: tuple[int, int]  # the image's own (height, width)


def cache_folder(cache: Path, backbone: BackboneConfig) -> Path:
    """Features of different backbone settings never mix: one folder per config hash."""
    return cache / config_hash(backbone)


def fill_cache(
    paths: list[Path], cache: Path, backbone: BackboneConfig, batch: int = 8, log=sys.stderr
) -> Path:
    """Compute and store the features of every image not yet cached; returns the folder."""
    from autosod_ray.backbone import ViTFeatures

    folder = cache_folder(cache, backbone)
    folder.mkdir(parents=True, exist_ok=True)
    todo = [p for p in paths if not (folder / f"{p.stem}.npz").exists()]
    if not todo:
        return folder
    extractor = ViTFeatures(backbone)
    which = backbone.features
    for start in range(0, len(todo), batch):
        chunk = todo[start : start + batch]
        images = [decode_image(p.read_bytes(), 1 << 30) for p in chunk]
        out = extractor(np.stack([resize_square(im, extractor.image_size) for im in images]))
        feats = getattr(out, which).numpy()
        attn = out.cls_attention.numpy()
        for i, (p, im) in enumerate(zip(chunk, images, strict=True)):
            tmp = folder / f"_{p.stem}.npz"
            np.savez(
                tmp,
                features=feats[i].astype(np.float32),
                cls_attention=attn[i].astype(np.float32),
                grid=np.array(out.grid),
                size=np.array(im.shape[:2]),
            )
            tmp.rename(folder / f"{p.stem}.npz")  # a killed run leaves no half file
        print(f"features {start + len(chunk)}/{len(todo)}", file=log, flush=True)
    return folder


def load_cached(folder: Path, stem: str) -> CachedImage:
    with np.load(folder / f"{stem}.npz") as z:
        return CachedImage(
            stem=stem,
            features=z["features"],
            cls_attention=z["cls_attention"],
            grid=tuple(int(v) for v in z["grid"]),
            size=tuple(int(v) for v in z["size"]),
        )


def cached_batches(folder: Path, stems: list[str], batch: int) -> Iterator[list[CachedImage]]:
    for start in range(0, len(stems), batch):
        yield [load_cached(folder, s) for s in stems[start : start + batch]]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--images", required=True)
    p.add_argument("--cache", required=True)
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--limit", type=int, default=None)
    args = p.parse_args(argv)
    cfg = load_config(PseudolabelConfig, args.config, args.set)
    paths = sorted(p for p in Path(args.images).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    folder = fill_cache(paths[: args.limit], Path(args.cache), cfg.backbone)
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
