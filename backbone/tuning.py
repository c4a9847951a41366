"""Tuning: a few-shot dataset in memory -> a trained prompt, for one config (``fit`` builds and
trains one module; ``backbone.search`` runs it for each candidate of method auto).

Seeded and reproducible (split, init, batch order and dropout all come from
``config.seed``; the caller's global RNG state is restored afterwards). Image
features are computed once for methods whose image path is untouched. SGD/AdamW
with a constant or linear warm-up then a per-step cosine decay. On GPU the forward
runs under float16 autocast with a gradient scaler; on CPU everything is float32.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn.functional as F

from .artifacts import TrainedPrompt
from .errors import Cancelled, ConfigError, DivergedError
from .evaluation import validation_metrics
from .methods import MethodSpec, Trainer, get_method, parse_config
from .methods.base import MethodConfig, PromptModule, TrainConfig, check_text_prompts
from .towers import ImageFeatures

if TYPE_CHECKING:
    from .loading import Backbone

EVAL_BATCH = 64


@dataclass
class Progress:
    fraction: float  # in [0, 1]
    epoch: int
    epochs: int
    loss: float | None = None
    val_accuracy: float | None = None


@dataclass
class TuneResult:
    prompt: TrainedPrompt
    metrics: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    confusion: list[list[int]] = field(default_factory=list)


def build_module(
    backbone: "Backbone", spec: MethodSpec, classes: list[str], config: MethodConfig, *, check_text: bool = True
) -> PromptModule:
    """Check the method fits the backbone and every class's text prompt fits (and is told apart
    by) the text encoder, then build its module on the backbone's device. ``check_text=False``
    only to serve a prompt already published (it is served as it was trained)."""
    spec.module_cls.check_backbone(backbone, config)
    if check_text:
        check_text_prompts(spec.name, spec.module_cls, list(classes), config, backbone.text_tokens)
    module = spec.module_cls(backbone, list(classes), config)
    return module.to(backbone.device)


def prompt_of(backbone: "Backbone", method: str, module: PromptModule, metrics: dict | None = None) -> TrainedPrompt:
    """The saveable prompt of ``module`` (its state dict on the CPU)."""
    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in module.state_dict().items()}
    return TrainedPrompt(
        method, module.config.model_dump(mode="json"), list(module.classes), backbone.fingerprint, tensors,
        metrics=dict(metrics or {}),
    )


def split_indices(labels: torch.Tensor, n_classes: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified split: round(n_c * val_fraction) images of each class go to validation,
    but every class keeps at least one training image. Returns (train_idx, val_idx), sorted."""
    gen = torch.Generator().manual_seed(seed)
    train, val = [], []
    for c in range(n_classes):
        idx = (labels == c).nonzero(as_tuple=True)[0]
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_val = min(int(round(len(idx) * val_fraction)), max(len(idx) - 1, 0))
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return torch.cat(train).sort().values, torch.cat(val).sort().values


def _check_data(backbone: "Backbone", spec: MethodSpec, classes: list[str], images, labels) -> None:
    if not isinstance(classes, (list, tuple)) or not all(isinstance(c, str) and c for c in classes):
        raise ConfigError("classes must be a list of non-empty strings")
    if len(set(classes)) != len(classes):
        raise ConfigError("class names must be unique")
    min_classes = 1 if spec.trainer is Trainer.NONE else 2
    if len(classes) < min_classes:
        raise ConfigError(f"method {spec.name} needs at least {min_classes} classes, got {len(classes)}")
    if not spec.needs_dataset and images is None:
        return
    if images is None or labels is None:
        raise ConfigError(f"method {spec.name} needs images and labels")
    s = backbone.image_size
    if images.dim() != 4 or tuple(images.shape[1:]) != (3, s, s):
        raise ConfigError(f"images must be (N, 3, {s}, {s}) preprocessed for this backbone, got {tuple(images.shape)}")
    if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
        raise ConfigError(f"labels must be (N,) matching images, got {tuple(labels.shape)}")
    if images.shape[0] == 0:
        raise ConfigError("no images")
    if labels.min() < 0 or labels.max() >= len(classes):
        raise ConfigError(f"labels must lie in [0, {len(classes)})")
    counts = torch.bincount(labels, minlength=len(classes))
    if spec.trainer is not Trainer.NONE and (counts == 0).any():
        empty = [classes[i] for i in (counts == 0).nonzero(as_tuple=True)[0].tolist()]
        raise ConfigError(f"classes without images: {empty}; each class needs at least 1")


