"""train and predict end to end: Ray Train (DDP on gloo) on a real local Ray head,
real pseudo-masks of real photos, checkpoints, failures, S3 via moto."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from autosod_ray.config import ConfigError, PredictConfig, TrainConfig, load_config
from autosod_ray.data.uris import InputError
from autosod_ray.predict import run_predict
from autosod_ray.train.run import run_train
from tests.conftest import (
    copy_photos,
    job_env,
    ray_job_submit,
    run_script,
    start_ray_head,
    start_script,
    stop_ray_node,
    wait_for,
)

N_IMAGES = 16


@pytest.fixture(scope="module")
def photos(tmp_path_factory, ecssd) -> Path:
    return copy_photos(tmp_path_factory.mktemp("photos"), ecssd, N_IMAGES)


@pytest.fixture(scope="module")
def pseudo_masks(photos, tmp_path_factory, ray_head, weights_path) -> Path:
    """Real POTNet pseudo-masks of the photos, made by the pseudolabel job."""
    out = tmp_path_factory.mktemp("pseudo") / "run"
    args = ["--config", "configs/smoke.yaml", "--input", str(photos), "--output", str(out)]
    args += ["--set", f"backbone.weights={weights_path}"]
    res = run_script("jobs/pseudolabel.py", args, job_env(RAY_ADDRESS=ray_head["address"]))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def laptop_head(tmp_path_factory):
    """A Ray head of 2 logical CPUs, a laptop's: the shipped configs' `auto` scaling must
    leave a CPU to data ingest on it and still end."""
    head = start_ray_head(tmp_path_factory.mktemp("ray2"), 2)  # short: Ray's socket paths
    yield head
    stop_ray_node(head["proc"], head["log"])


def shipped(config: str, pseudo: str, out: str, weights_path, *sets: str) -> list[str]:
    """train.py arguments for a shipped config at test size: its model, data path and
    `auto` scaling as shipped; the backbone at 56 px, 2 images a step, checkpoints every 2."""
    small = ["backbone.name=vit_small_patch14_dinov2.lvd142m", "backbone.image_size=56"]
    small += ["optim.batch_size=2", "optim.warmup_steps=1", "checkpoint.every_steps=2", *sets]
    args = train_args(pseudo, out, weights_path, *(a for s in small for a in ("--set", s)))
    args[1] = config
    return args


def check_laptop_scaling(summary: dict) -> None:
    """`auto` on 2 CPUs: one worker that leaves a CPU to data ingest."""
    scaling = summary["config"]["scaling"]
    assert (scaling["num_workers"], scaling["cpus_per_worker"]) == (1, 1.0)
    assert scaling["use_gpu"] is False and scaling["torch_threads"] >= 1


def train_args(pseudo: str, out: str, weights_path, *extra: str) -> list[str]:
    return [
        "--config",
        "configs/train-smoke.yaml",
        "--pseudo-masks",
        pseudo,
        "--output",
        out,
        "--set",
        f"backbone.weights={weights_path}",
        *extra,
    ]


def checkpoints(out: Path) -> list[Path]:
    return sorted(p for p in (out / "checkpoints").glob("checkpoint_*") if p.is_dir())


def check_predictions(masks: pd.DataFrame, photos: Path) -> None:
    """One row per photo, binary masks at each photo's own size."""
    assert sorted(masks.image_id) == sorted(p.name for p in photos.glob("*.jpg"))
    for _, row in masks.iterrows():
        h, w = Image.open(photos / row.image_id).size[::-1]
        mask = np.asarray(Image.open(io.BytesIO(row.mask_png)))
        assert mask.shape == (h, w) == (row.height, row.width)
        assert set(np.unique(mask)) <= {0, 255}
        assert 0 <= row.confidence <= 1 and np.isnan(row.consistency_loss)
        # the model's own estimate of its mask's IoU: 0 exactly when the mask is empty (a
        # barely trained model may find nothing)
        assert 0 <= row.quality < 1 and (row.quality == 0) == (not mask.any())
    assert masks.backbone.str.startswith("autosod:").all()
    assert masks.attention_border.between(0.01, 10).all()  # from its own encoder, never NaN


