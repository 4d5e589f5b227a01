"""The real pipeline and responder on a loopback transport, the real SDK against a fake OpenAI server."""

from __future__ import annotations

import asyncio
import time

import pytest

from bot.limits import OncePerWindow
from bot.replies import reply
from connection.types import MessageKind
from memory.store import Direction, MessageStatus
from tests.conftest import inbound
from tests.fake_openai import FakeOpenAI

CHAT = "34600111222@s.whatsapp.net"


def ai(fake: FakeOpenAI, **extra: object) -> dict[str, object]:
    return {"openai_api_key": "test-key", "openai_base_url": fake.base_url, **extra}


async def test_answers_with_the_model(harness, fake_openai: FakeOpenAI) -> None:
    async with harness(**ai(fake_openai)) as h:
        assert await h.say("¿tienen envío a domicilio?") == ["echo: ¿tienen envío a domicilio?"]
    payload = fake_openai.chat_requests[0]
    assert payload["messages"][0]["role"] == "system"
    assert payload["messages"][-1] == {"role": "user", "content": "¿tienen envío a domicilio?"}


async def test_redelivered_message_is_answered_once(harness, fake_openai: FakeOpenAI) -> None:
    async with harness(**ai(fake_openai)) as h:
        first = inbound("hola", id="WAID-1")
        assert await h.say(first, first) == ["echo: hola"]
        assert h.bot.pipeline.counters.duplicates == 1


async def test_redelivery_after_a_restart_is_still_caught(harness, fake_openai: FakeOpenAI) -> None:
    async with harness(**ai(fake_openai)) as h:
        await h.say(inbound("hola", id="WAID-2"))
    async with harness(**ai(fake_openai)) as h:
        assert await h.say(inbound("hola", id="WAID-2")) == []
        assert h.bot.pipeline.counters.duplicates == 1
    assert fake_openai.chat_count == 1


async def test_messages_of_one_chat_are_answered_in_order(harness, fake_openai: FakeOpenAI) -> None:
    fake_openai.delay_s = 0.05
    other = "5491122334455@s.whatsapp.net"
    async with harness(**ai(fake_openai)) as h:
        messages = [inbound(f"m{i}", chat=CHAT if i % 2 else other) for i in range(10)]
        await h.say(*messages)
        assert h.transport.texts_to(CHAT) == [f"echo: m{i}" for i in range(1, 10, 2)]
        assert h.transport.texts_to(other) == [f"echo: m{i}" for i in range(0, 10, 2)]


async def test_chats_run_concurrently_under_the_model_cap(harness, fake_openai: FakeOpenAI) -> None:
    fake_openai.delay_s = 0.3
    async with harness(**ai(fake_openai, openai_max_concurrency=4)) as h:
        peak = 0

        async def watch() -> None:
            nonlocal peak
            while True:
                peak = max(peak, h.bot.model.in_flight)
                await asyncio.sleep(0.01)

        watcher = asyncio.create_task(watch())
        started = asyncio.get_running_loop().time()
        await h.say(*[inbound("hola", chat=f"3460000{i:04d}@s.whatsapp.net") for i in range(8)])
        elapsed = asyncio.get_running_loop().time() - started
        watcher.cancel()
    assert peak == 4  # never more than the cap, and the cap was used
    assert elapsed < 8 * 0.3  # not one after the other


async def test_model_sees_exactly_the_last_five_messages(harness, fake_openai: FakeOpenAI) -> None:
    async with harness(**ai(fake_openai)) as h:
        for i in range(1, 5):
            await h.say(f"pregunta {i}")
        await h.say("pregunta 5")
    sent = fake_openai.chat_requests[-1]["messages"]
    # system + 5 history turns (user 3, bot 3, user 4, bot 4 ... trimmed to five) + the new message
    assert [m["role"] for m in sent] == [
        "system",
        "assistant",
        "user",
        "assistant",
        "user",
        "assistant",
        "user",
    ]
    assert [m["content"] for m in sent[1:]] == [
        "echo: pregunta 2",
        "pregunta 3",
        "echo: pregunta 3",
        "pregunta 4",
        "echo: pregunta 4",
        "pregunta 5",
    ]


