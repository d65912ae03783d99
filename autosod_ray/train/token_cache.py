"""A frozen encoder's tokens, computed once per image and view, so training runs only
the decoder (`data.cache_tokens`, with `optim.freeze_encoder`).

    kept pseudo-masks -> read image -> decode, resize -> encoder actor (each image as
    is and mirrored) -> <cache>/<key>/part-*.parquet

One row per image and view: `tokens` (the encoder's patch tokens, float16,
N x D), `target` (the pseudo-mask area-resized to the mask logits' grid,
2h x 2w, float16, mirrored with its view), and the filter columns of the
pseudo-mask (`fg_fraction`, `quality`) so the same `data` filters select the
same rows. The cache lives in the output (or `data.token_cache`), keyed by
what decides its rows (encoder weights, input size, views, pseudo-masks); a
rerun adds only the images it lacks. A frozen encoder costs more than the
whole decoder's forward and backward pass at 448 px, so this is most of the
training time saved.
"""

from __future__ import annotations

import posixpath

import numpy as np
import pyarrow as pa

from ..config import TrainConfig, config_hash
from ..data.images import decode_gray
from ..data.parquet import ShardDatasink, read_table_folder
from ..data.stages import decode, read_bytes
from ..data.training import TrainingSet, read_pseudo_masks

VIEWS = 2  # 0: the image as is, 1: mirrored left-right
TOKEN_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("view", pa.int8()),
        ("tokens", pa.binary()),  # float16, N x D, row-major
        ("target", pa.binary()),  # float16, 2h x 2w, the pseudo-mask at the mask logits' grid
        ("fg_fraction", pa.float32()),
        ("quality", pa.float32()),
    ]
)


def cache_location(cfg: TrainConfig, image_size: int) -> str:
    """<token cache root>/<key>: the key hashes what decides the cached rows (the encoder
    and its input size, the views, the pseudo-masks), not where or how it runs."""
    root = cfg.data.token_cache or posixpath.join(cfg.output, "token_cache")
    backbone = cfg.backbone.model_copy(update={"device": "auto", "image_size": image_size})
    key = config_hash(
        {"backbone": backbone, "views": VIEWS, "pseudo_masks": cfg.pseudo_masks.rstrip("/")}
    )
    return posixpath.join(root, key)


def area_target(mask_png: bytes, grid: tuple[int, int]) -> np.ndarray:
    """A 0/255 mask PNG -> its foreground share in each cell of a (2h x 2w) grid, float32."""
    import torch
    import torch.nn.functional as F

    m = torch.from_numpy((decode_gray(mask_png) > 127).astype(np.float32))[None, None]
    return F.interpolate(m, size=(2 * grid[0], 2 * grid[1]), mode="area")[0, 0].numpy()


