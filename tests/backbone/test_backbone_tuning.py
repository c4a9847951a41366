"""Tuning: split, schedule, progress, cancellation, reproducibility, cached features."""

from __future__ import annotations

import math

import pytest
import torch

from backbone import Cancelled, ConfigError, Progress, tune
from backbone.methods import parse_config
from backbone.tuning import _lr_at, split_indices


def test_split_is_stratified_and_keeps_one_training_image_per_class():
    labels = torch.tensor([0] * 10 + [1] * 5 + [2] * 1)
    tr, va = split_indices(labels, 3, 0.2, seed=0)
    assert len(set(tr.tolist()) & set(va.tolist())) == 0 and len(tr) + len(va) == 16
    assert torch.bincount(labels[va], minlength=3).tolist() == [2, 1, 0]
    assert torch.bincount(labels[tr], minlength=3).tolist() == [8, 4, 1]
    assert torch.equal(split_indices(labels, 3, 0.2, seed=0)[1], va)
    assert not torch.equal(split_indices(labels, 3, 0.2, seed=1)[1], va)
    assert len(split_indices(labels, 3, 0.0, seed=0)[1]) == 0


def test_schedule_warmup_then_cosine():
    cfg = parse_config("coop", {"lr": 0.002, "epochs": 10})  # constant warm-up at 1e-5 (CoOp)
    assert _lr_at(0, 100, 10, cfg) == 1e-5 and _lr_at(9, 100, 10, cfg) == 1e-5
    assert _lr_at(10, 100, 10, cfg) == pytest.approx(0.002)
    assert _lr_at(55, 100, 10, cfg) == pytest.approx(0.001)
    assert _lr_at(99, 100, 10, cfg) < 1e-5
    vpt = parse_config("vpt-deep", {"lr": 1.0, "epochs": 100})  # linear warm-up (VPT)
    assert _lr_at(0, 1000, 100, vpt) == pytest.approx(0.01) and _lr_at(99, 1000, 100, vpt) == pytest.approx(1.0)
    assert vpt.schedule_warmup(100) == 10 and vpt.schedule_warmup(5) == 0  # paper value, capped for short runs
    assert parse_config("coop", {}).default_epochs(1) == 50 and parse_config("coop", {}).default_epochs(16) == 200


def test_progress_history_metrics_confusion(tiny, classes, train_data):
    images, labels = train_data
    seen: list[Progress] = []
    r = tune(tiny, "vpt-shallow", classes, images, labels, {"epochs": 3, "n_tokens": 2, "batch_size": 8}, on_progress=seen.append)
    assert [p.epoch for p in seen] == [1, 2, 3] and all(p.epochs == 3 for p in seen)
    assert [p.fraction for p in seen] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert all(p.loss is not None and p.val_accuracy is not None for p in seen)
    assert [h["epoch"] for h in r.history] == [1, 2, 3]
    assert all(set(h) >= {"epoch", "loss", "val_accuracy"} for h in r.history)
    m = r.metrics
    assert set(m) >= {"val_accuracy", "train_seconds", "n_train", "n_val", "train_accuracy", "epochs"}
    assert m["n_train"] + m["n_val"] == len(labels) and m["n_val"] == 4 * round(12 * 0.2)
    assert m["epochs"] == 3 and m["train_seconds"] > 0
    conf = torch.tensor(r.confusion)
    assert conf.shape == (4, 4) and conf.sum() == m["n_val"]
    assert conf.sum(dim=1).tolist() == [round(12 * 0.2)] * 4  # rows are the true classes
    assert conf.diag().sum().item() / m["n_val"] == pytest.approx(m["val_accuracy"])
    assert r.prompt.metrics == m


def test_cancellation_between_steps(tiny, classes, train_data):
    images, labels = train_data
    calls = {"n": 0}

    def should_cancel():
        calls["n"] += 1
        return calls["n"] > 3

    with pytest.raises(Cancelled):
        tune(tiny, "coop", classes, images, labels, {"epochs": 50, "batch_size": 8}, should_cancel=should_cancel)
    assert calls["n"] == 4


