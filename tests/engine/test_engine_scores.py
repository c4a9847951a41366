"""Classify never answers a NaN, infinite or null score (issue "Real-world inputs", kind 4)."""

from __future__ import annotations

import math

import pytest
import torch

from api.engine import PromptUnavailable, UnusableScores, top_predictions


def test_finite_logits_give_sorted_probabilities() -> None:
    preds = top_predictions(torch.tensor([1.0, 3.0, 2.0]), ["a", "b", "c"], 2)
    assert [p["label"] for p in preds] == ["b", "c"]
    assert all(math.isfinite(p["score"]) for p in preds)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_logits_are_an_error_not_a_score(bad: float) -> None:
    with pytest.raises(UnusableScores, match="non-finite scores") as err:
        top_predictions(torch.tensor([0.5, bad, 1.0]), ["a", "b", "c"], None)
    assert isinstance(err.value, PromptUnavailable)  # answered 409 by the classify route