@torch.no_grad()
def encode_cached(backbone: "Backbone", images: torch.Tensor) -> torch.Tensor:
    """Image embeddings (N, E) of the untouched tower, float32 on the backbone's device."""
    out = []
    for i in range(0, images.shape[0], EVAL_BATCH):
        out.append(backbone.encode_images(images[i:i + EVAL_BATCH]).embeds.float())
    return torch.cat(out)


def _logits(module: PromptModule, images: torch.Tensor | None, cache: torch.Tensor | None, idx: torch.Tensor) -> torch.Tensor:
    """Logits (len(idx), C) of a batch, from cached embeddings or from images."""
    if cache is not None:
        return module(feats=ImageFeatures(pooled=None, embeds=cache[idx.to(cache.device)]))
    assert images is not None
    return module(images=images[idx])


@torch.no_grad()
def _predict(module: PromptModule, images, cache, idx: torch.Tensor, amp: bool) -> torch.Tensor:
    was_training = module.training
    module.eval()
    preds = []
    for i in range(0, len(idx), EVAL_BATCH):
        with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
            preds.append(_logits(module, images, cache, idx[i:i + EVAL_BATCH]).float().argmax(dim=-1).cpu())
    module.train(was_training)
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)


def _accuracy(pred: torch.Tensor, y: torch.Tensor) -> float | None:
    return float((pred == y).float().mean()) if len(y) else None


def _confusion(pred: torch.Tensor, y: torch.Tensor, n: int) -> list[list[int]]:
    m = torch.zeros(n, n, dtype=torch.long)
    if len(y):
        m.index_put_((y, pred), torch.ones_like(y), accumulate=True)
    return m.tolist()


@torch.no_grad()
def _non_finite_param(module: PromptModule) -> str | None:
    """The name of a learned tensor holding NaN or infinity, or None (one device sync)."""
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    if not named:
        return None
    ok = torch.stack([torch.isfinite(p).all() for _, p in named])
    if bool(ok.all()):
        return None
    return named[int((~ok).nonzero()[0])][0]


def _lr_at(step: int, total: int, warmup: int, cfg: TrainConfig) -> float:
    if step < warmup:
        return cfg.warmup_lr if cfg.warmup == "constant" else cfg.lr * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return 0.5 * cfg.lr * (1.0 + math.cos(math.pi * t))


