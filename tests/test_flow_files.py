"""A keyword flow that sends a photo or a document ("carta" -> the menu PDF): the flows file, the real
pipeline and SQLite store on a loopback transport, the console, the outbox, and the neonize adapter on its
fake client."""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import json
import os
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.app import Bot
from bot.flows import MAX_FILE_BYTES, FlowsFileError, load_flows_file
from bot.governor import GovernedTransport, GovernorLimits
from bot.limits import OncePerWindow
from bot.replies import reply
from connection.console import ConsoleTransport
from connection.loopback import LoopbackTransport
from connection.neonize_adapter import NeonizeTransport
from connection.outbox import Outbox
from connection.types import ChatId, ConnectionState, MessageId, TransportError
from memory.manager import MemoryManager, MemoryState
from memory.store import Direction
from tests.conftest import BotHarness, inbound
from tests.fake_openai import FakeOpenAI
from tests.test_governor import FakeTime
from tests.test_neonize_adapter import FakeNewAClient, WAMessage, wait_state
from tests.test_outbox import Recorder, transport
from tests.test_outbox import fake_client as fake_client  # a fixture
from tests.test_protection import critical_memory

CHAT = "34600111222@s.whatsapp.net"
MENU = "Aquí tienes nuestra carta."


def ai(fake: FakeOpenAI, **extra: object) -> dict[str, object]:
    return {"openai_api_key": "k", "openai_base_url": fake.base_url, **extra}


def flows_with(tmp_path: Path, file: str, answer: str = MENU) -> Path:
    flows = tmp_path / "flows" / "flows.yaml"
    flows.parent.mkdir(exist_ok=True)
    flows.write_text(f"- keywords: [carta, menu]\n  answer: {json.dumps(answer)}\n  file: {file}\n")
    return flows


def menu_pdf(tmp_path: Path) -> Path:
    pdf = tmp_path / "flows" / "carta.pdf"
    pdf.parent.mkdir(exist_ok=True)
    pdf.write_bytes(b"%PDF-1.4 la carta")
    return pdf


# ---------------------------------------------------------------- the flows file


def test_a_flows_file_names_the_file_relative_to_itself(tmp_path: Path) -> None:
    pdf = menu_pdf(tmp_path)
    [flow] = load_flows_file(flows_with(tmp_path, "carta.pdf"))
    assert flow.file == str(pdf.resolve()) and flow.answer == MENU


@pytest.mark.parametrize(
    ("file", "problem"),
    [
        ("falta.pdf", "entry 1: file 'falta.pdf' cannot be read (No such file or directory; relative to"),
        ("vacia.pdf", "entry 1: file 'vacia.pdf' is empty"),
        ("enorme.pdf", f"entry 1: file 'enorme.pdf' is 17.0 MB, at most {MAX_FILE_BYTES // 2**20} MB"),
        (".", "entry 1: file '.' is not a file"),
        ("[1, 2]", "entry 1: 'file' must be the path of a photo or document"),
    ],
)
def test_a_file_that_cannot_be_sent_stops_the_start_naming_it(
    tmp_path: Path, file: str, problem: str
) -> None:
    """Found at start, not by the first customer who asks for the menu."""
    flows = flows_with(tmp_path, file)
    (flows.parent / "vacia.pdf").write_bytes(b"")
    with (flows.parent / "enorme.pdf").open("wb") as huge:
        huge.truncate(17 * 2**20)  # sparse: no disk used
    with pytest.raises(FlowsFileError) as error:
        load_flows_file(flows)
    assert problem in str(error.value)


# ---------------------------------------------------------------- the pipeline


