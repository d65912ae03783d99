"""The HTML report: its pure functions, the page on a small real-looking run (no model),
the job's command line, and the page in a real headless Chromium."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import math
import os
import re
import shutil
import subprocess
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image
from scipy import ndimage, stats

from autosod_ray.config import PseudolabelConfig, ReportConfig, load_config
from autosod_ray.data.parquet import ERROR_SCHEMA, MASK_SCHEMA, write_table_atomic
from autosod_ray.data.uris import open_fs
from autosod_ray.pseudolabel import transport_summary
from autosod_ray.report import (
    ReportSettings,
    _num,
    count_objects,
    error_reason,
    error_reasons,
    lowest_first,
    make_thumbnail,
    no_object_flags,
    objects_in,
    outline,
    overlay,
    report_path,
    run_report,
    run_view,
    spearman,
    write_report,
)
from tests.conftest import REPO, job_env, run_script

# ECSSD images of both orientations (0001, 0002, 0005, 0013, 0018, 0040 are portrait)
STEMS = [
    "0001",
    "0003",
    "0002",
    "0004",
    "0005",
    "0006",
    "0013",
    "0007",
    "0018",
    "0036",
    "0040",
    "0008",
]
SETTINGS = ReportSettings(thumbnails=5)


def png(mask: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def variant(gt: np.ndarray, k: int) -> np.ndarray:
    """Prediction k of 12 from a ground-truth mask: exact, grown, shrunk, shifted, empty,
    everything, with a second object, a speck, half of it."""
    h, w = gt.shape
    if k in (0, 11):
        return gt.copy()
    if k == 1:
        return ndimage.binary_dilation(gt, iterations=4)
    if k == 2:
        return ndimage.binary_erosion(gt, iterations=6)
    if k == 3:  # shifted right by 40 px, no wrap-around
        out = np.zeros_like(gt)
        out[:, 40:] = gt[:, :-40]
        return out
    if k == 4:
        return np.zeros_like(gt)
    if k == 5:
        out = np.ones_like(gt)
        out[:3] = False
        return out
    if k == 6:  # the object plus a disc in whichever corner it leaves empty
        out = gt.copy()
        yy, xx = np.mgrid[:h, :w]
        for cy, cx in ((30, 30), (30, w - 31), (h - 31, 30), (h - 31, w - 31)):
            disc = (yy - cy) ** 2 + (xx - cx) ** 2 < 22**2
            if not ndimage.binary_dilation(gt, iterations=6)[disc].any():
                return out | disc
        raise AssertionError("no free corner")
    if k == 7:
        return ndimage.binary_dilation(gt, iterations=12)
    if k == 8:  # a 4 x 4 speck: near-empty
        out = np.zeros_like(gt)
        out[h // 2 : h // 2 + 4, w // 2 : w // 2 + 4] = True
        return out
    if k == 9:
        out = gt.copy()
        out[:, w // 2 :] = False
        return out
    return ndimage.binary_erosion(gt, iterations=12)


@pytest.fixture(scope="module")
def run(tmp_path_factory, ecssd) -> dict:
    """A pseudolabel-like output of 12 ECSSD images in two shards, 4 errors, run.json; the
    masks are made from the ground truth, so every expected figure is known."""
    root = tmp_path_factory.mktemp("run")
    rng = np.random.default_rng(7)
    masks, gts, rows = [], [], []
    for k, stem in enumerate(STEMS):
        gt = np.asarray(Image.open(ecssd / "masks" / f"{stem}.png").convert("L")) > 127
        mask = variant(gt, k)
        truth_iou = (mask & gt).sum() / max((mask | gt).sum(), 1)
        quality = (
            np.nan if k == 8 else float(np.clip(0.8 * truth_iou + rng.normal(0, 0.08), 0.02, 0.98))
        )
        source = ecssd / "images" / f"{stem}.jpg"
        rows.append(
            {
                "image_id": f"photos/{stem}.jpg",
                "source_uri": str(source if k != 11 else root / "gone" / f"{stem}.jpg"),
                "height": mask.shape[0],
                "width": mask.shape[1],
                "mask_png": png(mask),
                "saliency_png": png(mask),
                "fg_fraction": float(mask.mean()),
                "confidence": float(rng.uniform(0.3, 0.9)),
                "consistency_loss": float(rng.uniform(0.01, 0.1)),
                "quality": quality,
                "ot_iterations": int(rng.integers(30, 300)),
                "ot_marginal_error": 2e-4 if k == 5 else float(rng.uniform(1e-6, 9e-5)),
                # k = 3's value goes with its shard's column (an older output): never flags
                "attention_border": 1.1 if k in (3, 10) else float(rng.uniform(0.2, 0.7)),
                "backbone": "vit_small_patch14_dinov2.lvd142m",
                "config_hash": "c0ffee",
            }
        )
        masks.append(mask)
        gts.append(gt)
    fs, out = open_fs(str(root), {})
    table = pa.Table.from_pylist(rows, schema=MASK_SCHEMA)
    # the first shard as an output from before attention_border: its rows read it as NaN
    write_table_atomic(fs, f"{out}/masks", table.slice(0, 6).drop_columns(["attention_border"]))
    write_table_atomic(fs, f"{out}/masks", table.slice(6))
    errors = [
        (
            "bad/a.jpg",
            "could not read: FileNotFoundError: [Errno 2] No such file: '/x/bad/a.jpg'",
            "permanent",
        ),
        (
            "bad/b.jpg",
            "could not read: FileNotFoundError: [Errno 2] No such file: '/x/bad/b.jpg'",
            "permanent",
        ),
        ("bad/c.png", "corrupt or truncated image: broken data stream", "permanent"),
        (
            "bad/d.jpg",
            "could not read after 4 tries: TimeoutError: <script>alert(1)</script>",
            "transient",
        ),
    ]
    err_table = pa.Table.from_pylist(  # columns the schema may add later: null
        [
            {
                "image_id": i,
                "source_uri": f"/x/{i}",
                "error": e,
                "error_kind": k,
                "config_hash": "c0ffee",
            }
            for i, e, k in errors
        ],
        schema=ERROR_SCHEMA,
    )
    write_table_atomic(fs, f"{out}/errors", err_table)
    # run.json as RunOutput writes it: identity and totals, then one entry per run
    cfg = PseudolabelConfig(input="/data/photos", output=str(root))
    first = {
        "run": 1,
        "status": "interrupted",
        "started": "2026-01-02T10:00:00+0000",
        "seconds": 3.1,
        "labelled_this_run": 5,
        "reason": "KeyboardInterrupt (Ctrl-C)",
    }
    latest = {
        "run": 2,
        "status": "complete",
        "started": "2026-01-02T10:05:00+0000",
        "listing": {"images": 16, "ignored": {".gif": 2}, "unreadable": 0, "symlink_loops": 0},
        "labelled_this_run": 11,
        "skipped_already_done": 5,
        "seconds": 25.321,
        "images_per_second": 0.434,
        "timings": {"listing_s": 0.01, "resume_check_s": 0.02, "labelling_s": 25.3},
        "warnings": ["Sinkhorn did not converge for 1 images (8.3%, row error >= 0.0001)"],
        "output": str(root),
    }
    record = {
        "config_hash": "c0ffee",
        "config": cfg.model_dump(mode="json"),
        "job": "pseudolabel",
        "status": "complete",
        "runs": [first, latest],
        "inputs": 16,
        "labelled": 12,
        "errors": 4,
        "errors_permanent": 3,
        "errors_transient": 1,
        "errors_internal": 0,
        "duplicates": 0,
        "missing": 0,
        **transport_summary(table, tol=1e-4),
    }
    (root / "run.json").write_text(json.dumps(record, indent=2))
    fg = np.array([r["fg_fraction"] for r in rows])
    quality = np.array([r["quality"] for r in rows])
    attention = np.array([r["attention_border"] if k >= 6 else np.nan for k, r in enumerate(rows)])
    return {
        "root": root,
        "masks": masks,
        "gts": gts,
        "fg": fg,
        "quality": quality,
        "attention_border": attention,
        "record": record,
        "ids": [r["image_id"] for r in rows],
    }


class Page(HTMLParser):
    """Thumbnails per gallery section, attributes of <html>, text of elements with an id."""

    def __init__(self, text: str):
        super().__init__()
        self.section, self.current = None, None
        self.thumbs: Counter = Counter()
        self.declared: dict[str, int] = {}
        self.root: dict = {}
        self.text: dict[str, str] = {}
        self.attrs: dict[str, dict] = {}
        self.images: list[dict] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "html":
            self.root = a
        if tag == "section":
            self.section = a.get("id")
            self.declared[self.section] = int(a.get("data-thumbnails", -1))
        if tag == "img":
            self.images.append(a)
            if "thumb" in (a.get("class") or "").split():
                self.thumbs[self.section] += 1
        if "id" in a:
            self.attrs[a["id"]] = a
            self.text[a["id"]] = ""
            if tag == "span":
                self.current = a["id"]

    def handle_endtag(self, tag):
        if tag == "section":
            self.section = None
        if tag == "span":
            self.current = None

    def handle_data(self, data):
        if self.current:
            self.text[self.current] += data


def expected_several(masks) -> int:
    """Masks of two or more pieces >= 0.5% of the image, by scikit-image (not our code)."""
    from skimage.measure import label, regionprops

    return sum(
        sum(r.area >= 0.005 * m.size for r in regionprops(label(m, connectivity=2))) >= 2
        for m in masks
    )


def expected_thumbs(run, with_gt: bool) -> dict[str, int]:
    n = SETTINGS.thumbnails
    q, fg = run["quality"], run["fg"]
    attention = np.nan_to_num(run["attention_border"], nan=0.0)
    flagged = (fg < 0.005) | (fg > 0.9) | (np.nan_to_num(q, nan=1.0) < 0.4) | (attention >= 0.8)
    out = {
        "gallery-check": min(n, int(np.isfinite(q).sum())),
        "gallery-trust": min(n, int(np.isfinite(q).sum())),
        "gallery-no-object": min(n, int(flagged.sum())),
        "gallery-several": min(n, expected_several(run["masks"])),
    }
    if with_gt:
        out["gallery-worst-iou"] = n
    return out


# ---------------------------------------------------------------- pure functions


def test_overlay_dims_the_background_and_outlines_the_mask():
    image = np.full((20, 30, 3), 200, np.uint8)
    mask = np.zeros((20, 30), bool)
    mask[5:15, 8:20] = True
    out = overlay(image, mask)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert (out[~mask] == 80).all()  # 200 * 0.4
    assert (out[7:13, 10:18] == 200).all()  # inside, off the outline: untouched
    edge = outline(mask)
    assert edge.sum() == 2 * (10 + 12) - 4  # the rectangle's border pixels
    assert (out[edge] == (255, 40, 40)).all()
    with pytest.raises(ValueError):
        overlay(image, mask[:10])


def test_objects_in_counts_pieces_above_the_minimum_area():
    mask = np.zeros((50, 50), bool)
    assert objects_in(mask, 1) == 0
    mask[2:12, 2:12] = True  # 100 px
    mask[30:40, 30:45] = True  # 150 px
    mask[45:47, 2:4] = True  # 4 px speck
    assert objects_in(mask, 1) == 3
    assert objects_in(mask, 50) == 2
    assert objects_in(mask, 120) == 1
    diagonal = np.eye(6, dtype=bool)  # touching corners: one 8-connected piece
    assert objects_in(diagonal, 1) == 1
    big = np.zeros((2000, 1000), bool)  # downscaled before counting: the same answer
    big[100:600, 100:900], big[1200:1900, 100:900] = True, True
    assert count_objects(big, 0.005) == 2


def test_thumbnails_keep_orientation_and_mark_unreadable_images():
    portrait = make_thumbnail(np.zeros((400, 267, 3), np.uint8), np.ones((400, 267), bool), 160)
    landscape = make_thumbnail(None, np.zeros((267, 400), bool), 160)
    assert portrait.shape == (160, 107, 3) and landscape.shape == (107, 160, 3)
    assert (landscape == 90).all()  # the mask alone, grey where it is empty


def test_error_reasons_group_messages_that_differ_in_paths_and_numbers():
    errors = [
        "could not read: FileNotFoundError: [Errno 2] No such file: '/data/a/1.jpg'",
        "could not read: FileNotFoundError: [Errno 2] No such file: 's3://b/2.jpg'",
        "could not read after 4 tries: TimeoutError: read timed out",
        "image is 5x7 pixels, smaller than one patch (14 px)",
        "image is 3x3 pixels, smaller than one patch (14 px)",
        "decompression-bomb guard: 20000 x 20000 pixels > max_pixels 89478485 (raise it)",
        "",
    ]
    kinds = ["permanent", "permanent", "transient", "permanent", "permanent", "permanent", ""]
    reasons = error_reasons(errors, kinds)
    assert reasons == {
        "could not read: FileNotFoundError": {
            "count": 2,
            "kinds": {"permanent": 2},
            "example": errors[0],
        },
        "image is #x# pixels, smaller than one patch (# px)": {
            "count": 2,
            "kinds": {"permanent": 2},
            "example": errors[3],
        },
        "(no message)": {"count": 1, "kinds": {"unknown": 1}, "example": ""},
        "could not read after # tries: TimeoutError": {
            "count": 1,
            "kinds": {"transient": 1},
            "example": errors[2],
        },
        "decompression-bomb guard": {"count": 1, "kinds": {"permanent": 1}, "example": errors[5]},
    }
    assert error_reason("OSError: disk /mnt/x full") == "OSError: disk <path> full"
    assert error_reasons(["x: 1"], ["permanent"], counts=[7])["x"]["count"] == 7


def test_no_object_rules_sorting_and_spearman():
    fg = np.array([0.0, 0.3, 0.95, 0.4, 0.004])
    q = np.array([0.9, 0.1, 0.8, np.nan, 0.9])
    attention_border = np.array([0.4, 0.8, np.nan, 1.3, 0.79])
    flags = no_object_flags(fg, q, attention_border, ReportSettings())
    assert flags["empty"].tolist() == [True, False, False, False, True]
    assert flags["background"].tolist() == [False, False, True, False, False]
    assert flags["low quality"].tolist() == [False, True, False, False, False]
    assert flags["diffuse attention"].tolist() == [False, True, False, True, False]
    assert lowest_first(q, 3).tolist() == [1, 2, 0]  # NaN never chosen, ties stable
    assert lowest_first(q, 2, descending=True).tolist() == [0, 4]
    x, y = np.array([0.1, 0.5, 0.2, np.nan, 0.9]), np.array([0.3, 0.2, 0.1, 0.5, 0.8])
    rho, n = spearman(x, y)
    assert n == 4 and rho == pytest.approx(stats.spearmanr(x[[0, 1, 2, 4]], y[[0, 1, 2, 4]])[0])
    assert math.isnan(spearman(np.ones(5), y)[0])


def test_figures_on_the_page():
    assert [_num(120.0, 0), _num(0.5, 3), _num(2e-4, 6), _num(12345), _num(math.nan)] == [
        "120", "0.5", "0.0002", "12,345", "-"
    ]  # fmt: skip
    assert _num("<b>") == "&lt;b&gt;" and _num(None) == "-"


def test_report_path():
    assert report_path("runs/a", None) == "runs/a/report.html"
    assert report_path("s3://b/run/", None) == "s3://b/run/report.html"
    assert report_path("runs/a", "out/") == "out/report.html"
    assert report_path("runs/a", "out/r.html") == "out/r.html"


# ---------------------------------------------------------------- the page


def test_report_without_ground_truth(run, tmp_path):
    result = write_report(str(run["root"]), str(tmp_path), {}, settings=SETTINGS)
    page_path = tmp_path / "report.html"
    assert result["output"] == str(page_path) and page_path.stat().st_size == result["bytes"]
    page = Page(page_path.read_text())
    assert page.text["labelled"] == "12" and page.text["errors"] == "4"
    text = page_path.read_text()
    assert "3 permanent, 1 transient, 0 internal" in text  # run.json's totals
    assert "0.434 images/s over 25.321 s" in text  # its latest run's speed
    assert "KeyboardInterrupt (Ctrl-C)" in text  # and the history
    assert "Sinkhorn did not converge for 1 images" in text
    # one image's attention lies on its border (the shard without the column never flags)
    assert "attention_border &ge; 0.8, the CLS token" in text
    assert "nothing in the image draws it (1 (8.3%))" in text
    assert dict(page.thumbs) == expected_thumbs(run, with_gt=False)
    assert {k: v for k, v in page.declared.items()} == expected_thumbs(run, with_gt=False)
    assert result["several_objects"] == expected_several(run["masks"]) >= 1
    assert "ground-truth" not in page.attrs
    # errors grouped by reason, every string from the data escaped
    assert re.search(r"<td class='n'>2</td><td>could not read: FileNotFoundError</td>", text)
    assert "<script>alert(1)" not in text and "&lt;script&gt;alert(1)" in text
    # the transport figures of run.json, and the image that could not be read
    t = run["record"]["transport"]
    assert f"of {t['images']} images converged" in text
    row = "".join(
        f"<td class='n'>{t['iterations'][k]:.0f}</td>" for k in ("p50", "p90", "p99", "max")
    )
    assert f"<tr><th>iterations</th>{row}</tr>" in text
    assert "image unreadable: FileNotFoundError" in text
    assert {"hist-quality", "hist-fg"} <= set(page.attrs)
    for img in page.images:  # every picture inline: a PNG or JPEG that decodes
        head, data = img["src"].split(",", 1)
        assert head in ("data:image/png;base64", "data:image/jpeg;base64")
        Image.open(io.BytesIO(base64.b64decode(data))).load()
    assert result["bytes"] < 1_000_000


def test_report_with_ground_truth_has_iou_and_scipy_spearman(run, tmp_path, ecssd):
    gt_dir = tmp_path / "gt"
    gt_dir.mkdir()
    for stem in STEMS:
        shutil.copy(ecssd / "masks" / f"{stem}.png", gt_dir / f"{stem}.png")
    out = tmp_path / "page.html"
    result = write_report(
        str(run["root"]), str(out), {}, ground_truth=str(gt_dir), settings=SETTINGS
    )
    ious = np.array(
        [
            (m & g).sum() / max((m | g).sum(), 1)
            for m, g in zip(run["masks"], run["gts"], strict=True)
        ]
    )
    q = run["quality"]
    ok = np.isfinite(q)
    rho = stats.spearmanr(q[ok], ious[ok]).statistic
    page = Page(out.read_text())
    assert float(page.attrs["spearman"]["data-value"]) == pytest.approx(rho, abs=1e-12)
    assert page.text["spearman"] == f"{rho:.3f}".rstrip("0").rstrip(".")
    assert result["iou"]["spearman"] == pytest.approx(rho, abs=1e-12)
    assert result["iou"]["n"] == 12 and result["iou"]["spearman_n"] == 11
    assert float(page.text["mean-iou"]) == pytest.approx(ious.mean(), abs=5e-4)
    assert dict(page.thumbs) == expected_thumbs(run, with_gt=True)
    assert "scatter" in page.attrs
    csv = next(i for i in re.findall(r"href='data:text/csv;base64,([^']+)'", out.read_text()))
    lines = base64.b64decode(csv).decode().strip().splitlines()
    assert len(lines) == 13 and lines[0] == "image_id,quality,iou"


def test_ray_tasks_give_the_same_page_figures(run, tmp_path, ecssd):
    """ray_above=0: object counts, IoU and thumbnails made in Ray tasks, one per shard."""
    import ray

    gt_dir = tmp_path / "gt"
    gt_dir.mkdir()
    for stem in STEMS[:6]:
        shutil.copy(ecssd / "masks" / f"{stem}.png", gt_dir / f"{stem}.png")
    here = write_report(str(run["root"]), str(tmp_path / "a.html"), {}, ground_truth=str(gt_dir),
                        settings=SETTINGS)  # fmt: skip
    started = not ray.is_initialized()
    if started:  # one worker, no dashboard: the cheapest local Ray
        ray.init(num_cpus=1, include_dashboard=False)
    try:
        there = write_report(str(run["root"]), str(tmp_path / "b.html"), {},
                             ground_truth=str(gt_dir),
                             settings=dataclasses.replace(SETTINGS, ray_above=0))  # fmt: skip
    finally:
        if started:
            ray.shutdown()
    assert (here["ray"], there["ray"]) == (False, True)
    for key in ("thumbnails", "no_object", "several_objects", "scanned_for_objects", "iou"):
        assert here[key] == there[key], key
    assert (
        Page((tmp_path / "b.html").read_text()).thumbs
        == Page((tmp_path / "a.html").read_text()).thumbs
    )


def test_config_run_writes_into_the_run_and_the_job_refuses_a_missing_run(run, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(run["root"], target)
    cfg = load_config(ReportConfig, REPO / "configs" / "report.yaml", ["thumbnails=3"],
                      {"predictions": str(target)})  # fmt: skip
    result = run_report(cfg)
    assert result["output"] == str(target / "report.html") and result["ray"] is False
    assert Page((target / "report.html").read_text()).thumbs["gallery-check"] == 3
    bad = run_script("jobs/report.py", ["--predictions", str(tmp_path / "nope")], job_env())
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        f"error: --predictions {str(tmp_path / 'nope')!r} does not exist"
    ]


def test_run_view_reads_the_history_and_the_older_flat_record():
    flat = {"status": "complete", "labelled": 3, "seconds": 2.0, "config_hash": "a"}
    assert run_view(flat) == flat
    history = {
        "status": "failed",
        "labelled": 3,
        "config_hash": "a",
        "runs": [{"run": 1, "seconds": 1.0}, {"run": 2, "status": "failed", "seconds": 5.0}],
    }
    assert run_view(history) == {
        "status": "failed",
        "labelled": 3,
        "config_hash": "a",
        "run": 2,
        "seconds": 5.0,
    }
    assert run_view(None) == {}


# ---------------------------------------------------------------- in a real browser

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--enable-logging=stderr",
    "--v=0",
]


def chromium_binary() -> str:
    found = next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)
    if found is None:
        if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
            pytest.fail("chromium is not installed; CI must install it (apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium); CI does not skip")
    return found


def browse(chromium: str, page: Path, profile: Path, *action: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *action, page.as_uri()],
        capture_output=True,
        text=True,
        timeout=90,
    )


def page_errors(dom: str, stderr: str) -> list[str]:
    """Script errors the page recorded in <html data-js-errors>, and console errors in the
    browser's log."""
    found = [f"data-js-errors: {v}" for v in re.findall(r'data-js-errors="([^"]*)"', dom)]
    found += [
        line
        for line in stderr.splitlines()
        if "Uncaught" in line or ("CONSOLE" in line and "error" in line.lower())
    ]
    return found


