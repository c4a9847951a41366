"""``promptstore bench accuracy``: held-out accuracy of every method with its default config,
and of ``auto``, on real images, by shots per class.

The images are Fashion-MNIST (Debian's ``dataset-fashion-mnist``, idx files under
``/usr/share/datasets/fashion-mnist``; ``--data`` for another folder): 10 classes named as
the dataset names them. For each backbone, a few-shot pool of ``max(shots)`` images per class
is drawn from the training files (``--seed``) and a held-out test set of ``--test-per-class``
images per class from the test files; the k-shot sets are nested (the 1-shot image is among
the 4 shots). Every method is tuned through ``backbone.tune`` as a task would be (each encodes
its own training images), with its default config except ``epochs``, capped by
``--max-epochs`` where given (CPU runs: the papers' schedules take hours there), and the
test accuracy is measured on its published prompt. ``auto`` gets the same methods as
candidates (same caps) and ``--budget`` seconds. Rows say whether a method's image features
are computed once per run ("cached") or pass the image tower at every step ("tower"); with
``--unshared SPEC`` auto also runs with ``share_features: false`` on that backbone, to measure
what sharing its features across candidates saves.

Prints a table and writes JSON; timings and accuracies are the output, nothing is asserted.
"""

from __future__ import annotations

import gzip
import json
import struct
import time
from pathlib import Path
from typing import Any

#: Debian's dataset-fashion-mnist installs the four idx files here.
DEFAULT_DATA = "/usr/share/datasets/fashion-mnist"
#: The dataset's own class names, in label order.
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
DEFAULT_METHODS = ("zeroshot", "linear-probe", "coop", "cocoop", "vpt-shallow", "padding")


def read_idx(path: Path) -> "Any":
    """An idx file (gzipped or not) as a numpy array: (N, rows, cols) uint8 images or (N,) labels."""
    import numpy as np

    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    magic, n = struct.unpack(">II", data[:8])
    if magic == 2051:
        rows, cols = struct.unpack(">II", data[8:16])
        return np.frombuffer(data, dtype=np.uint8, offset=16).reshape(n, rows, cols)
    if magic == 2049:
        return np.frombuffer(data, dtype=np.uint8, offset=8).reshape(n)
    raise ValueError(f"{path} is not an idx image or label file (magic {magic})")