class EncoderStage:
    """Actor stage: the frozen encoder, built once; each decoded image -> VIEWS rows."""

    def __init__(self, cfg_json: dict):
        import torch

        from ..backbone import resolve_device
        from ..model import build_autosod

        cfg = TrainConfig.model_validate(cfg_json)
        if cfg.scaling.torch_threads != "auto":  # resolved by the train driver
            torch.set_num_threads(cfg.scaling.torch_threads)
        self.device = resolve_device(cfg.backbone.device)
        opts = cfg.storage.options(cfg.backbone.weights or "")
        self.model = build_autosod(cfg.backbone, cfg.model, storage_options=opts)
        self.model.eval().requires_grad_(False).to(self.device)
        self.bf16 = self.device.type == "cuda" and cfg.backbone.precision in ("auto", "bf16")
        self.torch = torch

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        ok = np.array([e == "" for e in batch["error"]], dtype=bool)
        rows = {name: [] for name in TOKEN_SCHEMA.names}
        if not ok.any():
            return {k: np.array(v, dtype=object) for k, v in rows.items()}
        images = torch.as_tensor(np.ascontiguousarray(batch["image"][ok])).to(self.device)
        s = images.shape[1] // self.model.patch_size
        grid = (s, images.shape[2] // self.model.patch_size)
        with torch.inference_mode(), torch.autocast("cuda", enabled=self.bf16):
            views = [self.model.encode(images), self.model.encode(images.flip(2))]
        for v, tokens in enumerate(views):
            tokens = tokens.float().cpu().numpy().astype(np.float16)
            for j, i in enumerate(np.flatnonzero(ok)):
                target = area_target(batch["mask_png"][i], grid)
                if v == 1:
                    target = target[:, ::-1]
                rows["image_id"].append(batch["image_id"][i])
                rows["view"].append(v)
                rows["tokens"].append(tokens[j].tobytes())
                rows["target"].append(np.ascontiguousarray(target, np.float16).tobytes())
                rows["fg_fraction"].append(batch["fg_fraction"][i])
                rows["quality"].append(batch["quality"][i])
        return {k: np.array(v, dtype=object) for k, v in rows.items()}


def _as_cache_rows(table: pa.Table) -> dict[str, pa.Table]:
    return {"": table.select(TOKEN_SCHEMA.names).cast(TOKEN_SCHEMA)}


def _not_cached(batch: dict[str, np.ndarray], cached) -> dict[str, np.ndarray]:
    import pyarrow.compute as pc

    keep = ~pc.is_in(pa.array(batch["image_id"]), value_set=cached).to_numpy(zero_copy_only=False)
    return {k: v[keep] for k, v in batch.items()}


def fill_token_cache(cfg: TrainConfig, selection: TrainingSet, image_size: int, pool) -> dict:
    """Encode the image of every kept pseudo-mask not yet cached; returns what the cache
    holds. `pool`: (num_cpus, num_gpus, most actors) of the encoder stage."""
    from ray.data import ActorPoolStrategy

    location = cache_location(cfg, image_size)
    opts = cfg.storage.options(location)
    cached = read_table_folder(location, opts, ["image_id"]).column("image_id")
    cached = cached.combine_chunks().cast(pa.string())
    num_cpus, num_gpus, size = pool
    step = 8
    ds = read_pseudo_masks(selection, keep_filter_columns=True)
    if "quality" not in selection.filter_columns:
        ds = ds.add_column("quality", lambda b: np.full(len(b["image_id"]), np.nan, np.float32))
    ds = ds.map_batches(
        _not_cached, batch_size=256, batch_format="numpy", fn_kwargs={"cached": cached}
    )
    ds = ds.map_batches(
        read_bytes, batch_size=step, batch_format="numpy",
        fn_kwargs={"storage_options": cfg.storage.options(cfg.pseudo_masks)},
    )  # fmt: skip
    ds = ds.map_batches(
        decode, batch_size=step, batch_format="numpy",
        fn_kwargs={"image_size": image_size, "max_pixels": cfg.max_pixels, "min_side": 1},
    )  # fmt: skip
    ds = ds.map_batches(
        EncoderStage,
        batch_size=step,
        batch_format="numpy",
        fn_constructor_args=(cfg.model_dump(mode="json"),),
        compute=ActorPoolStrategy(min_size=1, max_size=size),
        num_cpus=num_cpus,
        num_gpus=num_gpus,
    )
    ds.write_datasink(ShardDatasink(location, opts, 256, _as_cache_rows))
    ids = read_table_folder(location, opts, ["image_id"]).column("image_id")
    return {"location": location, "rows": len(ids), "images": len(ids.unique()),
            "encoded": len(ids) - len(cached)}  # fmt: skip


def read_token_cache(location: str, storage_options: dict, selection: TrainingSet, grid):
    """The cached (tokens, target) rows the selection keeps, decoded for the trainer:
    {"tokens": B x N x D float16, "target": B x 2h x 2w float16} (half the bytes to move;
    the trainer's batches widen them to float32)."""
    import pyarrow.fs as pafs
    import ray

    from ..data.uris import open_fs

    fs, root = open_fs(location, storage_options)
    ds = ray.data.read_parquet(
        root,
        filesystem=pafs.PyFileSystem(pafs.FSSpecHandler(fs)),
        columns=["tokens", "target", "fg_fraction", "quality"],
        file_extensions=["parquet"],
    )
    ds = ds.filter(expr=" and ".join(selection.conditions)).select_columns(["tokens", "target"])
    n, shape = grid[0] * grid[1], (2 * grid[0], 2 * grid[1])

    def unpack(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tokens = np.stack([np.frombuffer(t, np.float16).reshape(n, -1) for t in batch["tokens"]])
        target = np.stack([np.frombuffer(t, np.float16).reshape(shape) for t in batch["target"]])
        return {"tokens": tokens, "target": target}  # float16: the trainer widens them

    return ds.map_batches(unpack, batch_format="numpy")
