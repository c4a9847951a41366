"""Text and JSON from clients, and stored values on their way out: one set of rules.

Input (docs/inputs.md "Text and JSON"): every JSON text a client sends (a task's ``config``
and ``classes``, a classify JSON body, the admin tenant body) is bounded in size and in
nesting depth *before* it is parsed (a linear scan, so a value nested 100,000 deep never
reaches the recursive parser), must be valid UTF-8 and hold no lone UTF-16 surrogate
(``"\\ud800"``) nor control characters other than tab and line breaks. Names (task, class
and tenant names) are NFC, trimmed, 1 to N characters, and hold no control characters,
line/paragraph separators, lone surrogates or bidirectional embedding/override/isolate
characters. A refusal is an :class:`InputError` whose message names the field.

Output: :func:`make_safe` and :func:`loads_stored` turn whatever is already stored (a lone
surrogate, NaN, a config nested 100,000 deep) into values every response can encode;
``store.db.make_engine`` reads every JSON column through :func:`loads_stored`.
"""

from __future__ import annotations

import json
import logging
import math
import re
import unicodedata
from typing import Any

log = logging.getLogger("promptstore.store")

#: Deepest nesting of arrays/objects accepted in any client JSON (a config is 1-3 deep).
MAX_JSON_DEPTH = 32
#: Deepest nesting kept when a stored JSON value is read back (deeper: read as null).
MAX_STORED_DEPTH = 64
#: Longest task and tenant name, in characters.
MAX_NAME_CHARS = 200
#: Longest class name, in characters (the text encoder's 77 tokens bind long before).
MAX_CLASS_NAME_CHARS = 1000
#: Largest ``config`` JSON text, in UTF-8 bytes.
MAX_CONFIG_BYTES = 64 * 1024
#: Largest ``classes`` JSON text, in UTF-8 bytes (also the multipart text-field limit).
MAX_CLASSES_BYTES = 1024 * 1024

_SURROGATES = re.compile("[\ud800-\udfff]")
#: Control characters refused inside JSON strings: C0 but tab, LF, CR; DEL.
_TEXT_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
#: Bidirectional embedding, override and isolate characters (they reorder what follows them).
_BIDI = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
#: Unicode categories refused in names: controls, line/paragraph separators, surrogates.
_NAME_CATEGORIES = frozenset({"Cc", "Zl", "Zp", "Cs"})
_TOKENS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]', re.DOTALL)
_TOKENS_B = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]', re.DOTALL)


