"""A customer asking for a person ("quiero hablar con una persona"): the bot says someone will write, leaves
the chat to the owner for HUMAN_TAKEOVER_MINUTES, and tells the owner in their own chat.

Phrases match as whole words anywhere in the message, case and accents ignored (as keyword flows do), so
"¿puedo hablar con alguien de ventas sobre mi pedido?" is a request too. HANDOFF_PHRASES replaces the
defaults below; `off` turns the hand-off off.
"""

from __future__ import annotations

from collections.abc import Iterable

from bot.flows import normalize

DEFAULT_PHRASES = (
    # Spanish
    "hablar con una persona",
    "hablar con un humano",
    "hablar con una humana",
    "hablar con alguien",
    "hablar con un agente",
    "hablar con un asesor",
    "hablar con una asesora",
    "hablar con un operador",
    "hablar con una operadora",
    "hablar con el encargado",
    "hablar con la encargada",
    "pasame con una persona",
    "pasame con alguien",
    "pasame con un humano",
    "agente humano",
    "atencion humana",
    # English
    "talk to a human",
    "talk to a person",
    "talk to someone",
    "talk to an agent",
    "talk with a human",
    "talk with someone",
    "speak to a human",
    "speak to a person",
    "speak to someone",
    "speak to an agent",
    "speak with a human",
    "speak with someone",
    "human agent",
    "live agent",
)
# What the owner is shown of the customer's message in the notice.
NOTICE_QUOTE_CHARS = 200


class HandoffPhrases:
    """The phrases that ask for a person, matched as whole words anywhere in a message."""

    def __init__(self, phrases: Iterable[str] = DEFAULT_PHRASES) -> None:
        self._padded = tuple(f" {normal} " for normal in map(normalize, phrases) if normal)

    def asked(self, text: str) -> bool:
        padded = f" {normalize(text)} "
        return any(phrase in padded for phrase in self._padded)


def customer_label(push_name: str, sender: str) -> str:
    """How the owner's notice names the customer: "Ana (+34600111222)", or whichever part is known."""
    user, _, server = sender.partition("@")
    number = f"+{user}" if server == "s.whatsapp.net" and user.isdigit() else ""
    name = " ".join(push_name.split())[:60]
    if name and number:
        return f"{name} ({number})"
    return name or number or "?"


def quote_for_owner(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= NOTICE_QUOTE_CHARS else flat[: NOTICE_QUOTE_CHARS - 1].rstrip() + "…"
