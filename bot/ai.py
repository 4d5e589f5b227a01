"""The model client: OpenAI chat completions under a concurrency cap, errors turned into one type."""

from __future__ import annotations

import asyncio
import importlib
import re
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from loguru import logger

from bot.limits import CircuitBreaker, CircuitState, ResizableLimit

if TYPE_CHECKING:
    import openai


class AIError(Exception):
    """The model could not answer (timeout, HTTP error, empty answer). The text is log-safe.

    `systemic` failures say the service is down or refuses everyone (timeouts, connection errors, HTTP 429,
    5xx, 401, 403, 404, answers that cannot be read); only they open the circuit. The others are about one
    request (another 4xx, an empty answer) and must not cost every other chat its answers.
    """

    def __init__(
        self,
        message: str,
        *,
        systemic: bool = True,
        context_too_long: bool = False,
        about_images: bool = False,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status  # the server's HTTP status, when it answered one
        self.systemic = systemic
        self.context_too_long = context_too_long
        self.about_images = about_images  # a request with photos refused for them: ask again without


@dataclass(frozen=True)
class Completion:
    """A model's answer. `whole` is False when the model ran out of tokens (`max_tokens`): the text is cut
    back to its last full sentence, and must not be cached as the answer to that conversation."""

    text: str
    whole: bool = True


_ABOUT_IMAGES = re.compile(r"image|vision|multimodal|mmproj", re.IGNORECASE)
_SENTENCE_END = re.compile(r"[.!?…][)\"'»”’]*(?=\s|$)|\n")
# Words a full stop follows without ending the sentence ("el Sr. García", "Bizum, etc. y").
# fmt: off
_ABBREVIATIONS = frozenset({
    "sr", "sra", "srta", "sres", "dr", "dra", "d", "dña", "ud", "uds", "vd", "vds", "av", "avda", "c", "nº",
    "núm", "tel", "etc", "ej", "p.ej", "aprox", "máx", "mín", "pág", "mr", "mrs", "ms", "st", "vs", "approx",
    "e.g", "i.e", "no",
})
# fmt: on


def _sentence_ends(text: str) -> Iterator[int]:
    """Offsets just past each sentence's end: a line break, or a full stop, ! ? or … (with its closing
    quotes or brackets) before a space; not a list number's ("3.") nor an abbreviation's stop."""
    for match in _SENTENCE_END.finditer(text):
        if text[match.start()] == ".":
            before = text[: match.start()].split()
            word = before[-1].lower().lstrip("(¿¡\"'«“") if before else ""
            if word.isdigit() or word in _ABBREVIATIONS:
                continue
        yield match.end()


def cut_to_last_sentence(text: str) -> str:
    """What to send of an answer the token limit cut mid-sentence: up to its last full sentence (not one
    ending in ":", which promises what was cut), or the text with "…" when that would keep less than a
    third of it (a long list with no full stops)."""
    for end in reversed(list(_sentence_ends(text))):
        kept = text[:end].rstrip()
        if end < len(text) / 3:
            break
        if kept and not kept.endswith(":"):
            return kept
    return text.rstrip(" ,;:-") + "…"


def _has_images(messages: list[dict[str, Any]]) -> bool:
    return any(
        isinstance(part, dict) and part.get("type") == "image_url"
        for message in messages
        if isinstance(message.get("content"), list)
        for part in message["content"]
    )


def percentile(samples: list[float], fraction: float) -> float:
    if not samples:
        return 0.0
    ordered = sorted(samples)
    index = min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))
    return ordered[index]


