"""auto: tune several methods on one split and publish the best on validation
(``backbone.search``; docs/methods.md, "auto and search").

Not a prompt method: a task of method auto publishes an ordinary prompt of the candidate
it chose (its ``TrainedPrompt.method`` is that candidate's, e.g. "linear-probe", with the
config that won), so serving never meets the name auto. This file holds what the service
validates before any tuning: the config, and the checks of the candidates a user named
against the class names (text prompts) and the backbone.

Candidates a user names are checked when the task is created: one whose text prompts do not
fit the classes, or that the backbone cannot run (a text method on a timm backbone), refuses
the task naming it. Left unset, the default candidates are not checked up front: the search
records a candidate that cannot run as ``failed: <reason>`` in its leaderboard and goes on
with the others (linear-probe reads no text and runs on every backbone).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..errors import ConfigError
from .base import MethodConfig, PromptModule
from .registry import MethodSpec, Trainer, get_method, method_names, parse_config, register

if TYPE_CHECKING:
    from ..loading import Backbone, TextTokens

#: The candidates of ``candidates: null``, in order of preference (the order decides only when
#: nothing else does: with no validation image the first is published). The search runs them
#: cheapest first whatever this order (``backbone.search``). fixed-patch and random-patch are
#: left out: their paper found padding the best of its three designs.
DEFAULT_CANDIDATES: tuple[str, ...] = ("linear-probe", "zeroshot", "coop", "padding", "vpt-shallow", "cocoop", "vpt-deep")

#: Keys a candidate's config may not set: the search gives every candidate auto's split and seed,
#: and sweeps each candidate itself.
_SHARED_KEYS = ("seed", "val_fraction", "search")


class Candidate(BaseModel):
    """One candidate method with the config its sweep starts from."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    method: str = Field(description="A prompt method (`promptstore methods`), not auto.")
    config: dict[str, Any] = Field(
        default_factory=dict,
        description="The method's config the sweep starts from (its defaults when empty); seed, val_fraction "
        "and search are auto's.",
    )


class AutoConfig(MethodConfig):
    """Every candidate is tuned on the same split (``seed``, ``val_fraction``), or on the same
    ``k_folds`` folds, with the hyperparameters its paper sweeps on validation; the best on
    ``metric`` is published (trained again on every image, ``refit``), ties going to the candidate
    cheaper to serve (fewer FLOPs per image, then fewer resident bytes)."""

    budget_s: float | None = Field(
        1800.0,
        gt=0.0,
        le=604_800.0,
        description="Seconds the search may take (0 < budget_s <= 604800, a week): once a candidate has finished "
        "(the first always does), none starts past the budget, nor one that the earlier runs of its method say "
        "would overrun it, and the running one is stopped before a step that would end past it. The winner's "
        "final training on every image (refit) follows. null: no limit.",
    )
    candidates: list[str | Candidate] | None = Field(
        None,
        min_length=1,
        max_length=16,
        description="The methods to try: names, or {\"method\", \"config\"} objects whose config the sweep starts "
        "from (e.g. {\"method\": \"vpt-shallow\", \"config\": {\"epochs\": 20}}). null: linear-probe, zeroshot, "
        "coop, padding, vpt-shallow, cocoop, vpt-deep, and one that cannot run on this backbone or these "
        "classes is skipped and named in the leaderboard; named candidates that cannot are refused up front. "
        "The order is the preference when nothing else decides (no validation image: the first is published).",
    )
    metric: Literal["val_accuracy", "macro_f1"] = Field(
        "val_accuracy",
        description="What the best candidate has most of on validation: val_accuracy, or macro_f1 (the mean of "
        "the per-class F1 scores).",
    )
    k_folds: int | None = Field(
        None,
        ge=0,
        le=20,
        description="0 or null: one split (val_fraction). k >= 2: stratified k-fold cross-validation instead "
        "(for few shots): each candidate is scored on every image once, out of fold, and the winner is then "
        "trained on all images. A class with one image is never held out.",
    )
    refit: bool = Field(
        True,
        description="true: the winner is trained once more on every image, validation split included, with the "
        "config that won (the VTAB-1k protocol VPT follows: tune on a split, then train on all); its validation figures "
        "are the search's. false: publish the winner as trained on the split (one split only).",
    )
    share_features: bool = Field(
        True,
        description="Compute the image features once for every candidate whose image path is untouched "
        "(zeroshot, coop, cocoop, linear-probe). false: each computes its own (only to measure the saving).",
    )

    @field_validator("candidates", mode="before")
    @classmethod
    def _shape(cls, v: Any) -> Any:
        """Say what a candidate is, rather than how each member of the union failed."""
        if not isinstance(v, list):
            return v
        for i, item in enumerate(v):
            if isinstance(item, dict):
                extra = sorted(set(item) - {"method", "config"})
                if extra or not isinstance(item.get("method"), str) or not isinstance(item.get("config", {}), dict):
                    raise ValueError(
                        f"candidates[{i}] must be a method name or {{\"method\": name, \"config\": {{...}}}}"
                        + (f"; unknown key(s): {', '.join(extra)}" if extra else "")
                    )
            elif not isinstance(item, (str, Candidate)):
                raise ValueError(f"candidates[{i}] must be a method name or {{\"method\": name, \"config\": {{...}}}}")
        return v

    @model_validator(mode="after")
    def _check(self) -> "AutoConfig":
        if self.k_folds == 1:
            raise ValueError("k_folds must be 0 or null (one split) or at least 2 (k-fold cross-validation), got 1")
        if (self.k_folds or 0) >= 2 and not self.refit:
            raise ValueError("k_folds needs refit true: a fold's model saw only part of the images")
        seen: set[tuple[str, str]] = set()
        for i, cand in enumerate(self.candidates or []):
            method, config = (cand, {}) if isinstance(cand, str) else (cand.method, cand.config)
            if method not in method_names():
                known = ", ".join(method_names())
                raise ValueError(f"candidates[{i}]: {method!r} is not a prompt method; accepted: {known}")
            shared = [k for k in _SHARED_KEYS if k in config]
            if shared:
                raise ValueError(
                    f"candidates[{i}] ({method}): {', '.join(shared)} cannot be set per candidate (every candidate "
                    "shares auto's seed and split, and auto sweeps each one itself); set seed and val_fraction on auto"
                )
            try:
                full = parse_config(method, config).model_dump(mode="json")
            except ConfigError as exc:
                raise ValueError(f"candidates[{i}] ({method}): {exc}") from None
            key = (method, json.dumps(full, sort_keys=True))
            if key in seen:
                raise ValueError(f"candidates[{i}]: {method} appears twice with the same config")
            seen.add(key)
        return self

    def candidate_list(self) -> list[tuple[str, dict[str, Any]]]:
        """(method, base config as given) of each candidate, in the config's order."""
        if self.candidates is None:
            return [(m, {}) for m in DEFAULT_CANDIDATES]
        return [(c, {}) if isinstance(c, str) else (c.method, dict(c.config)) for c in self.candidates]