async def test_history_survives_a_restart(harness, fake_openai: FakeOpenAI) -> None:
    async with harness(**ai(fake_openai)) as h:
        await h.say("me llamo Ana")
    async with harness(**ai(fake_openai)) as h:
        await h.say("¿cómo me llamo?")
    sent = fake_openai.chat_requests[-1]["messages"]
    assert [m["content"] for m in sent[1:]] == ["me llamo Ana", "echo: me llamo Ana", "¿cómo me llamo?"]


async def test_history_read_back_keeps_the_last_answer_when_whatsapps_clock_is_behind(
    harness, fake_openai: FakeOpenAI
) -> None:
    """Inbound rows were dated by WhatsApp's whole-second timestamp, replies by this host's clock: a quick
    follow-up (or a host clock a little ahead) sorted before the bot's last answer, and the history read
    back from the store after a restart lost that answer."""
    async with harness(**ai(fake_openai)) as h:
        await h.say(inbound("me llamo Ana", timestamp=time.time() - 2))
    async with harness(**ai(fake_openai)) as h:
        await h.say(inbound("¿cómo me llamo?", timestamp=time.time() - 1))  # WhatsApp's clock: 1 s behind
    sent = fake_openai.chat_requests[-1]["messages"]
    assert [m["content"] for m in sent[1:]] == ["me llamo Ana", "echo: me llamo Ana", "¿cómo me llamo?"]


async def test_history_depth_follows_the_setting(harness, fake_openai: FakeOpenAI) -> None:
    async with harness(**ai(fake_openai, max_chat_history=2)) as h:
        await h.say("a", "b", "c")
    assert len(fake_openai.chat_requests[-1]["messages"]) == 1 + 2 + 1


async def test_a_cache_hit_avoids_a_model_call(harness, fake_openai: FakeOpenAI) -> None:
    async with harness(**ai(fake_openai)) as h:
        first = await h.say(inbound("¿hacen envíos?", chat="34600000001@s.whatsapp.net"))
        second = await h.say(inbound("¿hacen envíos?", chat="34600000002@s.whatsapp.net"))
        assert first == second == ["echo: ¿hacen envíos?"]
        assert fake_openai.chat_count == 1
        assert h.bot.cache.stats()["hits"] == 1


async def test_cache_never_hands_a_context_dependent_answer_to_another_chat(
    harness, fake_openai: FakeOpenAI
) -> None:
    answers = iter(["Hola Ana", "Tu pedido 17 sale hoy", "Hola Luis", "Tu pedido 99 sale mañana"])
    fake_openai.reply = lambda messages: next(answers)
    ana, luis = "34600000011@s.whatsapp.net", "34600000022@s.whatsapp.net"
    async with harness(**ai(fake_openai)) as h:
        await h.say(inbound("soy Ana, pedido 17", chat=ana))
        await h.say(inbound("¿cuándo sale mi pedido?", chat=ana))
        await h.say(inbound("soy Luis, pedido 99", chat=luis))
        assert await h.say(inbound("¿cuándo sale mi pedido?", chat=luis)) == ["Tu pedido 99 sale mañana"]
    assert fake_openai.chat_count == 4


async def test_flows_win_over_the_model(harness, fake_openai: FakeOpenAI, tmp_path) -> None:
    flows = tmp_path / "flows.yaml"
    flows.write_text("- keywords: [horario]\n  answer: Abrimos a las 9.\n", encoding="utf-8")
    async with harness(**ai(fake_openai, flows_file=flows)) as h:
        assert await h.say("¿Cuál es el HORARIO?") == ["Abrimos a las 9."]
        assert h.transport.typing == []  # no typing indicator without a model call
    assert fake_openai.chat_count == 0