class ChatModel:
    def __init__(
        self,
        client: LazyOpenAI,
        model: str,
        *,
        max_concurrency: int = 8,
        max_tokens: int = 600,
        breaker: CircuitBreaker | None = None,
        timeout_s: float | None = None,
    ) -> None:
        self.client = client
        self.model = model
        self.max_tokens = max_tokens
        self.timeout_s = timeout_s  # the whole call, the SDK's retry included
        self.limit = ResizableLimit(max_concurrency)
        self.max_concurrency = max_concurrency
        self.breaker = breaker or CircuitBreaker()
        self.requests = 0
        self.errors = 0
        self.cut = 0  # answers that reached max_tokens
        self.in_flight = 0
        self._latencies: deque[float] = deque(maxlen=1000)
        # Set by the app: told the error when the circuit opens (every customer gets an apology from now on),
        # then None when the model answers again. Once each way per outage.
        self.on_outage: Callable[[AIError | None], None] | None = None
        self._down = False

    async def complete(self, messages: list[dict[str, Any]]) -> Completion:
        async with self.limit:
            if not self.breaker.allow():
                raise AIError("circuit open: the model failed repeatedly, not calling it for now")
            try:
                completion = await self._call(messages)
            except AIError as error:
                if error.systemic:
                    self.breaker.failure()
                else:
                    self.breaker.success()  # the service answered; only this request was refused
                self._note_circuit(error)
                raise
            except BaseException:  # anything, cancellation included, must end a half-open trial
                self.breaker.failure()
                raise
            self.breaker.success()
            self._note_circuit(None)
            return completion

    def _note_circuit(self, error: AIError | None) -> None:
        down = self.breaker.state is not CircuitState.CLOSED
        if down == self._down:
            return
        self._down = down
        if self.on_outage is not None:
            self.on_outage(error if down else None)

    async def _call(self, messages: list[dict[str, Any]]) -> Completion:
        client = await self.client.get()
        import openai  # already loaded by get(); named here for its error types

        self.requests += 1
        self.in_flight += 1
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout_s):
                response = await client.chat.completions.create(
                    model=self.model,
                    messages=messages,  # type: ignore[arg-type]
                    max_tokens=self.max_tokens,
                )
            choices = response.choices
            text = (choices[0].message.content or "").strip() if choices else ""
            finish = choices[0].finish_reason if choices else None
        except (TimeoutError, openai.APITimeoutError) as error:
            self.errors += 1
            raise AIError("model timed out") from error
        except openai.APIStatusError as error:
            self.errors += 1
            status = error.status_code
            # A server that reads no images says so about a request with photos, whatever the status
            # (llama.cpp without its vision projector answers 5xx): the next text-only request will do.
            about_images = (
                status not in (401, 403, 429)
                and _has_images(messages)
                and bool(_ABOUT_IMAGES.search(error.message or ""))
            )
            raise AIError(
                f"model answered HTTP {status}" + (" (about the images)" if about_images else ""),
                # 404: a model name nobody has
                systemic=not about_images and (status in (401, 403, 404, 429) or status >= 500),
                context_too_long=error.code == "context_length_exceeded",
                about_images=about_images,
                status=status,
            ) from error
        except openai.OpenAIError as error:
            self.errors += 1
            raise AIError(f"model call failed: {type(error).__name__}") from error
        except Exception as error:  # an answer the SDK could not read: a proxy's HTML page, broken JSON
            self.errors += 1
            raise AIError(f"model answer unreadable: {type(error).__name__}") from error
        finally:
            self.in_flight -= 1
            self._latencies.append(time.perf_counter() - started)
        if finish == "content_filter":  # what is there is a part the filter let through, or nothing
            self.errors += 1
            raise AIError("the model's content filter withheld the answer", systemic=False)
        if not text:
            self.errors += 1
            raise AIError("model returned an empty answer", systemic=False)
        logger.debug("model answered in {:.0f} ms", (time.perf_counter() - started) * 1000)
        if finish == "length":
            self.cut += 1
            logger.warning(
                "model answer reached OPENAI_MAX_TOKENS ({}): sent up to its last full sentence",
                self.max_tokens,
            )
            return Completion(cut_to_last_sentence(text), whole=False)
        return Completion(text)

    async def close(self) -> None:
        await self.client.close()

    def stats(self) -> dict[str, Any]:
        samples = list(self._latencies)
        return {
            "enabled": True,
            "model": self.model,
            "requests": self.requests,
            "errors": self.errors,
            "cut_at_max_tokens": self.cut,
            "in_flight": self.in_flight,
            "max_concurrency": self.limit.capacity,
            "latency_ms": {
                "p50": round(percentile(samples, 0.5) * 1000, 1),
                "p95": round(percentile(samples, 0.95) * 1000, 1),
            },
            "circuit": self.breaker.state.value,
            "breaker": self.breaker.stats(),
        }


class LazyOpenAI:
    """An `openai.AsyncOpenAI` made at the first request, with the SDK imported in a worker thread.

    Importing the openai SDK costs about 14 MiB on top of the bot (hundreds of pydantic types) and half
    a second; a bot that waits for customers never needs it, so idle memory stays that much lower. The
    first model call or voice note pays the import once, off the event loop so other chats keep moving.
    """

    def __init__(self, factory: Callable[[], openai.AsyncOpenAI]) -> None:
        self._factory = factory
        self._client: openai.AsyncOpenAI | None = None
        self._lock = asyncio.Lock()

    @classmethod
    def of(cls, client: openai.AsyncOpenAI) -> LazyOpenAI:
        """Wrap a client that already exists (tests)."""
        lazy = cls(lambda: client)
        lazy._client = client
        return lazy

    @property
    def loaded(self) -> bool:
        return self._client is not None

    async def get(self) -> openai.AsyncOpenAI:
        if self._client is None:
            async with self._lock:
                if self._client is None:
                    await asyncio.to_thread(importlib.import_module, "openai")
                    self._client = self._factory()
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()


# Always passed: given None, the SDK reads OPENAI_BASE_URL itself, and an empty one (`docker run --env-file`
# with .env.example's `OPENAI_BASE_URL=`) became a base URL of "" that failed every call.
OPENAI_DEFAULT_BASE_URL = "https://api.openai.com/v1"


def make_client(api_key: str, base_url: str | None, timeout_s: float) -> LazyOpenAI:
    def build() -> openai.AsyncOpenAI:
        import openai

        # One SDK retry covers a transient 429/5xx; more would keep a customer waiting. ChatModel bounds
        # the whole call, retry included, by the same timeout.
        return openai.AsyncOpenAI(
            api_key=api_key, base_url=base_url or OPENAI_DEFAULT_BASE_URL, timeout=timeout_s, max_retries=1
        )

    return LazyOpenAI(build)
