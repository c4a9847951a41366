"""The method registry: public name -> (config class, module class, trainer).

Adding a method is one new file under backbone/methods/ that calls ``register``
and one import line in ``backbone/methods/__init__.py``.
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

import annotated_types
from pydantic import ValidationError
from pydantic.fields import FieldInfo

from ..errors import ConfigError
from .base import MethodConfig, PromptModule

if TYPE_CHECKING:
    from ..loading import TextTokens


class Trainer(str, Enum):
    """How ``tuning.tune`` trains a method's module (each value is one trainer there)."""

    NONE = "none"  # nothing to learn (zeroshot)
    SGD = "sgd"  # gradient steps: SGD/AdamW, warm-up then cosine
    LBFGS = "lbfgs"  # the linear-probe L2 sweep on cached features
    SEARCH = "search"  # no module of its own: ``backbone.search`` tunes candidates and publishes the best (auto)


@dataclass(frozen=True)
class MethodSpec:
    """Everything the service knows about a method; the rest lives on its config and module
    classes (``PromptModule``: image pass, pixel/token prompts, head, batched heads).

    A method whose trainer is ``Trainer.SEARCH`` (auto) is a task method only: it tunes other
    methods and publishes one of their prompts, so no prompt ever carries its name."""

    name: str
    config_cls: type[MethodConfig]
    module_cls: type[PromptModule]
    trainer: Trainer
    summary: str
    #: A small config that tunes in about a second on ``open_clip:tiny:random`` (tests and benches).
    smoke_config: dict[str, Any] = field(default_factory=dict)
    #: Whether a task of this method needs a labelled dataset (False only for zeroshot).
    needs_dataset: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "trainer", Trainer(self.trainer))  # a typo fails at import


_REGISTRY: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    if spec.name in _REGISTRY:
        raise RuntimeError(f"method {spec.name!r} registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def method_names() -> list[str]:
    """The prompt methods (what a published prompt can be), in registry order: every registered
    method but the searches (``task_method_names`` adds those)."""
    return [name for name, spec in _REGISTRY.items() if spec.trainer is not Trainer.SEARCH]


def task_method_names() -> list[str]:
    """Every method a task can be created with: the prompt methods, then the searches (auto)."""
    return method_names() + [name for name, spec in _REGISTRY.items() if spec.trainer is Trainer.SEARCH]


def get_method(name: str) -> MethodSpec:
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown method {name!r}; known methods: {', '.join(task_method_names())}") from None


@dataclass(frozen=True)
class FloatBounds:
    """The accepted range of a float config field (of each item, for a list of floats)."""

    name: str
    lower: float
    lower_inclusive: bool
    upper: float
    upper_inclusive: bool
    is_list: bool = False

    def __str__(self) -> str:
        lo = ">=" if self.lower_inclusive else ">"
        hi = "<=" if self.upper_inclusive else "<"
        what = f"a list of finite numbers, each {lo}" if self.is_list else f"a finite number {self.name} {lo}"
        return f"{what} {_num(self.lower)} and {hi} {_num(self.upper)}"

    def contains(self, x: float) -> bool:
        if not math.isfinite(x):
            return False
        above = x >= self.lower if self.lower_inclusive else x > self.lower
        below = x <= self.upper if self.upper_inclusive else x < self.upper
        return above and below


def _num(x: float) -> str:
    return f"{x:g}".replace("e+0", "e").replace("e+", "e").replace("e-0", "e-")


def _float_type(tp: Any) -> tuple[bool, bool, list[Any]]:
    """(is a float, is a list of floats, metadata of the items) of an annotation."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if tp is float:
        return True, False, []
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and args:
        if len(args) == 1:
            return _float_type(args[0])
        return False, False, []
    if typing.get_origin(tp) is list and len(args) == 1:
        item = args[0]
        meta: list[Any] = []
        if typing.get_origin(item) is typing.Annotated:
            item, *extra = typing.get_args(item)
            for m in extra:
                meta.extend(m.metadata if isinstance(m, FieldInfo) else [m])
        if item is float:
            return True, True, meta
    return False, False, []


def float_bounds(cls: type[MethodConfig]) -> dict[str, FloatBounds]:
    """Every float field (and list-of-floats field) of a config class with its bounds.
    A missing bound reads as -inf/inf (tests require every field to declare both)."""
    out: dict[str, FloatBounds] = {}
    for name, f in cls.model_fields.items():
        is_float, is_list, item_meta = _float_type(f.annotation)
        if not is_float:
            continue
        lower, lower_inc, upper, upper_inc = -math.inf, False, math.inf, False
        for m in item_meta if is_list else f.metadata:
            if isinstance(m, annotated_types.Gt):
                lower, lower_inc = float(m.gt), False
            elif isinstance(m, annotated_types.Ge):
                lower, lower_inc = float(m.ge), True
            elif isinstance(m, annotated_types.Lt):
                upper, upper_inc = float(m.lt), False
            elif isinstance(m, annotated_types.Le):
                upper, upper_inc = float(m.le), True
        out[name] = FloatBounds(name, lower, lower_inc, upper, upper_inc, is_list)
    return out


def _describe(exc: ValidationError, cls: type[MethodConfig], method: str) -> str:
    msgs = []
    bounds = float_bounds(cls)
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            msgs.append(f"unknown config key {loc!r} for method {method}; accepted keys: {', '.join(cls.model_fields)}")
        elif loc:
            msg = f"config key {loc!r}: {err['msg']} (got {err.get('input')!r})"
            key = err["loc"][0]
            if key in bounds:
                msg += f"; accepted: {bounds[key]}"
            msgs.append(msg)
        else:
            msgs.append(f"config for method {method}: {err['msg']}")
    return "; ".join(msgs)


def parse_config(method: str, config: dict[str, Any] | MethodConfig | None) -> MethodConfig:
    """Validated config object of ``method`` (a fresh copy; defaults filled)."""
    spec = get_method(method)
    if isinstance(config, spec.config_cls):
        return config.model_copy()
    if config is not None and not isinstance(config, dict):
        raise ConfigError(f"config for method {method} must be a JSON object, got {type(config).__name__}")
    try:
        return spec.config_cls.model_validate(config or {})
    except ValidationError as exc:
        raise ConfigError(_describe(exc, spec.config_cls, method)) from None


def validate_config(method: str, config: dict[str, Any] | None) -> dict[str, Any]:
    """The full validated config (defaults filled) as a JSON-able dict, or ConfigError.

    Needs no backbone; backbone-specific checks (a text method on a timm backbone, a
    frame wider than the image) happen when tuning starts.
    """
    return parse_config(method, config).model_dump(mode="json")


def check_class_texts(
    method: str, classes: list[str], config: dict[str, Any] | MethodConfig | None, tokens: "TextTokens | None"
) -> None:
    """ConfigError when a class's text prompt for ``method`` and ``config`` would not fit the text
    encoder's context, or two classes' prompts make the same tokens (``check_text_prompts``;
    auto checks each candidate it was given by name, ``AutoModule.check_texts``).
    Needs only the tokenizer (``Backbone.text_tokens`` or ``loading.text_tokens_for_spec``)."""
    spec = get_method(method)
    spec.module_cls.check_texts(spec.name, list(classes), parse_config(method, config), tokens)


def describe_config(method: str) -> dict[str, dict[str, Any]]:
    """Field name -> {default, description} for documentation and forms."""
    cls = get_method(method).config_cls
    bounds = float_bounds(cls)
    out = {
        name: {"default": f.default, "description": f.description or ""} for name, f in cls.model_fields.items()
    }
    for name, b in bounds.items():
        out[name]["bounds"] = str(b)
    return out
