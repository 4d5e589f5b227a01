"""The model service misbehaving: unreadable answers, one chat's refused requests, a too-long conversation,
and the time a customer waits; through the real pipeline and the real SDK against the fake server."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import pytest

from bot.limits import CircuitBreaker
from connection.types import ChatId
from tests.conftest import inbound
from tests.fake_openai import FakeOpenAI
from tests.test_voice_notes import note, voice_note  # noqa: F401 (the fixture)

OTHER = "5491122334455@s.whatsapp.net"
ME = "34699999999@s.whatsapp.net"  # the linked number's own chat
HTML = (200, "text/html", "<html><body>502 Bad Gateway</body></html>")
BROKEN_JSON = (200, "application/json", '{"id": "x", "choices": [')
WRONG_SHAPE = (200, "application/json", '{"id": "x", "object": "chat.completion", "choices": [{"index": 0}]}')
CONTEXT_TOO_LONG = (
    400,
    "application/json",
    '{"error": {"message": "This model\'s maximum context length is 128000 tokens.",'
    ' "type": "invalid_request_error", "code": "context_length_exceeded"}}',
)


def ai(fake: FakeOpenAI, **extra: object) -> dict[str, object]:
    return {"openai_api_key": "test-key", "openai_base_url": fake.base_url, **extra}


@pytest.mark.parametrize(
    "answer", [HTML, BROKEN_JSON, WRONG_SHAPE], ids=["html", "broken-json", "wrong-shape"]
)
async def test_an_unreadable_model_answer_gets_an_apology(harness, fake_openai: FakeOpenAI, answer) -> None:
    fake_openai.raw_next.append(answer)
    async with harness(**ai(fake_openai)) as h:
        [apology] = await h.say("hola")
        assert "Lo siento" in apology
        assert h.bot.model.errors == 1
        assert await h.say("otra vez") == ["echo: otra vez"]  # and the chat keeps working


async def test_an_unreadable_transcription_gets_an_apology(
    harness,
    fake_openai: FakeOpenAI,
    voice_note: Path,  # noqa: F811
) -> None:
    fake_openai.transcribe_raw_next.append(HTML)
    async with harness(**ai(fake_openai)) as h:
        [answer] = await h.say(note(voice_note))
        assert "Lo siento" in answer


@pytest.mark.parametrize("status", [401, 404, 500])
async def test_failures_that_refuse_everyone_open_the_circuit(
    harness, fake_openai: FakeOpenAI, status: int
) -> None:
    """A wrong key (401), a model name nobody has (404), a server down (500): every chat would fail."""
    async with harness(**ai(fake_openai, ai_circuit_failures=2)) as h:
        fake_openai.fail_next.extend([status] * 4)  # the SDK retries a 500 once
        for i in range(2):
            await h.say(inbound(f"m{i}", chat=f"3460000000{i}@s.whatsapp.net"))
        assert h.bot.metrics()["ai"]["circuit"] == "open"


@pytest.mark.parametrize(
    ("status", "why"),
    [
        (401, "el servidor rechaza la clave (OPENAI_API_KEY) (HTTP 401)"),
        (429, "se ha alcanzado el límite de uso o se ha agotado el saldo de la cuenta (HTTP 429)"),
        (500, "el servicio no contesta o falla (HTTP 500)"),
    ],
)
async def test_the_owner_hears_once_when_the_model_stops_answering_and_once_when_it_is_back(
    harness, fake_openai: FakeOpenAI, status: int, why: str
) -> None:
    """An expired key or an exhausted OpenAI balance: every customer got an apology and the owner learnt of
    it from them, hours later."""
    async with harness(**ai(fake_openai, ai_circuit_failures=2, ai_circuit_cooldown_s=0.2)) as h:
        h.transport.owner_chat = ChatId(ME)
        fake_openai.fail_next.extend([status] * 8)  # the SDK retries a 429 and a 500 once
        for i in range(4):  # the circuit opens at the second; the others get the apology without a call
            await h.say(inbound(f"m{i}", chat=f"3460000000{i}@s.whatsapp.net", id=f"m{i}"))
        told_down = h.transport.texts_to(ME)
        fake_openai.fail_next.clear()
        await asyncio.sleep(0.3)  # the cooldown: the next message is the trial call
        await h.say(inbound("¿ya?", chat=OTHER, id="trial"))
        assert h.transport.texts_to(OTHER) == ["echo: ¿ya?"]
        told = h.transport.texts_to(ME)
    assert told_down == [
        f"⚠️ La IA no responde: {why}. Los clientes reciben una disculpa hasta que vuelva; te aviso cuando "
        "responda de nuevo."
    ]
    assert told == [*told_down, "✅ La IA vuelve a responder a los clientes."]


async def test_a_flapping_service_tells_the_owner_once_down_and_once_back() -> None:
    """A service failing about 3 calls in 4 opened and closed the circuit over and over: 20 notices in 40
    calls."""
    from bot.ai import AIError, ChatModel, Completion
    from bot.app import OutageNotices

    outcomes = [False, False, False, True] * 10

    async def call(messages: object) -> Completion:
        if outcomes.pop(0):
            return Completion("ok")
        raise AIError("model answered HTTP 503", status=503)

    model = ChatModel(None, "m", breaker=CircuitBreaker(threshold=3, cooldown_s=0))  # type: ignore[arg-type]
    told: list[str] = []
    model.on_outage = OutageNotices(told.append, "es")
    model._call = call  # type: ignore[method-assign]
    for _ in range(40):
        with contextlib.suppress(AIError):
            await model.complete([])
    assert [text[:1] for text in told] == ["⚠", "✅"]


async def test_one_chats_refused_requests_do_not_open_the_circuit_for_everyone(
    harness, fake_openai: FakeOpenAI
) -> None:
    async with harness(**ai(fake_openai)) as h:
        h.bot.model.breaker = CircuitBreaker(threshold=3, cooldown_s=30)
        fake_openai.raw_next.extend([(400, "application/json", '{"error": {"message": "bad request"}}')] * 5)
        for i in range(5):
            [apology] = await h.say(f"m{i}")
            assert "Lo siento" in apology
        assert h.bot.metrics()["ai"]["circuit"] == "closed"
        assert await h.say(inbound("hola", chat=OTHER)) == ["echo: hola"]


async def test_a_conversation_too_long_for_the_model_is_answered_without_its_history(
    harness, fake_openai: FakeOpenAI
) -> None:
    async with harness(**ai(fake_openai)) as h:
        await h.say("primera pregunta")
        fake_openai.raw_next.append(CONTEXT_TOO_LONG)
        assert await h.say("segunda") == ["echo: segunda"]
    retried = fake_openai.chat_requests[-1]["messages"]
    assert [m["role"] for m in retried] == ["system", "user"]


async def test_openai_timeout_bounds_the_whole_wait_retry_included(harness, fake_openai: FakeOpenAI) -> None:
    """The SDK retries a timed-out request once; with its own full timeout a customer waited twice as long."""
    fake_openai.delay_s = 5
    async with harness(**ai(fake_openai, openai_timeout=1.0)) as h:
        started = time.monotonic()
        [apology] = await h.say("hola")
        waited = time.monotonic() - started
    assert "Lo siento" in apology
    assert waited < 1.8


async def test_a_transcription_error_quoting_the_key_does_not_put_it_in_the_logs(
    harness,
    fake_openai: FakeOpenAI,
    voice_note: Path,  # noqa: F811
) -> None:
    """The server's error text went into the DEBUG line as it was; some servers quote the key they refuse."""
    from loguru import logger

    key = "sk-proj-Zq8vN3kLw9RtY2pXc7Hs"
    refused = f"Incorrect API key provided: Bearer {key}"
    body = f'{{"error": {{"message": "{refused}", "code": "invalid_api_key"}}}}'
    fake_openai.transcribe_raw_next.append((401, "application/json", body))
    lines: list[str] = []
    sink = logger.add(lines.append, level="DEBUG", format="{message}")
    try:
        async with harness(**ai(fake_openai, openai_api_key=key)) as h:
            [answer] = await h.say(note(voice_note))
    finally:
        logger.remove(sink)
    assert "Lo siento" in answer
    said = "".join(lines)
    assert "HTTP 401 invalid_api_key" in said  # what went wrong is still there
    assert "Zq8vN3kLw9RtY2pXc7Hs" not in said


