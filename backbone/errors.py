"""Exceptions raised by the backbone package, and the helpers that make a message fit for a client.

Every message says what was wrong and what is accepted; none carries a stack
trace or a tensor.
"""

from __future__ import annotations

import re


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


#: An absolute path (POSIX or Windows) standing alone or after ':' or '=' (not a URL's '//').
_PATH = re.compile(r"""(?:(?<=^)|(?<=[\s:='"(]))(?:/(?!/)|[A-Za-z]:\\)[^\s'"(),;]+""")
_URL_CREDENTIALS = re.compile(r"(\w+://)[^/\s@]+@")


def public_reason(exc: BaseException) -> str:
    """``exc``'s message fit for a client (see ``public_text``)."""
    return public_text(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)


def public_text(msg: str) -> str:
    """``msg`` fit for a client: no server path (a path is shortened to its last part) and no
    credentials in URLs; at most 300 characters."""
    msg = _URL_CREDENTIALS.sub(r"\1", msg)
    msg = _PATH.sub(lambda m: ".../" + re.split(r"[\\/]", m.group(0).rstrip("\\/"))[-1], msg)
    return msg[:300]
