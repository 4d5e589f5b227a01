"""The customer's text made safe to store and to show the model."""

from __future__ import annotations

import re
import unicodedata

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_BLANK = frozenset("\u2800\u3164\u115f\u1160\uffa0")  # letters that show as nothing (braille, Hangul fillers)


def clean_text(text: str, max_chars: int) -> tuple[str, bool]:
    """Drop control characters (keeping line breaks and tabs) and trim; returns (text, trimmed).

    Only C0/C1 controls go: format characters such as the zero-width joiner hold emoji together.
    """
    cleaned = _CONTROL.sub("", text).strip()
    if all(ch.isspace() or ch in _BLANK or unicodedata.category(ch) == "Cf" for ch in cleaned):
        return "", False  # nothing visible (zero-width characters only, say): an empty message
    if len(cleaned) > max_chars:
        return cleaned[:max_chars], True
    return cleaned, False


def joined(*parts: str) -> str:
    """The non-empty parts, a blank line apart."""
    return "\n\n".join(part for part in parts if part)
