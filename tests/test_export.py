"""jobs/export.py and autosod_ray/export.py on a small predictions folder made by hand:
COCO (RLE, one annotation per object), PNG folders read back by evaluate, HF Parquet, S3."""

from __future__ import annotations

import json
import runpy
import signal
import sys
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pytest
from PIL import Image
from pycocotools import mask as mask_util
from pycocotools.coco import COCO

from autosod_ray.config import ExportConfig, StorageConfig
from autosod_ray.data.images import decode_gray
from autosod_ray.data.parquet import MASK_SCHEMA, write_table_atomic
from autosod_ray.data.stages import png_bytes
from autosod_ray.data.uris import InputError, pngs_by_stem
from autosod_ray.evaluate import load_predictions
from autosod_ray.export import object_masks, rle_encode, run_export
from tests.conftest import REPO, job_env, run_script

CONFIG = "c0ffee"


def two_blobs() -> tuple[np.ndarray, list[np.ndarray]]:
    """40 x 60 mask: two rectangles (150 and 375 px) and a 4-px speck; the two objects."""
    mask = np.zeros((40, 60), bool)
    mask[5:15, 5:20] = True  # bbox [5, 5, 15, 10], area 150
    mask[20:35, 30:55] = True  # bbox [30, 20, 25, 15], area 375
    first, second = np.zeros_like(mask), np.zeros_like(mask)
    first[5:15, 5:20], second[20:35, 30:55] = True, True
    mask[36:38, 2:4] = True  # 4 px: below min_area
    return mask, [first, second]