def test_train_two_workers_survive_a_killed_rank_validate_resume_then_predict(
    pseudo_masks, photos, tmp_path, ray_head, weights_path, ecssd
):
    """One DDP run of 2 workers on a real Ray head: a rank killed mid-run (Ray Train
    restarts the group from the last checkpoint), validation during and at the end, keep_last;
    then a longer schedule resumes it, and predict uses the model."""
    out = tmp_path / "train"
    env = job_env(RAY_ADDRESS=ray_head["address"])
    val = ["--set", f"validation.images={ecssd / 'images'}"]
    val += ["--set", f"validation.ground_truth={ecssd / 'masks'}", "--set", "validation.limit=4"]
    val += ["--set", "validation.every_steps=3"]
    # batches of 2: each rank's 8 images are one epoch of 4 steps (an epoch costs a Ray
    # Data pass; the steps themselves are cheap); a checkpoint every 2 steps
    short = ["--set", "optim.batch_size=2", "--set", "checkpoint.every_steps=2"]
    args = train_args(str(pseudo_masks), str(out), weights_path, *val, *short)
    proc = start_script("jobs/train.py", [*args, "--set", "optim.max_steps=8"], env)
    # a checkpoint counts once Ray Train has registered it (its snapshot names it)
    snapshot = out / "checkpoints" / "checkpoint_manager_snapshot.json"
    registered = lambda: snapshot.exists() and "checkpoint_dir_name" in snapshot.read_text()  # noqa: E731
    wait_for(lambda: registered() and train_worker_pid(ray_head), proc)
    os.kill(train_worker_pid(ray_head), signal.SIGKILL)  # one DDP rank dies mid-run
    stdout, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, stdout[-5000:]
    assert "train: resumed from step" in stdout
    resumed = int(stdout.split("train: resumed from step ")[1].split()[0])
    assert 2 <= resumed < 8
    summary = json.loads((out / "train.json").read_text())
    assert summary["steps"] == 8 and summary["status"] == "complete"
    m = summary["metrics"]
    assert np.isfinite(m["loss"]) and m["images_per_second"] > 0
    assert 0 <= m["val_maxF"] <= 1 and 0 <= m["val_MAE"] <= 1  # validated at the end
    # keep_last: Ray Train keeps the last 2 it registered (a checkpoint from before the
    # restart may stay on disk beside them: Ray Train 2.60 does not delete it)
    kept = json.loads(snapshot.read_text())["checkpoint_results"]
    assert [r["metrics"]["step"] for r in kept] == [6, 8]
    assert {r["checkpoint_dir_name"] for r in kept} <= {p.name for p in checkpoints(out)}
    meta = json.loads((out / "model" / "model.json").read_text())
    assert meta["steps"] == 8 and meta["backbone"]["weights"] is None  # all weights are ours

    # the same command with a longer schedule continues from the last checkpoint
    more = train_args(
        str(pseudo_masks), str(out), weights_path, *short, "--set", "optim.max_steps=10"
    )
    res = run_script("jobs/train.py", more, env)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    said = res.stdout + res.stderr
    # progress, in steps; each line once (Ray Train doubles what a worker print()s)
    assert said.count("resumed from step 8") == said.count("train  10/10 steps  100.0%") == 1
    assert json.loads((out / "train.json").read_text())["steps"] == 10

    # predict: every photo gets a mask at its own size; a corrupt file an errors row
    images = tmp_path / "new"
    shutil.copytree(photos, images)
    (images / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    pred = tmp_path / "pred"
    args = ["--model", str(out / "model"), "--input", str(images), "--output", str(pred)]
    res = run_script("jobs/predict.py", args, env)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    check_predictions(pd.read_parquet(pred / "masks"), photos)
    errors = pd.read_parquet(pred / "errors")
    assert list(errors.image_id) == ["broken.jpg"]
    # (predict's resume, nothing left to do, is the self-training test's rerun)
    run = json.loads((pred / "run.json").read_text())
    assert run["provenance"]["model"]["sha256"] == meta_sha(out / "model")  # made by it
    # and scored by this fit of `quality` (a resume never mixes two scores' rows)
    from autosod_ray.model.quality import quality_settings

    assert run["settings"]["quality"] == quality_settings("guided")


def test_quality_filter_keeps_the_best_masks(pseudo_masks, ray_head, tmp_path):
    """data.keep_top_fraction / min_quality: chosen on the driver, applied by Ray Data."""
    import ray

    from autosod_ray.config import DataSection
    from autosod_ray.data.training import read_pseudo_masks, select_pseudo_masks

    assert len(pd.read_parquet(pseudo_masks / "errors")) == 0  # nothing failed: still a table
    table = pq.read_table(pseudo_masks / "masks", columns=["image_id", "quality"])
    quality = dict(zip(*table.to_pydict().values(), strict=True))
    assert len(quality) == N_IMAGES and all(0 <= q <= 1 for q in quality.values())
    best = sorted(quality, key=quality.get, reverse=True)[: N_IMAGES // 4]
    sel = select_pseudo_masks(str(pseudo_masks), {}, DataSection(keep_top_fraction=0.25))
    assert sel.rows == N_IMAGES and sel.kept == len(best)
    assert sel.min_quality == pytest.approx(min(quality[i] for i in best))
    ray.init(address=ray_head["address"])
    try:
        kept = read_pseudo_masks(sel).take_all()
    finally:
        ray.shutdown()
    assert sorted(r["image_id"] for r in kept) == sorted(best)
    assert set(kept[0]) == {"image_id", "source_uri", "mask_png"}
    with pytest.raises(InputError, match="no mask passes"):
        select_pseudo_masks(
            str(pseudo_masks), {}, DataSection(min_quality=1.0, min_fg_fraction=0.5)
        )
    # pseudo-masks without a quality column cannot be filtered on it
    plain = tmp_path / "plain" / "masks"
    plain.mkdir(parents=True)
    pq.write_table(
        pq.read_table(pseudo_masks / "masks").drop_columns(["quality"]), plain / "p.parquet"
    )
    with pytest.raises(InputError, match="lacks a column the data filters read"):
        select_pseudo_masks(str(plain.parent), {}, DataSection(min_quality=0.5))
    assert select_pseudo_masks(str(plain.parent), {}, DataSection()).kept == N_IMAGES


def meta_sha(model: Path) -> str:
    import hashlib

    return hashlib.sha256((model / "model.safetensors").read_bytes()).hexdigest()


def test_a_quality_filter_on_unscored_masks_names_the_fix(pseudo_masks, tmp_path):
    """Masks without a `quality` (NaN: an older predict's): a quality filter says so
    instead of keeping nothing for an unnamed reason; with some masks scored, only the
    scored ones count."""
    from autosod_ray.config import DataSection
    from autosod_ray.data.training import quality_threshold, select_pseudo_masks

    mine = tmp_path / "pseudo"
    shutil.copytree(pseudo_masks, mine)
    for shard in (mine / "masks").glob("*.parquet"):
        table = pq.read_table(shard)
        nan = pa.array(np.full(len(table), np.nan, np.float32))
        column = table.schema.get_field_index("quality")
        pq.write_table(table.set_column(column, "quality", nan), shard)
    with pytest.raises(InputError, match="no mask has a `quality` score"):
        select_pseudo_masks(str(mine / "masks"), {}, DataSection(keep_top_fraction=0.5))
    everything = select_pseudo_masks(str(mine / "masks"), {}, DataSection())
    assert everything.kept == everything.rows > 0
    # NaN neither counts toward the kept fraction nor passes
    q = np.array([np.nan, 0.2, 0.4, np.nan, 0.6, 0.8])
    assert quality_threshold(q, 0.0, 0.5) == 0.6
    assert quality_threshold(q, 0.7, 1.0) == 0.7


def test_token_cache_rows_are_the_encoders_own_tokens(pseudo_masks, photos, weights_path):
    """One EncoderStage batch: view 0 is model.encode(image), view 1 the mirrored image's,
    each keyed by the digest of the image bytes; a target is the pseudo-mask at the mask
    grid."""
    import hashlib

    import torch

    from autosod_ray.data.stages import decode, read_bytes
    from autosod_ray.model import build_autosod
    from autosod_ray.train.token_cache import EncoderStage, area_target

    cfg = load_config(
        TrainConfig,
        "configs/train-smoke.yaml",
        [f"backbone.weights={weights_path}", "pseudo_masks=x", "output=y"],
    )
    rows = pq.read_table(pseudo_masks / "masks").slice(0, 2).to_pydict()
    batch = {k: np.array(v, dtype=object) for k, v in rows.items() if k != "image_sha256"}
    batch = decode(read_bytes(batch, {}), image_size=112, max_pixels=10**8, min_side=1)
    out = EncoderStage(cfg.model_dump(mode="json"))(batch)
    assert list(out["view"]) == [0, 0, 1, 1]
    digests = [hashlib.sha256((photos / i).read_bytes()).hexdigest() for i in rows["image_id"]]
    assert list(out["image_sha256"]) == digests * 2 == rows["image_sha256"] * 2
    model = build_autosod(cfg.backbone, cfg.model).eval()
    with torch.inference_mode():
        want = model.encode(torch.as_tensor(batch["image"]))
        mirrored = model.encode(torch.as_tensor(batch["image"][:, :, ::-1].copy()))
    got = np.stack([np.frombuffer(t, np.float16).reshape(64, -1) for t in out["tokens"]])
    np.testing.assert_allclose(got[:2], want.numpy(), atol=2e-2, rtol=1e-2)
    np.testing.assert_allclose(got[2:], mirrored.numpy(), atol=2e-2, rtol=1e-2)
    target = area_target(rows["mask_png"][1], (8, 8))
    assert target.shape == (16, 16) and 0 <= target.min() <= target.max() <= 1
    mask = np.asarray(Image.open(io.BytesIO(rows["mask_png"][1]))) > 127
    assert abs(target.mean() - mask.mean()) < 0.05  # the mask's share, cell by cell


def relabel(masks: Path) -> None:
    """Other pseudo-masks for the same images, in place (as a relabel with other POTNet
    settings writes them): every mask inverted, under another config hash."""
    for path in sorted(masks.glob("*.parquet")):
        t = pq.read_table(path)
        inverted = [_png(255 - _gray(b)) for b in t.column("mask_png").to_pylist()]
        t = t.set_column(t.column_names.index("mask_png"), "mask_png", pa.array(inverted))
        hashes = pa.array(["relabelled000000"] * t.num_rows)
        t = t.set_column(t.column_names.index("config_hash"), "config_hash", hashes)
        pq.write_table(t, path)


def _gray(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)))


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_selftrain_rounds_chain_the_jobs_paths():
    """Round k: student-(k-1) labels --input into labels-k, student-k trains on them; the
    students share <output>/token_cache and the top-level storage."""
    from autosod_ray.config import SelfTrainConfig
    from autosod_ray.selftrain import round_configs

    cfg = load_config(
        SelfTrainConfig,
        "configs/selftrain-cpu.yaml",
        ["storage.endpoint_url=http://127.0.0.1:9", "rounds=2"],
        {"input": "s3://b/images", "pseudo_masks": "s3://b/potnet", "output": "s3://b/self"},
    )
    none, first = round_configs(cfg, 0)
    assert none is None and first.pseudo_masks == "s3://b/potnet"
    assert first.output == "s3://b/self/student-0"
    label, second = round_configs(cfg, 2)
    assert (label.model, label.input, label.output) == (
        "s3://b/self/student-1/model",
        "s3://b/images",
        "s3://b/self/labels-2",
    )
    assert (second.pseudo_masks, second.output) == ("s3://b/self/labels-2", "s3://b/self/student-2")
    assert first.data.token_cache == second.data.token_cache == "s3://b/self/token_cache"
    assert label.storage.endpoint_url == second.storage.endpoint_url == "http://127.0.0.1:9"
    assert second.optim == first.optim and second.data.keep_top_fraction == 0.75  # one recipe


