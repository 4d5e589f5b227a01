"""A customer asking for a person ("quiero hablar con una persona"): the bot says someone will write, leaves
the chat to the owner for HUMAN_TAKEOVER_MINUTES, and tells the owner in their own chat.

Phrases match as whole words anywhere in the message, case and accents ignored (as keyword flows do), so
"¿puedo hablar con alguien de ventas sobre mi pedido?" is a request too. HANDOFF_PHRASES replaces the
defaults below; `off` turns the hand-off off.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from bot.flows import normalize
from bot.replies import Language, reply

# Requests, not mentions: "tengo que hablar con alguien de mi familia" or "¿eres un agente humano?" are
# no hand-off, so phrases about "someone" carry the asking verb; "no quiero..." refuses (see _refused).
DEFAULT_PHRASES = (
    # Spanish
    "hablar con una persona",
    "hablar con un humano",
    "hablar con una humana",
    "hablar con un agente",
    "hablar con una agente",
    "hablar con un asesor",
    "hablar con una asesora",
    "hablar con un operador",
    "hablar con una operadora",
    "hablar con un representante",
    "hablar con el encargado",
    "hablar con la encargada",
    "hablar con el responsable",
    "hablar con la responsable",
    "hablar con el dueño",
    "hablar con la dueña",
    "hablar con persona",  # typed in a hurry, without the article
    "hablar con humano",
    "quiero hablar con alguien",
    "puedo hablar con alguien",
    "necesito hablar con alguien",
    "pasame con una persona",
    "pasame con alguien",
    "pasame con un humano",
    "pasame con un asesor",
    "pasame con un agente",
    "pasame con el encargado",
    "pasame con la encargada",
    "me pasas con alguien",
    "me pasas con una persona",
    "me pones con alguien",
    "me pones con una persona",
    "ponme con alguien",
    "ponme con una persona",
    "me atienda una persona",
    "me puede atender una persona",
    "quisiera hablar con alguien",
    "me gustaria hablar con alguien",
    "me puede pasar con alguien",
    "me puedes pasar con alguien",
    "comunicame con alguien",
    "comunicame con una persona",
    "comunicame con un asesor",
    "atencion humana",
    # English
    "talk to a human",
    "talk to a person",
    "talk to a real person",
    "talk with a human",
    "talk with a person",
    "speak to a human",
    "speak to a person",
    "speak to a real person",
    "speak with a human",
    "speak with a person",
    "talk to an agent",
    "speak to an agent",
    "talk to a representative",
    "speak to a representative",
    "can i talk to someone",
    "can i speak to someone",
    "i want to talk to someone",
    "i want to speak to someone",
    "live agent",
    "talk to the owner",
    "speak to the owner",
    "talk to the manager",
    "speak to the manager",
    "talk to a manager",
    "speak to a manager",
    "can i speak with someone",
    "could i speak to someone",
)
# Requests only as the end of what is said ("¿me atiende alguien?", "eres un bot? quiero una persona"): with
# more after them they are something else ("¿me atiende alguien el sábado?", "quiero una persona para
# limpieza", "necesito una persona más en la reserva").
DEFAULT_ENDING = (
    "me atiende una persona",
    "me atiende alguien",
    "me atienda alguien",
    "me puede atender alguien",
    "quiero una persona",
    "necesito una persona",
    "ayuda de una persona",
    "quiero un humano",
)
# A message that is only one of these (greetings and "please" aside) asks too, as callers say "operador" to
# a phone menu: "un humano por favor", "agente". Within a longer message they are mere mentions. Not
# "persona": "una persona" answers "¿para cuántas personas?".
DEFAULT_ALONE = (
    "humano",
    "humana",
    "operador",
    "operadora",
    "agente",
    "asesor",
    "asesora",
    "human",
    "agent",
    "operator",
    "representative",
)
_COURTESY = frozenset(
    """
    hola buenas buenos dias tardes noches por favor porfa porfavor un una el la con quiero necesito
    hi hello please pls a an the i want need
    """.split()  # noqa: SIM905 (a word list reads better as text)
)
# What may follow a phrase that asks only as the end of a clause ("quiero una persona real, por favor").
_AFTER_ENDING = _COURTESY | {"real", "de", "verdad", "ya", "ahora", "now", "ahi", "alli"}
# A negation right before a verb of wanting, right before the phrase, refuses it: "no quiero hablar con una
# persona", "I don't want to talk to a human". "¿Por qué no puedo hablar con una persona?" or "esto no
# funciona, quiero hablar con una persona" still ask; so does "no, quiero..." (another clause).
_NEGATIONS = frozenset({"no", "not", "dont", "never", "nunca"})
_WANTING = frozenset({"quiero", "queria", "quisiera", "necesito", "want", "wanna", "need"})
# A message is read clause by clause: a phrase never spans one of these.
CLAUSE_BREAKS = re.compile(r"[,;!?¡¿\n]+")
# What the owner is shown of the customer's message in the notice.
NOTICE_QUOTE_CHARS = 200


def spans_clauses(phrase: str) -> bool:
    """A phrase with words on both sides of a clause break ("ventas; soporte"): messages are read clause by
    clause, so it could never match. "¿hablar con ventas?" has words in one clause only."""
    return sum(1 for part in CLAUSE_BREAKS.split(phrase) if normalize(part)) > 1


class HandoffPhrases:
    """The phrases that ask for a person, matched as whole words anywhere in a message (`ending`: only at
    the end of a clause; `alone`: only as the whole message, not a question)."""

    def __init__(
        self,
        phrases: Iterable[str] = DEFAULT_PHRASES,
        alone: Iterable[str] = DEFAULT_ALONE,
        ending: Iterable[str] = DEFAULT_ENDING,
    ) -> None:
        self._padded = tuple(f" {normal} " for normal in map(normalize, phrases) if normal)
        self._ending = tuple(f" {normal} " for normal in map(normalize, ending) if normal)
        self._alone = frozenset(map(normalize, alone))

    def asked(self, text: str) -> bool:
        if self._alone and self._only_asks(text):
            return True
        return any(self._asked_in(f" {normalize(clause)} ") for clause in CLAUSE_BREAKS.split(text))

    def _only_asks(self, text: str) -> bool:
        """The message is one of the words asking alone ("operador", "un humano por favor"); "¿humano?"
        asks what the bot is."""
        words = [word for word in normalize(text).split() if word not in _COURTESY]
        return len(words) == 1 and words[0] in self._alone and "?" not in text

    def asked_over_lines(self, text: str) -> bool:
        """`asked`, for a message over several lines or a burst of messages: "quiero hablar" / "con una
        persona" asks, "no quiero" / "hablar con una persona" does not. A line that is a bare "no" answers
        something else: "no" / "quiero hablar con una persona" asks."""
        lines = [line for line in text.split("\n") if line.strip()]
        return self.asked(" ".join(f"{line}," if normalize(line) in _NEGATIONS else line for line in lines))

    def _asked_in(self, padded: str) -> bool:
        return any(self._found(padded, phrase, ending=False) for phrase in self._padded) or any(
            self._found(padded, phrase, ending=True) for phrase in self._ending
        )

    @staticmethod
    def _found(padded: str, phrase: str, *, ending: bool) -> bool:
        start = padded.find(phrase)
        while start != -1:
            after = padded[start + len(phrase) :].split()
            if (not ending or all(word in _AFTER_ENDING for word in after)) and not _refused(
                padded[:start].split(), phrase.split()
            ):
                return True
            start = padded.find(phrase, start + 1)
        return False


def _refused(before: list[str], phrase: list[str]) -> bool:
    """Whether the words before a matched phrase refuse it: a negation, then a verb of wanting (and "to"),
    straight into the phrase's speaking verb ("no | quiero | hablar con...", "dont want to | talk")."""
    words = before + phrase
    verb = len(before)
    while verb < len(words) and words[verb] in _WANTING:  # the phrase's own "quiero" ("quiero hablar con...")
        verb += 1
    at = verb - 1
    if at >= 0 and words[at] == "to":
        at -= 1
    return at >= 1 and words[at] in _WANTING and words[at - 1] in _NEGATIONS


def customer_label(push_name: str, sender: str, language: Language) -> str:
    """How the owner's notice names the customer: "Ana (+34600111222)", or whichever part is known."""
    user, _, server = sender.partition("@")
    number = f"+{user}" if server == "s.whatsapp.net" and user.isdigit() else ""
    name = " ".join(push_name.split())[:60]
    if name and number:
        return f"{name} ({number})"
    return name or number or reply("a_customer", language)


def quote_for_owner(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= NOTICE_QUOTE_CHARS else flat[: NOTICE_QUOTE_CHARS - 1].rstrip() + "…"
