"""A diverged run's error becomes the task's readable reason (issue "Real-world inputs", kind 4)."""

from __future__ import annotations

from backbone.errors import DivergedError, NonFinitePrompt
from worker.jobs import failure_reason


def test_diverged_and_non_finite_prompts_fail_with_their_own_message() -> None:
    msg = "training diverged: the loss became nan at epoch 2 of 10, step 3 of 30 (...); lower it and retrain"
    assert failure_reason(DivergedError(msg)) == msg
    msg = "the coop prompt is unusable: its tensor 'ctx' holds NaN or infinite values (...)"
    assert failure_reason(NonFinitePrompt(msg)) == msg