async def test_a_swipe_reply_tells_the_model_what_it_replies_to(
    harness, fake_openai: FakeOpenAI, tmp_path
) -> None:
    """ "¿y este?" under one plan of a list, or under an answer no longer in the last messages: without the
    quote the model had only "¿y este?" to go on."""
    flows = tmp_path / "flows.yaml"
    flows.write_text("- keywords: [horario]\n  answer: Abrimos a las 9.\n", encoding="utf-8")
    plans = "1. Básico: 10 €\n2. Pro: 20 €"
    async with harness(**ai(fake_openai, flows_file=flows)) as h:
        await h.say(inbound("¿y este?", quoted=plans, quoted_from="bot"))
        asked_about_ours = fake_openai.chat_requests[-1]["messages"][-1]["content"]
        # A keyword in the quote is not the customer's question: "gracias" under the hours goes to the model.
        await h.say(inbound("gracias", quoted="El horario es de 9 a 14", quoted_from="customer"))
        asked_about_theirs = fake_openai.chat_requests[-1]["messages"][-1]["content"]
        # The same words under another plan are another question: not the cached answer to the first.
        [other] = await h.say(inbound("¿y este?", quoted="3. Empresa: 50 €", quoted_from="bot"))
        rows = [r.body for r in await h.bot.store.recent_messages(CHAT, 10) if r.direction is Direction.IN]
    assert asked_about_ours == reply("quote_of_bot_note", "es").format(quoted=plans) + "\n\n¿y este?"
    assert asked_about_theirs.endswith("«El horario es de 9 a 14»)\n\ngracias")
    assert "tuyo" not in asked_about_theirs  # the model is not told it wrote the customer's words
    assert "3. Empresa: 50 €" in other and fake_openai.chat_count == 3
    assert rows == ["¿y este?", "gracias", "¿y este?"]  # the chat's record holds what the customer wrote


async def test_a_customer_from_an_ad_is_answered_about_the_ad(harness, fake_openai: FakeOpenAI) -> None:
    async with harness(**ai(fake_openai, bot_language="en")) as h:
        await h.say(inbound("Hi, more info please", quoted="Pizza 2x1 on Tuesdays", quoted_from="ad"))
    asked = fake_openai.chat_requests[-1]["messages"][-1]["content"]
    ad = reply("ad_note", "en").format(quoted="Pizza 2x1 on Tuesdays")
    assert asked == f"{ad}\n\nHi, more info please"
    assert "Pizza 2x1" in ad  # the model is told what the ad says


async def test_a_product_from_the_catalog_is_answered_about_that_product(
    harness, fake_openai: FakeOpenAI
) -> None:
    details = "Camiseta azul · 20.00 EUR · Algodón 100 %"
    async with harness(**ai(fake_openai)) as h:
        [answer] = await h.say(inbound("Camiseta azul", quoted=details, quoted_from="product"))
    asked = fake_openai.chat_requests[-1]["messages"][-1]["content"]
    assert asked == reply("product_note", "es").format(quoted=details) + "\n\nCamiseta azul"
    assert answer.startswith("echo: (El cliente envía este producto de tu catálogo")


async def test_the_flows_facts_come_from_the_customers_words_not_the_quote(
    harness, fake_openai: FakeOpenAI, tmp_path
) -> None:
    """ "muchas gracias por todo" under the bot's message about hours got the hours again with AI off; with
    AI on, keywords in the quote took the places of the facts the customer's question needed."""
    flows = tmp_path / "flows.yaml"
    flows.write_text(
        "- keywords: [horario]\n  answer: Abrimos a las 9.\n"
        "- keywords: [devolucion]\n  answer: Tienes 30 días para devolverlo.\n",
        encoding="utf-8",
    )
    under_hours = {"quoted": "Nuestro horario es de 9 a 14", "quoted_from": "bot"}
    async with harness(flows_file=flows) as h:  # AI off
        [thanks] = await h.say(inbound("muchas gracias por todo", **under_hours))
    assert thanks == reply("ai_off", "es")
    async with harness(**ai(fake_openai, flows_file=flows)) as h:
        await h.say(inbound("¿y la devolución del pedido 12 cómo va?", **under_hours))
    system = fake_openai.chat_requests[-1]["messages"][0]["content"]
    assert "30 días" in system and "Abrimos a las 9." not in system