def test_a_selftrain_step_that_stops_is_recorded(tmp_path, photos):
    """A step that raises (here: pseudo-masks that do not exist, refused before any Ray
    work) leaves selftrain.json saying how and where the run stopped, then ends the job
    as that step would."""
    from autosod_ray.config import SelfTrainConfig
    from autosod_ray.selftrain import run_selftrain

    out = tmp_path / "self"
    flags = {"input": str(photos), "pseudo_masks": str(tmp_path / "none"), "output": str(out)}
    cfg = load_config(SelfTrainConfig, "configs/selftrain-cpu.yaml", [], flags)
    with pytest.raises(InputError):
        run_selftrain(cfg)
    record = json.loads((out / "selftrain.json").read_text())
    assert record["status"] == "user error" and "pseudo" in record["reason"]
    assert record["stopped_at"] == {"round": 0, "job": "train", "output": str(out / "student-0")}
    assert record["model"] is None and record["steps"] == []


def test_selftrain_rounds_relabel_then_train_on_the_students_surest_masks(
    pseudo_masks, photos, tmp_path, ray_head, weights_path
):
    """jobs/selftrain.py: student-0 on POTNet's masks, student-0 relabels the photos with
    its own quality, student-1 trains on the better half of those; the students share the
    token cache; the same command again does nothing."""
    from autosod_ray.data.training import quality_threshold

    out = tmp_path / "self"
    args = ["--input", str(photos), "--pseudo-masks", str(pseudo_masks), "--output", str(out)]
    tiny = {
        "backbone.weights": weights_path,
        "backbone.image_size": 112,
        "model.num_queries": 5,
        "model.decoder_layers": 2,
        "model.width": 128,
        "model.heads": 4,
        "model.ffn_width": 256,
        "optim.batch_size": 4,
        "optim.max_steps": 3,
        "optim.warmup_steps": 1,
        "scaling.num_workers": 1,
        "scaling.cpus_per_worker": 1,
        "checkpoint.every_steps": 3,
        "data.keep_top_fraction": 0.5,
        "data.min_fg_fraction": 0.0,
        "data.max_fg_fraction": 1.0,
    }
    sets = [f"train.{k}={v}" for k, v in tiny.items()]
    sets += ["predict.pipeline.pool_max=1", "predict.pipeline.pool_min=1"]
    args += [a for kv in sets for a in ("--set", kv)]
    env = job_env(RAY_ADDRESS=ray_head["address"])
    res = run_script("jobs/selftrain.py", args, env)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    summary = json.loads((out / "selftrain.json").read_text())
    assert [(s["round"], s["job"], s["status"]) for s in summary["steps"]] == [
        (0, "train", "complete"),
        (1, "predict", "complete"),
        (1, "train", "complete"),
    ]
    assert summary["model"] == str(out / "student-1" / "model")
    labels = pd.read_parquet(out / "labels-1" / "masks")
    check_predictions(labels, photos)
    first = json.loads((out / "student-0" / "train.json").read_text())
    second = json.loads((out / "student-1" / "train.json").read_text())
    assert json.loads((out / "labels-1" / "run.json").read_text())["provenance"]["model"][
        "sha256"
    ] == meta_sha(out / "student-0" / "model")  # labelled by student-0
    cut = quality_threshold(labels.quality.to_numpy(), 0.0, 0.5)  # the better half (ties in)
    best = set(labels.image_id[labels.quality >= cut])
    assert second["pseudo_masks"]["kept"] == len(best) >= N_IMAGES // 2
    assert second["pseudo_masks"]["min_quality"] == pytest.approx(cut)
    assert second["provenance"]["pseudo_masks"]["uri"].startswith(str(out / "labels-1"))
    # one token cache: student-1 encodes only the images student-0 did not train on
    potnet = pd.read_parquet(pseudo_masks / "masks")
    cut0 = quality_threshold(potnet.quality.to_numpy(), 0.0, 0.5)
    kept0 = set(potnet.image_id[potnet.quality >= cut0])  # student-0's: POTNet's best half
    cache0, cache1 = first["token_cache"], second["token_cache"]
    assert cache0["location"] == cache1["location"] == str(out / "token_cache" / cache0[
        "location"].rsplit("/", 1)[1])  # fmt: skip
    # each image and its mirror; ties at the cut are kept (a barely trained student may
    # write several empty masks, each of quality 0)
    assert cache0["encoded"] == 2 * len(kept0) and cache1["rows"] == 2 * len(best)
    assert cache1["reused"] == 2 * len(best & kept0)  # each image and its mirror
    assert cache1["encoded"] == 2 * len(best - kept0)
    # the same command again: every step is complete, nothing is trained or labelled again
    res = run_script("jobs/selftrain.py", args, env)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    again = json.loads((out / "selftrain.json").read_text())
    statuses = [s["status"] for s in again["steps"]]
    assert statuses == ["already complete", "complete", "already complete"]
    assert again["steps"][1]["labelled"] == N_IMAGES and "selftrain complete" in res.stdout
    relabel_run = json.loads((out / "labels-1" / "run.json").read_text())["runs"][-1]
    assert relabel_run["skipped_already_done"] == N_IMAGES  # predict resumed: nothing left
    assert relabel_run["labelled_this_run"] == 0
    # the rounds' own paths are not settable: the job names the keys and what to give
    res = run_script("jobs/selftrain.py", [*args, "--set", "train.output=elsewhere"], env)
    assert res.returncode == 2 and "train.output" in res.stderr and "--output" in res.stderr