def test_report_in_headless_chromium(run, tmp_path):
    chromium = chromium_binary()
    # the check itself: a page with a script error must be caught
    broken = tmp_path / "broken.html"
    broken.write_text(
        "<html><head><script>"
        + __import__("autosod_ray.report").report.ERROR_PROBE
        + "</script></head><body><script>notDefined();</script></body></html>"
    )
    res = browse(chromium, broken, tmp_path / "p0", "--dump-dom")
    assert page_errors(res.stdout, res.stderr), "the error check misses a ReferenceError"

    write_report(str(run["root"]), str(tmp_path), {}, settings=SETTINGS)
    page = tmp_path / "report.html"
    res = browse(chromium, page, tmp_path / "p1", "--dump-dom")
    assert res.returncode == 0, res.stderr[-2000:]
    assert page_errors(res.stdout, res.stderr) == []
    dom = Page(res.stdout)
    assert dom.root.get("data-ready") == "1", "the page's load handler did not run"
    assert dom.root.get("data-broken-images") == "0"
    assert dict(dom.thumbs) == expected_thumbs(run, with_gt=False)
    assert dom.text["labelled"] == str(run["record"]["labelled"])

    artefacts = Path(os.environ.get("AUTOSOD_ARTEFACTS") or tmp_path)
    artefacts.mkdir(parents=True, exist_ok=True)
    shot = artefacts / "report_chromium.png"
    res = browse(
        chromium,
        page,
        tmp_path / "p2",
        f"--screenshot={shot}",
        "--window-size=1280,2000",
        "--hide-scrollbars",
    )
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    assert Image.open(shot).size == (1280, 2000)
    print(f"screenshot: {shot}")