def _idx(folder: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(
        f"{folder / stem}(.gz) not found; install Debian's dataset-fashion-mnist (apt-get install "
        "dataset-fashion-mnist) or pass --data with the folder holding the Fashion-MNIST idx files"
    )


def load_split(folder: Path, split: str) -> tuple["Any", "Any"]:
    prefix = "train" if split == "train" else "t10k"
    return read_idx(_idx(folder, f"{prefix}-images-idx3-ubyte")), read_idx(_idx(folder, f"{prefix}-labels-idx1-ubyte"))


def sample(labels: "Any", per_class: int, seed: int) -> list[list[int]]:
    """``per_class`` indices of each class, in a seeded random order."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for c in range(len(CLASSES)):
        idx = np.nonzero(labels == c)[0]
        if len(idx) < per_class:
            raise ValueError(f"class {CLASSES[c]!r} has {len(idx)} images, fewer than {per_class}")
        out.append(rng.permutation(idx)[:per_class].tolist())
    return out


def preprocess(backbone: Any, images: "Any", indices: list[int]) -> "Any":
    """Images ``indices`` of the (N, 28, 28) array as the backbone's preprocessed (n, 3, S, S)."""
    import torch
    from PIL import Image

    return torch.stack([backbone.preprocess(Image.fromarray(images[i], "L").convert("RGB")) for i in indices])


def per_backbone(values: list[str] | None, spec: str, default: Any, parse: Any) -> Any:
    """The value for ``spec`` from options given as ``VALUE`` (every backbone) or ``SPEC=VALUE``."""
    out = default
    for v in values or []:
        if "=" in v:
            name, _, rest = v.partition("=")
            if name == spec:
                return parse(rest)
        else:
            out = parse(v)
    return out


def _none_or(parse: Any) -> Any:
    return lambda v: None if v.strip().lower() in ("", "none", "null", "default") else parse(v)


def held_out_accuracy(backbone: Any, prompt: Any, images: "Any", embeds: "Any") -> float:
    """Accuracy of ``prompt`` on the test images (from their cached embeddings when its head reads only those)."""
    import torch

    from backbone import prepare_resident
    from backbone.towers import ImageFeatures

    resident = prepare_resident(backbone, prompt)
    labels = torch.arange(len(CLASSES)).repeat_interleave(len(images) // len(CLASSES))
    with torch.no_grad():
        if resident.module.cache_features:
            logits = resident.module(feats=ImageFeatures(pooled=None, embeds=embeds)).float().cpu()
        else:
            logits = torch.cat([resident.forward(images[i:i + 64]) for i in range(0, len(images), 64)])
    return float((logits.argmax(dim=-1) == labels).float().mean())


def run_accuracy_bench(
    out: str,
    *,
    backbones: list[str],
    shots: list[int],
    methods: list[str] | None = None,
    test_per_class: int = 30,
    max_epochs: list[str] | None = None,
    budget: list[str] | None = None,
    unshared: list[str] | None = None,
    seed: int = 0,
    data: str = DEFAULT_DATA,
    device: str | None = None,
    threads: int | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Run the bench (module docstring); ``methods``, ``max_epochs`` and ``budget`` entries are
    ``VALUE`` for every backbone or ``SPEC=VALUE`` for one. Returns the JSON it writes to ``out``."""
    import torch

    from api.bench.harness import machine_info
    from backbone import load_backbone, tune
    from backbone.methods import Trainer, get_method, method_names
    from backbone.methods.auto import DEFAULT_CANDIDATES
    from backbone.tuning import encode_cached

    if threads:
        torch.set_num_threads(threads)
    shots = sorted(set(shots))
    folder = Path(data)
    train_x, train_y = load_split(folder, "train")
    test_x, test_y = load_split(folder, "test")
    pool = sample(train_y, max(shots), seed)  # (class, max shots) indices
    test_idx = [i for per in sample(test_y, test_per_class, seed + 1) for i in per]
    results: list[dict[str, Any]] = []
    setups: list[dict[str, Any]] = []
    dev = None
    for spec in backbones:
        t = time.perf_counter()
        bb = load_backbone(spec, device=device)
        dev = bb.device
        load_s = time.perf_counter() - t
        wanted = per_backbone(methods, spec, list(DEFAULT_METHODS), lambda v: [m.strip() for m in v.split(",") if m.strip()])
        for m in wanted:
            get_method(m)  # an unknown name fails here with the known ones
            if m not in method_names():
                raise ValueError(f"--methods takes prompt methods; {m!r} is not one (auto always runs)")
        cap = per_backbone(max_epochs, spec, None, _none_or(int))
        budget_s = per_backbone(budget, spec, 120.0, _none_or(float))
        t = time.perf_counter()
        test_images = preprocess(bb, test_x, test_idx)
        pool_images = [preprocess(bb, train_x, per) for per in pool]  # per class (max shots, 3, S, S)
        preprocess_s = time.perf_counter() - t
        t = time.perf_counter()
        test_embeds = encode_cached(bb, test_images)  # once: the test set of every cached-head prompt
        test_encode_s = time.perf_counter() - t
        setup = {
            "backbone": spec, "fingerprint": bb.fingerprint, "methods": wanted, "max_epochs": cap, "budget_s": budget_s,
            "load_seconds": round(load_s, 2), "preprocess_seconds": round(preprocess_s, 2),
            "test_encode_seconds": round(test_encode_s, 2), "test_images": len(test_idx),
        }
        setups.append(setup)

        def config_of(method: str) -> dict[str, Any]:
            trained = get_method(method).trainer is Trainer.SGD  # the methods with epochs
            return {"epochs": cap} if cap is not None and trained else {}

        for k in shots:
            images = torch.cat([p[:k] for p in pool_images])
            labels = torch.arange(len(CLASSES)).repeat_interleave(k)
            for m in wanted:
                cfg = config_of(m)
                dataset = get_method(m).needs_dataset
                t = time.perf_counter()
                r = tune(bb, m, CLASSES, images if dataset else None, labels if dataset else None, cfg)
                seconds = time.perf_counter() - t
                results.append(_row(bb, spec, k, m, cfg, r, seconds, test_images, test_embeds))
                _say(quiet, results[-1])
            candidates = [{"method": m, "config": config_of(m)} for m in DEFAULT_CANDIDATES if m in wanted]
            candidates += [{"method": m, "config": config_of(m)} for m in wanted if m not in DEFAULT_CANDIDATES]
            runs = [True] + ([False] if spec in (unshared or []) else [])
            for share in runs:
                cfg = {"budget_s": budget_s, "candidates": candidates, "seed": 0, "share_features": share}
                t = time.perf_counter()
                r = tune(bb, "auto", CLASSES, images, labels, cfg)
                seconds = time.perf_counter() - t
                row = _row(bb, spec, k, "auto" if share else "auto (unshared)", cfg, r, seconds, test_images, test_embeds)
                results.append(row)
                _say(quiet, row)
        del bb
    report = {
        "benchmark": "accuracy",
        "dataset": {"name": "Fashion-MNIST", "folder": str(folder), "classes": CLASSES, "test_per_class": test_per_class,
                    "seed": seed},
        "shots": shots,
        "backbones": setups,
        "machine": machine_info(dev if dev is not None else torch.device("cpu")),
        "results": results,
        "summary": _summary(results, setups, shots),
    }
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    if not quiet:
        print(format_table(report))
        print(f"wrote {path}")
    return report


def _row(bb: Any, spec: str, shots: int, label: str, cfg: dict[str, Any], r: Any, seconds: float,
         test_images: Any, test_embeds: Any) -> dict[str, Any]:
    from backbone.methods import get_method

    prompt = r.prompt
    module_cls = get_method(prompt.method).module_cls
    row: dict[str, Any] = {
        "backbone": spec, "shots": shots, "method": label, "config": cfg,
        "test_accuracy": held_out_accuracy(bb, prompt, test_images, test_embeds),
        "val_accuracy": r.metrics.get("val_accuracy"), "n_val": r.metrics.get("n_val"),
        "tuning_seconds": round(seconds, 2),
        "features": "cached" if module_cls.cache_features else "tower",
        "published_method": prompt.method,
    }
    search = r.metrics.get("search")
    if search is not None:
        board = search["leaderboard"]
        row.update({
            "features": "shared" if search["features_cached"] else "per candidate",
            "chosen": search["chosen"],
            "budget_s": search["budget_s"], "elapsed_s": search["elapsed_s"],
            "within_budget": search["budget_s"] is None or search["elapsed_s"] <= search["budget_s"],
            "longest_candidate_s": max((b["tuning_seconds"] for b in board), default=0.0),
            "encode_seconds": search["encode_seconds"], "selected_on": search["selected_on"],
            "candidates": {s: sum(1 for b in board if b["status"].split(":")[0] == s)
                           for s in sorted({b["status"].split(":")[0] for b in board})},
            "leaderboard": board,
        })
    return row


def _summary(results: list[dict[str, Any]], setups: list[dict[str, Any]], shots: list[int]) -> list[dict[str, Any]]:
    """Per backbone and shots: the best single method's test accuracy and auto's."""
    out = []
    for setup in setups:
        for k in shots:
            rows = [r for r in results if r["backbone"] == setup["backbone"] and r["shots"] == k]
            singles = [r for r in rows if not r["method"].startswith("auto")]
            auto = next((r for r in rows if r["method"] == "auto"), None)
            if not singles or auto is None:
                continue
            best = max(singles, key=lambda r: r["test_accuracy"])
            out.append({
                "backbone": setup["backbone"], "shots": k, "best_single": best["method"],
                "best_single_test_accuracy": best["test_accuracy"], "auto_test_accuracy": auto["test_accuracy"],
                "auto_chose": auto["chosen"]["method"], "auto_at_least_best_single": auto["test_accuracy"] >= best["test_accuracy"],
                "auto_elapsed_s": auto["elapsed_s"], "auto_budget_s": auto["budget_s"], "auto_within_budget": auto["within_budget"],
            })
    return out


def _say(quiet: bool, row: dict[str, Any]) -> None:
    if not quiet:
        print(f"  {row['backbone']} {row['shots']:>2} shots {row['method']:<16} test {100 * row['test_accuracy']:5.1f}%  "
              f"{row['tuning_seconds']:8.1f} s", flush=True)


def format_table(report: dict[str, Any]) -> str:
    """The Markdown table of a report: test accuracy (tuning seconds) per method and shots."""
    shots = report["shots"]
    head = "| backbone | method | features | " + " | ".join(f"{k} shot{'s' if k > 1 else ''}" for k in shots) + " |"
    lines = [head, "|" + " --- |" * (3 + len(shots))]
    for setup in report["backbones"]:
        spec = setup["backbone"]
        labels = list(dict.fromkeys(r["method"] for r in report["results"] if r["backbone"] == spec))
        for label in labels:
            cells, feats = [], ""
            for k in shots:
                r = next((r for r in report["results"] if r["backbone"] == spec and r["method"] == label
                          and r["shots"] == k), None)
                if r is None:
                    cells.append("")
                    continue
                feats = r["features"]
                cell = f"{100 * r['test_accuracy']:.1f}% ({r['tuning_seconds']:.1f} s"
                if "chosen" in r:
                    done = r["candidates"].get("done", 0)
                    cell += (f"; chose {r['chosen']['method']}; {done} of {len(r['leaderboard'])} candidates in "
                             f"{r['elapsed_s']:.0f} of {r['budget_s']:g} s")
                cells.append(cell + ")")
            name = f"**{label}**" if label == "auto" else label
            lines.append(f"| {spec} | {name} | {feats} | " + " | ".join(cells) + " |")
    lines.append("")
    for s in report["summary"]:
        verdict = "yes" if s["auto_at_least_best_single"] else "NO"
        lines.append(
            f"- {s['backbone']}, {s['shots']} shot(s): best single {s['best_single']} "
            f"{100 * s['best_single_test_accuracy']:.1f}%, auto {100 * s['auto_test_accuracy']:.1f}% "
            f"(chose {s['auto_chose']}); auto >= best single: {verdict}; search {s['auto_elapsed_s']:.1f} s "
            f"of a {s['auto_budget_s']:g} s budget"
        )
    return "\n".join(lines)