async def test_a_reply_to_a_photo_tells_the_model_it_cannot_see_it(harness, fake_openai: FakeOpenAI) -> None:
    """ "¿precio?" under a product photo the business sent: the model had only "¿precio?" and could name
    any price; told what it cannot see, it can ask which product."""
    asked = []
    async with harness(**ai(fake_openai)) as h:
        for message in (
            inbound("¿precio?", quoted_from="bot", quoted_kind=MessageKind.IMAGE),
            inbound("¿y esta?", quoted="Nueva colección", quoted_from="bot", quoted_kind=MessageKind.VIDEO),
            inbound("eso que te dije", quoted_from="customer", quoted_kind=MessageKind.AUDIO),
        ):
            await h.say(message)
            asked.append(fake_openai.chat_requests[-1]["messages"][-1]["content"])
    assert asked == [
        "(El cliente responde a una foto, un mensaje tuyo, que no puedes ver.)\n\n¿precio?",
        "(El cliente responde a un vídeo, un mensaje tuyo, que no puedes ver, con este texto: «Nueva "
        "colección»)\n\n¿y esta?",
        # Not "cannot see": the bot reads voice notes, and the customer's transcript is in the history.
        "(El cliente responde a una nota de voz, un mensaje suyo.)\n\neso que te dije",
    ]


async def test_a_long_quote_reaches_the_model_shortened(harness, fake_openai: FakeOpenAI) -> None:
    async with harness(**ai(fake_openai)) as h:
        await h.say(inbound("¿esto?", quoted="palabra " * 5000))
    asked = fake_openai.chat_requests[-1]["messages"][-1]["content"]
    assert len(asked) < 400 and "…»)" in asked and asked.endswith("¿esto?")


async def test_without_a_key_flows_still_answer_and_the_rest_gets_a_polite_reply(harness, tmp_path) -> None:
    flows = tmp_path / "flows.json"
    flows.write_text('[{"keywords": ["precio"], "answer": "Cuesta 10 euros."}]', encoding="utf-8")
    async with harness(flows_file=flows) as h:
        assert await h.say("precio?") == ["Cuesta 10 euros."]
        [polite] = await h.say("¿me ayudas con otra cosa?")
    assert "desactivadas" in polite


async def test_polite_replies_follow_the_language_setting(harness) -> None:
    async with harness(bot_language="en") as h:
        [polite] = await h.say("hello?")
    assert "turned off" in polite


async def test_model_errors_get_an_apology(harness, fake_openai: FakeOpenAI) -> None:
    fake_openai.fail_next.extend([500, 500, 429, 429])  # the SDK retries once: two failures per message
    async with harness(**ai(fake_openai)) as h:
        replies = await h.say("uno")
        replies += await h.say("dos")
        assert all("Lo siento" in r for r in replies) and len(replies) == 2
        assert await h.say("tres") == ["echo: tres"]  # and the chat keeps working
        assert h.bot.model.errors == 2


async def test_a_model_timeout_gets_an_apology(harness, fake_openai: FakeOpenAI) -> None:
    fake_openai.delay_s = 3
    async with harness(**ai(fake_openai, openai_timeout=0.3)) as h:
        [apology] = await h.say("hola")
    assert "Lo siento" in apology


async def test_typing_is_on_while_the_model_works(harness, fake_openai: FakeOpenAI) -> None:
    async with harness(**ai(fake_openai)) as h:
        await h.say("hola")
        assert h.transport.typing == [(CHAT, True), (CHAT, False)]


async def test_long_answers_are_split_at_sentence_boundaries(harness, fake_openai: FakeOpenAI) -> None:
    sentence = "Esta es una frase de ejemplo con bastante texto."
    fake_openai.reply = lambda messages: " ".join([sentence] * 60)
    async with harness(**ai(fake_openai, max_reply_chars=500)) as h:
        parts = await h.say("cuéntame todo")
        rows = await h.bot.store.recent_messages(CHAT, 5)
    assert len(parts) > 1
    assert all(len(p) <= 500 and p.endswith(".") for p in parts)
    assert " ".join(parts) == " ".join([sentence] * 60)
    assert rows[-1].body == " ".join([sentence] * 60)  # stored once, whole