async def test_a_flow_sends_its_file_with_the_answer_as_caption(
    harness, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    pdf = menu_pdf(tmp_path)
    async with harness(**ai(fake_openai, flows_file=flows_with(tmp_path, "carta.pdf"))) as h:
        await h.say("hola, ¿la carta?")
        [sent] = h.transport.sent
        assert (sent.text, sent.file) == (MENU, str(pdf.resolve()))
        await h.say("¿tenéis opciones veganas?")
        rows = await h.bot.store.recent_messages(CHAT, 10)
    # The history says the file went out: the model knows the customer has the menu.
    replies = [row.body for row in rows if row.direction is Direction.OUT]
    assert replies[0] == f"{MENU}\n(📎 carta.pdf)"
    assert f"{MENU}\n(📎 carta.pdf)" in [m["content"] for m in fake_openai.chat_requests[-1]["messages"]]


async def test_a_long_answer_follows_its_file(harness, tmp_path: Path) -> None:
    """A caption holds 1,024 characters: a longer answer goes as text after the file."""
    menu_pdf(tmp_path)
    long_answer = "Nuestra carta. " + "Platos del día y postres caseros. " * 40
    async with harness(flows_file=flows_with(tmp_path, "carta.pdf", long_answer)) as h:
        await h.say("carta")
    first, *rest = h.transport.sent
    assert (first.text, first.file is not None) == ("", True)
    assert "\n".join(s.text for s in rest) == long_answer.strip() and all(s.file is None for s in rest)


async def test_a_file_gone_since_the_start_leaves_the_answer(harness, tmp_path: Path) -> None:
    pdf = menu_pdf(tmp_path)
    async with harness(flows_file=flows_with(tmp_path, "carta.pdf")) as h:
        pdf.unlink()
        await h.say("carta")
    assert [(s.text, s.file) for s in h.transport.sent] == [(MENU, None)]


class RefusesFiles(LoopbackTransport):
    async def send_text(self, chat: ChatId, text: str, file: str | None = None) -> MessageId:
        if file is not None:
            raise TransportError("send failed: media upload failed")
        return await super().send_text(chat, text)


async def test_a_file_the_upload_refuses_leaves_the_answer(make_settings, tmp_path: Path) -> None:
    menu_pdf(tmp_path)
    h = BotHarness(make_settings(flows_file=flows_with(tmp_path, "carta.pdf")))
    h.transport = RefusesFiles()
    h.bot = Bot.build(h.settings, h.transport)
    async with h:
        assert await h.say("carta") == [MENU]


async def test_the_models_answer_goes_with_the_file_of_a_flow_it_matched_once_an_hour(
    harness, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    """ "¿me pasas la carta?" asks more than the flow's question: the model answers (told the flow's answer),
    and the menu goes with it; "¿tiene opciones veganas la carta?" right after needs no second copy, while the
    flow's own question always gets it."""
    pdf = str(menu_pdf(tmp_path).resolve())
    async with harness(**ai(fake_openai, flows_file=flows_with(tmp_path, "carta.pdf"))) as h:
        await h.say("¿me pasas la carta?")
        await h.say("¿tiene opciones veganas la carta?")
        await h.say("la carta")
        metrics = h.bot.metrics()["memory"]["structures"]["flow_file_chats"]
    assert [(s.text, s.file) for s in h.transport.sent] == [
        ("echo: ¿me pasas la carta?", pdf),
        ("echo: ¿tiene opciones veganas la carta?", None),
        (MENU, pdf),
    ]
    assert MENU in fake_openai.chat_requests[0]["messages"][0]["content"]
    assert metrics["size"] == 1


async def test_thanks_for_the_menu_is_answered_without_sending_it_again(
    harness, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    """ "¡gracias por la carta!" a day later got the model's answer and the menu once more."""
    menu_pdf(tmp_path)
    async with harness(**ai(fake_openai, flows_file=flows_with(tmp_path, "carta.pdf"))) as h:
        await h.say("¡gracias por la carta!")
        await h.say(inbound("gracias por la carta, ¿la tenéis en inglés?", id="asks"))
    assert [s.file is None for s in h.transport.sent] == [True, False]


async def test_a_model_that_fails_still_leaves_the_customer_what_the_flows_know(
    harness, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    """ "¿me pasas la carta?" while the model is down (500s, a timeout, an exhausted quota): the bot knows the
    answer and has the menu, and used to send only "sorry, try again later"."""
    pdf = str(menu_pdf(tmp_path).resolve())
    fake_openai.fail_next.extend([500] * 10)
    async with harness(**ai(fake_openai, flows_file=flows_with(tmp_path, "carta.pdf"))) as h:
        await h.say("¿me pasas la carta?")
        await h.say(inbound("¿hacéis envíos?", id="other"))  # nothing the flows know: the apology alone
        # A complaint naming the menu is not answered with it
        await h.say(
            inbound("La paella de la carta llegó fría y tarde, quiero que me devolváis el dinero", id="c")
        )
    assert [(s.text, s.file) for s in h.transport.sent] == [
        (f"{MENU}\n\n{reply('ai_error_after_facts', 'es')}", pdf),
        (reply("ai_error", "es"), None),
        (reply("ai_error", "es"), None),
    ]


# ---------------------------------------------------------------- the console and the outbox


async def test_the_console_shows_the_file() -> None:
    out = io.StringIO()
    console = ConsoleTransport(jsonl=True, out=out)
    await console.send_text(ChatId(CHAT), MENU, "/srv/flows/carta.pdf")
    assert json.loads(out.getvalue()) == {"to": "34600111222", "text": MENU, "file": "/srv/flows/carta.pdf"}
    out = io.StringIO()
    await ConsoleTransport(jsonl=False, out=out).send_text(ChatId(CHAT), MENU, "/srv/flows/carta.pdf")
    assert out.getvalue() == f"bot> [carta.pdf] {MENU}\n"


async def test_a_queued_file_survives_a_restart(tmp_path: Path) -> None:
    first = Outbox(tmp_path / "outbox.sqlite3")
    first.put(ChatId(CHAT), MENU, "/srv/flows/carta.pdf")
    first.put(ChatId(CHAT), "¿algo más?")
    first.close()
    second = Outbox(tmp_path / "outbox.sqlite3")
    recorder = Recorder()
    assert await second.flush(recorder) == 2
    assert recorder.files == ["/srv/flows/carta.pdf", None]
    second.close()


# ---------------------------------------------------------------- the neonize adapter


async def test_chats_a_file_went_to_are_bounded_and_forgotten_under_pressure(harness, tmp_path: Path) -> None:
    now = [1000.0]
    menu_pdf(tmp_path)
    async with harness(flows_file=flows_with(tmp_path, "carta.pdf")) as h:
        h.bot.pipeline.flow_files = OncePerWindow(3600, max_keys=3, clock=lambda: now[0])
        await h.say(*[inbound("carta", chat=f"3460077{i:04d}@s.whatsapp.net") for i in range(5)])
        structures = h.bot.metrics()["memory"]["structures"]
        now[0] += 3601
        manager = MemoryManager(500, read_rss_mb=lambda: 410.0)
        manager.on_change(h.bot._on_memory_state)
        assert manager.check() is MemoryState.WARNING
        after = h.bot.metrics()["memory"]["structures"]["flow_file_chats"]
    assert structures["flow_file_chats"] == {"size": 3, "max": 3, "evictions": 2}
    assert after["size"] == 0


def test_a_photo_pillow_refuses_or_a_fifo_stops_the_start_with_one_line(tmp_path: Path) -> None:
    """A 225-megapixel PNG (27 KB) raised Pillow's DecompressionBombError, no OSError: a traceback instead of
    the line naming the file; a FIFO hung the start."""
    from PIL import Image

    flows = flows_with(tmp_path, "cartel.png")
    Image.new("1", (15000, 15000)).save(flows.parent / "cartel.png")
    with pytest.raises(FlowsFileError, match=r"photo 'cartel\.png' has far more than 16 megapixels"):
        load_flows_file(flows)
    flows = flows_with(tmp_path, "fifo.pdf")
    os.mkfifo(flows.parent / "fifo.pdf")
    with pytest.raises(FlowsFileError, match=r"file 'fifo\.pdf' is not a file"):
        load_flows_file(flows)


def test_a_photo_too_big_to_preview_or_unreadable_stops_the_start(tmp_path: Path) -> None:
    """neonize decodes a photo whole for its preview, on the event loop: a 600 dpi poster took 130 MB and
    half a second per send; a broken one failed at every send."""
    from PIL import Image

    flows = flows_with(tmp_path, "cartel.png")
    Image.new("L", (5000, 4000)).save(flows.parent / "cartel.png")
    with pytest.raises(
        FlowsFileError, match=r"photo 'cartel\.png' is 5000x4000 pixels, at most 16 megapixels"
    ):
        load_flows_file(flows)
    (flows.parent / "cartel.png").write_bytes(b"not a png at all")
    with pytest.raises(FlowsFileError, match=r"file 'cartel\.png' is not a photo Pillow can read"):
        load_flows_file(flows)
    Image.new("RGB", (1600, 1200), "white").save(flows.parent / "cartel.png")
    assert load_flows_file(flows)[0].file == str(flows.parent / "cartel.png")


async def test_a_symlinked_file_swapped_after_the_start_sends_the_new_target(harness, tmp_path: Path) -> None:
    """The path was resolved at start: a symlink swapped to a new menu (a ConfigMap update, `ln -sfn`) kept
    pointing at the old, deleted one."""
    folder = tmp_path / "flows"
    folder.mkdir()
    (folder / "v1.pdf").write_bytes(b"%PDF old")
    (folder / "carta.pdf").symlink_to(folder / "v1.pdf")
    async with harness(flows_file=flows_with(tmp_path, "carta.pdf")) as h:
        (folder / "v2.pdf").write_bytes(b"%PDF new")
        (folder / "carta.pdf").unlink()
        (folder / "carta.pdf").symlink_to(folder / "v2.pdf")
        (folder / "v1.pdf").unlink()
        await h.say("carta")
    [sent] = h.transport.sent
    assert sent.file is not None and Path(sent.file).read_bytes() == b"%PDF new"


async def test_while_memory_is_critical_a_flow_answers_without_its_file(harness, tmp_path: Path) -> None:
    menu_pdf(tmp_path)
    async with harness(flows_file=flows_with(tmp_path, "carta.pdf")) as h:
        critical_memory(h.bot)
        h.bot.pipeline.submit(inbound("carta"))
        await asyncio.sleep(0.3)
    assert [(s.text, s.file) for s in h.transport.sent] == [(MENU, None)]


async def test_files_without_captions_to_many_chats_are_not_the_same_text() -> None:
    """Six customers getting six different files (answers too long for a caption) within a minute were
    "the same text to six chats", and the sixth waited a minute."""
    time = FakeTime()
    inner = LoopbackTransport()
    gov = GovernedTransport(inner, GovernorLimits(typing_chars_per_s=0), clock=time.clock, sleep=time.sleep)
    for n in range(8):
        chat = ChatId(f"3460011{n:04d}@s.whatsapp.net")
        gov.note_inbound(inbound("hola", chat=chat))
        await gov.send_text(chat, "", f"/srv/flows/carta-{n}.pdf")
    assert gov.counters["same_text_waits"] == 0 and len(inner.sent) == 8


@contextlib.asynccontextmanager
async def connected(
    fake_client: type[FakeNewAClient], tmp_path: Path
) -> AsyncIterator[tuple[NeonizeTransport, FakeNewAClient]]:
    """The neonize adapter, connected, on its fake client."""
    fake_client.script.extend(["ok"])
    t = transport(tmp_path)
    await t.start()
    try:
        await wait_state(t, ConnectionState.CONNECTED)
        yield t, fake_client.instances[0]
    finally:
        await t.stop()


async def test_whatsapp_gets_a_photo_inline_and_a_document_with_its_name(
    fake_client: type[FakeNewAClient], tmp_path: Path
) -> None:
    from PIL import Image

    photo, pdf = tmp_path / "Tarta.JPG", tmp_path / "carta.pdf"
    Image.new("RGB", (64, 48), "white").save(photo, format="JPEG")
    pdf.write_bytes(b"%PDF-1.4 la carta")
    async with connected(fake_client, tmp_path) as (t, client):
        await t.send_text(ChatId(CHAT), "La tarta del día", str(photo))
        await t.send_text(ChatId(CHAT), "", str(pdf))
        image, document = client.messages
    assert (image.imageMessage.caption, image.imageMessage.fileLength) == (
        "La tarta del día",
        photo.stat().st_size,
    )
    sent = document.documentMessage
    assert (sent.fileName, sent.mimetype, sent.caption) == ("carta.pdf", "application/pdf", "")


async def test_a_document_without_an_extension_is_typed_by_its_content(
    fake_client: type[FakeNewAClient], tmp_path: Path
) -> None:
    """An explicit application/octet-stream overrode neonize's reading of the content."""
    (tmp_path / "carta").write_bytes(b"%PDF-1.4 la carta")
    async with connected(fake_client, tmp_path) as (t, client):
        await t.send_text(ChatId(CHAT), MENU, str(tmp_path / "carta"))
        [document] = client.messages
    assert (document.documentMessage.fileName, document.documentMessage.mimetype) == ("carta", "sniffed")


async def test_a_file_sent_while_disconnected_goes_out_after_the_reconnect(
    fake_client: type[FakeNewAClient], tmp_path: Path
) -> None:
    (tmp_path / "carta.pdf").write_bytes(b"%PDF-1.4 la carta")
    async with connected(fake_client, tmp_path) as (t, client):
        await client.drop()
        queued = await t.send_text(ChatId(CHAT), MENU, str(tmp_path / "carta.pdf"))
        assert queued.startswith("outbox-") and client.messages == []
        await client.back()
        async with asyncio.timeout(5):
            while not client.messages:
                await asyncio.sleep(0.01)
        [document] = client.messages
    assert (document.documentMessage.caption, document.documentMessage.fileName) == (MENU, "carta.pdf")


async def test_a_queued_file_deleted_before_the_reconnect_sends_its_caption_and_holds_nothing_up(
    fake_client: type[FakeNewAClient], tmp_path: Path
) -> None:
    """It counted as a failed try, held every reply behind it for 10 s a try, and was dropped after three:
    the answer never came."""
    other = "34600999888@s.whatsapp.net"
    (tmp_path / "carta.pdf").write_bytes(b"%PDF-1.4 la carta")
    async with connected(fake_client, tmp_path) as (t, client):
        await client.drop()
        await t.send_text(ChatId(CHAT), MENU, str(tmp_path / "carta.pdf"))
        await t.send_text(ChatId(other), "Hola, ¿en qué te ayudo?")
        (tmp_path / "carta.pdf").unlink()
        await client.back()
        async with asyncio.timeout(5):
            while len(client.sent) < 2:
                await asyncio.sleep(0.01)
        stats = t.stats()
    assert client.sent == [(CHAT, MENU), (other, "Hola, ¿en qué te ayudo?")]
    assert stats["outbox_pending"] == 0 and stats["outbox_dropped"] == 0


@pytest.mark.parametrize("spoiled", ["refused", "unreadable", "too many pixels"])
async def test_a_queued_file_that_cannot_go_sends_its_caption_and_holds_nothing_up(
    fake_client: type[FakeNewAClient], tmp_path: Path, spoiled: str
) -> None:
    """Only a deleted file was caught: a photo spoiled while it waited, or one WhatsApp refused, still held
    every reply behind it and was dropped with its caption."""
    from PIL import Image

    other = "34600999888@s.whatsapp.net"
    photo = tmp_path / "promo.jpg"
    Image.new("RGB", (100, 100)).save(photo)
    async with connected(fake_client, tmp_path) as (t, client):
        await client.drop()
        await t.send_text(ChatId(CHAT), "La promo", str(photo))
        await t.send_text(ChatId(other), "Hola, ¿en qué te ayudo?")
        if spoiled == "refused":
            fake_client.upload_error = "media upload failed: 415"
        elif spoiled == "unreadable":
            photo.write_bytes(b"half a jpeg")
        else:  # a symlink swapped to a poster, say: the start's bound holds at the send
            Image.new("1", (6000, 4000)).save(photo, format="PNG")
        try:
            await client.back()
            async with asyncio.timeout(5):
                while len(client.sent) < 2:
                    await asyncio.sleep(0.01)
        finally:
            fake_client.upload_error = None
        stats = t.stats()
    assert client.sent == [(CHAT, "La promo"), (other, "Hola, ¿en qué te ayudo?")]
    assert stats["outbox_pending"] == 0 and stats["outbox_dropped"] == 0


async def test_a_photos_preview_is_made_off_the_event_loop(
    fake_client: type[FakeNewAClient], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """neonize's build_image_message decodes the whole photo for its preview (Pillow, up to ~170 ms) in
    the loop it runs on: on the bot's loop, every other chat stalled while a photo was prepared."""
    from PIL import Image

    photo = tmp_path / "tarta.png"
    Image.new("RGBA", (64, 48), "white").save(photo)
    built_on: list[int] = []
    original = fake_client.build_image_message

    async def build(self: FakeNewAClient, file: bytes, caption: str | None = None) -> WAMessage:
        built_on.append(threading.get_ident())
        time.sleep(0.2)  # neonize's synchronous Pillow work, as it blocks its loop
        return await original(self, file, caption)

    monkeypatch.setattr(fake_client, "build_image_message", build)
    async with connected(fake_client, tmp_path) as (t, client):
        ticks: list[float] = []

        async def ticker() -> None:
            while True:
                ticks.append(time.monotonic())
                await asyncio.sleep(0.01)

        beat = asyncio.create_task(ticker())
        try:
            await t.send_text(ChatId(CHAT), "La tarta", str(photo))
        finally:
            beat.cancel()
        [image] = client.messages
    assert image.imageMessage.caption == "La tarta"
    assert built_on and built_on[0] != threading.get_ident()
    assert max(b - a for a, b in itertools.pairwise(ticks)) < 0.15  # the loop kept serving other chats
