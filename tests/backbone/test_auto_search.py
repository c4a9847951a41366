"""Method auto and ``search: true`` (backbone.search): the candidates and the papers' sweeps,
the choice on a seeded problem whose answer is known, ties to the cheaper prompt, the budget,
k-fold cross-validation, no validation image, shared features, progress and cancel, and that
what is published is an ordinary, servable prompt of the chosen method.

Time is never asserted against a constant: the budget test checks the search's own records."""

from __future__ import annotations

import pytest
import torch

from bbtest_helpers import make_images

from backbone import (
    Cancelled, ConfigError, Progress, forward_mixed, load_prompt, method_names, prepare_resident, task_method_names, tune,
    validate_config,
)
from backbone.methods import auto as auto_module
from backbone.methods import check_class_texts, get_method, parse_config
from backbone.search import PIXEL_LRS, VPT_BASE_LRS, VPT_WEIGHT_DECAYS, _rank_key, kfold_indices, sweep
from backbone.tuning import split_indices

PROBE = {"method": "linear-probe", "config": {"l2_grid": [1e-2], "max_iter": 100}}
PAD = {"method": "padding", "config": {"epochs": 1, "pad": 4, "batch_size": 16}}


def _done(result):
    return [r for r in result.metrics["search"]["leaderboard"] if r["status"] == "done"]