async def test_a_word_longer_than_a_message_is_cut_without_leaving_a_lonely_start(
    harness, fake_openai: FakeOpenAI
) -> None:
    """The words before an over-long one (a URL, a token the model repeated) went out as a message of
    their own: "Mira:" alone, then the cut word."""
    long_word = "x" * 1200
    fake_openai.reply = lambda messages: f"Mira: {long_word}"
    async with harness(**ai(fake_openai, max_reply_chars=500)) as h:
        parts = await h.say("dame el enlace")
    assert parts[0].startswith("Mira: xxx") and all(len(p) <= 500 for p in parts)
    assert "".join(parts) == f"Mira: {long_word}"


async def test_inbound_and_outbound_are_persisted(harness, fake_openai: FakeOpenAI) -> None:
    async with harness(**ai(fake_openai)) as h:
        await h.say(inbound("hola", id="WAID-9"))
        rows = await h.bot.store.recent_messages(CHAT, 10)
    assert [(r.direction, r.status, r.body) for r in rows] == [
        (Direction.IN, MessageStatus.ANSWERED, "hola"),
        (Direction.OUT, MessageStatus.SENT, "echo: hola"),
    ]
    assert rows[0].wa_message_id == "WAID-9"


async def test_own_status_and_group_messages_are_skipped(harness, fake_openai: FakeOpenAI) -> None:
    group = "120363025246125486@g.us"
    async with harness(**ai(fake_openai, reply_to_groups="mentioned")) as h:
        replies = await h.say(
            inbound("mine", from_me=True),
            inbound("status", chat="status@broadcast", is_status=True),
            inbound("group chatter", chat=group, is_group=True),
            inbound("👍", kind=MessageKind.REACTION),
            inbound("", kind=MessageKind.OTHER),
        )
        assert replies == []
        assert await h.say(inbound("@bot hola", chat=group, is_group=True, mentions_me=True)) == [
            "echo: @bot hola"
        ]
    assert fake_openai.chat_count == 1


async def test_groups_are_off_by_default(harness, fake_openai: FakeOpenAI) -> None:
    group = "120363025246125486@g.us"
    async with harness(**ai(fake_openai)) as h:
        assert await h.say(inbound("@bot hola", chat=group, is_group=True, mentions_me=True)) == []
    async with harness(**ai(fake_openai, reply_to_groups="always")) as h:
        assert await h.say(inbound("hola a todos", chat=group, is_group=True)) == ["echo: hola a todos"]


async def test_media_gets_a_polite_reply(harness) -> None:
    async with harness() as h:
        [answer] = await h.say(inbound("", kind=MessageKind.IMAGE))
    assert "texto" in answer


async def test_empty_and_control_character_messages(harness, fake_openai: FakeOpenAI) -> None:
    async with harness(**ai(fake_openai)) as h:
        [empty] = await h.say("   \n\t ")
        [clean] = await h.say("ho\x00la\x1b[31m")
        [invisible] = await h.say("\u200b\u200c\u200d\ufeff\u2060 \u2800")  # cost a model call before
        [emoji] = await h.say("\U0001f468\u200d\U0001f469\u200d\U0001f467")  # joined by zero-width joiners
    assert "No he recibido texto" in empty and invisible == empty
    assert clean == "echo: hola[31m"
    assert emoji == "echo: \U0001f468\u200d\U0001f469\u200d\U0001f467"
    assert fake_openai.chat_count == 2


async def test_a_huge_message_is_trimmed_before_the_model(harness, fake_openai: FakeOpenAI) -> None:
    async with harness(**ai(fake_openai, max_inbound_chars=1000)) as h:
        await h.say("a" * 100_000)
    content = fake_openai.chat_requests[0]["messages"][-1]["content"]
    assert content.startswith("a" * 1000) and len(content) < 1200
    assert "muy largo" in content