class AutoModule(PromptModule):
    """No module: the search builds its candidates' modules. Only the class-level checks that the
    service runs before tuning live here."""

    def __init__(self, backbone: "Backbone", classes: list[str], config: MethodConfig):  # noqa: D107
        raise ConfigError(
            "method auto has no prompt of its own: tune it (backbone.tune) and it publishes the chosen candidate's"
        )

    @staticmethod
    def _named(config: MethodConfig) -> list[tuple[str, MethodConfig]]:
        cfg: AutoConfig = config  # type: ignore[assignment]
        if cfg.candidates is None:
            return []
        return [(m, parse_config(m, c)) for m, c in cfg.candidate_list()]

    @classmethod
    def check_backbone(cls, backbone: "Backbone", config: MethodConfig) -> None:
        for method, cfg in cls._named(config):
            try:
                get_method(method).module_cls.check_backbone(backbone, cfg)
            except ConfigError as exc:
                raise ConfigError(f"auto candidate {method!r} cannot run: {exc}; {_drop_hint()}") from None

    @classmethod
    def check_texts(
        cls, method: str, classes: list[str], config: MethodConfig, tokens: "TextTokens | None"
    ) -> None:
        for name, cfg in cls._named(config):
            try:
                get_method(name).module_cls.check_texts(name, classes, cfg, tokens)
            except ConfigError as exc:
                raise ConfigError(f"auto candidate {name!r} cannot take these classes: {exc}; {_drop_hint()}") from None


def _drop_hint() -> str:
    return (
        "drop it from candidates, or leave candidates unset (the default candidates skip one that cannot run "
        "and name it in the leaderboard)"
    )


register(
    MethodSpec(
        name="auto",
        config_cls=AutoConfig,
        module_cls=AutoModule,
        trainer=Trainer.SEARCH,
        summary="tunes several methods on one split and publishes the best on validation",
        smoke_config={
            "candidates": ["zeroshot", {"method": "linear-probe", "config": {"l2_grid": [1.0, 0.01], "max_iter": 50}}],
        },
    )
)
