"""Keyword flows: fixed answers for known questions, checked before the cache and the model.

The flows file is YAML or JSON:

    - keywords: [horario, horarios, "a qué hora"]
      answer: Abrimos de lunes a viernes de 9:00 a 18:00.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path

import yaml

from memory.store import Flow


class FlowsFileError(ValueError):
    """The flows file is missing, unreadable or malformed; the message names the file and entry."""


_NON_WORD = re.compile(r"[^\w]+")
_COMBINING = re.compile(r"[\u0300-\u036f\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-\u20ff\ufe20-\ufe2f]")


def normalize(text: str) -> str:
    """Lower case, accents removed, punctuation to spaces: '¿Horário?' -> 'horario'."""
    folded = text.casefold()
    if not folded.isascii():
        decomposed = unicodedata.normalize("NFKD", folded)
        folded = _COMBINING.sub("", decomposed)
    return " ".join(_NON_WORD.sub(" ", folded).split())


def load_flows_file(path: Path) -> list[Flow]:
    try:
        raw = path.read_text(encoding="utf-8")
        data = json.loads(raw) if path.suffix == ".json" else yaml.safe_load(raw)
    except (OSError, ValueError, yaml.YAMLError) as error:
        raise FlowsFileError(f"flows file {path}: {error}") from error
    if data is None:
        return []
    if not isinstance(data, list):
        raise FlowsFileError(f"flows file {path}: expected a list of {{keywords, answer}} entries")
    flows = []
    for index, entry in enumerate(data, start=1):
        if not isinstance(entry, dict):
            raise FlowsFileError(f"flows file {path}: entry {index} is not a mapping")
        keywords = entry.get("keywords")
        answer = entry.get("answer")
        if isinstance(keywords, str):
            keywords = [keywords]
        if not keywords or not all(isinstance(k, str) and k.strip() for k in keywords):
            raise FlowsFileError(f"flows file {path}: entry {index} needs a non-empty list of keywords")
        if not isinstance(answer, str) or not answer.strip():
            raise FlowsFileError(f"flows file {path}: entry {index} needs a non-empty answer")
        flows.append(Flow(tuple(keywords), answer.strip(), bool(entry.get("enabled", True))))
    return flows


class FlowMatcher:
    """Finds the first enabled flow with a keyword that appears as whole words in the text."""

    def __init__(self, flows: Iterable[Flow] = ()) -> None:
        self.replace(flows)

    def replace(self, flows: Iterable[Flow]) -> None:
        self._flows: Sequence[tuple[tuple[str, ...], str]] = [
            (
                tuple(f" {normalize(k)} " for k in flow.keywords if normalize(k)),
                flow.answer,
            )
            for flow in flows
            if flow.enabled
        ]

    def __len__(self) -> int:
        return len(self._flows)

    def match(self, text: str) -> str | None:
        padded = f" {normalize(text)} "
        for keywords, answer in self._flows:
            if any(keyword in padded for keyword in keywords):
                return answer
        return None
