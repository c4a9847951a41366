"""`promptstore bench accuracy` runs end to end through the console script, prints its table and
writes its JSON; its idx reader reads Debian's Fashion-MNIST files.

Accuracies and timings are the benchmark's output, never asserted here: the CLI test runs on a
small synthetic dataset written in the idx format (the real one is read where installed)."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from procs import run_cli, settings_env

from api.bench.accuracy import CLASSES, DEFAULT_DATA, format_table, load_split, per_backbone, read_idx

TINY = "open_clip:tiny:random"


def write_idx(folder: Path, per_class_train: int, per_class_test: int) -> None:
    """Fashion-MNIST-shaped idx files: 28 x 28 images whose brightness and a bar's place follow the class."""
    rng = np.random.default_rng(0)
    for prefix, per_class in (("train", per_class_train), ("t10k", per_class_test)):
        labels = np.repeat(np.arange(10, dtype=np.uint8), per_class)
        rng.shuffle(labels)
        images = rng.integers(0, 60, size=(len(labels), 28, 28), dtype=np.uint8)
        for i, c in enumerate(labels):
            images[i, 2 * c:2 * c + 6, :] = 120 + 12 * c
        (folder / f"{prefix}-images-idx3-ubyte.gz").write_bytes(
            gzip.compress(struct.pack(">IIII", 2051, len(labels), 28, 28) + images.tobytes())
        )
        (folder / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(
            gzip.compress(struct.pack(">II", 2049, len(labels)) + labels.tobytes())
        )


def test_bench_accuracy_cli_writes_table_and_json(tmp_path):
    data = tmp_path / "fmnist"
    data.mkdir()
    write_idx(data, per_class_train=4, per_class_test=2)
    out = tmp_path / "res" / "accuracy.json"
    args = ["bench", "accuracy", "--backbone", TINY, "--shots", "1,3", "--test-per-class", "2",
            "--methods", "zeroshot,linear-probe,padding", "--max-epochs", "1", "--budget", "20",
            "--unshared", TINY, "--threads", "1", "--data", str(data), "--out", str(out)]
    proc = run_cli(args, env=settings_env(), cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| backbone | method | features | 1 shot | 3 shots |" in proc.stdout and "**auto**" in proc.stdout
    res = json.loads(out.read_text())
    assert res["benchmark"] == "accuracy" and res["shots"] == [1, 3]
    assert res["dataset"]["classes"] == CLASSES and res["dataset"]["test_per_class"] == 2
    (setup,) = res["backbones"]
    assert setup["backbone"] == TINY and setup["max_epochs"] == 1 and setup["budget_s"] == 20.0
    assert setup["methods"] == ["zeroshot", "linear-probe", "padding"] and setup["test_images"] == 20
    assert res["machine"]["device"] == "cpu" and res["machine"]["torch_threads"] == 1
    labels = ["zeroshot", "linear-probe", "padding", "auto", "auto (unshared)"]
    for k in (1, 3):
        rows = [r for r in res["results"] if r["shots"] == k]
        assert [r["method"] for r in rows] == labels
        for r in rows:
            assert 0.0 <= r["test_accuracy"] <= 1.0 and r["tuning_seconds"] >= 0
        by = {r["method"]: r for r in rows}
        assert by["zeroshot"]["features"] == "cached" and by["padding"]["features"] == "tower"
        assert by["padding"]["config"] == {"epochs": 1} and by["linear-probe"]["config"] == {}
        auto, unshared = by["auto"], by["auto (unshared)"]
        assert auto["features"] == "shared" and unshared["features"] == "per candidate"
        assert auto["published_method"] == auto["chosen"]["method"]
        assert isinstance(auto["within_budget"], bool) and auto["budget_s"] == 20.0
        assert sum(auto["candidates"].values()) == len(auto["leaderboard"])
        assert all(c["method"] in ("zeroshot", "linear-probe", "padding") for c in auto["leaderboard"])
    assert "no validation image" in next(r for r in res["results"] if r["method"] == "auto" and r["shots"] == 1)["selected_on"]
    summary = {s["shots"]: s for s in res["summary"]}
    assert set(summary) == {1, 3}
    for s in summary.values():
        assert s["best_single"] in ("zeroshot", "linear-probe", "padding")
        assert isinstance(s["auto_at_least_best_single"], bool)
    assert format_table(res) in proc.stdout


def test_bench_accuracy_refuses_bad_arguments(tmp_path):
    proc = run_cli(["bench", "accuracy", "--shots", "0"], env=settings_env(), cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "--shots needs at least one count" in proc.stderr
    proc = run_cli(["bench", "accuracy", "--data", str(tmp_path / "none")], env=settings_env(), cwd=tmp_path, timeout=120)
    assert proc.returncode == 1 and "dataset-fashion-mnist" in proc.stderr


def test_per_backbone_options():
    assert per_backbone(["2", "x:y=5"], "x:y", None, int) == 5
    assert per_backbone(["2", "x:y=5"], "other", None, int) == 2
    assert per_backbone(None, "x:y", 120.0, float) == 120.0


@pytest.mark.skipif(not Path(DEFAULT_DATA).is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_reads_debians_fashion_mnist():
    images, labels = load_split(Path(DEFAULT_DATA), "test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and np.bincount(labels).tolist() == [1000] * 10
    assert read_idx(Path(DEFAULT_DATA) / "train-labels-idx1-ubyte.gz").shape == (60000,)
