"""Text for a terminal or a log line, from values a database or a user may have filled in.

An order id, an item id, a worker name or an error message can hold any character: a newline
that forges a second log line, an ANSI escape (``\\x1b[2J``) or an 8-bit CSI (``\\x9b``) that
the terminal obeys, a lone surrogate left by undecodable bytes that makes ``print`` raise.
Everything printed goes through :func:`safe_text` (or :func:`safe_json`) at the boundary: the
API and ``place_order`` may refuse such ids today, but rows written earlier, or by other
means, still hold them.
"""

from __future__ import annotations

import json
from typing import Any


def _escape(ch: str) -> str:
    return repr(ch)[1:-1]  # '\n' -> \n, '\x1b' -> \x1b, '\u2028' -> \u2028, as repr shows them


def safe_text(value: Any) -> str:
    """``str(value)`` with every non-printable character (controls, separators other than
    the space, format characters, lone surrogates) written as ``repr`` writes it; ordinary
    Unicode (accents, CJK, emoji) and the backslash itself are left alone."""
    text = value if isinstance(value, str) else str(value)
    if text.isprintable():  # the common case, checked in C
        return text
    return "".join(ch if ch.isprintable() else _escape(ch) for ch in text)


def _json_escape(ch: str) -> str:
    code = ord(ch)
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    code -= 0x10000  # a UTF-16 surrogate pair, as JSON spells characters past the BMP
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


def safe_json(value: Any) -> str:
    """JSON on one line, Unicode kept readable, every non-printable character as ``\\uXXXX``
    (``json.dumps`` already escapes C0 controls, but not DEL, C1 controls such as the 8-bit
    CSI, line separators or lone surrogates). Parses back to the same value."""
    return escape_unprintable(json.dumps(value, ensure_ascii=False))


def escape_unprintable(text: str) -> str:
    """``text`` with every non-printable character written as JSON writes it (``\\uXXXX``):
    for text that goes inside a JSON string or beside one, such as an error message that
    quotes what a client sent."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else _json_escape(ch) for ch in text)