def disc(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (yy - h / 2) ** 2 + (xx - w / 3) ** 2 < 12**2


def example_masks() -> dict[str, tuple[np.ndarray, float]]:
    """image_id -> (H x W bool mask, quality); sub-folders on purpose."""
    tiny = np.zeros((30, 30), bool)
    tiny[10:13, 10:13] = True  # 9 px: the image has no object above min_area
    return {
        "a/two.jpg": (two_blobs()[0], 0.9),
        "b/empty.jpg": (np.zeros((30, 30), bool), 0.2),
        "c/tiny.jpg": (tiny, 0.5),
        "d/one.jpg": (disc(50, 40), 0.7),
    }


def mask_row(image_id: str, mask: np.ndarray, quality: float, source: str, config: str) -> dict:
    soft = np.where(mask, 200, 30).astype(np.uint8)
    return {
        "image_id": image_id,
        "source_uri": source,
        "height": mask.shape[0],
        "width": mask.shape[1],
        "mask_png": png_bytes(mask.astype(np.uint8) * 255),
        "saliency_png": png_bytes(soft),
        "fg_fraction": float(mask.mean()),
        "confidence": 0.5,
        "consistency_loss": 0.1,
        "quality": quality,
        "ot_iterations": 7,
        "ot_marginal_error": 1e-4,
        "backbone": "test",
        "config_hash": config,
    }


def write_predictions(fs, root: str, masks: dict, image_root: str | None = None) -> None:
    """<root>/masks in two shards plus a stale row of another config, and run.json."""
    rows = []
    for image_id, (mask, quality) in masks.items():
        source = f"{image_root}/{image_id}" if image_root else f"/nowhere/{image_id}"
        rows.append(mask_row(image_id, mask, quality, source, CONFIG))
    # a row an earlier config left: same id, high quality, never exported
    stale = mask_row("a/two.jpg", np.ones((40, 60), bool), 0.99, "/nowhere/a/two.jpg", "old")
    for shard in (rows[:2], rows[2:] + [stale]):
        write_table_atomic(fs, f"{root}/masks", pa.Table.from_pylist(shard, schema=MASK_SCHEMA))
    fs.pipe_file(f"{root}/run.json", json.dumps({"config_hash": CONFIG}).encode())


@pytest.fixture()
def predictions(tmp_path) -> tuple[Path, dict]:
    """A predictions folder and its masks; the images exist as PNGs under tmp/images."""
    masks = example_masks()
    for image_id, (mask, _) in masks.items():
        path = tmp_path / "images" / image_id
        path.parent.mkdir(parents=True, exist_ok=True)
        rgb = np.stack([mask * 255, np.full(mask.shape, 80), np.full(mask.shape, 160)], -1)
        Image.fromarray(rgb.astype(np.uint8)).save(path, format="PNG")
    write_predictions(
        fsspec.filesystem("file"), str(tmp_path / "run"), masks, str(tmp_path / "images")
    )
    return tmp_path / "run", masks


def export(predictions: Path | str, output: Path | str, **fields) -> dict:
    return run_export(ExportConfig(predictions=str(predictions), output=str(output), **fields))


def test_objects_are_8_connected_components_above_min_area_and_rle_round_trips():
    mask, expected = two_blobs()
    objects, small = object_masks(mask, min_area=16)
    assert small == 1 and len(objects) == 2
    for obj, want in zip(objects, expected, strict=True):
        np.testing.assert_array_equal(obj, want)
        rle = rle_encode(obj)
        assert isinstance(rle["counts"], str) and rle["size"] == [40, 60]
        decoded = mask_util.decode({**rle, "counts": rle["counts"].encode()})
        np.testing.assert_array_equal(decoded.astype(bool), obj)
    diagonal = np.zeros((4, 4), bool)
    diagonal[0, 0] = diagonal[1, 1] = True  # touching corners: one object
    assert len(object_masks(diagonal, 1)[0]) == 1
    assert object_masks(np.zeros((5, 5), bool), 1) == ([], 0)


def test_coco_export_loads_in_pycocotools_one_annotation_per_object(predictions, tmp_path):
    run, masks = predictions
    summary = export(run, tmp_path / "out" / "coco.json", min_area=16)
    assert summary["exported"] == 4 and summary["rows"] == 5 and summary["other_config"] == 1
    assert summary["annotations"] == 3 and summary["images_without_objects"] == 2
    assert summary["objects_below_min_area"] == 2  # the speck in a/two, the blob in c/tiny
    coco = COCO(str(tmp_path / "out" / "coco.json"))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["salient object"]
    images = {img["file_name"]: img for img in coco.dataset["images"]}
    assert sorted(images) == sorted(masks)
    for name, (mask, quality) in masks.items():
        img = images[name]
        assert (img["height"], img["width"]) == mask.shape
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img["id"]))
        for ann in anns:
            assert ann["iscrowd"] == 0 and ann["category_id"] == 1
            assert isinstance(ann["segmentation"]["counts"], str)
            assert ann["score"] == pytest.approx(quality)
            obj = coco.annToMask(ann).astype(bool)
            assert ann["area"] == obj.sum() == mask_util.area(coco.annToRLE(ann))
            assert ann["bbox"] == list(mask_util.toBbox(coco.annToRLE(ann)))
            assert (obj <= mask).all()  # each object is part of the stored mask
        if name == "a/two.jpg":
            _, expected = two_blobs()
            got = sorted((coco.annToMask(a).astype(bool) for a in anns), key=lambda m: m.argmax())
            for obj, want in zip(got, expected, strict=True):
                np.testing.assert_array_equal(obj, want)
            assert sorted(a["bbox"] for a in anns) == [[5, 5, 15, 10], [30, 20, 25, 15]]
            assert sorted(a["area"] for a in anns) == [150, 375]
        elif name == "d/one.jpg":
            assert len(anns) == 1
            np.testing.assert_array_equal(coco.annToMask(anns[0]).astype(bool), mask)
        else:  # empty, and only a blob below min_area: listed, no annotation
            assert anns == []


@pytest.mark.parametrize(
    ("filters", "kept"),
    [
        ({}, {"a/two.jpg", "b/empty.jpg", "c/tiny.jpg", "d/one.jpg"}),
        ({"min_quality": 0.6}, {"a/two.jpg", "d/one.jpg"}),
        ({"top_fraction": 0.5}, {"a/two.jpg", "d/one.jpg"}),
        ({"top_fraction": 0.25}, {"a/two.jpg"}),
        ({"min_quality": 0.45, "top_fraction": 0.75}, {"a/two.jpg", "d/one.jpg", "c/tiny.jpg"}),
        ({"min_quality": 0.8, "top_fraction": 0.75}, {"a/two.jpg"}),
    ],
)
def test_quality_filters_keep_the_best_masks_of_the_current_config(
    predictions, tmp_path, filters, kept
):
    run, _ = predictions
    out = tmp_path / "coco.json"
    summary = export(run, out, **filters)
    names = {img["file_name"] for img in json.loads(out.read_text())["images"]}
    assert names == kept and summary["exported"] == len(kept)
    two = [img for img in json.loads(out.read_text())["images"] if img["file_name"] == "a/two.jpg"]
    assert two[0]["quality"] == pytest.approx(0.9)  # never the stale row of the old config


