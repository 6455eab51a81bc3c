from __future__ import annotations

import numpy as np
import pytest

from neurofm.evaluate.metrics import (
    bootstrap,
    classification_metrics,
    regression_metrics,
    segmentation_case,
    summarize,
)


def _cube(shape, lo, hi):
    m = np.zeros(shape, np.uint8)
    m[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))] = 1
    return m


def test_dice_known_answers():
    a = _cube((20, 20, 20), (5, 5, 5), (15, 15, 15))
    assert segmentation_case(a, a, (1, 1, 1))["dice"] == pytest.approx(1.0)
    b = _cube((20, 20, 20), (10, 5, 5), (20, 15, 15))  # half overlap: 500 of 1000 voxels each
    assert segmentation_case(b, a, (1, 1, 1))["dice"] == pytest.approx(0.5)
    empty = np.zeros_like(a)
    r = segmentation_case(empty, empty, (1, 1, 1))
    assert r == {"dice": 1.0, "nsd": 1.0, "hd95": 0.0}
    r = segmentation_case(empty, a, (1, 1, 1))
    assert r["dice"] == 0.0 and np.isnan(r["hd95"])


def test_hd95_and_nsd_use_the_voxel_spacing():
    a = _cube((30, 30, 30), (5, 5, 5), (15, 15, 15))
    b = _cube((30, 30, 30), (8, 5, 5), (18, 15, 15))  # shifted 3 voxels along x
    r1 = segmentation_case(b, a, (1, 1, 1))
    r2 = segmentation_case(b, a, (2, 1, 1))
    assert r1["hd95"] == pytest.approx(3.0, abs=0.01)
    assert r2["hd95"] == pytest.approx(6.0, abs=0.01)  # the same shift is 6 mm with 2 mm voxels
    assert r1["nsd"] < 1.0 and segmentation_case(b, a, (1, 1, 1), nsd_tolerance_mm=3.5)["nsd"] == pytest.approx(1.0)


def test_classification_metrics_known_answers():
    prob = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.4, 0.6], [0.6, 0.4]])
    y = np.array([0, 0, 1, 1, 1])
    m = classification_metrics(prob, y)
    assert m["auroc"] == pytest.approx(1.0)  # every positive scores above every negative
    assert m["accuracy"] == pytest.approx(0.8)
    assert m["balanced_accuracy"] == pytest.approx((1.0 + 2 / 3) / 2)
    assert m["f1"] == pytest.approx(0.8)  # precision 1, recall 2/3
    confident = classification_metrics(np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([0, 1]))
    assert confident["ece"] == pytest.approx(0.0, abs=1e-6)
    wrong = classification_metrics(np.array([[1.0, 0.0], [1.0, 0.0]]), np.array([1, 1]))
    assert wrong["ece"] == pytest.approx(1.0, abs=1e-6)


def test_regression_metrics_known_answers():
    m = regression_metrics(np.array([10.0, 20.0, 30.0, 40.0]), np.array([12.0, 18.0, 33.0, 37.0]))
    assert m["mae"] == pytest.approx(2.5)
    assert m["rmse"] == pytest.approx(np.sqrt((4 + 4 + 9 + 9) / 4))
    d, e = np.array([-15.0, -5, 5, 15]), np.array([-13.0, -7, 8, 12])  # both centred: r = d.e / |d| |e|
    assert m["pearson_r"] == pytest.approx(d @ e / np.sqrt((d @ d) * (e @ e)))
    from scipy.stats import pearsonr

    rng = np.random.default_rng(0)
    for n in (3, 5, 40):
        a, b = rng.normal(size=n), rng.normal(size=n)
        assert regression_metrics(a, a * 0.3 + b)["pearson_r"] == pytest.approx(pearsonr(a, a * 0.3 + b)[0], abs=1e-12)
    assert np.isnan(regression_metrics(np.ones(5), np.arange(5.0))["pearson_r"])  # a constant prediction
    assert np.isnan(regression_metrics(np.array([1.0, 2.0]), np.array([2.0, 1.0]))["pearson_r"])  # two cases


def test_bootstrap_interval_brackets_the_estimate():
    rng = np.random.default_rng(0)
    vals = rng.normal(0.7, 0.1, 60)
    out = bootstrap(lambda idx: {"mean": float(vals[idx].mean())}, 60, reps=500)
    m = out["mean"]
    assert m["ci_low"] < m["value"] < m["ci_high"]
    assert m["ci_high"] - m["ci_low"] == pytest.approx(2 * 1.96 * 0.1 / np.sqrt(60), rel=0.35)


