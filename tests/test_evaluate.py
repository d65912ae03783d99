"""jobs/evaluate.py on a real local Ray: reference values, Parquet input, odd pairs."""

import io
import json
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from autosod_ray.metrics import METRIC_KEYS, SODMetrics
from tests.conftest import PYSOD_REFERENCE_NAMES, REPO, job_env, ray_job_submit


def evaluate(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """jobs/evaluate.py; its own local Ray unless `env` names a cluster."""
    return subprocess.run(
        [sys.executable, "jobs/evaluate.py", *args],
        cwd=REPO,
        env=env or job_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def fixtures(shared_dir):
    return shared_dir / "data" / "pysodmetrics"


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def test_png_folder_equals_published_values_and_single_process(fixtures, tmp_path):
    res = evaluate(
        "--predictions",
        str(fixtures / "preds"),
        "--ground-truth",
        str(fixtures / "masks"),
        "--output",
        str(tmp_path / "m" / "metrics.json"),
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "evaluate  3/3 images  100.0%" in res.stderr  # progress, in images
    metrics = json.loads((tmp_path / "m" / "metrics.json").read_text())
    ref = json.loads((fixtures / "version_performance.json").read_text())["v1_4_3"]
    for ours, theirs in PYSOD_REFERENCE_NAMES.items():
        assert metrics[ours] == pytest.approx(ref[theirs], abs=1e-10), ours
    single = SODMetrics()
    for pred in sorted((fixtures / "preds").iterdir()):
        single.step(
            np.asarray(Image.open(pred).convert("L")),
            np.asarray(Image.open(fixtures / "masks" / pred.name).convert("L")),
        )
    expected = single.results()
    for key in METRIC_KEYS:
        assert metrics[key] == pytest.approx(expected[key], abs=1e-12), key
    assert metrics["n"] == 3 and metrics["predictions_without_gt"] == 0
    assert metrics["gt_without_predictions"] == 0 and metrics["resized"] == 0
    per_image = pd.read_parquet(tmp_path / "m" / "metrics_per_image.parquet")
    assert len(per_image) == 3 and per_image.IoU.is_monotonic_increasing
    assert metrics["quality_ranking"] is None  # PNG maps carry no quality


def test_parquet_predictions_with_missing_resized_and_unreadable(fixtures, tmp_path, ray_head):
    gt_dir = tmp_path / "gt"
    shutil.copytree(fixtures / "masks", gt_dir)
    Image.new("L", (20, 20)).save(gt_dir / "only_gt.png")
    rows = []
    for pred in sorted((fixtures / "preds").iterdir()):
        soft = np.asarray(Image.open(pred).convert("L"))
        if pred.stem == "19":  # a prediction at half size: resized to the ground truth
            soft = np.asarray(
                Image.fromarray(soft).resize((soft.shape[1] // 2, soft.shape[0] // 2))
            )
        rows.append(
            {
                "image_id": f"dir/{pred.name}",
                "saliency_png": png(soft),
                "mask_png": png(((soft >= 128) * 255).astype(np.uint8)),
                "quality": float(len(rows)) / 10,
            }
        )
    rows.append(
        {
            "image_id": "dir/no_gt.jpg",
            "saliency_png": png(np.zeros((4, 4), np.uint8)),
            "mask_png": png(np.zeros((4, 4), np.uint8)),
            "quality": 0.5,
        }
    )
    rows.append(
        {
            "image_id": "aerial-1867541__340.jpg".replace("aerial", "x"),
            "saliency_png": b"broken",
            "mask_png": b"broken",
            "quality": 0.5,
        }
    )
    Image.new("L", (8, 8)).save(gt_dir / "x-1867541__340.png")
    (tmp_path / "run" / "masks").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "run" / "masks" / "part-0.parquet")
    res = evaluate(
        "--predictions",
        str(tmp_path / "run"),
        "--ground-truth",
        str(gt_dir),
        "--output",
        str(tmp_path / "metrics.json"),
        env=job_env(RAY_ADDRESS=ray_head["address"]),  # the local Ray: tested above
    )
    assert res.returncode == 0, res.stderr[-3000:]
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["n"] == 3 and m["resized"] == 1
    assert m["predictions_without_gt"] == 1 and m["gt_without_predictions"] == 1
    assert [u["image_id"] for u in m["unreadable"]] == ["x-1867541__340.jpg"]
    assert all(np.isfinite(m[k]) for k in METRIC_KEYS)
    # the masks' own quality column, ranked against their IoU with ground truth
    from scipy.stats import spearmanr

    per_image = pd.read_parquet(tmp_path / "metrics_per_image.parquet")
    assert sorted(per_image.quality) == pytest.approx([0.0, 0.1, 0.2])
    ranking = m["quality_ranking"]
    assert ranking["n"] == 3
    assert ranking["spearman"] == pytest.approx(spearmanr(per_image.quality, per_image.IoU)[0])
    assert "quality vs IoU: Spearman" in res.stdout


def test_missing_inputs_fail_clearly(tmp_path, fixtures):
    res = evaluate(
        "--predictions",
        str(tmp_path / "nope"),
        "--ground-truth",
        str(fixtures / "masks"),
        "--output",
        str(tmp_path / "m.json"),
    )
    assert res.returncode == 2 and "does not exist" in res.stderr


def test_preview_sheet_from_real_images(tmp_path, ecssd):
    from scipy.ndimage import gaussian_filter

    preds = tmp_path / "preds"
    preds.mkdir()
    for stem in ("0001", "0002", "0003", "0004"):
        gt = np.asarray(Image.open(ecssd / "masks" / f"{stem}.png").convert("L")).astype(float)
        blur = 2.0 if stem != "0003" else 25.0  # 0003 is the worst
        Image.fromarray(gaussian_filter(gt, blur).astype(np.uint8)).save(preds / f"{stem}.png")
    out = tmp_path / "sheet.png"
    res = subprocess.run(
        [
            sys.executable,
            "jobs/preview.py",
            "--predictions",
            str(preds),
            "--images",
            str(ecssd / "images"),
            "--ground-truth",
            str(ecssd / "masks"),
            "--output",
            str(out),
            "--n",
            "3",
            "--worst",
        ],
        cwd=REPO,
        env=job_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "wrote 3 rows" in res.stdout
    sheet = np.asarray(Image.open(out).convert("RGB"))
    assert sheet.shape[0] == 3 * 3 * 80 and sheet.shape[1] == 4 * 3 * 80  # rows x panels
    assert sheet.std() > 20  # not blank


def test_evaluate_through_ray_job_submit(fixtures, tmp_path, ray_head):
    out = tmp_path / "metrics.json"
    job = [
        "jobs/evaluate.py",
        "--predictions",
        str(fixtures / "preds"),
        "--ground-truth",
        str(fixtures / "masks"),
        "--output",
        str(out),
    ]
    res = ray_job_submit(ray_head, job)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    assert json.loads(out.read_text())["n"] == 3


def test_contact_sheet_texts_never_overlap_on_portrait_rows():
    """The row label (a long image id and its IoU) and the column titles each keep their own
    place, on portrait, landscape and square panels alike."""
    from autosod_ray.preview import contact_sheet

    rng = np.random.default_rng(0)
    rows = []
    for h, w in ((400, 120), (120, 400), (200, 200)):
        pic = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        label = "s3://bucket/a/rather/long/prefix/of/folders/img_000123.jpg  IoU 0.812"
        rows.append((label, [(pic, "image"), (pic[..., 0], "soft map"), (pic, "mask")]))
    fig = contact_sheet(rows)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    texts = [t for ax in fig.axes for t in (ax.title, *ax.texts) if t.get_text()]
    assert sum("IoU 0.812" in t.get_text() for t in texts) == 3
    assert all(t.get_text().endswith("IoU 0.812") for t in texts if "IoU" in t.get_text())
    boxes = [t.get_window_extent(renderer) for t in texts]
    for i, a in enumerate(boxes):
        for j in range(i + 1, len(boxes)):
            assert not a.overlaps(boxes[j]), (texts[i].get_text(), texts[j].get_text())
