"""A frozen encoder's tokens, computed once per image and view, so training runs only
the decoder (`data.cache_tokens`, with `optim.freeze_encoder`).

    kept pseudo-masks -> read image (its sha256) -> not cached? -> decode, resize
      -> encoder actor (each image as is and mirrored) -> <cache>/<encoder key>/part-*.parquet
    training: cached tokens of the kept images + targets from their pseudo-masks

Keyed by content, and apart: tokens depend on the image and the encoder, targets
on the pseudo-masks. The folder key hashes the encoder (its weights by sha256,
its input size, the views), never a path; a row is keyed by the sha256 of the
image bytes it encoded. Targets are not cached: each run pairs the tokens with
its own pseudo-masks (matched by image digest), so a relabel or a self-training
round reuses every token whose image is unchanged, and an image replaced since
its pseudo-mask was made is left out (its mask is of another picture). One row
per image and view: `image_sha256`, `view`, `tokens` (the encoder's patch
tokens, float16, N x D). A frozen encoder costs more than the whole decoder's
forward and backward pass at 448 px, so this is most of the training time saved.
"""

from __future__ import annotations

import functools
import posixpath

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..config import TrainConfig, config_hash
from ..data.images import decode_gray
from ..data.parquet import ShardDatasink, read_table_folder
from ..data.stages import decode, read_bytes
from ..data.training import TrainingSet, read_pseudo_masks

VIEWS = 2  # 0: the image as is, 1: mirrored left-right
FORMAT = 2  # rows keyed by image digest, tokens only
TOKEN_SCHEMA = pa.schema(
    [
        ("image_sha256", pa.string()),  # of the image bytes encoded
        ("view", pa.int8()),
        ("tokens", pa.binary()),  # float16, N x D, row-major
    ]
)


