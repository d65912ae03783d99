"""Our metric plumbing against PySODMetrics itself and its published reference values."""

import json

import numpy as np
import py_sod_metrics as psm
import pytest
from PIL import Image

from autosod_ray.metrics import SODMetrics, image_metrics, summarize
from tests.conftest import PYSOD_REFERENCE_NAMES


@pytest.fixture(scope="module")
def pairs(shared_dir):
    root = shared_dir / "data" / "pysodmetrics"
    out = []
    for pred in sorted((root / "preds").iterdir()):
        p = np.asarray(Image.open(pred).convert("L"))
        g = np.asarray(Image.open(root / "masks" / pred.name).convert("L"))
        out.append((p, g))
    return out


def test_matches_published_reference_values(pairs, shared_dir):
    ref = json.loads((shared_dir / "data/pysodmetrics/version_performance.json").read_text())
    ref = ref["v1_4_3"]
    m = SODMetrics()
    for p, g in pairs:
        m.step(p, g)
    r = m.results()
    names = {**PYSOD_REFERENCE_NAMES, "IoU": "sample_biiou"}
    for ours, theirs in names.items():
        assert r[ours] == pytest.approx(ref[theirs], abs=1e-10), ours
    assert r["n"] == 3


def test_any_order_of_per_image_rows_equals_one_pysodmetrics_run(pairs):
    fm, em = psm.Fmeasure(), psm.Emeasure()
    for p, g in pairs:
        fm.step(pred=p, gt=g)
        em.step(pred=p, gt=g)
    rows = [image_metrics(p, g) for p, g in pairs]
    shuffled = summarize(reversed(rows))
    assert shuffled["maxF"] == pytest.approx(fm.get_results()["fm"]["curve"].max(), abs=1e-12)
    assert shuffled["meanE"] == pytest.approx(em.get_results()["em"]["curve"].mean(), abs=1e-12)


def test_size_mismatch_is_an_error(pairs):
    p, g = pairs[0]
    with pytest.raises(ValueError, match="differ in size"):
        image_metrics(p[:-1], g)


def test_quality_ranking_hand_checked():
    from scipy.stats import spearmanr

    from autosod_ray.metrics import quality_ranking

    iou = np.array([0.9, 0.2, 0.5, 0.7, 0.1, 0.8, 0.3, 0.6])
    perfect = quality_ranking(iou * 0.5, iou)
    assert perfect["spearman"] == pytest.approx(1.0)
    assert perfect["iou_best_quarter"] == pytest.approx((0.9 + 0.8) / 2)
    assert perfect["iou_all"] == pytest.approx(iou.mean()) and perfect["n"] == 8
    assert quality_ranking(-iou, iou)["iou_best_quarter"] == pytest.approx((0.1 + 0.2) / 2)
    q = np.array([0.3, 0.1, np.nan, 0.9, 0.2, 0.5, np.nan, 0.4])  # NaN: no score reported
    r = quality_ranking(q, iou)
    keep = np.isfinite(q)
    assert r["n"] == 6 and r["spearman"] == pytest.approx(spearmanr(q[keep], iou[keep])[0])
    assert quality_ranking(np.full(8, np.nan), iou) is None
