"""Prompt methods, registered by public name in this order (one import line each); auto, the
search over them (``backbone.search``), comes last."""

from . import zeroshot  # noqa: F401
from . import coop  # noqa: F401
from . import cocoop  # noqa: F401
from . import vpt_shallow  # noqa: F401
from . import vpt_deep  # noqa: F401
from . import padding  # noqa: F401
from . import fixed_patch  # noqa: F401
from . import random_patch  # noqa: F401
from . import linear_probe  # noqa: F401
from . import auto  # noqa: F401
from .registry import (
    MethodSpec, Trainer, check_class_texts, describe_config, get_method, method_names, parse_config,
    task_method_names, validate_config,
)

__all__ = [
    "MethodSpec", "Trainer", "check_class_texts", "get_method", "method_names", "parse_config", "validate_config",
    "describe_config", "task_method_names",
]
