"""The evaluation figures (backbone/evaluation.py) against references computed here: scikit-learn's
metrics (accuracy_score, top_k_accuracy_score, f1_score, precision_recall_fscore_support,
confusion_matrix), the expected calibration error by its direct formula (Guo et al. 2017), and
the thresholds by brute force; on random predictions and on edge cases (a class never
predicted, a class absent from the labels, perfect and all-wrong predictions, ties). Plus the
per-class figures tuning adds to a version's validation metrics."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    top_k_accuracy_score,
)

from backbone.evaluation import RELIABILITY_BINS, evaluate, lowest_threshold, reliability, top_k_accuracy

CLOSE = {"rel": 1e-12, "abs": 1e-12}
#: sklearn warns that k >= the number of classes makes a perfect top-k score: so it does, and so it is checked
pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.UndefinedMetricWarning")


# --------------------------------------------------------------------------- references


def ref_top_k(y: np.ndarray, p: np.ndarray, k: int) -> float:
    """sklearn's top-k accuracy with ties broken toward the class listed first (sklearn itself
    ranks the later class first among equal scores): the scores are nudged down by the class
    index, far below any gap between distinct scores of these tests."""
    n_classes = p.shape[1]
    if n_classes == 2:  # sklearn takes the positive class's score for two classes (ties: class 0)
        return float(top_k_accuracy_score(y, p[:, 1], k=k, labels=[0, 1]))
    nudged = p - 1e-9 * np.arange(n_classes)[None, :]
    return float(top_k_accuracy_score(y, nudged, k=k, labels=list(range(n_classes))))


def ref_ece(conf: np.ndarray, correct: np.ndarray, n_bins: int = RELIABILITY_BINS) -> tuple[float, list[dict]]:
    """ECE = sum_m |B_m|/n |acc(B_m) - conf(B_m)| over bins B_m = ((m-1)/M, m/M] (Guo et al. 2017)."""
    n = len(conf)
    ece, bins = 0.0, []
    for m in range(1, n_bins + 1):
        lo, hi = (m - 1) / n_bins, m / n_bins
        in_bin = [i for i in range(n) if (lo < conf[i] <= hi) or (m == 1 and conf[i] == 0)]
        if in_bin:
            acc = sum(bool(correct[i]) for i in in_bin) / len(in_bin)
            mean = sum(float(conf[i]) for i in in_bin) / len(in_bin)
            ece += len(in_bin) / n * abs(acc - mean)
            bins.append({"lower": lo, "upper": hi, "confidence": mean, "accuracy": acc, "count": len(in_bin)})
        else:
            bins.append({"lower": lo, "upper": hi, "confidence": None, "accuracy": None, "count": 0})
    return ece, bins


def brute_threshold(scores: list[float], right: list[bool], target: float) -> tuple[float | None, int]:
    """Try every score as the threshold; the lowest one whose answered set is precise enough."""
    best: tuple[float | None, int] = (None, 0)
    for t in sorted(set(scores), reverse=True):
        answered = [r for s, r in zip(scores, right) if s >= t]
        if sum(answered) / len(answered) >= target:
            best = (t, len(answered))
    return best


def check_against_references(p: np.ndarray, y: np.ndarray, classes: list[str], *, top_k: int, precision: float) -> dict[str, Any]:
    """``evaluate`` equals every reference; returns its result."""
    n, c = p.shape
    got = evaluate(p, y, classes, top_k=top_k, precision=precision)
    pred = np.argmax(p, axis=1)
    conf = p[np.arange(n), pred]
    labels = list(range(c))

    assert got["n_images"] == n and got["classes"] == classes
    assert got["accuracy"] == pytest.approx(accuracy_score(y, pred), **CLOSE)
    assert got["top_k_accuracy"]["k"] == min(top_k, c)
    assert got["top_k_accuracy"]["accuracy"] == pytest.approx(ref_top_k(y, p, min(top_k, c)), **CLOSE)
    assert got["confusion"] == confusion_matrix(y, pred, labels=labels).tolist()
    # macro F1 over the classes present in the labels or the predictions (sklearn's default labels)
    assert got["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"), **CLOSE)
    prec, rec, f1, support = precision_recall_fscore_support(y, pred, labels=labels, zero_division=np.nan)
    for row, label, pr, rc, f, sup in zip(got["per_class"], classes, prec, rec, f1, support):
        assert row["label"] == label and row["support"] == int(sup)
        for key, want in (("precision", pr), ("recall", rc), ("f1", f)):
            if math.isnan(want):
                assert row[key] is None, (label, key, row)
            else:
                assert row[key] == pytest.approx(float(want), **CLOSE), (label, key, row)

    ece, bins = ref_ece(conf, pred == y)
    assert got["ece"] == pytest.approx(ece, **CLOSE)
    assert len(got["reliability"]) == RELIABILITY_BINS
    for mine, ref in zip(got["reliability"], bins):
        assert mine["count"] == ref["count"]
        assert mine["lower"] == pytest.approx(ref["lower"]) and mine["upper"] == pytest.approx(ref["upper"])
        for key in ("confidence", "accuracy"):
            assert (mine[key] is None) == (ref[key] is None)
            if ref[key] is not None:
                assert mine[key] == pytest.approx(ref[key], **CLOSE)
    assert sum(b["count"] for b in got["reliability"]) == n

    for cls, row in enumerate(got["per_class"]):
        mine = pred == cls
        want, _ = brute_threshold(conf[mine].tolist(), (y[mine] == cls).tolist(), precision)
        assert row["threshold"] == want, (cls, row, want)
    want, answered = brute_threshold(conf.tolist(), (pred == y).tolist(), precision)
    assert got["suggested_min_score"] == want
    assert got["coverage_at_suggested"] == (None if want is None else answered / n)
    return got


def dirichlet(rng: np.random.Generator, n: int, c: int, concentration: float = 0.7) -> np.ndarray:
    return rng.dirichlet([concentration] * c, size=n)


# --------------------------------------------------------------------------- random


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("n_classes", [2, 3, 7])
def test_random_predictions_match_sklearn(seed: int, n_classes: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 300))
    p = dirichlet(rng, n, n_classes)
    # make the classifier better than chance so that every figure takes varied values
    y = np.where(rng.random(n) < 0.6, p.argmax(axis=1), rng.integers(0, n_classes, n))
    classes = [f"class {i}" for i in range(n_classes)]
    for top_k in (1, 2, 5):
        for precision in (0.5, 0.9, 1.0):
            check_against_references(p, y, classes, top_k=top_k, precision=precision)


def test_float32_scores_as_classify_answers_them() -> None:
    rng = np.random.default_rng(42)
    p = dirichlet(rng, 120, 4).astype(np.float32)
    y = rng.integers(0, 4, 120)
    got = check_against_references(p, y, list("abcd"), top_k=2, precision=0.8)
    # a threshold is one of the scores, exactly as classify reports it (float32 -> float)
    scores = {float(v) for v in p.max(axis=1)}
    for row in got["per_class"]:
        assert row["threshold"] is None or row["threshold"] in scores
    assert got["suggested_min_score"] is None or got["suggested_min_score"] in scores


# --------------------------------------------------------------------------- edge cases


def test_a_class_never_predicted_and_a_class_absent_from_the_labels() -> None:
    rng = np.random.default_rng(3)
    n = 60
    p = dirichlet(rng, n, 4)
    p[:, 2] = 0.0  # class 2 is never predicted
    p /= p.sum(axis=1, keepdims=True)
    y = rng.choice([0, 1, 2], size=n)  # class 3 has no image (it may still be predicted)
    assert (p.argmax(axis=1) == 3).any()
    got = check_against_references(p, y, ["a", "b", "c", "d"], top_k=2, precision=0.7)
    c, d = got["per_class"][2], got["per_class"][3]
    assert c["precision"] is None and c["recall"] == 0.0 and c["f1"] == 0.0 and c["threshold"] is None
    assert d["support"] == 0 and d["recall"] is None and d["precision"] == 0.0 and d["f1"] == 0.0


def test_a_class_absent_from_labels_and_predictions_does_not_count() -> None:
    p = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.1, 0.8, 0.1]])
    y = np.array([0, 1, 1, 1])
    got = check_against_references(p, y, ["a", "b", "c"], top_k=2, precision=0.9)
    absent = got["per_class"][2]
    assert absent == {"label": "c", "precision": None, "recall": None, "f1": None, "support": 0, "threshold": None}
    assert got["macro_f1"] == pytest.approx((2 * 1 / 3 + 2 * 2 / 5) / 2)  # a: 1 tp, 1 fp; b: 2 tp, 1 fn


def test_perfect_predictions() -> None:
    rng = np.random.default_rng(5)
    y = rng.integers(0, 3, 40)
    p = np.full((40, 3), 0.05)
    p[np.arange(40), y] = 0.9
    got = check_against_references(p, y, ["x", "y", "z"], top_k=1, precision=1.0)
    assert got["accuracy"] == 1.0 and got["macro_f1"] == 1.0 and got["top_k_accuracy"]["accuracy"] == 1.0
    assert got["ece"] == pytest.approx(0.1)  # always right at 0.9 confidence
    assert all(r["threshold"] == 0.9 for r in got["per_class"])
    assert got["suggested_min_score"] == 0.9 and got["coverage_at_suggested"] == 1.0


def test_all_wrong_predictions() -> None:
    rng = np.random.default_rng(6)
    y = rng.integers(0, 3, 30)
    p = np.full((30, 3), 0.1)
    p[np.arange(30), (y + 1) % 3] = 0.8
    got = check_against_references(p, y, ["x", "y", "z"], top_k=2, precision=0.5)
    assert got["accuracy"] == 0.0 and got["macro_f1"] == 0.0
    assert got["ece"] == pytest.approx(0.8)
    assert all(r["threshold"] is None for r in got["per_class"])
    assert got["suggested_min_score"] is None and got["coverage_at_suggested"] is None


def test_ties_go_to_the_class_listed_first() -> None:
    p = np.array([
        [0.4, 0.4, 0.2],    # tie 0/1: predicted 0
        [0.25, 0.25, 0.5],  # tie for 2nd place between 0 and 1
        [1 / 3, 1 / 3, 1 / 3],  # three-way tie: predicted 0
        [0.2, 0.4, 0.4],    # tie 1/2: predicted 1
        [0.5, 0.25, 0.25],
        [0.1, 0.45, 0.45],
    ])
    y = np.array([1, 1, 2, 2, 0, 2])
    got = check_against_references(p, y, ["a", "b", "c"], top_k=1, precision=0.6)
    assert got["confusion"][1] == [1, 0, 1] and got["confusion"][2] == [1, 2, 0]
    check_against_references(p, y, ["a", "b", "c"], top_k=2, precision=0.6)
    assert top_k_accuracy(p, y, 1) == pytest.approx(1 / 6)  # only row 4 (class 0 predicted and right)
    # two-class ties
    p2 = np.array([[0.5, 0.5], [0.5, 0.5], [0.3, 0.7], [0.75, 0.25]])
    y2 = np.array([0, 1, 1, 1])
    check_against_references(p2, y2, ["no", "yes"], top_k=1, precision=0.5)


def test_tied_scores_are_answered_together() -> None:
    # at t = 0.6 both images scoring 0.6 are answered (one right, one wrong): 2/3 < 0.9; only t = 0.9 reaches it
    assert lowest_threshold([0.9, 0.6, 0.6], [True, True, False], 0.9) == (0.9, 1)
    assert lowest_threshold([0.9, 0.6, 0.6], [True, True, False], 0.6) == (0.6, 3)
    # not monotone: the lowest t reaching the target wins, even below one that does not
    assert lowest_threshold([0.9, 0.8, 0.7, 0.6], [False, True, True, True], 0.75) == (0.6, 4)
    assert lowest_threshold([], [], 0.5) == (None, 0)


def test_reliability_bin_edges() -> None:
    # a confidence on an edge belongs to the bin it closes ((lower, upper]); 1.0 to the last
    conf = np.array([1 / 15, 2 / 15, 1.0, 0.5])
    ece, bins = reliability(conf, [True, False, True, True])
    counts = [b["count"] for b in bins]
    assert counts[0] == 1 and counts[1] == 1 and counts[14] == 1 and counts[7] == 1 and sum(counts) == 4
    want, _ = ref_ece(conf, np.array([True, False, True, True]))
    assert ece == pytest.approx(want, **CLOSE)
    assert [b["lower"] for b in bins] == pytest.approx([m / 15 for m in range(15)])
    assert bins[3] == {"lower": pytest.approx(3 / 15), "upper": pytest.approx(4 / 15), "confidence": None,
                       "accuracy": None, "count": 0}


def test_bad_shapes_are_refused() -> None:
    with pytest.raises(ValueError):
        evaluate(np.zeros((3, 2)), [0, 1], ["a", "b"], top_k=1, precision=0.9)
    with pytest.raises(ValueError):
        evaluate(np.zeros((2, 2)), [0, 2], ["a", "b"], top_k=1, precision=0.9)
    with pytest.raises(ValueError):
        evaluate(np.zeros((2, 3)), [0, 1], ["a", "b"], top_k=1, precision=0.9)


# --------------------------------------------------------------------------- tuning's validation metrics


def _expand(confusion: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    y, pred = [], []
    for t, row in enumerate(confusion):
        for q, n in enumerate(row):
            y += [t] * n
            pred += [q] * n
    return np.array(y), np.array(pred)


def test_tuning_records_per_class_validation_metrics(tiny: Any, train_data: Any, classes: list[str]) -> None:
    from backbone import tune

    images, labels = train_data
    result = tune(tiny, "linear-probe", classes, images, labels, {"l2_grid": [1.0], "max_iter": 20})
    m = result.metrics
    assert result.confusion and m["n_val"] == sum(map(sum, result.confusion))
    y, pred = _expand(result.confusion)
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"), **CLOSE)
    prec, rec, f1, support = precision_recall_fscore_support(
        y, pred, labels=list(range(len(classes))), zero_division=np.nan
    )
    assert [r["label"] for r in m["per_class"]] == classes
    for row, pr, rc, f, sup in zip(m["per_class"], prec, rec, f1, support):
        assert set(row) == {"label", "precision", "recall", "f1", "support"}
        assert row["support"] == int(sup)
        for key, want in (("precision", pr), ("recall", rc), ("f1", f)):
            assert (row[key] is None) if math.isnan(want) else row[key] == pytest.approx(float(want), **CLOSE)
    # the prompt's own header carries the same metrics (JSON: no NaN)
    assert result.prompt.metrics["per_class"] == m["per_class"]


def test_no_validation_split_adds_nothing(tiny: Any, train_data: Any, classes: list[str]) -> None:
    from backbone import tune

    images, labels = train_data
    result = tune(tiny, "linear-probe", classes, images, labels,
                  {"l2_grid": [1.0], "max_iter": 20, "val_fraction": 0.0})
    assert result.metrics["n_val"] == 0 and result.confusion == []
    assert "macro_f1" not in result.metrics and "per_class" not in result.metrics