def test_training_pairs_key_masks_by_the_image_they_were_made_of(pseudo_masks, photos, tmp_path):
    """Targets come from the pseudo-masks, matched to cached tokens by image digest: a
    relabel gives the new masks for the same keys; an image replaced since labelling is
    left out (its mask is of another picture)."""
    import hashlib

    from autosod_ray.config import DataSection
    from autosod_ray.data.training import select_pseudo_masks
    from autosod_ray.train.token_cache import training_pairs

    mine = tmp_path / "pseudo"
    shutil.copytree(pseudo_masks, mine)
    digests = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in photos.glob("*.jpg")}
    now = pa.table({"image_id": list(digests), "image_sha256": list(digests.values())})
    before, _ = training_pairs(select_pseudo_masks(str(mine), {}, DataSection()), now)
    relabel(mine / "masks")
    changed = dict(digests, **{"0001.jpg": "0" * 64})  # replaced on disk since labelling
    now = pa.table({"image_id": list(changed), "image_sha256": list(changed.values())})
    after, left_out = training_pairs(select_pseudo_masks(str(mine), {}, DataSection()), now)
    assert left_out == {"unreadable": 0, "image_changed": 1}
    assert before.num_rows == N_IMAGES and after.num_rows == N_IMAGES - 1
    old = dict(zip(*before.to_pydict().values(), strict=True))
    for key, png in zip(*after.to_pydict().values(), strict=True):
        assert np.array_equal(_gray(png), 255 - _gray(old[key]))