def _same_tensors(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- registry and config


def test_auto_is_a_task_method_and_never_a_prompt_method():
    assert "auto" not in method_names() and task_method_names() == [*method_names(), "auto"]
    spec = get_method("auto")
    assert spec.needs_dataset and spec.trainer == "search"
    full = validate_config("auto", None)
    assert full == {"seed": 0, "val_fraction": 0.2, "budget_s": 1800.0, "candidates": None, "metric": "val_accuracy",
                    "k_folds": None, "refit": True, "share_features": True}
    with pytest.raises(ConfigError, match="known methods: zeroshot, .*linear-probe, auto"):
        get_method("nope")
    with pytest.raises(ConfigError, match="no prompt of its own"):
        spec.module_cls(None, ["a", "b"], parse_config("auto", None))


@pytest.mark.parametrize(
    "config, needle",
    [
        ({"k_folds": 1}, "k_folds must be 0 or null"),
        ({"candidates": ["auto"]}, "'auto' is not a prompt method; accepted: zeroshot"),
        ({"candidates": ["nope"]}, "'nope' is not a prompt method"),
        ({"candidates": [{"method": "coop", "config": {"seed": 3}}]}, "seed cannot be set per candidate"),
        ({"candidates": [{"method": "vpt-shallow", "config": {"search": True}}]}, "search cannot be set per candidate"),
        ({"candidates": [{"method": "coop", "config": {"lr": 0}}]}, r"candidates\[0\] \(coop\): config key 'lr'"),
        ({"candidates": ["coop", {"method": "coop", "config": {}}]}, "coop appears twice"),
        ({"candidates": []}, "candidates"),
        ({"metric": "loss"}, "metric"),
        ({"budget_s": 0}, "budget_s"),
        ({"candidates": "coop"}, "candidates"),
    ],
)
def test_invalid_auto_configs_are_refused_naming_what_is_wrong(config, needle):
    with pytest.raises(ConfigError, match=needle):
        validate_config("auto", config)


def test_search_flag_on_the_trained_methods():
    assert validate_config("vpt-shallow", None)["search"] is False
    assert validate_config("padding", {"search": True})["search"] is True
    with pytest.raises(ConfigError, match="config key 'search'"):
        validate_config("coop", {"search": "yes"})
    with pytest.raises(ConfigError, match="unknown config key 'search'"):
        validate_config("zeroshot", {"search": True})  # nothing to sweep


def test_sweeps_are_the_papers_grids_starting_from_the_config():
    vpt = parse_config("vpt-shallow", {"batch_size": 64})
    points = sweep("vpt-shallow", vpt)
    assert points[0] == {} and len(points) == 1 + len(VPT_BASE_LRS) * len(VPT_WEIGHT_DECAYS)
    # Jia et al.: base lr scaled by batch size / 256, times the weight decays, nearest the config first
    assert {(p["lr"], p["weight_decay"]) for p in points[1:]} == {
        (lr * 64 / 256, wd) for lr in VPT_BASE_LRS for wd in VPT_WEIGHT_DECAYS
    }
    assert points[1] == {"lr": 1.0 * 64 / 256, "weight_decay": 1e-4}  # the grid point at the config's 0.25 and 1e-4
    assert len({(p["lr"], p["weight_decay"]) for p in points[2:6]}) == 4  # then its grid neighbours
    assert all(abs(VPT_BASE_LRS.index(p["lr"] * 4) - 5) + abs(VPT_WEIGHT_DECAYS.index(p["weight_decay"]) - 2) == 1
               for p in points[2:6])
    assert [p["lr"] for p in sweep("padding", parse_config("padding", {}))[1:]] == list(PIXEL_LRS)
    outward = [p["lr"] for p in sweep("padding", parse_config("padding", {"lr": 1.0}))[1:]]
    assert outward[0] == 1.0 and set(outward[1:3]) == {10.0, 0.1} and set(outward[3:]) == {40.0, 0.01}
    lp = parse_config("linear-probe", {"l2_grid": [1.0, 1e-3]})
    assert sweep("linear-probe", lp) == [{"l2_grid": [1.0], "l2_without_val": 1.0}, {"l2_grid": [1e-3], "l2_without_val": 1e-3}]
    assert sweep("coop", parse_config("coop", {})) == [{}] and sweep("zeroshot", parse_config("zeroshot", {})) == [{}]


def test_rank_prefers_the_metric_then_the_cheaper_prompt():
    def row(flops, nbytes, loss=None):
        return {"per_image_flops": flops, "resident_bytes": nbytes, "val_loss": loss}

    ranked = sorted(
        [
            ("worse", _rank_key(0.5, row(1, 1), (0,))),
            ("costly", _rank_key(0.75, row(10, 1), (1,))),
            ("bigger", _rank_key(0.75, row(5, 100), (2,))),
            ("lossier", _rank_key(0.75, row(5, 50, 0.9), (3,))),
            ("best", _rank_key(0.75, row(5, 50, 0.2), (4,))),
            ("later", _rank_key(0.75, row(5, 50, 0.2), (5,))),
        ],
        key=lambda x: x[1],
    )
    assert [name for name, _ in ranked] == ["best", "later", "lossier", "bigger", "costly", "worse"]


def test_kfold_indices_are_stratified_and_keep_every_class_in_training():
    labels = torch.tensor([0] * 5 + [1] * 3 + [2] * 1)
    folds = kfold_indices(labels, 3, 3, seed=0)
    assert len(folds) == 3
    held = torch.cat([v for _, v in folds])
    assert sorted(held.tolist()) == list(range(8))  # every image of a class with 2+ images, once; class 2 never
    for train, val in folds:
        assert not set(train.tolist()) & set(val.tolist()) and len(train) + len(val) == 9
        assert (torch.bincount(labels[train], minlength=3) > 0).all()
    assert all(torch.equal(a[1], b[1]) for a, b in zip(folds, kfold_indices(labels, 3, 3, seed=0)))


# ---------------------------------------------------------------- the search


def test_auto_picks_the_best_candidate_on_a_known_problem(tiny, classes, train_data):
    """Colour classes: the linear probe separates them (docs: bbtest_helpers.LEARN), the random
    text tower does not, and one epoch of a pixel frame barely moves. Each candidate's score is
    also recomputed by tuning it alone with its config: the search must pick the argmax."""
    images, labels = train_data
    r = tune(tiny, "auto", classes, images, labels, {"budget_s": 600, "candidates": ["zeroshot", PROBE, PAD]})
    search = r.metrics["search"]
    done = _done(r)
    assert [row["method"] for row in done].count("padding") == len(PIXEL_LRS)  # 40 is the default: no duplicate
    assert search["chosen"]["method"] == "linear-probe" == r.prompt.method == done[0]["method"]
    assert r.metrics["val_accuracy"] == done[0]["val_accuracy"] == max(row["val_accuracy"] for row in done)
    zeroshot = next(row for row in done if row["method"] == "zeroshot")
    assert done[0]["val_accuracy"] > zeroshot["val_accuracy"]
    # the known answer, computed independently: each candidate tuned alone with its config on the
    # same split scores what the leaderboard says
    winner = {**search["chosen"]["config"], "val_fraction": 0.2}
    alone = tune(tiny, "linear-probe", classes, images, labels, winner)
    assert alone.metrics["val_accuracy"] == done[0]["val_accuracy"]
    assert r.confusion == alone.confusion and r.history == alone.history  # the winner's validation run
    for row in (zeroshot, next(row for row in done if row["method"] == "padding")):  # a row's figure is its own
        cfg = {**validate_config(row["method"], row["config"])}
        assert tune(tiny, row["method"], classes, images, labels, cfg).metrics["val_accuracy"] == row["val_accuracy"]
    # published: the winner's config trained again on every image (refit), an ordinary linear-probe prompt
    assert r.prompt.config["val_fraction"] == 0.0 and search["refit_seconds"] is not None
    assert _same_tensors(tune(tiny, "linear-probe", classes, images, labels, r.prompt.config).prompt.tensors,
                         r.prompt.tensors)
    assert set(r.metrics) >= {"val_accuracy", "train_seconds", "n_train", "n_val", "macro_f1", "per_class"}
    assert r.metrics["n_train"] == len(labels) and r.metrics["n_val"] == alone.metrics["n_val"] == sum(map(sum, r.confusion))
    for row in search["leaderboard"]:
        assert set(row) >= {"method", "config", "val_accuracy", "tuning_seconds", "resident_bytes", "status"}
    assert search["features_cached"] is True and search["k_folds"] is None and search["budget_s"] == 600


def test_refit_false_publishes_the_winner_as_trained_on_the_split(tiny, classes, train_data):
    images, labels = train_data
    r = tune(tiny, "auto", classes, images, labels, {"refit": False, "candidates": ["zeroshot", PROBE]})
    assert r.metrics["search"]["refit_seconds"] is None and r.prompt.config["val_fraction"] == 0.2
    alone = tune(tiny, r.prompt.method, classes, images, labels, r.prompt.config)
    assert _same_tensors(alone.prompt.tensors, r.prompt.tensors)
    assert r.metrics["n_train"] + r.metrics["n_val"] == len(labels)
    with pytest.raises(ConfigError, match="k_folds needs refit true"):
        validate_config("auto", {"k_folds": 3, "refit": False})


def test_ties_go_to_the_candidate_cheaper_to_serve(tiny, classes, train_data):
    """CoOp started from 'a photo of a' with a vanishing learning rate predicts exactly as zeroshot
    with 'a photo of a {}.': same accuracy, and zeroshot keeps fewer bytes resident, so it wins
    although coop is listed first."""
    images, labels = train_data
    coop = {"method": "coop", "config": {"init": "a photo of a", "epochs": 1, "lr": 1e-12, "warmup_epochs": 0}}
    r = tune(tiny, "auto", classes, images, labels, {"candidates": [coop, "zeroshot"]})
    done = {row["method"]: row for row in _done(r)}
    assert done["coop"]["val_accuracy"] == done["zeroshot"]["val_accuracy"]
    assert done["zeroshot"]["resident_bytes"] < done["coop"]["resident_bytes"]
    assert done["zeroshot"]["per_image_flops"] <= done["coop"]["per_image_flops"]
    assert r.prompt.method == "zeroshot" and r.metrics["search"]["leaderboard"][0]["method"] == "zeroshot"


def test_the_budget_stops_the_search(tiny, classes, train_data):
    images, labels = train_data
    candidates = [{"method": "linear-probe", "config": {"l2_grid": [1.0, 1e-2, 1e-4], "max_iter": 50}}, PAD, "zeroshot"]
    r = tune(tiny, "auto", classes, images, labels, {"budget_s": 1e-3, "candidates": candidates})
    search = r.metrics["search"]
    board = search["leaderboard"]
    ran = [row for row in board if row["started_s"] is not None]
    assert len(ran) == 1 and ran[0]["status"] == "done"  # the first candidate always runs
    skipped = [row for row in board if row["status"] == "skipped_budget"]
    assert len(skipped) == len(board) - 1 == 3 + len(PIXEL_LRS) + 1 - 1
    assert all(row["tuning_seconds"] == 0.0 and row["val_accuracy"] is None for row in skipped)
    assert r.prompt.method == ran[0]["method"] == "zeroshot"  # cheapest first
    # the search's own records: it ended where its one run ended, within the budget plus that run
    first = ran[0]
    assert search["elapsed_s"] == pytest.approx(first["started_s"] + first["tuning_seconds"], abs=2e-3)
    assert search["elapsed_s"] <= max(search["budget_s"], first["started_s"]) + first["tuning_seconds"] + 2e-3


def test_the_budget_stops_a_running_candidate(tiny, classes, train_data):
    """Once a candidate has finished, a run still going when the budget runs out is stopped."""
    images, labels = train_data
    slow = {"method": "padding", "config": {"epochs": 300, "pad": 4, "batch_size": 8}}
    r = tune(tiny, "auto", classes, images, labels, {"budget_s": 0.3, "candidates": ["zeroshot", slow]})
    rows = {row["method"]: row for row in r.metrics["search"]["leaderboard"]}
    assert rows["zeroshot"]["status"] == "done" and r.prompt.method == "zeroshot"
    assert rows["padding"]["status"] == "skipped_budget" and rows["padding"]["val_accuracy"] is None


def test_a_budget_lets_every_run_start_inside_it(tiny, classes, train_data):
    images, labels = train_data
    r = tune(tiny, "auto", classes, images, labels, {"budget_s": 2.0, "candidates": [PROBE, PAD, "zeroshot"]})
    search = r.metrics["search"]
    ran = sorted((row for row in search["leaderboard"] if row["started_s"] is not None), key=lambda row: row["started_s"])
    assert all(row["started_s"] < search["budget_s"] + 1e-3 for row in ran[1:])
    last = max(row["started_s"] + row["tuning_seconds"] for row in ran)
    assert search["elapsed_s"] == pytest.approx(last, abs=2e-3)
    assert search["elapsed_s"] <= max(search["budget_s"], ran[0]["started_s"]) + max(row["tuning_seconds"] for row in ran) + 2e-3


def test_k_fold_scores_every_image_out_of_fold_then_trains_the_winner_on_all(tiny, classes):
    images, labels = make_images(4, 3, seed=5)
    r = tune(tiny, "auto", classes, images, labels, {"k_folds": 3, "candidates": ["zeroshot", PROBE]})
    search = r.metrics["search"]
    assert search["k_folds"] == 3 and "3 folds" in search["selected_on"] and search["refit_seconds"] is not None
    assert r.metrics["n_val"] == len(labels) == sum(map(sum, r.confusion))  # each image once, out of fold
    assert r.metrics["n_train"] == len(labels) and r.prompt.config["val_fraction"] == 0.0
    best = _done(r)[0]
    assert r.metrics["val_accuracy"] == best["val_accuracy"] == sum(r.confusion[i][i] for i in range(4)) / len(labels)
    # the published prompt is the winner's config trained once on every image
    alone = tune(tiny, r.prompt.method, classes, images, labels, r.prompt.config)
    assert _same_tensors(alone.prompt.tensors, r.prompt.tensors)


def test_macro_f1_metric(tiny, classes, train_data):
    images, labels = train_data
    r = tune(tiny, "auto", classes, images, labels, {"metric": "macro_f1", "candidates": ["zeroshot", PROBE]})
    done = _done(r)
    assert r.metrics["search"]["metric"] == "macro_f1"
    assert done[0]["macro_f1"] == max(row["macro_f1"] for row in done) and r.prompt.method == done[0]["method"]


def test_without_a_validation_image_the_first_listed_candidate_is_published(tiny, classes):
    images, labels = make_images(4, 1, seed=2)  # one image per class: none can be held out
    r = tune(tiny, "auto", classes, images, labels, {"candidates": [PROBE, "zeroshot", PAD]})
    search = r.metrics["search"]
    assert "no validation image" in search["selected_on"]
    assert r.prompt.method == "linear-probe" and r.metrics["val_accuracy"] is None
    statuses = {row["method"]: row["status"] for row in search["leaderboard"]}
    assert statuses == {"linear-probe": "done", "zeroshot": "skipped_no_validation", "padding": "skipped_no_validation"}
    alone = tune(tiny, "linear-probe", classes, images, labels, PROBE["config"])
    assert _same_tensors(alone.prompt.tensors, r.prompt.tensors)


def test_search_true_tunes_one_method_over_its_sweep(tiny, classes, train_data):
    images, labels = train_data
    r = tune(tiny, "padding", classes, images, labels, {"search": True, "epochs": 1, "pad": 4, "batch_size": 16})
    board = r.metrics["search"]["leaderboard"]
    assert {row["method"] for row in board} == {"padding"} and len(board) == len(PIXEL_LRS)
    assert r.prompt.method == "padding" and r.prompt.config["search"] is False
    assert r.prompt.config["lr"] in PIXEL_LRS and r.prompt.config["pad"] == 4 and r.prompt.config["epochs"] == 1
    assert r.metrics["search"]["budget_s"] == 1800.0
    alone = tune(tiny, "padding", classes, images, labels, r.prompt.config)  # an ordinary padding config
    assert _same_tensors(alone.prompt.tensors, r.prompt.tensors)
    with pytest.raises(ConfigError, match="2 \\* pad must be smaller"):  # the method's own errors, as its own
        tune(tiny, "padding", classes, images, labels, {"search": True, "pad": 16})
    from backbone import tuning

    with pytest.raises(ConfigError, match="is a search; run it through backbone.tune"):
        tuning.tune(tiny, "padding", classes, images, labels, {"search": True})


def test_the_published_prompt_is_an_ordinary_servable_prompt(tiny, classes, train_data, test_data):
    images, labels = train_data
    r = tune(tiny, "auto", classes, images, labels, {"candidates": [PROBE, PAD]})
    data = r.prompt.to_bytes({"task_id": "t1", "version": "1"})
    loaded = load_prompt(data, tiny)
    assert loaded.method == r.prompt.method == "linear-probe" and loaded.config == r.prompt.config
    assert loaded.metrics["search"]["chosen"]["method"] == "linear-probe"
    test_images, _ = test_data
    resident = prepare_resident(tiny, loaded)
    other = prepare_resident(tiny, tune(tiny, "zeroshot", classes, None, None, {}).prompt)
    owner = torch.tensor([0, 1] * (len(test_images) // 2))
    mixed = forward_mixed(tiny, [resident, other], test_images, owner)
    alone = resident.forward(test_images)
    for i in range(len(test_images)):
        if owner[i] == 0:
            assert torch.allclose(mixed[i], alone[i], atol=1e-5)


def test_features_are_computed_once_and_shared(tiny, classes, train_data):
    images, labels = train_data
    cfg = {"candidates": ["zeroshot", {"method": "linear-probe", "config": {"l2_grid": [1.0, 1e-2], "max_iter": 50}}]}
    shared = tune(tiny, "auto", classes, images, labels, cfg)
    own = tune(tiny, "auto", classes, images, labels, {**cfg, "share_features": False})
    assert shared.metrics["search"]["features_cached"] is True and own.metrics["search"]["features_cached"] is False
    assert [(row["method"], row["val_accuracy"]) for row in _done(shared)] == [
        (row["method"], row["val_accuracy"]) for row in _done(own)
    ]
    assert _same_tensors(shared.prompt.tensors, own.prompt.tensors)


def test_progress_advances_over_the_whole_search_and_cancel_stops_it(tiny, classes, train_data):
    images, labels = train_data
    cfg = {"candidates": ["zeroshot", PROBE, PAD]}
    seen: list[Progress] = []
    tune(tiny, "auto", classes, images, labels, cfg, on_progress=seen.append)
    fractions = [p.fraction for p in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and fractions[0] < 0.5
    n = 2 + len(PIXEL_LRS)
    assert {p.epochs for p in seen} == {n} and seen[-1].epoch == n
    calls = {"n": 0}

    def cancel() -> bool:
        calls["n"] += 1
        return calls["n"] > 5

    with pytest.raises(Cancelled):
        tune(tiny, "auto", classes, images, labels, cfg, should_cancel=cancel)


def test_class_texts_named_candidates_are_refused_default_ones_skipped(tiny, classes, train_data, monkeypatch):
    long_name = " ".join(["word"] * 80)
    names = [long_name, *classes[1:]]
    tokens = tiny.text_tokens
    with pytest.raises(ConfigError, match="auto candidate 'coop' cannot take these classes: method coop: class .*drop it"):
        check_class_texts("auto", names, {"candidates": ["linear-probe", "coop"]}, tokens)
    check_class_texts("auto", names, {"candidates": ["linear-probe"]}, tokens)
    check_class_texts("auto", names, None, tokens)  # the default candidates: skipped at tuning, named
    images, labels = train_data
    monkeypatch.setattr(auto_module, "DEFAULT_CANDIDATES", ("linear-probe", "coop"))
    r = tune(tiny, "auto", names, images, labels, {})
    failed = [row for row in r.metrics["search"]["leaderboard"] if row["status"].startswith("failed")]
    assert [row["method"] for row in failed] == ["coop"] and "tokens" in failed[0]["status"]
    assert r.prompt.method == "linear-probe"


def test_candidates_the_backbone_cannot_run_are_refused_when_named():
    from backbone import load_backbone

    bb = load_backbone("timm:vit_tiny_patch16_224:random@0", device="cpu")
    spec = get_method("auto")
    with pytest.raises(ConfigError, match="auto candidate 'zeroshot' cannot run: method needs a CLIP text tower"):
        spec.module_cls.check_backbone(bb, parse_config("auto", {"candidates": ["linear-probe", "zeroshot"]}))
    spec.module_cls.check_backbone(bb, parse_config("auto", None))  # defaults: skipped at tuning
    g = torch.Generator().manual_seed(0)
    images = torch.randn(8, 3, 224, 224, generator=g)
    labels = torch.tensor([0, 1] * 4)
    r = tune(bb, "auto", ["a", "b"], images, labels,
             {"candidates": ["linear-probe"], "val_fraction": 0.5})
    assert r.prompt.method == "linear-probe"


def test_auto_needs_a_dataset(tiny, classes):
    with pytest.raises(ConfigError, match="needs images and labels"):
        tune(tiny, "auto", classes, None, None, {})


def test_single_split_matches_the_methods_own(tiny, classes, train_data):
    """Every candidate gets the split its method would make alone with auto's seed and val_fraction."""
    images, labels = train_data
    r = tune(tiny, "auto", classes, images, labels, {"seed": 3, "val_fraction": 0.25, "candidates": [PROBE]})
    _, val = split_indices(labels, len(classes), 0.25, 3)
    assert r.metrics["n_val"] == len(val) and r.prompt.config["seed"] == 3


def test_search_true_on_linear_probe_sweeps_its_l2_and_publishes_a_plain_probe(tiny, classes, train_data):
    images, labels = train_data
    config = {"search": True, "l2_grid": [1.0, 0.01], "max_iter": 30}
    r = tune(tiny, "linear-probe", classes, images, labels, config)
    assert r.prompt.method == "linear-probe" and r.prompt.config["search"] is False
    assert {row["method"] for row in r.metrics["search"]["leaderboard"]} == {"linear-probe"}
    alone = tune(tiny, "linear-probe", classes, images, labels, r.prompt.config)
    assert _same_tensors(alone.prompt.tensors, r.prompt.tensors)