def test_summarize_per_task():
    seg = summarize("seg", [{"dice": 0.5, "nsd": 0.6, "hd95": 3.0}, {"dice": 0.7, "nsd": 0.8, "hd95": 5.0}], reps=50)
    assert seg["dice"]["value"] == pytest.approx(0.6) and seg["hd95"]["value"] == pytest.approx(4.0)
    cls = summarize("cls", [{"prob": [0.2, 0.8], "target": 1}, {"prob": [0.7, 0.3], "target": 0}], reps=50)
    assert cls["auroc"]["value"] == 1.0
    reg = summarize("reg", [{"prediction": 1.0, "target": 2.0}, {"prediction": 3.0, "target": 3.0}], reps=50)
    assert reg["mae"]["value"] == pytest.approx(0.5)


def test_paired_seeds_known_answers():
    from neurofm.evaluate.metrics import paired_seeds

    def seg(dices, tag=""):
        return [{"key": f"c{i}{tag}", "dice": d} for i, d in enumerate(dices)]

    arm = [seg([0.6, 0.8]), seg([0.4, 0.6])]  # two seeds: mean Dice 0.7 and 0.5
    ref = [seg([0.5, 0.7]), seg([0.4, 0.4])]
    res = paired_seeds("seg", arm, ref, reps=200)
    assert res["value"] == pytest.approx(0.6) and res["per_seed"] == pytest.approx([0.7, 0.5])
    assert res["difference"] == pytest.approx(0.1) and res["difference_per_seed"] == pytest.approx([0.1, 0.1])
    # resampling seeds, then cases within them: the difference can range over [0, 0.2] (seed 1's cases differ 0 and 0.2)
    assert 0.0 <= res["difference_low"] < 0.1 < res["difference_high"] <= 0.2
    same = paired_seeds("seg", arm, arm, reps=50)
    assert same["difference"] == same["difference_low"] == same["difference_high"] == 0.0
    assert res["ci_low"] <= res["value"] <= res["ci_high"] and "difference" not in paired_seeds("seg", arm)
    reg = [[{"key": "a", "prediction": 50.0, "target": 60.0}, {"key": "b", "prediction": 70.0, "target": 60.0}]]
    assert paired_seeds("reg", reg, reps=10)["value"] == pytest.approx(10.0)  # MAE
    with pytest.raises(ValueError, match="same cases"):
        paired_seeds("seg", arm, [seg([0.5, 0.7], "x"), seg([0.4, 0.4])])


def test_binary_auroc_matches_sklearn_with_ties_and_is_nan_with_one_class():
    from sklearn.metrics import roc_auc_score

    from neurofm.evaluate.metrics import binary_auroc

    assert binary_auroc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.75)
    rng = np.random.default_rng(0)
    for _ in range(20):
        y = rng.integers(0, 2, 15)
        score = rng.integers(0, 5, 15) / 4  # many ties
        if 0 < y.sum() < len(y):
            assert binary_auroc(y, score) == pytest.approx(roc_auc_score(y, score), abs=1e-12)
    assert np.isnan(binary_auroc(np.ones(4, int), np.arange(4.0)))


@pytest.mark.parametrize("k", [2, 3])
def test_the_bootstrap_resampler_gives_the_libraries_metrics_on_every_resample(k):
    """``classification_resampler`` counts instead of calling scikit-learn and torchmetrics a thousand times: on
    random and degenerate resamples (one class, a class absent), with ties (the constant predictor's 0.5s) and
    confidences on ECE's bin edges, each metric is theirs."""
    import warnings

    from neurofm.evaluate.metrics import classification_resampler

    rng = np.random.default_rng(k)
    n = 24
    for trial in range(12):
        logits = rng.normal(size=(n, k)) * (trial % 3)  # trial 0, 3, ...: every case the same, a tie
        prob = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        if trial == 1:
            prob = np.eye(k)[rng.integers(0, k, n)] * 0.6 + 0.4 / k  # confidences on the bins' edges
        y = rng.integers(0, k, n)
        fast = classification_resampler(prob, y)
        draws = [np.arange(n), rng.integers(0, n, n), rng.integers(0, 3, n), np.flatnonzero(y == y[0])]
        for idx in draws:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # one class only: scikit-learn warns, AUROC is NaN
                want = classification_metrics(prob[idx], y[idx])
            got = fast(idx)
            assert set(got) == set(want)
            for m in ("accuracy", "balanced_accuracy", "f1"):
                assert got[m] == want[m], (m, trial)
            assert got["ece"] == pytest.approx(want["ece"], abs=1e-6)
            assert got["auroc"] == pytest.approx(want["auroc"], abs=1e-12, nan_ok=True)
    not_prob = np.array([[2.0, -1.0], [0.5, 0.5]])  # logits: read by the libraries as they read them
    assert classification_resampler(not_prob, np.array([0, 1]))(np.arange(2)) == classification_metrics(
        not_prob, np.array([0, 1])
    )
