"""The search: tune several candidates on one split and publish the best on validation.

``tune`` here is the package's entry point (``backbone.tune``): a plain config trains once
(``tuning.tune``); method auto, and any method whose config says ``search: true``, run
``search`` instead. A search

1. lists its candidates: each candidate method's sweep over the hyperparameters its paper
   tunes on validation (``sweep``), starting from the candidate's own config;
2. orders them cheap first (``COST_RANK``): every method's starting config first, cheapest
   method first, then each method's next sweep point in turn, so that a budget cuts the
   expensive tails, never a whole method; the cheap sweeps (linear-probe's, on cached
   features) run whole at once;
3. computes the image features once for every candidate whose image path is untouched
   (zeroshot, coop, cocoop, linear-probe) and gives every candidate the same split (or the
   same ``k_folds`` folds: each image is scored once, out of fold);
4. runs them while the budget lasts: once a candidate has finished, no candidate starts
   that the budget (or the earlier runs of its method) says would overrun it, and the one
   running is stopped before a step that would end past ``budget_s``;
5. picks the best on the metric; ties go to the candidate cheaper to serve (fewer FLOPs per
   image, then fewer resident bytes of the prepared prompt), then to the lower validation
   cross-entropy (candidates on cached features), then to the earlier candidate;
6. trains the winner once more on every image, validation included, with the config that
   won (``refit``: the VTAB-1k protocol, Zhai et al. 2019, that VPT follows: tune on a split,
   then train on all; always with k folds), and publishes that.

The published prompt is an ordinary prompt of the chosen method with the config that won
(retuning that method with the published config gives the same tensors). With no
validation image at all (one image per class, or ``val_fraction`` 0) nothing can be
compared: the first listed candidate that runs is trained with its own config and published,
and the result says so.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn.functional as F

from . import tuning
from .artifacts import TrainedPrompt
from .errors import Cancelled, ConfigError, DivergedError
from .evaluation import macro_f1, validation_metrics
from .methods import MethodSpec, Trainer, get_method, parse_config, validate_config
from .methods.auto import AutoConfig, Candidate
from .methods.base import MethodConfig, PromptModule, check_text_prompts
from .towers import ImageFeatures
from .tuning import Progress, TuneResult

if TYPE_CHECKING:
    from .loading import Backbone

# ---------------------------------------------------------------- the papers' sweeps

#: VPT (Jia et al., "Visual Prompt Tuning", ECCV 2022, appendix A): learning rate and weight decay
#: are grid-searched on the validation split; the learning rate is a base value scaled by
#: batch size / 256.
VPT_BASE_LRS: tuple[float, ...] = (50.0, 25.0, 10.0, 5.0, 2.5, 1.0, 0.5, 0.25, 0.1, 0.05)
VPT_WEIGHT_DECAYS: tuple[float, ...] = (0.01, 0.001, 0.0001, 0.0)
#: Bahng et al. ("Exploring Visual Prompts for Adapting Large-Scale Models", 2022) train CLIP's
#: pixel prompts with SGD at learning rate 40, their tuned value; the sweep spans it and the
#: decades below it (their few-shot-free setting says nothing of smaller sets).
PIXEL_LRS: tuple[float, ...] = (40.0, 10.0, 1.0, 0.1, 0.01)

#: Tuning cost order of the methods, cheapest first (what runs first): nothing to learn; one
#: L-BFGS fit on cached features; SGD on cached features through the text tower; SGD through
#: the image tower (pixels, then tokens); CoCoOp's text pass per image; tokens at every layer.
COST_RANK: dict[str, int] = {
    "zeroshot": 0, "linear-probe": 1, "coop": 2, "padding": 3, "fixed-patch": 3, "random-patch": 3,
    "vpt-shallow": 4, "cocoop": 5, "vpt-deep": 6,
}

#: Config keys a sweep varies (and the split/seed auto sets): serving cost does not depend on them.
_SWEPT_KEYS = frozenset({"lr", "weight_decay", "l2_grid", "l2_without_val", "seed", "val_fraction"})


def _by_distance(points: list[tuple[float, ...]], start: tuple[int, ...]) -> list[tuple[float, ...]]:
    """Grid points (given with their grid indices first) ordered outward from the grid index ``start``."""
    return [p for _, p in sorted((sum(abs(a - b) for a, b in zip(idx, start)), p) for idx, p in points)]  # type: ignore[misc]


def _nearest(grid: tuple[float, ...], value: float) -> int:
    """Index of the grid value nearest ``value`` (in log space; 0 is its own point)."""
    def dist(g: float) -> float:
        if g == 0.0 or value == 0.0:
            return 0.0 if g == value else math.inf
        return abs(math.log(g) - math.log(value))

    return min(range(len(grid)), key=lambda i: (dist(grid[i]), i))


def sweep(method: str, base: MethodConfig) -> list[dict[str, Any]]:
    """The configs (as override dicts on ``base``) a search tries for ``method``, in order: the
    base config first, then the paper's grid outward from it (nearest grid point first).

    - linear-probe: each L2 strength of ``base.l2_grid`` alone (CLIP, Radford et al. 2021, and
      CoOp's linear-probe baseline sweep the L2 strength on validation; CLIP over 1e-6 .. 1e6),
      warm starts aside the same selection the method makes inside one run;
    - vpt-shallow / vpt-deep: ``VPT_BASE_LRS`` x batch_size / 256 times ``VPT_WEIGHT_DECAYS``;
    - padding, fixed-patch, random-patch: ``PIXEL_LRS``;
    - any other method (zeroshot, coop, cocoop: their papers fix these values): the base alone.
    """
    if method == "linear-probe":
        return [{"l2_grid": [l2], "l2_without_val": l2} for l2 in base.l2_grid]  # type: ignore[attr-defined]
    out: list[dict[str, Any]] = [{}]
    if method in ("vpt-shallow", "vpt-deep"):
        scale = base.batch_size / 256  # type: ignore[attr-defined]
        lrs = tuple(lr * scale for lr in VPT_BASE_LRS)
        start = (_nearest(lrs, base.lr), _nearest(VPT_WEIGHT_DECAYS, base.weight_decay))  # type: ignore[attr-defined]
        grid = [((i, j), (lr, wd)) for i, lr in enumerate(lrs) for j, wd in enumerate(VPT_WEIGHT_DECAYS)]
        out += [{"lr": lr, "weight_decay": wd} for lr, wd in _by_distance(grid, start)]  # type: ignore[has-type]
    elif method in ("padding", "fixed-patch", "random-patch"):
        start = (_nearest(PIXEL_LRS, base.lr),)  # type: ignore[attr-defined]
        out += [{"lr": lr} for (lr,) in _by_distance([((i,), (lr,)) for i, lr in enumerate(PIXEL_LRS)], start)]
    return out


# ---------------------------------------------------------------- entry point


def tune(
    backbone: "Backbone",
    method: str,
    classes: list[str],
    images: torch.Tensor | None,
    labels: torch.Tensor | None,
    config: dict | MethodConfig | None = None,
    *,
    on_progress: Callable[[Progress], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    features: torch.Tensor | None = None,
) -> TuneResult:
    """Tune ``method`` on images (N, 3, S, S) preprocessed float32 and labels (N,) int64.

    A plain config trains once (``tuning.tune``). Method auto, or a config with ``search: true``,
    runs the search (module docstring) and returns an ordinary prompt of the method it chose,
    whose ``metrics["search"]`` holds the leaderboard. ``features``: the images' untouched-tower
    embeddings (N, E) if the caller has them (``tuning.encode_cached``). Progress advances over
    the whole search; ``should_cancel`` stops it (Cancelled).
    Raises ConfigError (bad config, data, or method/backbone mismatch) or Cancelled.
    """
    spec = get_method(method)
    cfg = parse_config(method, config)
    if spec.trainer is Trainer.SEARCH:
        return search(backbone, cfg, classes, images, labels, on_progress=on_progress,  # type: ignore[arg-type]
                      should_cancel=should_cancel, features=features)
    if getattr(cfg, "search", False):
        return search(backbone, single_method_search(spec.name, cfg), classes, images, labels,
                      on_progress=on_progress, should_cancel=should_cancel, features=features, single=spec)
    return tuning.tune(backbone, method, classes, images, labels, cfg.model_dump(mode="json"),
                       on_progress=on_progress, should_cancel=should_cancel, features=features)


def single_method_search(method: str, cfg: MethodConfig) -> AutoConfig:
    """The search of ``search: true``: auto's defaults (budget included) with this method alone,
    its sweep starting from the rest of this config."""
    defaults = validate_config(method, None)
    base = {k: v for k, v in cfg.model_dump(mode="json").items()
            if k not in ("seed", "val_fraction", "search") and v != defaults.get(k)}
    return AutoConfig(seed=cfg.seed, val_fraction=cfg.val_fraction, candidates=[Candidate(method=method, config=base)])


# ---------------------------------------------------------------- folds


def kfold_indices(labels: torch.Tensor, n_classes: int, k: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Stratified k folds: each class's images, shuffled by ``seed``, are dealt to the folds in
    turn (continuing where the previous class stopped, so small classes fill different folds);
    a class with one image is never held out, so every class keeps a training image in every
    fold. Returns [(train_idx, val_idx)] sorted, for the folds that hold an image."""
    gen = torch.Generator().manual_seed(seed)
    fold_of = torch.full((len(labels),), -1, dtype=torch.long)
    dealt = 0
    for c in range(n_classes):
        idx = (labels == c).nonzero(as_tuple=True)[0]
        if len(idx) < 2:
            continue
        idx = idx[torch.randperm(len(idx), generator=gen)]
        fold_of[idx] = (dealt + torch.arange(len(idx))) % k
        dealt += len(idx)
    folds = []
    for f in range(k):
        val = (fold_of == f).nonzero(as_tuple=True)[0]
        if len(val):
            folds.append(((fold_of != f).nonzero(as_tuple=True)[0], val))
    return folds


# ---------------------------------------------------------------- the search


@dataclass
class _Planned:
    """One candidate config of the search, in run order."""

    method: str
    spec: MethodSpec
    cfg: MethodConfig
    listed: int  # position of its candidate in the config's list
    order: tuple[int, int, int, int]
    row: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Best:
    key: tuple
    planned: _Planned
    prompt: TrainedPrompt | None  # single split: the trained prompt; k folds: trained after the search
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    confusion: list[list[int]]


class _SearchProgress:
    """Maps each run's progress onto the whole search's, never going back."""

    def __init__(self, on_progress: Callable[[Progress], None] | None, total: int, budget_s: float | None, t0: float):
        self.on_progress, self.total, self.budget_s, self.t0 = on_progress, max(1, total), budget_s, t0
        self.fraction = 0.0
        self.done = 0

    def report(self, within: float, val: float | None = None, final: bool = False) -> None:
        if self.on_progress is None:
            return
        frac = (self.done + within) / self.total
        if self.budget_s:
            frac = max(frac, (time.perf_counter() - self.t0) / self.budget_s)
        self.fraction = 1.0 if final else max(self.fraction, min(frac, 0.999))
        self.on_progress(Progress(fraction=self.fraction, epoch=self.done, epochs=self.total, val_accuracy=val))

    def run_hook(self, fold: int, n_folds: int) -> Callable[[Progress], None]:
        def hook(p: Progress) -> None:
            self.report((fold + p.fraction) / n_folds)
        return hook


def _why_no_validation(labels: torch.Tensor | None, n_classes: int, val_fraction: float) -> str:
    """Why the split held out no image, in the terms a user can change (``split_indices``: a
    class gives round(n * val_fraction) images, keeping one for training)."""
    if labels is None:
        return "no labelled image"
    if val_fraction <= 0:
        return "no validation image (val_fraction is 0)"
    counts = torch.bincount(labels, minlength=n_classes).tolist()
    most = max(counts) if counts else 0
    if most < 2:
        return "no validation image (every class has 1 image: none can be held out)"
    return (f"no validation image (val_fraction {val_fraction:g} of at most {most} images per class rounds to 0; "
            "add images, raise val_fraction, or set k_folds)")


def search(
    backbone: "Backbone",
    auto: AutoConfig,
    classes: list[str],
    images: torch.Tensor | None,
    labels: torch.Tensor | None,
    *,
    on_progress: Callable[[Progress], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    features: torch.Tensor | None = None,
    single: MethodSpec | None = None,
) -> TuneResult:
    """Run the search of ``auto`` (module docstring); ``single``: the method of a ``search: true``
    config (errors then read as that method's own)."""
    t0 = time.perf_counter()
    spec_for_data = single or get_method("auto")
    tuning._check_data(backbone, spec_for_data, classes, images, labels)
    assert images is not None and labels is not None  # a search needs a dataset (checked above)
    classes = list(classes)
    labels = labels.to(torch.long).cpu()
    given = tuning.check_features(backbone, images, features)

    def cancel_check() -> None:
        if should_cancel is not None and should_cancel():
            raise Cancelled("tuning cancelled")

    # 1-2. candidates, checked against the backbone and the classes, then ordered cheap first
    rows: list[dict[str, Any]] = []
    planned: list[_Planned] = []
    explicit = auto.candidates is not None
    listed = auto.candidate_list()
    for i, (method, base_dict) in enumerate(listed):
        spec = get_method(method)
        base = parse_config(method, {**base_dict, "seed": auto.seed, "val_fraction": auto.val_fraction})
        try:
            spec.module_cls.check_backbone(backbone, base)
            check_text_prompts(spec.name, spec.module_cls, classes, base, backbone.text_tokens)
        except ConfigError as exc:
            if single is not None:
                raise
            if explicit:
                raise ConfigError(f"auto candidate {method!r} cannot run: {exc}") from None
            rows.append(_row(method, base, f"failed: {exc}"))
            continue
        rank = COST_RANK.get(method, len(COST_RANK))
        cheap = spec.trainer in (Trainer.NONE, Trainer.LBFGS)
        seen: set[str] = set()
        for j, over in enumerate(sweep(method, base)):
            cfg = parse_config(method, {**base.model_dump(mode="json"), **over})
            key = json.dumps(cfg.model_dump(mode="json"), sort_keys=True)
            if key in seen:
                continue
            seen.add(key)
            planned.append(_Planned(method, spec, cfg, i, (0 if cheap else j, rank, i, j)))
    if not planned:
        raise ConfigError("no candidate can run: " + "; ".join(f"{r['method']}: {r['status']}" for r in rows))
    planned.sort(key=lambda p: p.order)

    # 3. the split (or folds), and the features shared by the candidates that read them
    k = auto.k_folds or 0
    if k >= 2:
        folds = kfold_indices(labels, len(classes), k, auto.seed)
    else:
        train_idx, val_idx = tuning.split_indices(labels, len(classes), auto.val_fraction, auto.seed)
        folds = [(train_idx, val_idx)] if len(val_idx) else []
    no_validation = not folds
    if no_validation:  # nothing to compare on: the first listed candidate that runs, as configured
        first = min(p.listed for p in planned)
        keep = [p for p in planned if p.listed == first][:1]
        chosen_cfg = parse_config(keep[0].method, {**listed[first][1], "seed": auto.seed, "val_fraction": auto.val_fraction})
        keep[0].cfg = chosen_cfg
        for p in planned:
            if p is not keep[0]:
                p.row = _row(p.method, p.cfg, "skipped_no_validation")
        folds = [tuning.split_indices(labels, len(classes), auto.val_fraction, auto.seed)]
    shared = given
    encode_seconds = 0.0
    wants_cache = [p for p in planned if p.spec.module_cls.cache_features and not p.row]
    if shared is None and auto.share_features and wants_cache:
        t = time.perf_counter()
        shared = tuning.encode_cached(backbone, images)  # (N, E) computed once for all of them
        encode_seconds = time.perf_counter() - t
    features_cached = bool(wants_cache) and shared is not None and auto.share_features

    # 4. run them while the budget lasts
    runnable = [p for p in planned if not p.row]
    progress = _SearchProgress(on_progress, len(runnable), auto.budget_s, t0)
    progress.report(0.0)
    durations: dict[str, list[float]] = {}
    costs: dict[str, tuple[int, int]] = {}
    best: _Best | None = None
    keys: dict[int, tuple] = {}
    elapsed = time.perf_counter() - t0  # (the shared features, computed before any run)
    budget = _Budget(auto.budget_s, t0, should_cancel)
    for p in runnable:
        cancel_check()
        start = time.perf_counter()
        now = start - t0
        if budget.armed:
            past = durations.get(p.method)
            estimate = sum(past) / len(past) if past else 0.0
            if budget.spent(now) or budget.spent(now + estimate):
                p.row = _row(p.method, p.cfg, "skipped_budget")
                progress.done += 1
                progress.report(0.0)
                continue
        p.row = _row(p.method, p.cfg, "running")
        p.row["started_s"] = round(now, 3)
        budget.start_run()
        try:
            outcome = _run_candidate(backbone, p, classes, images, labels, folds, shared if auto.share_features else None,
                                     progress, budget.should_stop, costs)
        except (DivergedError, ConfigError) as exc:
            p.row["status"] = f"failed: {exc}"
            outcome = None
        except Cancelled:
            if not budget.stopped:
                raise
            p.row["status"] = "skipped_budget"  # stopped when the budget ran out (its started_s says when it began)
            outcome = None
        seconds = time.perf_counter() - start
        p.row["tuning_seconds"] = round(seconds, 3)
        elapsed = max(elapsed, now + seconds)  # the search's time is where its last run ended
        durations.setdefault(p.method, []).append(seconds)
        progress.done += 1
        if outcome is not None:
            p.row.update(outcome.row)
            p.row["status"] = "done"
            score = p.row[auto.metric] if not no_validation else None
            key = _rank_key(score, p.row, p.order)
            keys[id(p)] = key
            if best is None or key < best.key:
                best = _Best(key, p, outcome.prompt, outcome.metrics, outcome.history, outcome.confusion)
            budget.armed = True  # a candidate finished: from now on the budget stops the search
            progress.report(0.0, val=score)
        else:
            progress.report(0.0)
    # the leaderboard: the candidates that ran, best first, then the others in run order
    rows = [p.row for p in sorted((p for p in planned if id(p) in keys), key=lambda p: keys[id(p)])] + rows + [
        p.row for p in planned if id(p) not in keys
    ]
    if best is None:
        raise ConfigError("no candidate could be tuned: " + "; ".join(
            f"{r['method']}: {r['status']}" for r in rows if r["status"].startswith("failed")))

    # 5. the winner: trained once more on every image (refit), or as trained on the split
    chosen = best.planned
    refit_seconds = None
    metrics = dict(best.metrics)
    history, confusion = best.history, best.confusion
    if auto.refit and not no_validation:
        cancel_check()
        t = time.perf_counter()
        cfg = parse_config(chosen.method, {**chosen.cfg.model_dump(mode="json"), "val_fraction": 0.0})
        module, run = tuning.fit(backbone, chosen.spec, cfg, classes, images, labels, should_cancel=should_cancel,
                                 cache=shared if auto.share_features else None,
                                 on_progress=lambda q: progress.report(0.999))
        refit_seconds = time.perf_counter() - t
        refit = tuning.run_metrics(run, refit_seconds)
        metrics.update({k: refit[k] for k in ("train_accuracy", "n_train", "epochs") if k in refit})
        for key in ("schedule", "l2"):
            if key in refit:
                metrics[key] = refit[key]
        if len(folds) > 1:  # no fold's history stands for the candidate: the final run's
            history = run.history
        prompt = tuning.prompt_of(backbone, chosen.method, module)
    else:
        assert best.prompt is not None
        prompt = best.prompt
    if no_validation:
        selected_on = f"nothing: {_why_no_validation(labels, len(classes), auto.val_fraction)}; the first listed " \
                      "candidate was trained as configured, on every image"
    elif len(folds) > 1 or (auto.k_folds or 0) >= 2:
        selected_on = f"{auto.metric} over {len(folds)} folds, each image scored once out of fold"
    else:
        selected_on = f"{auto.metric} on the validation split"
    metrics["train_seconds"] = round(time.perf_counter() - t0, 3)
    metrics["search"] = {
        "chosen": {"method": chosen.method, "config": prompt.config},
        "leaderboard": rows,
        "metric": auto.metric,
        "selected_on": selected_on,
        "budget_s": auto.budget_s,
        "elapsed_s": round(elapsed, 3),
        "refit_seconds": None if refit_seconds is None else round(refit_seconds, 3),
        "features_cached": features_cached,
        "encode_seconds": round(encode_seconds, 3),
        "k_folds": auto.k_folds if (auto.k_folds or 0) >= 2 else None,
    }
    prompt.metrics = dict(metrics)
    progress.report(1.0, val=metrics.get("val_accuracy"), final=True)
    return TuneResult(prompt=prompt, metrics=metrics, history=history, confusion=confusion)


class _Budget:
    """When the search must stop: ``should_stop`` is the runs' cancel check (called before each
    optimisation step), true on the caller's cancel, or, once a candidate has finished
    (``armed``), when the budget would be spent before the next check: the time since the last
    check (about one step) is taken as the next step's."""

    def __init__(self, budget_s: float | None, t0: float, should_cancel: Callable[[], bool] | None):
        self.budget_s, self.t0, self.should_cancel = budget_s, t0, should_cancel
        self.armed = False
        self.stopped = False
        self.last: float | None = None

    def spent(self, at: float) -> bool:
        return self.budget_s is not None and at >= self.budget_s

    def start_run(self) -> None:
        self.last = None

    def should_stop(self) -> bool:
        if self.should_cancel is not None and self.should_cancel():
            return True
        now = time.perf_counter() - self.t0
        step = 0.0 if self.last is None else now - self.last
        self.last = now
        if self.armed and self.spent(now + step):
            self.stopped = True
            return True
        return False


def _row(method: str, cfg: MethodConfig, status: str) -> dict[str, Any]:
    """A leaderboard row: ``config`` holds the fields that differ from the method's defaults."""
    defaults = validate_config(method, None)
    diff = {k: v for k, v in cfg.model_dump(mode="json").items() if defaults.get(k) != v}
    return {
        "method": method, "config": diff, "status": status, "val_accuracy": None, "macro_f1": None,
        "val_loss": None, "tuning_seconds": 0.0, "started_s": None, "resident_bytes": None, "per_image_flops": None,
    }


def _rank_key(score: float | None, row: dict[str, Any], order: tuple[int, ...]) -> tuple:
    """Smaller is better: the higher score, then fewer FLOPs per image, fewer resident bytes, the
    lower validation cross-entropy (when known), the earlier candidate."""
    loss = row.get("val_loss")
    return (
        -round(score, 12) if score is not None else 0.0,
        row["per_image_flops"], row["resident_bytes"],
        loss if loss is not None else math.inf,
        order,
    )


@dataclass
class _Outcome:
    row: dict[str, Any]
    prompt: TrainedPrompt | None
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    confusion: list[list[int]]


def _run_candidate(
    backbone: "Backbone", p: _Planned, classes: list[str], images: torch.Tensor, labels: torch.Tensor,
    folds: list[tuple[torch.Tensor, torch.Tensor]], shared: torch.Tensor | None, progress: _SearchProgress,
    should_cancel: Callable[[], bool] | None, costs: dict[str, tuple[int, int]],
) -> _Outcome:
    """Train ``p`` on every fold (one split: one fold); its pooled validation figures and cost."""
    n = len(classes)
    pooled = torch.zeros(n, n, dtype=torch.long)
    loss_sum, loss_n = 0.0, 0
    module: PromptModule | None = None
    run = None
    for f, split in enumerate(folds):
        module, run = tuning.fit(backbone, p.spec, p.cfg, classes, images, labels, split=split,
                                 cache=shared if p.spec.module_cls.cache_features else None,
                                 on_progress=progress.run_hook(f, len(folds)), should_cancel=should_cancel)
        if run.confusion:
            pooled += torch.tensor(run.confusion)
        if run.cache is not None and len(run.val_idx):
            loss_sum += _val_loss_sum(module, run.cache, labels, run.val_idx)
            loss_n += len(run.val_idx)
    assert module is not None and run is not None
    n_val = int(pooled.sum())
    row: dict[str, Any] = {
        "val_accuracy": float(pooled.diag().sum()) / n_val if n_val else None,
        "macro_f1": macro_f1(pooled.tolist()) if n_val else None,
        "val_loss": loss_sum / loss_n if loss_n else None,
        "epochs": run.epochs,
    }
    one_split = len(folds) == 1
    metrics = tuning.run_metrics(run, 0.0)
    prompt = tuning.prompt_of(backbone, p.method, module, metrics) if one_split else None
    cost_key = json.dumps([p.method, {k: v for k, v in p.cfg.model_dump(mode="json").items() if k not in _SWEPT_KEYS}],
                          sort_keys=True)
    if cost_key not in costs:
        costs[cost_key] = serving_cost(backbone, prompt or tuning.prompt_of(backbone, p.method, module))
    row["per_image_flops"], row["resident_bytes"] = costs[cost_key]
    if not one_split:  # the pooled, out-of-fold figures stand for the candidate
        metrics = {"val_accuracy": row["val_accuracy"], "n_val": n_val, "n_train": int(len(labels)),
                   **(validation_metrics(pooled.tolist(), classes) if n_val else {})}
    return _Outcome(row, prompt, metrics, run.history, pooled.tolist() if n_val else [])


@torch.no_grad()
def _val_loss_sum(module: PromptModule, cache: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor) -> float:
    """Summed cross-entropy of ``module`` on the cached features of images ``idx``."""
    was = module.training
    module.eval()
    total = 0.0
    for i in range(0, len(idx), tuning.EVAL_BATCH):
        part = idx[i:i + tuning.EVAL_BATCH]
        logits = module(feats=ImageFeatures(pooled=None, embeds=cache[part.to(cache.device)])).float()
        total += float(F.cross_entropy(logits, labels[part].to(logits.device), reduction="sum"))
    module.train(was)
    return total


def serving_cost(backbone: "Backbone", prompt: TrainedPrompt) -> tuple[int, int]:
    """(FLOPs of classifying one image with ``prompt`` alone, bytes its prepared form keeps resident):
    what the tie-break compares. FLOPs are counted by torch (matrix products and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    from .serving import prepare_resident

    resident = prepare_resident(backbone, prompt)
    image = torch.zeros(1, 3, backbone.image_size, backbone.image_size)
    with FlopCounterMode(display=False) as counter:
        resident.forward(image)
    return int(counter.get_total_flops()), int(resident.nbytes)