def test_a_corrupt_pseudo_mask_shard_is_named_before_any_work(pseudo_masks, tmp_path):
    mine = tmp_path / "pseudo"
    shutil.copytree(pseudo_masks, mine)
    victim = sorted((mine / "masks").glob("*.parquet"))[0]
    victim.write_bytes(victim.read_bytes()[:100])
    args = train_args(str(mine), str(tmp_path / "out"), "/unused")
    res = run_script("jobs/train.py", args, job_env())
    assert res.returncode == 2 and "not a readable Parquet file" in res.stderr
    assert victim.name in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def train_worker_pid(ray_head) -> int | None:
    """PID of a live Ray Train worker, from Ray's state API."""
    from ray.util.state import list_actors

    alive = list_actors(
        address=ray_head["dashboard"],
        filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
    )
    return alive[0].pid if alive else None


@pytest.mark.parametrize(
    "sets, message",
    [
        ([], "holds no Parquet files"),
        (["validation.images=IMAGES"], "needs both validation.images and"),
        (["backbone.name=resnet50"], "is not a ViT"),
        (["backbone.weights=/nowhere/w.safetensors"], "no file at"),
    ],
)
def test_bad_train_inputs_fail_before_ray(sets, message, tmp_path, weights_path, ecssd):
    empty = tmp_path / "empty"
    empty.mkdir()
    overrides = [f"pseudo_masks={empty}", f"output={tmp_path / 'out'}"]
    overrides += [f"backbone.weights={weights_path}"]
    overrides += [s.replace("IMAGES", str(ecssd / "images")) for s in sets]
    if sets:  # pseudo-masks that pass, so that the check under test fires
        overrides[0] = f"pseudo_masks={_fake_masks(tmp_path)}"
    cfg = load_config(TrainConfig, "configs/train-smoke.yaml", overrides)
    with pytest.raises((InputError, ValueError, FileNotFoundError), match=message):
        run_train(cfg)