def test_same_seed_same_prompt_other_seed_other_prompt(tiny, classes, train_data):
    images, labels = train_data
    cfg = {"epochs": 2, "n_tokens": 2, "batch_size": 8, "prompt_dropout": 0.1}
    a = tune(tiny, "vpt-deep", classes, images, labels, cfg)
    b = tune(tiny, "vpt-deep", classes, images, labels, cfg)
    c = tune(tiny, "vpt-deep", classes, images, labels, {**cfg, "seed": 1})
    assert all(torch.equal(a.prompt.tensors[k], b.prompt.tensors[k]) for k in a.prompt.tensors)
    assert a.history == b.history
    assert not torch.equal(a.prompt.tensors["prompts"], c.prompt.tensors["prompts"])


def test_global_rng_is_left_alone(tiny, classes, train_data):
    images, labels = train_data
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tune(tiny, "coop", classes, images, labels, {"epochs": 1, "n_ctx": 2})
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("method", ["coop", "linear-probe"])
def test_untouched_image_path_encodes_images_once(tiny, classes, train_data, monkeypatch, method):
    images, labels = train_data
    calls = []
    real = tiny.vision.forward
    monkeypatch.setattr(tiny.vision, "forward", lambda x, p=None: calls.append(len(x)) or real(x, p))
    cfg = {"epochs": 4, "batch_size": 8, "n_ctx": 2} if method == "coop" else {"l2_grid": [1e-2, 1e-4]}
    tune(tiny, method, classes, images, labels, cfg)
    assert sum(calls) == len(images) and len(calls) == math.ceil(len(images) / 64)


def test_linear_probe_sweeps_and_keeps_best(tiny, classes, train_data):
    images, labels = train_data
    r = tune(tiny, "linear-probe", classes, images, labels, {"l2_grid": [1e-5, 10.0, 1e-2]})
    assert [h["l2"] for h in r.history] == [10.0, 1e-2, 1e-5]  # strongest first
    # the best validation accuracy; a tie goes to the lower validation loss, then the stronger l2
    best = max(r.history, key=lambda h: (h["val_accuracy"], -h["val_loss"]))
    assert r.metrics["l2"] == best["l2"] and r.metrics["val_accuracy"] == best["val_accuracy"]
    assert all(h["val_loss"] > 0 for h in r.history)
    no_val = tune(tiny, "linear-probe", classes, images, labels, {"val_fraction": 0.0})
    assert no_val.metrics["n_val"] == 0 and no_val.metrics["val_accuracy"] is None
    assert no_val.metrics["l2"] == 1e-3 and len(no_val.history) == 1


def test_zeroshot_with_images_evaluates_all_of_them(tiny, classes, train_data):
    images, labels = train_data
    seen = []
    r = tune(tiny, "zeroshot", classes, images, labels, None, on_progress=seen.append)
    assert r.metrics["n_val"] == len(labels) and r.metrics["n_train"] == 0
    assert 0.0 <= r.metrics["val_accuracy"] <= 1.0
    assert seen and seen[-1].fraction == 1.0
    assert r.prompt.tensors == {}


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"images": torch.zeros(4, 3, 16, 16)}, r"images must be \(N, 3, 32, 32\)"),
        ({"labels": torch.tensor([0, 1, 2, 9])}, r"labels must lie in \[0, 4\)"),
        ({"labels": torch.tensor([0, 1, 2])}, "labels must be"),
        ({"classes": ["a"]}, "needs at least 2 classes"),
        ({"classes": ["a", "a", "b", "c"]}, "unique"),
        ({"labels": torch.tensor([0, 0, 1, 1])}, r"classes without images: \['blue', 'yellow'\]"),
        ({"images": None}, "needs images and labels"),
    ],
)
def test_bad_data_is_rejected(tiny, classes, kwargs, needle):
    args = {"classes": classes, "images": torch.zeros(4, 3, 32, 32), "labels": torch.tensor([0, 1, 2, 3])}
    args.update(kwargs)
    with pytest.raises(ConfigError, match=needle):
        tune(tiny, "coop", args["classes"], args["images"], args["labels"], {"epochs": 1})
