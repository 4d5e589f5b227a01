"""Keyword flows: fixed answers for known questions, checked before the cache and the model.

A flow answers on its own only a message that is just its question: its keywords and words that ask
nothing by themselves ("hola, ¿cuál es el horario?"). "¿Horario de entrega?" or "¿horario del sábado? y
quiero cancelar el pedido 123" ask more than the flow knows, so they go to the model with the answers of the
flows they matched as facts.

The flows file is YAML or JSON:

    - keywords: [horario, horarios, "a qué hora"]
      answer: Abrimos de lunes a viernes de 9:00 a 18:00.
    - keywords: [carta, menú]
      answer: Aquí tienes nuestra carta.
      file: carta.pdf          # sent with the answer; relative to the flows file's folder
"""

from __future__ import annotations

import itertools
import json
import os
import re
import stat
import unicodedata
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import yaml

from connection.types import MAX_FILE_BYTES, MAX_PHOTO_PIXELS, PHOTO_SUFFIXES
from memory.store import Flow


class FlowsFileError(ValueError):
    """The flows file is missing, unreadable or malformed; the message names the file and entry."""


_NON_WORD = re.compile(r"[^\w]+")
_COMBINING = re.compile(r"[\u0300-\u036f\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-\u20ff\ufe20-\ufe2f]")


def normalize(text: str) -> str:
    """Lower case, accents removed, punctuation to spaces: '¿Horário?' -> 'horario'."""
    folded = text.casefold().replace("'", "").replace("\u2019", "")  # "what's" -> "whats", as typed without
    if not folded.isascii():
        decomposed = unicodedata.normalize("NFKD", folded)
        folded = _COMBINING.sub("", decomposed)
    return " ".join(_NON_WORD.sub(" ", folded).split())


# Bounds on the flows file: a real one is a few KB. A huge one took half a minute to load and kept hundreds
# of MB for good (the memory manager then stayed critical), so start-up refuses it instead.
MAX_FLOWS_FILE_BYTES = 1_000_000
MAX_FLOWS = 5_000
MAX_KEYWORDS = 50_000  # all flows together

# libyaml's loader when PyYAML was built with it: several times faster than the pure-Python one.
_YAML_LOADER: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _read_bounded(path: Path) -> str:
    with path.open("rb") as file:  # read at most one byte past the bound, whatever the file's size
        raw = file.read(MAX_FLOWS_FILE_BYTES + 1)
    if len(raw) > MAX_FLOWS_FILE_BYTES:
        raise FlowsFileError(
            f"flows file {path}: larger than {MAX_FLOWS_FILE_BYTES // 1_000_000} MB "
            f"(a flows file holds at most {MAX_FLOWS:,} short flows)"
        )
    return raw.decode("utf-8")


_FIELDS = frozenset({"keywords", "answer", "enabled", "file"})


def load_flows_file(path: Path) -> list[Flow]:
    """Read and check a flows file; FlowsFileError names the file and the entry."""
    try:
        raw = _read_bounded(path)
        data = json.loads(raw) if path.suffix == ".json" else yaml.load(raw, Loader=_YAML_LOADER)
    except FlowsFileError:
        raise
    except (OSError, ValueError, yaml.YAMLError) as error:
        raise FlowsFileError(f"flows file {path}: {error}") from error
    if data is None:
        return []
    if not isinstance(data, list):
        raise FlowsFileError(f"flows file {path}: expected a list of {{keywords, answer}} entries")
    if len(data) > MAX_FLOWS:
        raise FlowsFileError(f"flows file {path}: {len(data):,} flows, at most {MAX_FLOWS:,}")
    flows = []
    owner: dict[str, int] = {}  # normalised keyword -> the enabled entry that has it
    total_keywords = 0
    for index, entry in enumerate(data, start=1):
        where = f"flows file {path}: entry {index}"
        if not isinstance(entry, dict):
            raise FlowsFileError(f"{where} is not a mapping")
        unknown = sorted(str(key) for key in entry if key not in _FIELDS)
        if unknown:  # a typo ("enable: false") would leave the flow on without a word
            fields = ", ".join(unknown)
            raise FlowsFileError(
                f"{where}: unknown field(s) {fields} (known: keywords, answer, enabled, file)"
            )
        keywords = entry.get("keywords")
        if isinstance(keywords, str):
            keywords = [keywords]
        if not isinstance(keywords, list) or not keywords:
            raise FlowsFileError(f"{where}: 'keywords' must be a string or a non-empty list of strings")
        total_keywords += len(keywords)
        if total_keywords > MAX_KEYWORDS:  # YAML aliases can repeat one long list in every entry
            raise FlowsFileError(f"flows file {path}: more than {MAX_KEYWORDS:,} keywords in all")
        answer = entry.get("answer")
        if not isinstance(answer, str) or not answer.strip():
            raise FlowsFileError(f"{where}: 'answer' must be a non-empty string")
        enabled = entry.get("enabled", True)
        if not isinstance(enabled, bool):  # bool("false") is True: a quoted "false" left the flow on
            raise FlowsFileError(f"{where}: 'enabled' must be true or false (unquoted), not {enabled!r}")
        for keyword in keywords:
            if not isinstance(keyword, str):
                raise FlowsFileError(f"{where}: 'keywords' must hold strings only, not {keyword!r}")
            normal = normalize(keyword)
            if not normal:  # "¿?" or "": it could never match
                raise FlowsFileError(f"{where}: keyword {keyword!r} has no letters or digits")
            first = owner.setdefault(normal, index) if enabled else index
            if first != index:  # the first flow would always win: this one never answers it
                raise FlowsFileError(f"{where}: keyword {keyword!r} is already a keyword of entry {first}")
        file = _attachment(path, entry["file"], where) if "file" in entry else None
        flows.append(Flow(tuple(keywords), answer.strip(), enabled, file))
    return flows