def _fake_masks(tmp_path: Path) -> Path:
    root = tmp_path / "pl"
    (root / "masks").mkdir(parents=True)
    pq.write_table(
        pa.table({"image_id": ["a"], "fg_fraction": pa.array([0.2], pa.float32())}),
        root / "masks" / "part-0.parquet",
    )
    return root


def test_predict_refuses_a_folder_that_is_not_a_model(tmp_path, photos):
    cfg = PredictConfig(model=str(tmp_path), input=str(photos), output=str(tmp_path / "o"))
    with pytest.raises(InputError, match="not a trained model folder"):
        run_predict(cfg)
    res = run_script(
        "jobs/predict.py",
        ["--model", str(tmp_path), "--input", str(photos), "--output", str(tmp_path / "o")],
        job_env(),
    )
    assert res.returncode == 2 and "not a trained model folder" in res.stderr
    # random bytes as the weights: one clear line from the driver, before any Ray work
    (tmp_path / "model.json").write_text(
        json.dumps({"backbone": {"name": "vit_small_patch14_dinov2.lvd142m"}, "model": {}})
    )
    (tmp_path / "model.safetensors").write_bytes(np.random.default_rng(0).bytes(4096))
    res = run_script(
        "jobs/predict.py",
        ["--model", str(tmp_path), "--input", str(photos), "--output", str(tmp_path / "o")],
        job_env(),
    )
    assert res.returncode == 2 and "does not load into the network" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and "Started a local Ray" not in res.stderr