def tune(
    backbone: "Backbone",
    method: str,
    classes: list[str],
    images: torch.Tensor | None,
    labels: torch.Tensor | None,
    config: dict | None = None,
    *,
    on_progress: Callable[[Progress], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    features: torch.Tensor | None = None,
) -> TuneResult:
    """Tune ``method`` on images (N, 3, S, S) preprocessed float32 and labels (N,) int64: one
    training run of one config. ``features``: the images' embeddings (N, E) through the
    untouched tower (``encode_cached``) when the caller has them already; methods whose image
    path is untouched read them instead of encoding the images again, the others ignore them.

    ``backbone.tune`` (``backbone.search.tune``) is the entry point: it runs this, or the search
    for method auto and for a config with ``search: true``, which this refuses.
    Raises ConfigError (bad config, data, or method/backbone mismatch) or Cancelled.
    """
    spec = get_method(method)
    cfg = parse_config(method, config)
    if spec.trainer is Trainer.SEARCH or getattr(cfg, "search", False):
        raise ConfigError(f"method {spec.name} with this config is a search; run it through backbone.tune")
    _check_data(backbone, spec, classes, images, labels)
    if labels is not None:
        labels = labels.to(torch.long).cpu()
    cache = check_features(backbone, images, features)
    started = time.perf_counter()
    module, run = fit(
        backbone, spec, cfg, list(classes), images, labels, on_progress=on_progress, should_cancel=should_cancel,
        cache=cache,
    )
    metrics = run_metrics(run, time.perf_counter() - started)
    prompt = prompt_of(backbone, spec.name, module, metrics)
    return TuneResult(prompt=prompt, metrics=metrics, history=run.history, confusion=run.confusion)


def check_features(backbone: "Backbone", images: torch.Tensor | None, features: torch.Tensor | None) -> torch.Tensor | None:
    """``features`` (N, E) for ``images`` (N, ...) as float32 on the backbone's device, or ConfigError."""
    if features is None:
        return None
    if images is None or features.dim() != 2 or features.shape[0] != images.shape[0]:
        n = None if images is None else images.shape[0]
        raise ConfigError(f"features must be (N, E) for the N={n} images, got {tuple(features.shape)}")
    return features.to(backbone.device, torch.float32)


def fit(
    backbone: "Backbone",
    spec: MethodSpec,
    cfg: MethodConfig,
    classes: list[str],
    images: torch.Tensor | None,
    labels: torch.Tensor | None,
    *,
    on_progress: Callable[[Progress], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    split: tuple[torch.Tensor, torch.Tensor] | None = None,
    cache: torch.Tensor | None = None,
) -> tuple[PromptModule, "_Run"]:
    """Build ``spec``'s module for ``cfg`` (seeded by ``cfg.seed``; the caller's RNG state is kept)
    and train it; data already checked, labels (N,) int64 on the CPU. ``split``: (train_idx,
    val_idx) instead of the config's own split; ``cache``: the images' untouched-tower
    embeddings (N, E) for a module that reads them. Returns the module (eval mode) and its run."""
    amp = backbone.device.type == "cuda"
    devices = [backbone.device] if amp else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(cfg.seed)
        module = build_module(backbone, spec, classes, cfg)
        run = _Run(
            backbone, spec, cfg, module, list(classes), images, labels, amp, on_progress, should_cancel,
            split=split, cache=cache,
        )
        run.execute()
    module.eval()
    return module, run


def run_metrics(run: "_Run", seconds: float) -> dict[str, Any]:
    """The metrics a prompt carries from its run (``train_seconds``: ``seconds``, rounded to ms)."""
    return {
        "val_accuracy": run.val_accuracy,
        "train_accuracy": run.train_accuracy,
        "train_seconds": round(seconds, 3),
        "n_train": int(len(run.train_idx)),
        "n_val": int(len(run.val_idx)),
        "epochs": run.epochs,
        **run.extra_metrics,
    }


class _Run:
    """One tuning run; split from ``tune`` so each trainer reads as one method."""

    def __init__(
        self, bb, spec, cfg, module, classes, images, labels, amp, on_progress, should_cancel, *, split=None, cache=None
    ):
        self.bb, self.spec, self.cfg, self.module, self.classes = bb, spec, cfg, module, classes
        self.images, self.labels, self.amp = images, labels, amp
        self.on_progress, self.should_cancel = on_progress, should_cancel
        self.history: list[dict[str, Any]] = []
        self.extra_metrics: dict[str, Any] = {}
        self.val_accuracy: float | None = None
        self.train_accuracy: float | None = None
        n_cls = len(classes)
        self.confusion: list[list[int]] = []  # stays empty without a validation split
        if labels is None:
            self.train_idx = self.val_idx = torch.empty(0, dtype=torch.long)
        elif split is not None:  # the caller's split (the search: one split or fold for every candidate)
            self.train_idx, self.val_idx = split
        elif spec.trainer is Trainer.NONE:  # nothing to train: every image evaluates
            self.train_idx, self.val_idx = torch.empty(0, dtype=torch.long), torch.arange(len(labels))
        else:
            self.train_idx, self.val_idx = split_indices(labels, n_cls, cfg.val_fraction, cfg.seed)
        shots = 0
        if labels is not None and len(self.train_idx):
            shots = int(torch.bincount(labels[self.train_idx], minlength=n_cls).median())
        self.epochs = cfg.schedule_epochs(shots)
        self.cache = None
        if images is not None and module.cache_features:
            self.cache = cache if cache is not None else encode_cached(bb, images)  # (N, E) computed once

    def _cancel_check(self) -> None:
        if self.should_cancel is not None and self.should_cancel():
            raise Cancelled("tuning cancelled")

    def _report(self, epoch: int, loss: float | None, val_acc: float | None) -> None:
        if self.on_progress is not None:
            frac = 1.0 if self.epochs == 0 else min(1.0, epoch / self.epochs)
            self.on_progress(Progress(fraction=frac, epoch=epoch, epochs=self.epochs, loss=loss, val_accuracy=val_acc))

    def _evaluate(self, idx: torch.Tensor) -> tuple[torch.Tensor, float | None]:
        if self.labels is None or len(idx) == 0:
            return torch.empty(0, dtype=torch.long), None
        pred = _predict(self.module, self.images, self.cache, idx, self.amp)
        return pred, _accuracy(pred, self.labels[idx])

    def _finish(self) -> None:
        pred, self.val_accuracy = self._evaluate(self.val_idx)
        _, self.train_accuracy = self._evaluate(self.train_idx)
        if len(self.val_idx):
            self.confusion = _confusion(pred, self.labels[self.val_idx], len(self.classes))
            # macro F1 and per-class precision, recall, F1 and support (backbone.evaluation)
            self.extra_metrics.update(validation_metrics(self.confusion, self.classes))
        self._report(self.epochs, self.history[-1]["loss"] if self.history else None, self.val_accuracy)

    def execute(self) -> None:
        self._cancel_check()
        _TRAINERS[self.spec.trainer](self)
        self._finish()

    def _diverged(self, what: str, epoch: int, step: int, total: int, lr: float, warmup: int) -> DivergedError:
        """The error that stops a run whose loss or parameters went non-finite, naming the likely cause."""
        cfg: TrainConfig = self.cfg  # type: ignore[assignment]
        if step < warmup and cfg.warmup == "constant":
            phase, cause = "constant warm-up", f"warmup_lr is probably too high (warmup_lr={cfg.warmup_lr:g}, lr={cfg.lr:g})"
        else:
            phase = "linear warm-up" if step < warmup else "cosine decay"
            cause = f"the learning rate is probably too high (lr={cfg.lr:g})"
        amplifiers = []
        if cfg.weight_decay:
            amplifiers.append(f"weight_decay={cfg.weight_decay:g}")
        if cfg.optimizer == "sgd" and cfg.momentum:
            amplifiers.append(f"momentum={cfg.momentum:g}")
        also = f", made worse by {' and '.join(amplifiers)}" if amplifiers else ""
        return DivergedError(
            f"training diverged: {what} at epoch {epoch} of {self.epochs}, step {step + 1} of {total} "
            f"({cfg.optimizer}, {phase}, learning rate {lr:g}); {cause}{also}; lower it and retrain"
        )

    # ---- trainers

    def _train_none(self) -> None:
        pass

    def _train_sgd(self) -> None:
        cfg: TrainConfig = self.cfg  # type: ignore[assignment]
        module, y_all = self.module, self.labels
        params = [p for p in module.parameters() if p.requires_grad]
        if cfg.optimizer == "sgd":
            opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        else:
            opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        n_train = len(self.train_idx)
        bs = min(cfg.batch_size, n_train)
        steps_per_epoch = math.ceil(n_train / bs)
        total = self.epochs * steps_per_epoch
        warmup = cfg.schedule_warmup(self.epochs) * steps_per_epoch
        gen = torch.Generator().manual_seed(cfg.seed + 1)
        step = 0
        self.extra_metrics["schedule"] = {
            "optimizer": cfg.optimizer, "lr": cfg.lr, "batch_size": bs, "steps": total, "warmup_steps": warmup,
        }
        for epoch in range(1, self.epochs + 1):
            module.train()
            order = self.train_idx[torch.randperm(n_train, generator=gen)]
            loss_sum, seen = 0.0, 0
            for i in range(0, n_train, bs):
                self._cancel_check()
                idx = order[i:i + bs]
                lr = _lr_at(step, total, warmup, cfg)
                for group in opt.param_groups:
                    group["lr"] = lr
                y = y_all[idx].to(self.bb.device)
                with torch.autocast("cuda", dtype=torch.float16, enabled=self.amp):
                    logits = _logits(module, self.images, self.cache, idx)
                loss = F.cross_entropy(logits.float(), y)
                loss_value = float(loss.detach())
                if not math.isfinite(loss_value):  # stop before a step from a non-finite loss
                    raise self._diverged(f"the loss became {loss_value}", epoch, step, total, lr, warmup)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)  # under amp, a step with non-finite gradients is skipped, not applied
                scaler.update()
                bad = _non_finite_param(module)
                if bad is not None:
                    raise self._diverged(f"the learned tensor {bad!r} became non-finite", epoch, step, total, lr, warmup)
                loss_sum += loss_value * len(idx)
                seen += len(idx)
                step += 1
            _, val_acc = self._evaluate(self.val_idx)
            entry = {"epoch": epoch, "loss": loss_sum / max(seen, 1), "val_accuracy": val_acc}
            self.history.append(entry)
            if epoch < self.epochs:
                self._report(epoch, entry["loss"], val_acc)

    @torch.no_grad()
    def _val_loss(self, x_all: torch.Tensor, y_all: torch.Tensor) -> float:
        """Mean cross-entropy of the linear probe on the validation split (x normalised)."""
        idx = self.val_idx.to(x_all.device)
        return float(F.cross_entropy(self.module.linear(x_all[idx]).float(), y_all[idx]))  # type: ignore[attr-defined]

    def _train_lbfgs(self) -> None:
        from .methods.linear_probe import LinearProbeConfig, LinearProbeModule

        cfg: LinearProbeConfig = self.cfg  # type: ignore[assignment]
        module: LinearProbeModule = self.module  # type: ignore[assignment]
        assert self.cache is not None and self.labels is not None
        x_all = F.normalize(self.cache, dim=-1)
        y_all = self.labels.to(x_all.device)
        x_tr, y_tr = x_all[self.train_idx.to(x_all.device)], y_all[self.train_idx.to(x_all.device)]
        has_val = len(self.val_idx) > 0
        grid = cfg.l2_grid if has_val else [cfg.l2_without_val]
        self.epochs = len(grid)
        best: tuple[tuple[float, float], float, dict[str, torch.Tensor]] | None = None
        for i, l2 in enumerate(grid, start=1):
            self._cancel_check()
            loss = module.fit(x_tr, y_tr, l2, cfg.max_iter)
            bad = _non_finite_param(module)
            if not math.isfinite(loss) or bad is not None:
                what = f"the loss became {loss}" if bad is None else f"the learned tensor {bad!r} became non-finite"
                raise DivergedError(
                    f"training diverged: {what} in the L-BFGS fit {i} of {len(grid)} (l2={l2:g}); the l2 "
                    "strength is probably too weak for a stable fit; use larger l2_grid values (or l2_without_val)"
                )
            _, val_acc = self._evaluate(self.val_idx)
            val_loss = self._val_loss(x_all, y_all) if has_val else None
            self.history.append({"epoch": i, "loss": loss, "val_accuracy": val_acc, "val_loss": val_loss, "l2": l2})
            # best validation accuracy; ties (frequent on a few validation images) go to the lower
            # validation cross-entropy, so an over-regularised, near-uniform fit does not win them
            score = (val_acc if val_acc is not None else 0.0, -(val_loss if val_loss is not None else 0.0))
            if best is None or score > best[0]:
                best = (score, l2, {k: v.clone() for k, v in module.state_dict().items()})
            if i < len(grid):
                self._report(i, loss, val_acc)
        assert best is not None
        module.load_state_dict(best[2])
        self.extra_metrics["l2"] = best[1]


_TRAINERS: dict[Trainer, Callable[[_Run], None]] = {
    Trainer.NONE: _Run._train_none,
    Trainer.SGD: _Run._train_sgd,
    Trainer.LBFGS: _Run._train_lbfgs,
}