def _attachment(flows_file: Path, value: object, where: str) -> str:
    """A flow's file, checked at start (there, and not at the first customer who asks): a readable file of
    at most MAX_FILE_BYTES, and a photo Pillow reads, of at most MAX_PHOTO_PIXELS. Relative paths are from
    the flows file's folder; a symlink is followed at each send (a swapped target is the new file)."""
    if not isinstance(value, str) or not value.strip():
        raise FlowsFileError(f"{where}: 'file' must be the path of a photo or document")
    file = Path(os.path.abspath(flows_file.parent / value.strip()))
    try:
        if not stat.S_ISREG(file.stat().st_mode):  # a directory, or a FIFO that would block the start
            raise FlowsFileError(f"{where}: file {value!r} is not a file")
        with file.open("rb") as opened:
            size = os.fstat(opened.fileno()).st_size
            opened.read(1)
    except OSError as error:
        raise FlowsFileError(
            f"{where}: file {value!r} cannot be read ({error.strerror}; relative to {flows_file.parent})"
        ) from error
    if not size:
        raise FlowsFileError(f"{where}: file {value!r} is empty")
    if size > MAX_FILE_BYTES:
        limit = MAX_FILE_BYTES // 2**20
        raise FlowsFileError(f"{where}: file {value!r} is {size / 2**20:.1f} MB, at most {limit} MB")
    if file.suffix.lower() in PHOTO_SUFFIXES:
        _check_photo(file, value, where)
    return str(file)


def _check_photo(file: Path, value: str, where: str) -> None:
    """A photo is decoded whole for its preview when sent: refuse one Pillow cannot read, or a huge one."""
    from PIL import Image, UnidentifiedImageError  # only for flows with photos: neonize has it loaded anyway

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning: the bound below says it
            with Image.open(file) as image:
                width, height = image.size
    except Image.DecompressionBombError:
        raise FlowsFileError(
            f"{where}: photo {value!r} has far more than {MAX_PHOTO_PIXELS // 10**6} megapixels"
        ) from None
    except (UnidentifiedImageError, OSError) as error:
        raise FlowsFileError(f"{where}: file {value!r} is not a photo Pillow can read ({error})") from error
    if width * height > MAX_PHOTO_PIXELS:
        raise FlowsFileError(
            f"{where}: photo {value!r} is {width}x{height} pixels, at most {MAX_PHOTO_PIXELS // 10**6}"
            " megapixels (WhatsApp shows photos at about 1600 pixels: shrink it, or send it as a PDF)"
        )


def unusable(flow: Flow) -> str | None:
    """Why a flow can never answer, or None. The flows file is refused for these at start; the bot_flows
    table (edited live in Supabase) is not, so its rows are checked here: a blank answer sent the customer
    nothing at all."""
    if not flow.answer.strip():
        return "its answer is empty"
    if not any(normalize(keyword) for keyword in flow.keywords):
        return "none of its keywords has letters or digits"
    return None


# Words that ask nothing by themselves (greetings, courtesy, qué/cuál/what, articles, pronouns), Spanish
# and English, normalised. A message made of a flow's keywords and these words is that flow's question
# ("hola, ¿cuál es vuestro horario, por favor?"); any other word asks something more or else ("horario de
# entrega", "my order is 3 hours late"), so the model answers it, told the flow's answer as a fact. "mi" and
# "my" are not filler: "¿mi dirección?" is the customer's address, not the shop's. Nor are "dónde", "cuándo",
# "cómo" (they choose the question: "¿cuándo es el envío?" is not "¿envío?") or nouns ("tienda").
FILLER_WORDS = frozenset(
    """
    hola buenas buenos buen dia dias tardes noches saludos hey hi hello good morning afternoon evening
    por favor porfa porfavor gracias muchas thanks thank thx please pls plz ok okay vale oye perdon
    disculpa disculpe sorry excuse
    que cual cuales what which whats
    es son esta estan sera is are was be
    el la lo los las un una unos unas de del a al en y e o u para con the an of in at on to for and or
    su sus tu tus vuestro vuestra vuestros vuestras me te nos le les usted ustedes your you me i we us
    se hay tienen teneis tiene tienes do does can could would will
    saber quisiera queria quiero necesito puedes puede podrias podria pueden decir dime digame decirme
    tell know want need like about info informacion information have has got da das dar dan podeis sabes
    q k atencion apertura comercial ubicado ubicada ubicados ubicadas located
    hoy today
    """.split()  # noqa: SIM905 (a word list reads better as text)
)
# A message thanking for something ("ok, gracias por el horario") is not asking for it again, unless it asks.
_THANKS = frozenset({"gracias", "thanks", "thank", "thx"})