# the shipped configs on a laptop's Ray, last: its head lives only for them


def test_train_on_cached_tokens_then_reuse_the_cache(
    pseudo_masks, photos, tmp_path, laptop_head, weights_path
):
    """configs/train-cpu.yaml (cached tokens, `auto` scaling) on a 2-CPU Ray: it trains,
    a rerun does nothing, a relabel is refused, --overwrite retrains on the cached tokens."""
    mine = tmp_path / "pseudo"
    shutil.copytree(pseudo_masks, mine)
    out = tmp_path / "train"
    env = job_env(RAY_ADDRESS=laptop_head["address"])
    half = ["data.keep_top_fraction=0.5", "data.min_fg_fraction=0", "data.max_fg_fraction=1"]
    # 8 images kept, 16 rows with their mirrors, 2 a step: 8 steps an epoch, each run one
    args = shipped("configs/train-cpu.yaml", str(mine), str(out), weights_path, *half)
    args += ["--set", "optim.max_steps=6"]
    res = run_script("jobs/train.py", args, env)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    summary = json.loads((out / "train.json").read_text())
    check_laptop_scaling(summary)
    cache = summary["token_cache"]
    assert summary["pseudo_masks"]["kept"] == N_IMAGES // 2
    assert cache["images"] == N_IMAGES // 2 and cache["rows"] == N_IMAGES  # two views each
    assert cache["encoded"] == N_IMAGES and cache["location"].startswith(str(out / "token_cache"))
    assert summary["steps"] == 6 and np.isfinite(summary["metrics"]["loss"])
    made_from = summary["provenance"]["pseudo_masks"]
    assert made_from["kept"] == N_IMAGES // 2 and len(made_from["rows_sha256"]) == 64
    # the same command again: the run is complete, so nothing happens, and it says so
    # (resuming a longer schedule is tested above, on images)
    res = run_script("jobs/train.py", args, env)
    assert res.returncode == 0 and "already complete" in res.stdout, res.stdout[-2000:]
    assert "nothing to do" in res.stdout and "Started a local Ray" not in res.stdout + res.stderr
    after = json.loads((out / "train.json").read_text())
    assert {k: v for k, v in after.items() if k != "runs"} == {
        k: v for k, v in summary.items() if k != "runs"
    }  # the model's record stands; the no-op run has its own entry
    assert after["runs"][-1]["outcome"] == "already complete" and len(after["runs"]) == 2
    # pseudo-masks relabelled in place: resuming onto them is refused, naming what changed
    relabel(mine / "masks")
    longer = [*args, "--set", "optim.max_steps=8"]
    res = run_script("jobs/train.py", longer, env)
    assert res.returncode == 2 and "pseudo_masks.config_hashes" in res.stderr, res.stderr[-2000:]
    assert len(res.stderr.strip().splitlines()) == 1
    # --overwrite: a fresh training on the new masks; the tokens (same images, same
    # encoder) are reused, the targets are the new masks
    res = run_script("jobs/train.py", [*longer, "--overwrite"], env)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert "resumed from step" not in res.stdout + res.stderr
    summary = json.loads((out / "train.json").read_text())
    assert summary["steps"] == 8 and summary["token_cache"]["encoded"] == 0
    assert summary["token_cache"]["reused"] == summary["token_cache"]["rows"] > 0
    assert summary["provenance"]["pseudo_masks"]["config_hashes"] == ["relabelled000000"]
    # the cached rows need a frozen encoder
    with pytest.raises(ConfigError, match="freeze_encoder"):
        load_config(TrainConfig, None, ["data.cache_tokens=true", "optim.freeze_encoder=false"])