def test_png_export_reads_back_through_evaluate_as_the_same_masks(predictions, tmp_path):
    run, masks = predictions
    summary = export(run, tmp_path / "png", format="png")
    assert summary["pngs"] == 4
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == [
        "empty.png",
        "one.png",
        "tiny.png",
        "two.png",
    ]
    preds = load_predictions(str(tmp_path / "png"), {}).to_pylist()
    assert sorted(p["stem"] for p in preds) == ["empty", "one", "tiny", "two"]
    by_stem = {Path(i).stem: m for i, (m, _) in masks.items()}
    for p in preds:
        got = decode_gray(Path(p["pred_uri"]).read_bytes())
        np.testing.assert_array_equal(got, by_stem[p["stem"]].astype(np.uint8) * 255)

    export(run, tmp_path / "tree", format="png", png_layout="tree", png_map="saliency")
    assert (tmp_path / "tree" / "a" / "two.png").is_file()
    found = pngs_by_stem(str(tmp_path / "tree"), {}, "--predictions")
    for image_id, (mask, _) in masks.items():
        soft = decode_gray(Path(found[Path(image_id).stem]).read_bytes())
        np.testing.assert_array_equal(soft, np.where(mask, 200, 30))


def test_png_export_refuses_two_images_of_one_name_before_writing(tmp_path):
    masks = {"x/0001.jpg": (disc(30, 30), 0.5), "y/0001.JPG": (disc(30, 30), 0.6)}
    write_predictions(fsspec.filesystem("file"), str(tmp_path / "run"), masks)
    with pytest.raises(InputError, match=r"'x/0001.jpg' and 'y/0001.JPG'.*png-layout tree"):
        export(tmp_path / "run", tmp_path / "flat", format="png")
    assert not (tmp_path / "flat").exists()  # refused before anything is made
    export(tmp_path / "run", tmp_path / "tree", format="png", png_layout="tree")
    assert sorted(
        str(p.relative_to(tmp_path / "tree")) for p in (tmp_path / "tree").rglob("*.png")
    ) == [
        "x/0001.png",
        "y/0001.png",
    ]
    with pytest.raises(InputError, match="not empty"):  # never mixed with an earlier export
        export(tmp_path / "run", tmp_path / "tree", format="png", png_layout="tree")


def test_hf_export_loads_in_datasets_as_pil_images(predictions, tmp_path):
    datasets = pytest.importorskip("datasets")
    run, masks = predictions
    summary = export(run, tmp_path / "hf", format="hf", with_images=True)
    assert summary["rows_written"] == 4 and summary["rows"] == 5
    ds = datasets.load_dataset(
        "parquet",
        data_files=str(tmp_path / "hf" / "*.parquet"),
        split="train",
        cache_dir=str(tmp_path / "cache"),
    )
    assert isinstance(ds.features["mask"], datasets.Image)
    assert isinstance(ds.features["image"], datasets.Image)
    assert sorted(ds["image_id"]) == sorted(masks)
    for row in ds:
        mask, quality = masks[row["image_id"]]
        assert isinstance(row["mask"], Image.Image)
        np.testing.assert_array_equal(np.asarray(row["mask"]), mask.astype(np.uint8) * 255)
        picture = Image.open(tmp_path / "images" / row["image_id"])
        np.testing.assert_array_equal(np.asarray(row["image"]), np.asarray(picture))
        assert row["quality"] == pytest.approx(quality) and row["height"] == mask.shape[0]
    export(run, tmp_path / "hf_masks", format="hf")  # without images: masks only
    masks_only = datasets.load_dataset(
        "parquet",
        data_files=str(tmp_path / "hf_masks" / "*.parquet"),
        split="train",
        cache_dir=str(tmp_path / "cache"),
    )
    assert "image" not in masks_only.features
    assert isinstance(masks_only.features["saliency"], datasets.Image)
    # the product's own shards load too, but their plain PNG column stays bytes
    plain = datasets.load_dataset(
        "parquet",
        data_files=str(run / "masks" / "*.parquet"),
        split="train",
        cache_dir=str(tmp_path / "cache"),
    )
    assert plain.features["mask_png"] == datasets.Value("binary")


