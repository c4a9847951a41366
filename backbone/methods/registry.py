"""The method registry: public name -> (config class, module class, trainer).

Adding a method is one new file under backbone/methods/ that calls ``register``
and one import line in ``backbone/methods/__init__.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from ..errors import ConfigError
from .base import MethodConfig, PromptModule


@dataclass(frozen=True)
class MethodSpec:
    name: str
    config_cls: type[MethodConfig]
    module_cls: type[PromptModule]
    trainer: str  # "none" (zeroshot) | "sgd" (gradient steps) | "lbfgs" (linear-probe sweep)
    summary: str


_REGISTRY: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    if spec.name in _REGISTRY:
        raise RuntimeError(f"method {spec.name!r} registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def method_names() -> list[str]:
    """Registered method names, in registry order."""
    return list(_REGISTRY)


def get_method(name: str) -> MethodSpec:
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown method {name!r}; known methods: {', '.join(_REGISTRY)}") from None


def _describe(exc: ValidationError, cls: type[MethodConfig], method: str) -> str:
    msgs = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            msgs.append(f"unknown config key {loc!r} for method {method}; accepted keys: {', '.join(cls.model_fields)}")
        elif loc:
            msgs.append(f"config key {loc!r}: {err['msg']} (got {err.get('input')!r})")
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


def describe_config(method: str) -> dict[str, dict[str, Any]]:
    """Field name -> {default, description} for documentation and forms."""
    cls = get_method(method).config_cls
    return {
        name: {"default": f.default, "description": f.description or ""} for name, f in cls.model_fields.items()
    }