def test_ray_job_submit_train_and_predict_on_s3(
    pseudo_masks, photos, s3, laptop_head, weights_path
):
    """configs/train.yaml (images, the encoder fine-tuned, `auto` scaling) submitted to a
    2-CPU Ray, reading and writing S3; then predict from the model on S3."""
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3["endpoint"], key="testing", secret="testing")
    fs.mkdir("train")  # moto keeps buckets across servers in one process: a new name
    fs.put(str(photos), "train/images", recursive=True)
    # the pseudo-masks, as if pseudolabel had read the photos from S3
    table = pq.read_table(pseudo_masks / "masks")
    uris = [f"s3://train/images/{i}" for i in table.column("image_id").to_pylist()]
    table = table.set_column(
        table.schema.get_field_index("source_uri"), "source_uri", pa.array(uris)
    )
    buf = io.BytesIO()
    pq.write_table(table, buf)
    fs.pipe_file("train/run1/masks/part-0.parquet", buf.getvalue())

    endpoint = ["--set", f"storage.endpoint_url={s3['endpoint']}"]
    args = shipped("configs/train.yaml", "s3://train/run1", "s3://train/train1", weights_path)
    args += [*endpoint, "--set", "optim.max_steps=4"]
    res = ray_job_submit(laptop_head, ["jobs/train.py", *args], env_vars=s3["env"])
    assert res.returncode == 0, (res.stdout + res.stderr)[-5000:]
    summary = json.loads(fs.cat_file("train/train1/train.json"))
    assert summary["steps"] == 4 and not summary["config"]["optim"]["freeze_encoder"]
    check_laptop_scaling(summary)
    assert fs.exists("train/train1/model/model.safetensors")
    assert len(fs.glob("train/train1/checkpoints/checkpoint_*/state.pt")) == 2

    args = ["--model", "s3://train/train1/model", "--input", "s3://train/images"]
    args += ["--output", "s3://train/pred1", *endpoint]
    res = ray_job_submit(laptop_head, ["jobs/predict.py", *args], env_vars=s3["env"])
    assert res.returncode == 0, (res.stdout + res.stderr)[-5000:]
    masks = pd.concat(
        pd.read_parquet(io.BytesIO(fs.cat_file(p))) for p in fs.glob("train/pred1/masks/*.parquet")
    )
    check_predictions(masks, photos)