def _thanks_for(words: list[str]) -> bool:
    """ "gracias por ...", "thanks for ...", "thank you for ...": thanking for what follows."""
    for i, word in enumerate(words[:-1]):
        if word in _THANKS:
            after = words[i + 1 : i + 3]
            if after[:1] in (["por"], ["for"]) or after == ["you", "for"]:
                return True
    return False


# Longer messages are never just a flow's question (and the check stays cheap on a pasted wall of text).
MAX_QUESTION_WORDS = 40
# At most this many flow answers go to the model as facts for one message (they lengthen every such call).
MAX_FACTS = 3


def _covered(words: list[str], phrases: dict[str, list[list[str]]]) -> set[int]:
    """The positions of `words` inside an occurrence of any of a flow's keywords (`phrases`: each keyword's
    words, by its first word)."""
    covered: set[int] = set()
    for start, word in enumerate(words):
        for phrase in phrases.get(word, ()):
            if words[start : start + len(phrase)] == phrase:
                covered.update(range(start, start + len(phrase)))
    return covered


def _by_first_word(keywords: Iterable[str]) -> dict[str, list[list[str]]]:
    phrases: dict[str, list[list[str]]] = {}
    for keyword in keywords:
        words = keyword.split()
        phrases.setdefault(words[0], []).append(words)
    return phrases


class FlowMatcher:
    """Finds the enabled flows with a keyword that appears as whole words in the text, in file order."""

    def __init__(self, flows: Iterable[Flow] = ()) -> None:
        self.replace(flows)

    def replace(self, flows: Iterable[Flow]) -> None:
        """Use these flows from now on; a flow that cannot answer (see `unusable`) is left out."""
        self._flows: Sequence[tuple[tuple[str, ...], Flow]] = [
            (
                tuple(f" {normalize(k)} " for k in flow.keywords if normalize(k)),
                replace(flow, answer=flow.answer.strip()),
            )
            for flow in flows
            if flow.enabled and unusable(flow) is None
        ]
        self._phrases = [(_by_first_word(keywords), flow) for keywords, flow in self._flows]
        self._keyword_words = frozenset(
            word for keywords, _ in self._flows for k in keywords for word in k.split()
        )

    def __len__(self) -> int:
        return len(self._flows)

    def match(self, text: str) -> str | None:
        """The answer of the first flow the text is just the question of (see `find`)."""
        flow = self.find(text)
        return flow.answer if flow is not None else None

    def find(self, text: str) -> Flow | None:
        """The first flow the text is just the question of: its keywords and filler words (FILLER_WORDS),
        nothing else."""
        words = normalize(text).split()
        if len(words) > MAX_QUESTION_WORDS:
            return None
        if not all(word in FILLER_WORDS or word in self._keyword_words for word in words):
            return None  # a word no flow and no filler has: no flow's question alone (and no scan)
        if "?" not in text and "¿" not in text and _thanks_for(words):
            return None
        coverage = [(_covered(words, phrases), flow) for phrases, flow in self._phrases]
        for covered, flow in coverage:
            if covered and all(i in covered or word in FILLER_WORDS for i, word in enumerate(words)):
                if any(other - covered for other, _ in coverage):
                    return None  # another flow's keyword outside this one's: the message asks that too
                return flow
        return None

    def facts(self, text: str) -> list[str]:
        """The answers of the first MAX_FACTS flows the text matches, whatever its length: facts for the
        model when a flow does not answer the message on its own."""
        return list(itertools.islice(self._matches(f" {normalize(text)} "), MAX_FACTS))

    def file_for(self, text: str) -> str | None:
        """The file of the first of those flows that has one: "¿me pasas la carta?" asks more than the
        flow's question, and the model's answer goes with the menu all the same. Not to a message thanking
        for it ("¡gracias por la carta!"), unless it asks."""
        if "?" not in text and "¿" not in text and _thanks_for(normalize(text).split()):
            return None
        matched = itertools.islice(self._matching(f" {normalize(text)} "), MAX_FACTS)
        return next((flow.file for flow in matched if flow.file), None)

    def _matches(self, padded: str) -> Iterator[str]:
        return (flow.answer for flow in self._matching(padded))

    def _matching(self, padded: str) -> Iterator[Flow]:
        for keywords, flow in self._flows:
            if any(keyword in padded for keyword in keywords):
                yield flow