async def test_a_failed_send_fails_one_message_not_the_chat(harness, fake_openai: FakeOpenAI) -> None:
    async with harness(**ai(fake_openai)) as h:
        h.transport.fail_sends = 1
        assert await h.say("uno") == []
        assert await h.say("dos") == ["echo: dos"]
        assert h.bot.pipeline.counters.failed == 1
        rows = await h.bot.store.recent_messages(CHAT, 10)
    assert rows[0].status is MessageStatus.FAILED


async def test_messages_queued_behind_never_leak_into_the_history(harness, fake_openai: FakeOpenAI) -> None:
    # After a restart the history comes from the store, where later messages of the chat are
    # already saved at intake; the model must still see only what came before each message.
    async with harness(**ai(fake_openai)) as h:
        await h.say("primero")
    fake_openai.delay_s = 0.05
    async with harness(**ai(fake_openai)) as h:
        await h.say("segundo", "tercero", "cuarto")
    contexts = [[m["content"] for m in r["messages"][1:]] for r in fake_openai.chat_requests[1:]]
    assert contexts[0] == ["primero", "echo: primero", "segundo"]
    assert contexts[1] == ["primero", "echo: primero", "segundo", "echo: segundo", "tercero"]
    assert contexts[2][-3:] == ["tercero", "echo: tercero", "cuarto"]


async def test_an_old_backlog_is_stored_but_not_answered(harness, fake_openai: FakeOpenAI) -> None:
    # Delivered after a long disconnection: older than the freshness window.
    async with harness(**ai(fake_openai, recovery_window_minutes=10)) as h:
        assert await h.say(inbound("¿abren hoy?", id="OLD", timestamp=time.time() - 3600)) == []
        assert await h.say("¿y mañana?") == ["echo: ¿y mañana?"]
        rows = await h.bot.store.recent_messages(CHAT, 10)
    assert (rows[0].wa_message_id, rows[0].status) == ("OLD", MessageStatus.SKIPPED)


async def test_a_cancelled_wait_on_a_write_does_not_poison_the_next_flush(tmp_path) -> None:
    from memory.sqlite_store import SQLiteStore
    from memory.store import StoredMessage

    store = SQLiteStore(tmp_path / "s.sqlite3")
    await store.open()
    row = StoredMessage("W1", CHAT, Direction.IN, "text", "hola", MessageStatus.RECEIVED, time.time())
    waiting = asyncio.ensure_future(store.add_message(row))
    await asyncio.sleep(0)
    waiting.cancel()  # a worker cancelled at a shutdown timeout, while its batch was queued
    await asyncio.gather(waiting, return_exceptions=True)
    await store.flush()  # must not raise CancelledError
    await store.close()
    reopened = SQLiteStore(tmp_path / "s.sqlite3")
    await reopened.open()
    assert [m.wa_message_id for m in await reopened.recent_messages(CHAT, 5)] == ["W1"]
    await reopened.close()


async def test_a_poll_or_payment_request_gets_the_polite_reply_and_is_kept(harness) -> None:
    """Content the bot cannot read used to be dropped in silence, like protocol traffic, leaving the customer
    with no answer."""
    async with harness() as h:
        [answer] = await h.say(inbound("", kind=MessageKind.UNSUPPORTED, id="LOC1"))
        stored = await h.bot.store.recent_messages(CHAT, 5)
    assert answer == reply("media_unsupported", "es")
    assert [m.wa_message_id for m in stored if m.direction is Direction.IN] == ["LOC1"]