def cache_location(cfg: TrainConfig, image_size: int, weights_sha256: str | None) -> str:
    """<token cache root>/<key>: the key hashes what decides a cached row besides its
    image (the encoder by its weights' content and its input size, the views, the row
    format), not where the weights or the images are, nor how it runs."""
    root = cfg.data.token_cache or posixpath.join(cfg.output, "token_cache")
    backbone = cfg.backbone.model_dump(mode="json", exclude={"device", "weights"})
    key = config_hash(
        {
            "backbone": {**backbone, "image_size": image_size},
            "weights_sha256": weights_sha256,
            "views": VIEWS,
            "format": FORMAT,
        }
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
        with torch.inference_mode(), torch.autocast("cuda", enabled=self.bf16):
            views = [self.model.encode(images), self.model.encode(images.flip(2))]
        for v, tokens in enumerate(views):
            tokens = tokens.float().cpu().numpy().astype(np.float16)
            for j, i in enumerate(np.flatnonzero(ok)):
                rows["image_sha256"].append(batch["image_sha256"][i])
                rows["view"].append(v)
                rows["tokens"].append(tokens[j].tobytes())
        return {k: np.array(v, dtype=object) for k, v in rows.items()}


def _as_cache_rows(table: pa.Table) -> dict[str, pa.Table]:
    return {"": table.select(TOKEN_SCHEMA.names).cast(TOKEN_SCHEMA)}


def _only(batch: dict[str, np.ndarray], ids: pa.Array, column: str) -> dict[str, np.ndarray]:
    """The rows of `batch` whose `column` is in `ids`."""
    keep = pc.is_in(pa.array(batch[column], pa.string()), value_set=ids)
    keep = keep.to_numpy(zero_copy_only=False)
    return {k: v[keep] for k, v in batch.items()}


def _digest_only(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"image_id": batch["image_id"], "image_sha256": batch["image_sha256"]}


def image_digests(cfg: TrainConfig, selection: TrainingSet) -> pa.Table:
    """(image_id, image_sha256) of every kept pseudo-mask's image as it is now (read in
    Ray tasks; an image that cannot be read gets "")."""
    ds = read_pseudo_masks(selection).map_batches(
        read_bytes, batch_size=16, batch_format="numpy",
        fn_kwargs={"storage_options": cfg.storage.options(cfg.pseudo_masks)},
    )  # fmt: skip
    rows = ds.map_batches(_digest_only, batch_format="numpy").take_all()
    schema = pa.schema([("image_id", pa.string()), ("image_sha256", pa.string())])
    return pa.Table.from_pylist(rows, schema=schema)


def training_pairs(selection: TrainingSet, digests: pa.Table) -> tuple[pa.Table, dict]:
    """The kept pseudo-masks keyed by their image's digest now: (image_sha256, mask_png),
    one row per distinct image; and what was left out (unreadable images, and images
    replaced since their pseudo-mask was made, when the masks record their digest)."""
    import pyarrow.parquet as pq

    columns = ["image_id", "mask_png"]
    have = pq.read_schema(selection.filesystem.open_input_file(selection.files[0])).names
    columns += ["image_sha256"] if "image_sha256" in have else []
    masks = pq.read_table(selection.root, filesystem=selection.filesystem, columns=columns)
    masks = masks.filter(pc.is_in(masks.column("image_id"), value_set=selection.kept_ids))
    where = pc.index_in(masks.column("image_id"), value_set=digests.column("image_id"))
    now = pc.fill_null(pc.take(digests.column("image_sha256"), where), "")
    readable = pc.not_equal(now, "")
    same = readable
    if "image_sha256" in columns:  # null: a mask made before digests were recorded
        then = masks.column("image_sha256")
        same = pc.and_(readable, pc.or_(pc.is_null(then), pc.equal(then, now)))
    pairs = pa.table({"image_sha256": now, "mask_png": masks.column("mask_png")}).filter(same)
    first = pc.index_in(pairs.column("image_sha256"), value_set=pairs.column("image_sha256"))
    pairs = pairs.filter(pc.equal(first, pa.array(np.arange(pairs.num_rows), pa.int32())))
    left_out = {
        "unreadable": int(pc.sum(pc.invert(readable)).as_py() or 0),
        "image_changed": int(pc.sum(pc.and_(readable, pc.invert(same))).as_py() or 0),
    }
    return pairs, left_out


def fill_token_cache(
    cfg: TrainConfig, selection: TrainingSet, image_size: int, weights_sha256: str | None, pool
) -> tuple[dict, pa.Table]:
    """Encode every kept image not yet cached (by its digest); returns what the cache holds
    for this training, and the (image_sha256, mask_png) pairs it trains on. `pool`:
    (num_cpus, num_gpus, most actors) of the encoder stage."""
    from ray.data import ActorPoolStrategy

    location = cache_location(cfg, image_size, weights_sha256)
    opts = cfg.storage.options(location)
    cached = read_table_folder(location, opts, ["image_sha256"]).column("image_sha256")
    cached = cached.combine_chunks().cast(pa.string())
    digests = image_digests(cfg, selection)  # each kept image read once, as it is now
    pairs, left_out = training_pairs(selection, digests)
    new = pc.invert(pc.is_in(digests.column("image_sha256"), value_set=cached))
    todo = digests.filter(pc.and_(new, pc.not_equal(digests.column("image_sha256"), "")))
    if todo.num_rows:  # a cached rerun starts no encoder
        num_cpus, num_gpus, size = pool
        step = 8
        ds = read_pseudo_masks(selection).map_batches(
            _only, batch_size=256, batch_format="numpy",
            fn_kwargs={"ids": todo.column("image_id").combine_chunks(), "column": "image_id"},
        )  # fmt: skip
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
        ds.write_datasink(ShardDatasink(location, opts, 256, _as_cache_rows, key="image_sha256"))
    keys = read_table_folder(location, opts, ["image_sha256"]).column("image_sha256")
    mine = pc.is_in(keys, value_set=pairs.column("image_sha256"))
    rows = int(pc.sum(mine).as_py() or 0)
    summary = {
        "location": location,
        "images": pairs.num_rows,
        "rows": rows,
        "encoded": len(keys) - len(cached),
        "reused": rows - (len(keys) - len(cached)),
        "left_out": left_out,
    }
    return summary, pairs


def token_width(location: str, storage_options: dict, grid) -> int:
    """D of the cached tokens (N x D float16), from the first row of the first file."""
    import pyarrow.parquet as pq

    from ..data.parquet import shard_files
    from ..data.uris import open_fs

    fs, root = open_fs(location, storage_options)
    with fs.open(shard_files(fs, root)[0], "rb") as fh:
        first = pq.ParquetFile(fh).read_row_group(0, columns=["tokens"]).column(0)[0]
    return len(first.as_py()) // 2 // (grid[0] * grid[1])


@functools.lru_cache(maxsize=2)
def _pairs_by_digest(ref) -> dict[str, bytes]:
    """image_sha256 -> mask PNG of a training's pairs, built once per worker process."""
    import ray

    pairs = ray.get(ref)
    return dict(zip(*pairs.select(["image_sha256", "mask_png"]).to_pydict().values(), strict=True))


def read_token_cache(location: str, storage_options: dict, pairs: pa.Table, grid):
    """The cached tokens of the training images with their targets:
    {"tokens": B x N x D float16, "target": B x 2h x 2w float16} (half the bytes to move;
    the trainer's batches widen them to float32). `pairs` (image_sha256, mask_png) go to
    the tasks once, through the object store."""
    import pyarrow.fs as pafs
    import ray

    from ..data.uris import open_fs

    fs, root = open_fs(location, storage_options)
    ds = ray.data.read_parquet(
        root,
        filesystem=pafs.PyFileSystem(pafs.FSSpecHandler(fs)),
        columns=["image_sha256", "view", "tokens"],
        file_extensions=["parquet"],
    )
    n, dim = grid[0] * grid[1], token_width(location, storage_options, grid)
    ref = ray.put(pairs)

    def unpack(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        masks = _pairs_by_digest(ref)
        tokens, target = [], []
        for t, v, key in zip(batch["tokens"], batch["view"], batch["image_sha256"], strict=True):
            if key not in masks:
                continue  # tokens of an image this training does not use
            mask = area_target(masks[key], grid)
            target.append(mask[:, ::-1] if v == 1 else mask)
            tokens.append(np.frombuffer(t, np.float16).reshape(n, -1))
        if not tokens:
            return {"tokens": np.zeros((0, n, dim), np.float16),
                    "target": np.zeros((0, 2 * grid[0], 2 * grid[1]), np.float16)}  # fmt: skip
        return {"tokens": np.stack(tokens), "target": np.stack(target).astype(np.float16)}

    return ds.map_batches(unpack, batch_format="numpy")
