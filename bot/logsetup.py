"""Logging with loguru: one sink, phone numbers masked, stdlib logging routed in."""

from __future__ import annotations

import json
import logging
import re
import sys
from typing import TYPE_CHECKING

from loguru import logger

if TYPE_CHECKING:
    from loguru import Record

# Digit runs that look like phone numbers, bare or inside a JID (34600111222@s.whatsapp.net).
_PHONE = re.compile(r"(?<![\w.])\+?(\d{2})\d{4,11}(\d{2})(?=@|\b)")


def mask_phone(text: str) -> str:
    """`34600111222@s.whatsapp.net` -> `34*******22@s.whatsapp.net`."""
    return _PHONE.sub(lambda m: m.group(1) + "*" * (len(m.group(0)) - 4) + m.group(2), text)


def _patch(record: Record) -> None:
    record["message"] = mask_phone(record["message"])


# A JSON string literal: with LOG_JSON only strings are masked (a timestamp is a number, and stays one).
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


class _MaskedStderr:
    """The sink: masks the finished text too, since a traceback or an exception's text (a library's error
    quoting a JID) is not part of the message the patcher sees."""

    def __init__(self, *, json: bool) -> None:
        self.json = json

    def write(self, text: str) -> None:
        if self.json:  # masked decoded: "\n34600111222" holds a line break, not the letter n
            text = _JSON_STRING.sub(
                lambda m: json.dumps(mask_phone(json.loads(m.group(0))), ensure_ascii=False), text
            )
            sys.stderr.write(text)
        else:
            sys.stderr.write(mask_phone(text))

    def isatty(self) -> bool:  # loguru colours a terminal only
        return sys.stderr.isatty()

    def flush(self) -> None:
        sys.stderr.flush()


class _InterceptHandler(logging.Handler):
    """Sends stdlib records (aiohttp, neonize, whatsmeow) to loguru."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        named = logger.patch(lambda r: r.update({"name": record.name}))
        error = record.exc_info[1] if record.exc_info else None
        if record.name == "aiohttp.server" and type(error).__module__ == "aiohttp.http_exceptions":
            # A malformed request (a 100 kB URL, a bad header) is the client's problem: one line, not an
            # ERROR with a traceback anyone on the internet can make the bot print as often as they like.
            # Only its kind: the request line could carry the /qr token.
            named.warning("bad HTTP request refused ({})", type(error).__name__)
            return
        named.opt(depth=6, exception=record.exc_info).log(level, record.getMessage())


def setup_logging(level: str = "INFO", *, json: bool = False) -> None:
    logger.remove()
    logger.configure(patcher=_patch)
    fmt = "<green>{time:HH:mm:ss.SSS}</green> <level>{level: <7}</level> <cyan>{name}</cyan> {message}"
    logger.add(
        _MaskedStderr(json=json),
        level=level,
        format=fmt,
        serialize=json,
        backtrace=False,
        diagnose=False,
    )
    # neonize calls logging.basicConfig at import; replace its handlers with ours. The stdlib knows
    # neither TRACE nor SUCCESS: give it their numbers.
    std_level = {"TRACE": 5, "SUCCESS": 25}.get(level) or logging.getLevelName(level)
    logging.basicConfig(handlers=[_InterceptHandler()], level=std_level, force=True)
    # One line per request otherwise ("HTTP Request: POST .../chat/completions"); httpx2 is the openai
    # SDK's own copy of httpx.
    for noisy in ("aiohttp.access", "httpx", "httpx2", "httpcore", "openai", "hpack"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, std_level))
