"""Exceptions raised by the backbone package.

Every message says what was wrong and what is accepted; none carries a stack
trace or a tensor.
"""

from __future__ import annotations


class BackboneError(Exception):
    """A backbone spec that cannot be loaded: bad grammar, unknown architecture or
    pretrained tag, unreadable or mismatched checkpoint."""


class ConfigError(ValueError):
    """A method name or method config that is not accepted."""


class PromptFormatError(ValueError):
    """Bytes that are not a valid Promptstore prompt artifact."""


class PromptMismatch(ValueError):
    """A prompt trained on one backbone offered to a backbone with another fingerprint."""


class Cancelled(Exception):
    """Tuning stopped because ``should_cancel()`` returned true."""


class DivergedError(ConfigError):
    """Training stopped because the loss or a learned tensor became non-finite (NaN or
    infinity); the message names where and the likely cause (usually the learning rate)."""


class NonFinitePrompt(PromptFormatError):
    """A prompt whose tensors hold NaN or infinity: never saved, published or served."""
