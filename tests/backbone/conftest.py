"""Fixtures of the backbone tests: the tiny random CLIP loaded once per session and
synthetic few-shot data it can separate (see bbtest_helpers)."""

from __future__ import annotations

import pytest
import torch

from bbtest_helpers import CLASS_NAMES, TINY, make_images

from backbone import load_backbone


@pytest.fixture(scope="session")
def tiny():
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return load_backbone(TINY, device="cpu")


@pytest.fixture(scope="session")
def tiny_other():
    """Same architecture, other weights: another fingerprint."""
    return load_backbone("open_clip:tiny:random@1", device="cpu")


@pytest.fixture(scope="session")
def train_data():
    return make_images(4, 12, seed=0)


@pytest.fixture(scope="session")
def test_data():
    return make_images(4, 10, seed=1)


@pytest.fixture(scope="session")
def classes():
    return CLASS_NAMES[:4]
