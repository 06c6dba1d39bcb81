"""Showing text that a server, a dataset or another user controls on a terminal.

Display names, sample keys, class names, URIs and error messages are other people's text. Printed
raw, an escape sequence in one (`\x1b[31m`, `\x1b]0;...`) recolours the terminal, rewrites its
title or moves the cursor, and a bidirectional override reorders what the reader sees. `safe_text`
shows every control, line-separator and bidirectional-override character as its escape instead,
so the CLI prints what is there, not what it does.
"""

from __future__ import annotations

import re

__all__ = ["safe_text"]

_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff]")


def _escape(match: re.Match[str]) -> str:
    return match.group().encode("unicode_escape", "backslashreplace").decode("ascii")


def safe_text(value: str) -> str:
    """`value` with each unsafe character written as an escape (`\\x1b`, `\\u202e`)."""
    return _UNSAFE.sub(_escape, value)
