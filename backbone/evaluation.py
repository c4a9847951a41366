"""Metrics of a classifier's softmax probabilities against true labels: pure arithmetic on
arrays (numpy), no model, no database. Used by the evaluation job (``worker.evaluate``,
``POST /v1/tasks/{id}/evaluate``) and, for the per-class figures, by tuning's validation split.

Conventions (docs/api.md, "Evaluations"):

- ``probs`` is (N, C): one row of softmax probabilities per image over the version's classes,
  in the version's class order; ``labels`` (N,) are indices into those classes.
- The prediction of an image is its highest-scoring class; a tie goes to the class listed
  first (``numpy.argmax``). The top-k ranking breaks ties the same way: the true class is in
  the top k when fewer than k classes score above it or tie with it and come before it.
- Per class: precision = tp / (tp + fp) (null when the class is never predicted), recall =
  tp / (tp + fn) (null when it has no image), F1 = 2 tp / (2 tp + fp + fn) (null when both).
  Macro F1 averages F1 over the classes that have an image or are predicted at least once
  (scikit-learn's ``f1_score(average="macro")`` without ``labels``): a subset of the classes
  in the evaluation set is fine, and predicting an absent class still counts against it.
- Calibration (Guo et al. 2017, "On Calibration of Modern Neural Networks"): the top-1
  confidences fall in ``RELIABILITY_BINS`` equal-width bins ``(lower, upper]`` of [0, 1];
  ECE = sum over bins of (count / N) * |accuracy - mean confidence|.
- A threshold for a target precision p is the lowest score t such that, among the images
  answered at t (score >= t), the answers are right at least a fraction p of the time; t is
  always one of the scores (the answered set changes only there). Per class, the answers are
  the images predicted as that class; globally (``suggested_min_score``) every image's top-1.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

#: Bins of the reliability diagram and of the ECE (Guo et al. 2017 use 15).
RELIABILITY_BINS = 15


def _as_probs(probs: Any) -> np.ndarray:
    p = np.asarray(probs.detach().cpu().numpy() if hasattr(probs, "detach") else probs)
    if p.ndim != 2:
        raise ValueError(f"probs must be (N, C), got shape {p.shape}")
    return p


def _as_labels(labels: Any, n: int, n_classes: int) -> np.ndarray:
    y = np.asarray(labels.detach().cpu().numpy() if hasattr(labels, "detach") else labels, dtype=np.int64)
    if y.shape != (n,):
        raise ValueError(f"labels must be ({n},), got shape {y.shape}")
    if n and (y.min() < 0 or y.max() >= n_classes):
        raise ValueError(f"labels must lie in [0, {n_classes})")
    return y


def predict(probs: Any) -> np.ndarray:
    """The predicted class of each row (ties: the class listed first)."""
    return np.argmax(_as_probs(probs), axis=1).astype(np.int64)


def confusion_matrix(labels: Any, predictions: Any, n_classes: int) -> list[list[int]]:
    """(C, C) counts: rows the true class, columns the predicted one."""
    y = np.asarray(labels, dtype=np.int64)
    pred = np.asarray(predictions, dtype=np.int64)
    m = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(m, (y, pred), 1)
    return m.tolist()


def _ratio(num: int, den: int) -> float | None:
    return None if den == 0 else num / den


def per_class(confusion: Sequence[Sequence[int]], classes: Sequence[str]) -> list[dict[str, Any]]:
    """``[{"label", "precision", "recall", "f1", "support"}]`` per class, in ``classes`` order,
    from a confusion matrix (rows true class)."""
    m = np.asarray(confusion, dtype=np.int64).reshape(len(classes), len(classes))
    tp = np.diag(m)
    predicted = m.sum(axis=0)
    support = m.sum(axis=1)
    out = []
    for c, label in enumerate(classes):
        t, p, s = int(tp[c]), int(predicted[c]), int(support[c])
        fp, fn = p - t, s - t
        out.append({
            "label": label,
            "precision": _ratio(t, p),
            "recall": _ratio(t, s),
            "f1": _ratio(2 * t, 2 * t + fp + fn),
            "support": s,
        })
    return out


def macro_f1(confusion: Sequence[Sequence[int]]) -> float | None:
    """Mean F1 over the classes that have an image or a prediction; None for no image."""
    m = np.asarray(confusion, dtype=np.int64)
    tp = np.diag(m)
    predicted, support = m.sum(axis=0), m.sum(axis=1)
    present = (predicted + support) > 0
    if not present.any():
        return None
    f1 = [2 * int(tp[c]) / (int(predicted[c]) + int(support[c])) for c in np.nonzero(present)[0]]
    return float(sum(f1) / len(f1))


def validation_metrics(confusion: Sequence[Sequence[int]], classes: Sequence[str]) -> dict[str, Any]:
    """What tuning adds to a version's metrics when it has a validation split: ``macro_f1`` and
    ``per_class`` (label, precision, recall, f1, support)."""
    return {"macro_f1": macro_f1(confusion), "per_class": per_class(confusion, classes)}


def top_k_accuracy(probs: Any, labels: Any, k: int) -> float | None:
    """Fraction of images whose true class ranks among the ``k`` best (ties: the class listed
    first ranks first); None for no image."""
    p = _as_probs(probs)
    n, c = p.shape
    y = _as_labels(labels, n, c)
    if n == 0:
        return None
    true_score = p[np.arange(n), y][:, None]
    above = (p > true_score).sum(axis=1)
    tied_before = ((p == true_score) & (np.arange(c)[None, :] < y[:, None])).sum(axis=1)
    return float(((above + tied_before) < int(k)).mean())


def reliability(
    confidences: Any, correct: Any, n_bins: int = RELIABILITY_BINS
) -> tuple[float | None, list[dict[str, Any]]]:
    """``(ece, bins)``: the expected calibration error and the reliability diagram's points
    ``{"lower", "upper", "confidence", "accuracy", "count"}`` (confidence and accuracy null for
    an empty bin). A confidence ``x`` falls in the bin with ``lower < x <= upper`` (0 in the
    first)."""
    conf = np.asarray(confidences, dtype=np.float64)
    ok = np.asarray(correct, dtype=bool)
    edges = np.arange(n_bins + 1) / n_bins  # m / M, correctly rounded
    which = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    n = len(conf)
    bins = []
    ece = 0.0
    for b in range(n_bins):
        mask = which == b
        count = int(mask.sum())
        if count:
            mean_conf = float(conf[mask].mean())
            acc = float(ok[mask].mean())
            ece += count / n * abs(acc - mean_conf)
        else:
            mean_conf = acc = None
        bins.append({"lower": float(edges[b]), "upper": float(edges[b + 1]), "confidence": mean_conf,
                     "accuracy": acc, "count": count})
    return (float(ece) if n else None), bins


def lowest_threshold(scores: Any, correct: Any, precision: float) -> tuple[float | None, int]:
    """The lowest score ``t`` such that the answers scoring at least ``t`` are right at least a
    fraction ``precision`` of the time, and how many answers score at least ``t``; ``(None, 0)``
    when no ``t`` reaches it (or there is no answer)."""
    s = np.asarray(scores, dtype=np.float64)
    ok = np.asarray(correct, dtype=bool)
    if len(s) == 0:
        return None, 0
    order = np.argsort(-s, kind="stable")
    s, ok = s[order], ok[order]
    hits = np.cumsum(ok)
    # the answered set at t = s[i] is every score >= s[i]: up to the last of a run of equal scores
    last_of_run = np.append(s[1:] != s[:-1], True)
    best: tuple[float | None, int] = (None, 0)
    for i in np.nonzero(last_of_run)[0]:
        answered = int(i) + 1
        if int(hits[i]) / answered >= precision:
            best = (float(s[i]), answered)
    return best


def evaluate(
    probs: Any, labels: Any, classes: Sequence[str], *, top_k: int, precision: float,
    n_bins: int = RELIABILITY_BINS,
) -> dict[str, Any]:
    """Every figure of an evaluation (``GET /v1/tasks/{id}/evaluations/{eid}``'s ``result``)."""
    p = _as_probs(probs)
    n, c = p.shape
    if c != len(classes):
        raise ValueError(f"probs have {c} columns for {len(classes)} classes")
    y = _as_labels(labels, n, c)
    pred = predict(p)
    confidence = p[np.arange(n), pred].astype(np.float64) if n else np.zeros(0)
    correct = pred == y
    confusion = confusion_matrix(y, pred, c)
    k = max(1, min(int(top_k), c))
    rows = per_class(confusion, classes)
    for cls, row in enumerate(rows):
        mine = pred == cls
        row["threshold"] = lowest_threshold(confidence[mine], y[mine] == cls, precision)[0]
    ece, bins = reliability(confidence, correct, n_bins)
    suggested, answered = lowest_threshold(confidence, correct, precision)
    return {
        "n_images": int(n),
        "classes": list(classes),
        "accuracy": float(correct.mean()) if n else None,
        "top_k_accuracy": {"k": k, "accuracy": top_k_accuracy(p, y, k)},
        "macro_f1": macro_f1(confusion),
        "per_class": rows,
        "confusion": confusion,
        "ece": ece,
        "reliability": bins,
        "suggested_min_score": suggested,
        "coverage_at_suggested": (answered / n) if suggested is not None else None,
    }
