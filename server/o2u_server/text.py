"""Text a caller or a dataset controls: what the server accepts, and how it quotes it in messages.

Display names, sample keys and class names end up in other people's terminals, CSV files and
labeling tools, so `text_problem` refuses control characters (C0, DEL, C1), Unicode line and
paragraph separators and bidirectional overrides (which reorder what a reader sees), and lengths
past a limit. `shown` shortens a value quoted in an error message, so a 100 KB URI is not echoed
back whole (error details travel in gRPC metadata, which is small).
"""

from __future__ import annotations

__all__ = ["MAX_SHOWN_CHARS", "shown", "text_problem"]

MAX_SHOWN_CHARS = 160  # characters of a caller's value quoted in an error message
# Bidirectional embeddings, overrides and isolates (the "Trojan Source" characters), and the
# Unicode line and paragraph separators.
_INVISIBLE_LAYOUT = frozenset(
    [*range(0x202A, 0x202F), *range(0x2066, 0x206A), 0x2028, 0x2029, 0x200E, 0x200F, 0x061C]
)


def shown(value: str, limit: int = MAX_SHOWN_CHARS) -> str:
    """`value`, cut to `limit` characters (with how much was cut) for quoting in a message."""
    if len(value) <= limit:
        return value
    return f"{value[:limit]}... ({len(value)} characters)"


def _unsafe(character: str) -> bool:
    code = ord(character)
    return code < 0x20 or 0x7F <= code < 0xA0 or code in _INVISIBLE_LAYOUT or 0xD800 <= code < 0xE000


def text_problem(value: str, *, max_chars: int) -> str | None:
    """Why `value` may not be stored (too long, or a control character at some index), else None."""
    if len(value) > max_chars:
        return f"is {len(value)} characters long, more than {max_chars}"
    for index, character in enumerate(value):
        if _unsafe(character):
            return (
                f"holds the control character U+{ord(character):04X} at index {index} "
                "(control, line-separator and bidirectional-override characters are not allowed)"
            )
    return None