async def test_photos_in_a_row_get_the_media_notice_once_and_are_all_kept(
    harness, fake_openai: FakeOpenAI
) -> None:
    """Four photos or stickers sent in a row got four identical "I can only read text and voice notes"
    messages (photos the model is not shown: OPENAI_VISION=false)."""
    now = [1000.0]
    notice = reply("media_unsupported_pdf", "es")
    other = "5491122334455@s.whatsapp.net"
    async with harness(**ai(fake_openai), openai_vision=False) as h:
        h.bot.pipeline.media_notices = OncePerWindow(300, clock=lambda: now[0])
        photos = [inbound("", kind=MessageKind.IMAGE, id=f"PHOTO{i}") for i in range(3)]
        assert await h.say(*photos, inbound("", kind=MessageKind.STICKER, id="STICKER")) == [notice]
        assert await h.say("¿lo tenéis en azul?") == ["echo: ¿lo tenéis en azul?"]  # words still answered
        assert await h.say(inbound("", kind=MessageKind.IMAGE, id="PHOTO3")) == []
        assert await h.say(inbound("", kind=MessageKind.IMAGE, chat=other)) == [notice]  # its own chat
        now[0] += 301  # minutes later: told again
        assert await h.say(inbound("", kind=MessageKind.IMAGE, id="PHOTO4")) == [notice]
        rows = [r for r in await h.bot.store.recent_messages(CHAT, 20) if r.direction is Direction.IN]
    assert [(r.wa_message_id, r.status) for r in rows if r.kind != "text"] == [
        ("PHOTO0", MessageStatus.ANSWERED),
        *((f"PHOTO{i}", MessageStatus.SKIPPED) for i in (1, 2)),
        ("STICKER", MessageStatus.SKIPPED),  # kept, and never answered after a restart either
        ("PHOTO3", MessageStatus.SKIPPED),
        ("PHOTO4", MessageStatus.ANSWERED),
    ]


async def test_a_photo_with_a_caption_gets_the_caption_answered(harness, fake_openai: FakeOpenAI) -> None:
    async with harness(**ai(fake_openai)) as h:
        [answer] = await h.say(inbound("¿lo tenéis en azul?", kind=MessageKind.IMAGE))
    assert answer.startswith("echo: ¿lo tenéis en azul?")
    asked = fake_openai.chat_requests[-1]["messages"][-1]["content"]
    assert "no puedes ver" in asked  # the model is told it cannot see the photo


@pytest.mark.parametrize(("language", "max_chars"), [("es", 1500), ("en", 200)])
async def test_a_runaway_answer_is_cut_to_ten_messages_and_says_so(
    harness, fake_openai: FakeOpenAI, language: str, max_chars: int
) -> None:
    """The cut answer used to end on a full sentence, reading as complete: the customer never knew 85 %
    of it was missing."""
    sentence = "Una frase más de una respuesta que no se acaba nunca."
    fake_openai.reply = lambda messages: " ".join([sentence] * 2000)  # 108 KB, a server ignoring max_tokens
    async with harness(**ai(fake_openai, bot_language=language, max_reply_chars=max_chars)) as h:
        parts = await h.say("cuéntame todo")
        rows = await h.bot.store.recent_messages(CHAT, 5)
        fake_openai.reply = lambda messages: "Vale."
        await h.say("sigue, por favor")
    assert len(parts) == 10 and all(len(part) <= max_chars for part in parts)
    assert parts[-1].endswith(f"…\n\n{reply('answer_cut_note', language)}")  # type: ignore[arg-type]
    assert "…" not in "".join(parts[:-1])
    assert rows[-1].body == "\n".join(parts)  # the store holds what the customer got, the note included
    told = fake_openai.chat_requests[-1]["messages"][-2]
    assert told == {"role": "assistant", "content": "\n".join(parts)}  # so does the model's next context


async def test_an_unexpected_error_costs_an_apology_not_the_answer(harness) -> None:
    """Before, an error outside the known failure types left the customer with no reply at all."""
    from bot.ai import Completion
    from tests.fake_openai import InstantModel

    class Broken(InstantModel):
        async def _call(self, messages: list[dict[str, object]]) -> Completion:
            raise RuntimeError("a bug")

    async with harness() as h:
        h.bot.pipeline.responder.model = Broken()
        [apology] = await h.say("hola")
        assert "Lo siento" in apology
        assert h.bot.metrics()["messages"]["failed"] == 1