def test_s3_in_and_out_equals_local(predictions, s3, tmp_path):
    import s3fs

    run, masks = predictions
    fs = s3fs.S3FileSystem(endpoint_url=s3["endpoint"], key="testing", secret="testing")
    fs.mkdir("exports")
    write_predictions(fs, "exports/run", masks)
    storage = StorageConfig(endpoint_url=s3["endpoint"])
    local = export(run, tmp_path / "local.json")
    remote = export("s3://exports/run", "s3://exports/out/coco.json", storage=storage)
    assert remote == {**local, "output": "s3://exports/out/coco.json"}
    got = json.loads(fs.cat_file("exports/out/coco.json"))
    want = json.loads((tmp_path / "local.json").read_text())
    assert got["annotations"] == want["annotations"] and len(got["images"]) == 4
    export("s3://exports/run", "s3://exports/out/png", format="png", storage=storage)
    assert sorted(fs.ls("exports/out/png")) == [
        f"exports/out/png/{s}.png" for s in ("empty", "one", "tiny", "two")
    ]
    two = decode_gray(fs.cat_file("exports/out/png/two.png"))
    np.testing.assert_array_equal(two, masks["a/two.jpg"][0].astype(np.uint8) * 255)


def test_bad_inputs_are_one_clear_error(predictions, tmp_path):
    run, _ = predictions
    with pytest.raises(InputError, match="is a folder"):
        export(run, tmp_path)
    with pytest.raises(InputError, match="holds no Parquet shards"):
        export(tmp_path / "images", tmp_path / "x.json")
    no_quality = {"p.jpg": (disc(30, 30), float("nan"))}
    write_predictions(fsspec.filesystem("file"), str(tmp_path / "predict"), no_quality)
    export(tmp_path / "predict", tmp_path / "ok.json")  # no filter: exported, no score
    ann = json.loads((tmp_path / "ok.json").read_text())["annotations"][0]
    assert "score" not in ann
    with pytest.raises(InputError, match="no mask has a quality"):
        export(tmp_path / "predict", tmp_path / "q.json", min_quality=0.5)
    foreign = tmp_path / "foreign"
    write_table_atomic(fsspec.filesystem("file"), str(foreign), pa.table({"image_id": ["a"]}))
    with pytest.raises(InputError, match="lacks the columns"):
        export(foreign, tmp_path / "f.json")
    failed = tmp_path / "failed"  # a run whose every image failed: an empty masks shard
    write_table_atomic(fsspec.filesystem("file"), str(failed / "masks"), MASK_SCHEMA.empty_table())
    with pytest.raises(InputError, match="holds no masks"):
        export(failed, tmp_path / "e.json")


def test_job_exits_0_with_a_summary_and_2_with_one_line(predictions, tmp_path, monkeypatch, capsys):
    run, _ = predictions
    args = ["--predictions", str(run), "--output", str(tmp_path / "c.json"), "--min-area", "16"]
    monkeypatch.setattr(sys, "argv", ["jobs/export.py", *args, "--top-fraction", "0.5"])
    sigterm = signal.getsignal(signal.SIGTERM)  # run_job may install its own handler
    try:
        with pytest.raises(SystemExit) as done:  # the script in this process: flags, exit
            runpy.run_path(str(REPO / "jobs" / "export.py"), run_name="__main__")
    finally:
        signal.signal(signal.SIGTERM, sigterm)
    assert done.value.code == 0
    assert "export complete: 2 of 5 masks as coco" in capsys.readouterr().out
    coco = json.loads((tmp_path / "c.json").read_text())
    assert sorted(i["file_name"] for i in coco["images"]) == ["a/two.jpg", "d/one.jpg"]
    assert len(coco["annotations"]) == 3  # two objects in a/two, one in d/one
    bad = run_script(  # a real process: one line on stderr, status 2
        "jobs/export.py",
        ["--predictions", str(tmp_path / "nope"), "--output", str(tmp_path / "o.json")],
        job_env(),
        timeout=120,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        f"error: --predictions {str(tmp_path / 'nope')!r} does not exist"
    ]
