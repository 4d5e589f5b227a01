"""A model's Markdown in WhatsApp's own formatting.

Models write Markdown even when asked not to: "**Horario:**", "### Precios", "[Reserva aquí](https://…)", a
price table. WhatsApp shows those marks as they are, so the customer reads stray asterisks, hashes and
brackets. WhatsApp has *bold*, _italic_, ~strikethrough~, `code`, ``` blocks, "- " lists and "> " quotes; the
rest becomes plain text: a heading is a bold line, a link its text and its address, a table's rows its cells.
Code (inline or in a block) is left as written.
"""

from __future__ import annotations

import re

_FENCE = re.compile(r"(```.*?(?:```|\Z))", re.DOTALL)  # one left open (an answer cut short) runs to the end
_INLINE_CODE = re.compile(r"(`[^`\n]+`)")
_BOLD_CODE = re.compile(r"(?:\*\*|__)(`[^`\n]+`)(?:\*\*|__)")
# An address or an @handle keeps its underscores and asterisks: "instagram.com/__lacasita__".
_URL_OR_HANDLE = re.compile(r"(https?://[^\s<>]+|(?<!\w)@\w+)")
_HEADING = re.compile(r"^ {0,3}#{1,6}[ \t]+(.*?)[ \t#]*$")
_RULE = re.compile(r"^ {0,3}([-*_])( *\1){2,} *$")
_TABLE_SEPARATOR = re.compile(r"^ *\|? *:?-+:? *(\| *:?-+:? *)+\|? *$|^ *\| *:?-+:? *\| *$")
_TABLE_ROW = re.compile(r"^ *\|(.*)\| *$")
_BULLET = re.compile(r"^([ \t]*)[*+][ \t]+(?=\S)")
_IMAGE_OR_LINK = re.compile(r"!?\[([^\]\n]*)\]\((\S+?)(?:[ \t]+\"[^\"\n]*\")?\)")
_AUTOLINK = re.compile(r"<((?:https?|mailto):[^>\s]+)>")
_BOLD_ITALIC = re.compile(r"(?<!\w)\*\*\*(?=\S)(.+?)(?<=\S)\*\*\*(?!\w)")
_BOLD = re.compile(r"(?<!\w)\*\*(?=\S)(.+?)(?<=\S)\*\*(?!\w)")  # not "x**2 + y**2"
_BOLD_UNDERSCORES = re.compile(r"(?<!\w)__(?=\S)(.+?)(?<=\S)__(?!\w)")
_ITALIC_INSIDE = re.compile(r"(?<![\w*])\*(?=\S)([^*]+?)(?<=\S)\*(?![\w*])")
_STRIKE = re.compile(r"~~(?=\S)(.+?)(?<=\S)~~")


def for_whatsapp(text: str) -> str:
    """`text` with Markdown turned into WhatsApp formatting (see the module's docstring)."""
    if not any(mark in text for mark in "*#[|_~<-`"):
        return text  # most answers: nothing to do
    parts = _FENCE.split(
        text.replace("\r\n", "\n")
    )  # odd parts are code blocks: WhatsApp shows ``` blocks as they are
    return "".join(part if i % 2 else _blocks(part) for i, part in enumerate(parts))


def _blocks(text: str) -> str:
    lines: list[str] = []
    for line in text.split("\n"):
        if _RULE.match(line) or _TABLE_SEPARATOR.match(line):
            continue  # a horizontal rule, a table's |---|---|: nothing to read
        if row := _TABLE_ROW.match(line):
            line = " · ".join(cell for cell in map(str.strip, row.group(1).split("|")) if cell)
        elif heading := _HEADING.match(line):
            title = _inline(heading.group(1)).strip("*").strip()
            line = f"*{title}*" if title else ""
            lines.append(line)
            continue
        line = _BULLET.sub(r"\1- ", line)
        lines.append(_inline(line))
    return "\n".join(lines)


def _inline(line: str) -> str:
    line = _BOLD_CODE.sub(r"*\1*", line)  # **`VERANO10`**
    parts = _INLINE_CODE.split(line)  # odd parts are `code`: as written
    return "".join(part if i % 2 else _marks(part) for i, part in enumerate(parts))


def _marks(text: str) -> str:
    text = _AUTOLINK.sub(r"\1", _IMAGE_OR_LINK.sub(_link, text))
    parts = _URL_OR_HANDLE.split(text)  # odd parts are addresses and @handles: as written
    return "".join(part if i % 2 else _emphasis(part) for i, part in enumerate(parts))


def _emphasis(text: str) -> str:
    text = _BOLD_ITALIC.sub(r"*\1*", text)
    text = _BOLD.sub(_bold, text)
    text = _BOLD_UNDERSCORES.sub(_bold, text)
    return _STRIKE.sub(r"~\1~", text)


def _bold(match: re.Match[str]) -> str:
    """WhatsApp's bold; Markdown's *italic* inside it becomes WhatsApp's _italic_."""
    return "*" + _ITALIC_INSIDE.sub(r"_\1_", match.group(1)) + "*"


def _link(match: re.Match[str]) -> str:
    label, url = match.group(1).strip(), match.group(2)
    if not label or label == url or label in url:
        return url
    return f"{label} ({url})"
