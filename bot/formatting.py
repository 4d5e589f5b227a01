"""A model's Markdown in WhatsApp's own formatting.

Models write Markdown even when asked not to: "**Horario:**", "### Precios", "[Reserva aquí](https://…)", a
price table. WhatsApp shows those marks as they are, so the customer reads stray asterisks, hashes and
brackets. WhatsApp has *bold*, _italic_, ~strikethrough~, `code`, ``` blocks, "- " lists and "> " quotes; the
rest becomes plain text: a heading is a bold line, a link its text and its address, a table's rows its cells.
Code (inline or in a block) is left as written.
"""

from __future__ import annotations

import re

_FENCE = re.compile(r"(```.*?```)", re.DOTALL)
_INLINE_CODE = re.compile(r"(`[^`\n]+`)")
_HEADING = re.compile(r"^ {0,3}#{1,6}[ \t]+(.*?)[ \t#]*$")
_RULE = re.compile(r"^ {0,3}([-*_])( *\1){2,} *$")
_TABLE_SEPARATOR = re.compile(r"^ *\|? *:?-+:? *(\| *:?-+:? *)+\|? *$|^ *\| *:?-+:? *\| *$")
_TABLE_ROW = re.compile(r"^ *\|(.*)\| *$")
_BULLET = re.compile(r"^([ \t]*)[*+][ \t]+(?=\S)")
_IMAGE_OR_LINK = re.compile(r"!?\[([^\]\n]*)\]\((\S+?)(?:[ \t]+\"[^\"\n]*\")?\)")
_AUTOLINK = re.compile(r"<((?:https?|mailto):[^>\s]+)>")
_BOLD_ITALIC = re.compile(r"\*\*\*(?=\S)(.+?)(?<=\S)\*\*\*")
_BOLD = re.compile(r"\*\*(?=\S)(.+?)(?<=\S)\*\*")
_BOLD_UNDERSCORES = re.compile(r"(?<!\w)__(?=\S)(.+?)(?<=\S)__(?!\w)")
_STRIKE = re.compile(r"~~(?=\S)(.+?)(?<=\S)~~")


def for_whatsapp(text: str) -> str:
    """`text` with Markdown turned into WhatsApp formatting (see the module's docstring)."""
    if not any(mark in text for mark in "*#[|_~<-"):
        return text  # most answers: nothing to do
    parts = _FENCE.split(text)  # odd parts are code blocks: WhatsApp shows ``` blocks as they are
    return "".join(part if i % 2 else _blocks(part) for i, part in enumerate(parts))


def _blocks(text: str) -> str:
    lines: list[str] = []
    for line in text.split("\n"):
        if _RULE.match(line) or _TABLE_SEPARATOR.match(line):
            continue  # a horizontal rule, a table's |---|---|: nothing to read
        if row := _TABLE_ROW.match(line):
            line = " · ".join(cell.strip() for cell in row.group(1).split("|"))
        elif heading := _HEADING.match(line):
            title = _inline(heading.group(1)).strip("*").strip()
            line = f"*{title}*" if title else ""
            lines.append(line)
            continue
        line = _BULLET.sub(r"\1- ", line)
        lines.append(_inline(line))
    return "\n".join(lines)


def _inline(line: str) -> str:
    parts = _INLINE_CODE.split(line)  # odd parts are `code`: as written
    return "".join(part if i % 2 else _marks(part) for i, part in enumerate(parts))


def _marks(text: str) -> str:
    text = _IMAGE_OR_LINK.sub(_link, text)
    text = _AUTOLINK.sub(r"\1", text)
    text = _BOLD_ITALIC.sub(r"*\1*", text)
    text = _BOLD.sub(r"*\1*", text)
    text = _BOLD_UNDERSCORES.sub(r"*\1*", text)
    return _STRIKE.sub(r"~\1~", text)


def _link(match: re.Match[str]) -> str:
    label, url = match.group(1).strip(), match.group(2)
    if not label or label == url or label in url:
        return url
    return f"{label} ({url})"