async def test_overhead_leaves_out_the_time_spent_on_the_model_and_the_transcription(
    harness,
    fake_openai: FakeOpenAI,
    voice_note: Path,  # noqa: F811
) -> None:
    """The metric counted a voice note's transcription (and the governor's typing) as pipeline overhead."""
    fake_openai.delay_s = 0.5  # each of the transcription and the model call
    async with harness(**ai(fake_openai)) as h:
        await h.say(note(voice_note))
        await h.say("hola")
        overhead = h.bot.metrics()["messages"]["overhead_ms"]
    assert overhead["p99"] < 400, overhead  # the voice note alone spent 1,000 ms waiting on the server


async def test_an_answer_cut_at_the_token_limit_ends_on_a_full_sentence_and_is_not_cached(
    harness, fake_openai: FakeOpenAI
) -> None:
    """The model stopped at max_tokens mid-sentence: the fragment went out as the answer, and the cache gave
    it to the next customer asking the same, for an hour."""
    cut = "Para devolver un pedido tienes 30 días. Primero entra en tu cuenta y luego en la sección de"
    fake_openai.reply = lambda _: cut
    fake_openai.finish_next.append("length")
    async with harness(**ai(fake_openai, openai_max_tokens=50)) as h:
        assert await h.say("¿cómo devuelvo un pedido?") == ["Para devolver un pedido tienes 30 días."]
        assert fake_openai.chat_requests[-1]["max_tokens"] == 50
        assert await h.say(inbound("¿cómo devuelvo un pedido?", chat=OTHER)) == [cut]  # the model asked again
        assert fake_openai.chat_count == 2 and h.bot.model.stats()["cut_at_max_tokens"] == 1


