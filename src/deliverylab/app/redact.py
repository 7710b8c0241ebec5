"""Passwords out of everything the lab prints: start lines, log lines, status and errors.

A store or broker URL may carry a password (``amqp://guest:guest@…``,
``postgresql://user:secret@…``, or libpq's ``?password=…``); what the commands print shows
the user and hides the password as ``***``.
"""

from __future__ import annotations

import re

# scheme://user:password@ — the password is whatever runs to the '@' (percent-encoded in a URL)
_NETLOC = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^/\s:@?#]*):(?P<pw>[^@\s/?#]*)@")
_PARAM = re.compile(r"(?P<head>[?&](?:password|passwd|pass)=)(?P<pw>[^&\s#'\"]*)", re.I)


def hide_secrets(text: str) -> str:
    """``text`` with the password of every URL in it replaced by ``***``."""
    text = _NETLOC.sub(lambda m: f"{m['head']}:***@", text)
    return _PARAM.sub(lambda m: f"{m['head']}***", text)
