"""Trained prompts as safetensors bytes (never pickle).

Header metadata (str -> str): method, config (JSON), classes (JSON), backbone (spec),
fingerprint, format_version, metrics (JSON), plus caller extras (version, task_id, ...).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .errors import ConfigError, NonFinitePrompt, PromptFormatError, PromptMismatch

if TYPE_CHECKING:
    from .loading import Backbone

FORMAT_VERSION = "1"
RESERVED_KEYS = ("method", "config", "classes", "backbone", "fingerprint", "format_version", "metrics")
_MAX_HEADER = 100 * 1024 * 1024


@dataclass
class TrainedPrompt:
    method: str
    config: dict[str, Any]
    classes: list[str]
    fingerprint: str
    tensors: dict[str, torch.Tensor]
    metrics: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, str] = field(default_factory=dict)  # extra header entries read back by load_prompt

    @property
    def backbone_spec(self) -> str:
        return self.fingerprint.rsplit("#", 1)[0]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def to_bytes(self, extra: dict[str, str] | None = None) -> bytes:
        meta = {
            "method": self.method,
            "config": json.dumps(self.config, sort_keys=True),
            "classes": json.dumps(self.classes),
            "backbone": self.backbone_spec,
            "fingerprint": self.fingerprint,
            "format_version": FORMAT_VERSION,
            "metrics": json.dumps(self.metrics, sort_keys=True, default=float),
        }
        for k, v in (extra or {}).items():
            if k in RESERVED_KEYS:
                raise ValueError(f"extra metadata key {k!r} is reserved")
            if not isinstance(k, str) or not isinstance(v, str):
                raise ValueError("extra metadata must map str to str")
            meta[k] = v
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.tensors.items()}
        check_finite(tensors, f"{self.method} prompt")
        return st_save(tensors, metadata=meta)


def non_finite_tensor(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor holding NaN or infinity, or None."""
    for name, t in tensors.items():
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            return name
    return None


def check_finite(tensors: dict[str, torch.Tensor], what: str = "prompt") -> None:
    """NonFinitePrompt when a tensor holds NaN or infinity: such a prompt is never saved,
    published or served (its scores would be NaN)."""
    bad = non_finite_tensor(tensors)
    if bad is not None:
        raise NonFinitePrompt(
            f"the {what} is unusable: its tensor {bad!r} holds NaN or infinite values (training diverged; "
            "retrain with a lower learning rate); nothing was saved"
        )


def read_prompt_metadata(data: bytes) -> dict[str, str]:
    """The safetensors header metadata of a prompt, without loading tensors."""
    if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) < 8:
        raise PromptFormatError("prompt data is not safetensors: shorter than its 8-byte header length")
    (n,) = struct.unpack("<Q", bytes(data[:8]))
    if n > min(_MAX_HEADER, len(data) - 8):
        raise PromptFormatError("prompt data is not safetensors: header length exceeds the data")
    try:
        header = json.loads(bytes(data[8:8 + n]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise PromptFormatError("prompt data is not safetensors: header is not JSON") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise PromptFormatError("safetensors file carries no prompt metadata")
    missing = [k for k in RESERVED_KEYS if k not in meta]
    if missing:
        raise PromptFormatError(f"prompt metadata lacks {missing}")
    return dict(meta)


def load_prompt(data: bytes, backbone: "Backbone") -> TrainedPrompt:
    """Parse prompt bytes for ``backbone``; PromptMismatch if it was trained on another one."""
    from .methods import parse_config

    meta = read_prompt_metadata(data)
    if meta["format_version"] != FORMAT_VERSION:
        raise PromptFormatError(
            f"prompt format version {meta['format_version']!r} is not supported (this build reads {FORMAT_VERSION})"
        )
    if meta["fingerprint"] != backbone.fingerprint:
        raise PromptMismatch(
            f"prompt was trained on backbone {meta['fingerprint']} but this backbone is {backbone.fingerprint}; "
            "retrain the task on this backbone"
        )
    try:
        config = json.loads(meta["config"])
        classes = json.loads(meta["classes"])
        metrics = json.loads(meta["metrics"])
    except json.JSONDecodeError as exc:
        raise PromptFormatError(f"prompt metadata is not valid JSON: {exc}") from None
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes) or not classes:
        raise PromptFormatError("prompt metadata 'classes' must be a non-empty JSON list of strings")
    try:
        parse_config(meta["method"], config)
    except ConfigError as exc:
        raise PromptFormatError(f"prompt metadata has an invalid method/config: {exc}") from None
    try:
        tensors = st_load(bytes(data))
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise PromptFormatError(f"prompt tensors cannot be read: {exc}") from None
    extra = {k: v for k, v in meta.items() if k not in RESERVED_KEYS}
    return TrainedPrompt(
        method=meta["method"],
        config=config,
        classes=classes,
        fingerprint=meta["fingerprint"],
        tensors=tensors,
        metrics=metrics if isinstance(metrics, dict) else {},
        extra=extra,
    )