class InputError(ValueError):
    """A refused input: a message naming the field, and ``over_limit`` for a size bound
    (the API answers those 413, everything else 422)."""

    def __init__(self, message: str, *, over_limit: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.over_limit = over_limit


def _codes(chars: Any) -> str:
    return ", ".join(f"U+{ord(c):04X}" for c in sorted(set(chars)))


def json_depth(text: str | bytes, limit: int) -> int:
    """The nesting depth of the JSON ``text`` (arrays and objects), counted up to ``limit + 1``
    (the scan stops there): linear, no recursion. Strings are skipped whole."""
    depth = peak = 0
    pattern = _TOKENS_B if isinstance(text, (bytes, bytearray)) else _TOKENS
    opening = (ord("["), ord("{"), "[", "{")
    closing = (ord("]"), ord("}"), "]", "}")
    for m in pattern.finditer(text):
        tok = m.group()
        if len(tok) != 1:
            continue  # a string
        ch = tok[0] if isinstance(tok, str) else tok[0]
        if ch in opening:
            depth += 1
            if depth > peak:
                peak = depth
                if peak > limit:
                    return peak
        elif ch in closing:
            depth -= 1
    return peak


def _check_strings(field: str, value: Any, path: str = "") -> None:
    """Refuse lone surrogates and control characters in every key and string of ``value``."""
    stack: list[tuple[str, Any]] = [(path, value)]
    while stack:
        where, v = stack.pop()
        if isinstance(v, dict):
            for k, item in v.items():
                _check_text(field, k, where)
                stack.append((f"{where}.{k}" if where else str(k), item))
        elif isinstance(v, list):
            stack.extend((f"{where}[{i}]", item) for i, item in enumerate(v))
        elif isinstance(v, str):
            _check_text(field, v, where)


def _check_text(field: str, text: str, where: str) -> None:
    at = f"{field}{'.' if where and not where.startswith('[') else ''}{where}"
    bad = _SURROGATES.findall(text)
    if bad:
        raise InputError(
            f"{_show(at)} holds a lone UTF-16 surrogate ({_codes(bad)}), which is not valid Unicode; "
            "send text as valid UTF-8"
        )
    bad = _TEXT_CONTROL.findall(text)
    if bad:
        raise InputError(f"{_show(at)} holds control characters ({_codes(bad)}); only printable text, tab and line breaks are accepted")


def _show(text: str, limit: int = 120) -> str:
    out = make_safe_text(text).encode("unicode_escape").decode("ascii") if not text.isprintable() else text
    return out if len(out) <= limit else out[:limit] + "..."


def loads_checked(field: str, raw: str | bytes, *, max_bytes: int, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads(raw)`` once ``raw`` is within ``max_bytes`` (else 413) and ``max_depth`` (else
    422), valid UTF-8 (422) and, once parsed, holds no lone surrogate or control character in
    any key or string (422). ``json.JSONDecodeError`` propagates (callers word their own hint)."""
    if isinstance(raw, (bytes, bytearray)):
        size = len(raw)
    else:
        size = len(raw.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise InputError(f"{field} is {size} bytes, over the limit of {max_bytes} bytes", over_limit=True)
    if isinstance(raw, (bytes, bytearray)):
        try:
            text = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(
                f"{field} is not valid UTF-8 (byte {exc.start}: {bytes(raw)[exc.start:exc.start + 4]!r}); "
                "send JSON encoded as UTF-8"
            ) from None
    else:
        text = raw
    if _SURROGATES.search(text):
        raise InputError(f"{field} is not valid Unicode (it holds a lone surrogate); send JSON encoded as UTF-8")
    depth = json_depth(text, max_depth)
    if depth > max_depth:
        raise InputError(f"{field} is nested more than {max_depth} levels deep; the limit is {max_depth} levels of arrays/objects")
    value = json.loads(text)
    _check_strings(field, value)
    return value


def check_name(field: str, value: str, *, max_chars: int = MAX_NAME_CHARS) -> str:
    """``value`` NFC-normalised and trimmed, or InputError (422) naming ``field``: blank, over
    ``max_chars`` characters, or holding control characters, line/paragraph separators, lone
    surrogates or bidirectional override characters."""
    bad_surrogates = _SURROGATES.findall(value)
    if bad_surrogates:
        raise InputError(
            f"{field} holds a lone UTF-16 surrogate ({_codes(bad_surrogates)}), which is not valid Unicode; "
            "names must be printable text"
        )
    name = unicodedata.normalize("NFC", value).strip()
    if not name:
        raise InputError(f"{field} is blank; it must contain at least one visible character")
    if len(name) > max_chars:
        raise InputError(f"{field} is {len(name)} characters, over the limit of {max_chars}")
    bad = [ch for ch in name if unicodedata.category(ch) in _NAME_CATEGORIES or ch in _BIDI]
    if bad:
        raise InputError(
            f"{field} {_show(name)!r} has control or bidirectional-override characters ({_codes(bad)}); "
            "names must be printable text"
        )
    return name


# --------------------------------------------------------------------------- output


def make_safe_text(text: str) -> str:
    """``text`` with lone surrogates replaced by U+FFFD (encodable as UTF-8)."""
    return _SURROGATES.sub("\ufffd", text) if _SURROGATES.search(text) else text


def make_safe(value: Any, _depth: int = 0) -> Any:
    """A copy of a stored JSON value that every encoder accepts: lone surrogates replaced by
    U+FFFD, NaN and infinities as null, nesting past MAX_STORED_DEPTH as null."""
    if isinstance(value, str):
        return make_safe_text(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if _depth >= MAX_STORED_DEPTH and isinstance(value, (dict, list)):
        return None
    if isinstance(value, dict):
        return {make_safe_text(str(k)): make_safe(v, _depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [make_safe(v, _depth + 1) for v in value]
    return value


def loads_stored(text: str | bytes) -> Any:
    """The JSON deserializer of every database column: a stored value nested past
    MAX_STORED_DEPTH, or that does not parse, reads as null (logged); the rest through
    :func:`make_safe`. Never raises on what is stored."""
    if isinstance(text, (bytes, bytearray, memoryview)):
        text = bytes(text).decode("utf-8", "replace")
    if json_depth(text, MAX_STORED_DEPTH) > MAX_STORED_DEPTH:
        log.warning("a stored JSON value is nested deeper than %d levels; read as null", MAX_STORED_DEPTH)
        return None
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:
        log.warning("a stored JSON value does not parse (%s); read as null", exc)
        return None
    return make_safe(value)


def decode_stored_text(raw: bytes) -> str:
    """SQLite's text factory: stored bytes that are not valid UTF-8 read with U+FFFD."""
    return raw.decode("utf-8", "replace")


def as_fraction(value: Any) -> float:
    """A stored progress as a finite float (anything else, e.g. a string or NaN, reads as 0)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return 0.0
    return float(value) if math.isfinite(value) else 0.0