async def test_a_content_filtered_answer_gets_an_apology_not_its_fragment(
    harness, fake_openai: FakeOpenAI
) -> None:
    fake_openai.reply = lambda _: "Claro, para eso primero"
    fake_openai.finish_next.append("content_filter")
    async with harness(**ai(fake_openai)) as h:
        [apology] = await h.say("hola")
        assert "Lo siento" in apology and "Claro" not in apology
        assert await h.say(inbound("hola", chat=OTHER)) == ["Claro, para eso primero"]
        assert fake_openai.chat_count == 2


def test_a_cut_answer_keeps_its_full_sentences_or_says_it_was_cut() -> None:
    from bot.ai import cut_to_last_sentence

    assert cut_to_last_sentence("Hola. Te cuento que el envío tarda entre tres y cinco días hábiles en") == (
        "Hola. Te cuento que el envío tarda entre tres y cinco días hábiles en…"
    )
    assert cut_to_last_sentence("Paso 1: entra.\nPaso 2: elige el pedido\nPaso 3: pulsa en") == (
        "Paso 1: entra.\nPaso 2: elige el pedido"
    )
    assert (
        cut_to_last_sentence("Primera frase. Segunda frase! Y una tercera,")
        == "Primera frase. Segunda frase!"
    )
    # Stops that end nothing: a list's number, an abbreviation; a line promising what was cut.
    steps = "Sigue estos pasos:\n1. Entra en tu cuenta.\n2. Elige el pedido.\n3."
    assert cut_to_last_sentence(steps) == "Sigue estos pasos:\n1. Entra en tu cuenta.\n2. Elige el pedido."
    assert (
        cut_to_last_sentence("Te atiende el equipo. Pregunta por el Sr. García en") == "Te atiende el equipo."
    )
    assert (
        cut_to_last_sentence("Aceptamos tarjeta. Y también Bizum, efectivo, etc. en") == "Aceptamos tarjeta."
    )
    assert cut_to_last_sentence("Claro, te lo explico ahora. Para devolverlo haz esto:\nEntra en") == (
        "Claro, te lo explico ahora."
    )
    assert cut_to_last_sentence("Abrimos a las 9:30 (de lunes a viernes.) El sábado") == (
        "Abrimos a las 9:30 (de lunes a viernes.)"
    )
