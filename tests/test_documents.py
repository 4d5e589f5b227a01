"""PDFs customers send (a receipt, an invoice, a quote), read for the model: real pdftotext and pdftoppm, the
real pipeline, SQLite store and SDK against the fake OpenAI server, loopback transport; and through
`python -m bot chat --jsonl`."""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from bot.pipeline import MAX_BURST_PHOTOS
from bot.replies import reply
from connection.console import parse_jsonl
from connection.types import MediaRef, MessageKind
from media.document import MAX_CHARS, MAX_PAGES, DocumentRejected, PdfReader, is_pdf
from media.proc import run
from memory.store import Direction, MessageStatus, StoredMessage
from tests.conftest import BotHarness, inbound
from tests.fake_openai import FakeOpenAI
from tests.pdfs import protected_pdf, scanned_pdf, text_pdf
from tests.test_console import lines, run_chat
from tests.test_photos import ai, count_downloads, describes, jpeg, photo, shown_photos

CHAT = "34600111222@s.whatsapp.net"
RECEIPT = text_pdf(["Comprobante de transferencia", "Importe: 45,00 EUR", "Beneficiario: Zapatería Ñandú"])


def pdf(data: bytes, caption: str = "", name: str = "comprobante.pdf", **fields: Any) -> Any:
    media = MediaRef(mimetype="application/pdf", size_bytes=len(data), file_name=name, handle=data)
    return inbound(caption, kind=MessageKind.DOCUMENT, media=media, **fields)


def asked(fake: FakeOpenAI, request: int = -1) -> str:
    """The words of the last user turn the model got in a request."""
    content = fake.chat_requests[request]["messages"][-1]["content"]
    if isinstance(content, str):
        return content
    return " ".join(part["text"] for part in content if part["type"] == "text")


@pytest.fixture
def fake(fake_openai: FakeOpenAI) -> FakeOpenAI:
    fake_openai.reply = describes
    return fake_openai


async def test_a_pdf_is_read_to_the_model_with_its_caption(harness, fake: FakeOpenAI) -> None:
    """A customer sends a transfer receipt as a PDF and "¿os ha llegado?": the bot answered "I can only read
    text, photos and voice notes", or answered the words blind."""
    async with harness(**ai(fake)) as h:
        [answer] = await h.say(pdf(RECEIPT, "¿os ha llegado?", id="D1"))
        assert await h.say("¿y cuándo lo enviáis?") == ["texto: ¿y cuándo lo enviáis?"]
        stored = await h.bot.store.recent_messages(CHAT, 5)
        counters = h.bot.pipeline.counters
    first = asked(fake, 0)
    assert "Importe: 45,00 EUR" in first and "Beneficiario: Zapatería Ñandú" in first
    assert "«comprobante.pdf»" in first and first.endswith("¿os ha llegado?")
    assert answer.startswith("texto: (El cliente envía el PDF")
    # The PDF's text is in its own turn only: the history says a PDF came, with its caption, and is stored so.
    history = [m["content"] for m in fake.chat_requests[1]["messages"][1:-1]]
    assert history[0] == "(📄) ¿os ha llegado?"  # and the bot's answer: the fake model echoes the PDF
    assert next((m.kind, m.body, m.status) for m in stored if m.direction is Direction.IN) == (
        "document",
        "¿os ha llegado?",
        MessageStatus.ANSWERED,
    )
    assert (counters.documents, counters.documents_unread) == (1, 0)


async def test_a_pdf_alone_is_answered_from_its_text(harness, fake: FakeOpenAI) -> None:
    async with harness(**ai(fake)) as h:
        [answer] = await h.say(pdf(RECEIPT))
    assert asked(fake).startswith("(El cliente envía el PDF «comprobante.pdf»; este es su texto:)\n")
    assert asked(fake).endswith("Beneficiario: Zapatería Ñandú")  # nothing after: no empty caption
    assert "Importe" in answer


async def test_a_pdf_and_the_words_after_it_are_one_turn(harness, fake: FakeOpenAI) -> None:
    async with harness(**ai(fake)) as h:
        h.bot.pipeline.gather_s = 0.3  # as WA_GATHER_S sets it on WhatsApp
        sent = await h.say(pdf(RECEIPT), "hola", "¿os ha llegado el pago?")
    assert len(sent) == 1 and fake.chat_count == 1
    assert "Importe: 45,00 EUR" in asked(fake) and asked(fake).endswith("hola\n¿os ha llegado el pago?")


async def test_words_in_a_pdf_do_not_set_off_a_flow(harness, fake: FakeOpenAI, tmp_path: Path) -> None:
    """A menu PDF says "horario" somewhere: the flow for "horario" must not answer a question about the PDF,
    nor hand its facts or files to the model as if the customer had asked."""
    flows = tmp_path / "flows.yaml"
    flows.write_text("- keywords: [horario]\n  answer: Abrimos de 9 a 14.\n")
    menu = text_pdf(["Carta de temporada", "Horario de cocina: hasta las 23:00"])
    async with harness(**ai(fake), flows_file=flows) as h:
        [answer] = await h.say(pdf(menu, "¿tenéis opciones veganas?", name="carta.pdf"))
        assert await h.say(pdf(menu, "¿horario?", name="carta.pdf")) != ["Abrimos de 9 a 14."]
    assert answer.startswith("texto:") and "Carta de temporada" in answer
    assert "Abrimos de 9 a 14." not in fake.chat_requests[0]["messages"][0]["content"]


async def test_a_long_pdf_is_read_in_part_and_the_model_told_so(harness, fake: FakeOpenAI) -> None:
    pages = [[f"Página {n}: precio del artículo {n}, {n},00 EUR"] for n in range(1, MAX_PAGES + 6)]
    async with harness(**ai(fake)) as h:
        await h.say(pdf(text_pdf(*pages), "¿qué precio tiene el artículo 33?", name="catalogo.pdf"))
    text = asked(fake)
    assert f"Página {MAX_PAGES}:" in text and f"Página {MAX_PAGES + 1}:" not in text
    assert reply("pdf_cut_note", "es") in text


async def test_a_pdf_of_exactly_the_pages_read_is_not_called_cut(harness, fake: FakeOpenAI) -> None:
    pages = [[f"Página {n}", "Condiciones generales de venta y envío"] for n in range(1, MAX_PAGES + 1)]
    async with harness(**ai(fake)) as h:
        await h.say(pdf(text_pdf(*pages)))
    assert f"Página {MAX_PAGES}" in asked(fake) and reply("pdf_cut_note", "es") not in asked(fake)


async def test_a_pdf_of_much_text_is_cut_at_a_line_end() -> None:
    line = "Cláusula: el cliente acepta las condiciones generales de venta y envío."
    many = text_pdf(*[[f"{n} {line}"] * 40 for n in range(10)])
    read = await PdfReader(enabled=True).read(many)
    assert read.cut and MAX_CHARS // 2 < len(read.text) <= MAX_CHARS
    assert read.text.endswith(line)  # a whole line, not half a word


async def test_a_password_protected_pdf_gets_a_reply_that_says_so(harness, fake: FakeOpenAI) -> None:
    """Bank statements are often protected with the customer's ID number: "send it again" would not help."""
    async with harness(**ai(fake)) as h:
        sent = await h.say(pdf(protected_pdf(RECEIPT), id="D1"))
        counters = h.bot.pipeline.counters
        [row] = [m for m in await h.bot.store.recent_messages(CHAT, 5) if m.direction is Direction.IN]
    assert sent == [reply("pdf_protected_photos", "es")]  # a screenshot would be read
    assert fake.chat_count == 0 and counters.documents_unread == 1
    assert row.status is MessageStatus.ANSWERED


@pytest.mark.parametrize(
    "data",
    [RECEIPT[: len(RECEIPT) // 3], b"%PDF-1.4\n" + bytes(range(256)) * 40, b"PK\x03\x04 not a pdf at all"],
    ids=["truncated", "garbage", "a zip named .pdf"],
)
async def test_a_corrupt_pdf_alone_is_asked_for_again(harness, fake: FakeOpenAI, data: bytes) -> None:
    async with harness(**ai(fake)) as h:
        assert await h.say(pdf(data)) == [reply("pdf_unreadable", "es")]
    assert fake.chat_count == 0


@pytest.mark.parametrize(
    ("data", "why"),
    [(b"%PDF-1.4 broken", "pdf_unreadable"), (protected_pdf(RECEIPT), "pdf_protected_photos")],
    ids=["corrupt", "password-protected"],
)
async def test_a_pdf_not_read_with_words_gets_the_words_answered_and_the_reason_told(
    harness, fake: FakeOpenAI, data: bytes, why: str
) -> None:
    """ "Os mando el justificante" under a protected PDF: the model was told only "a file you cannot see came"
    and answered "¡recibido!". It is told what the PDF alone would have got, for the customer to hear."""
    async with harness(**ai(fake)) as h:
        [answer] = await h.say(pdf(data, "te paso la factura, ¿la veis bien?"))
    note = reply("pdf_unread_note", "es", why=reply(why, "es"))
    assert answer == f"texto: te paso la factura, ¿la veis bien?\n\n{note}"


async def test_a_pdf_over_the_limit_is_refused_before_downloading(
    harness, fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    big = MediaRef("application/pdf", size_bytes=30 * 1024 * 1024, file_name="catalogo.pdf", handle=b"x")
    async with harness(**ai(fake), pdf_max_mb=20) as h:
        downloads = count_downloads(h, monkeypatch)
        sent = await h.say(inbound("", kind=MessageKind.DOCUMENT, media=big))
    assert sent == [reply("pdf_too_large_photos", "es", limit=20)] and "20 MB" in sent[0]
    assert downloads == [] and fake.chat_count == 0


async def test_a_scanned_pdf_is_shown_to_the_model_as_photos(harness, fake: FakeOpenAI) -> None:
    """A receipt scanned with a phone app is images in a PDF: no text to read, but the model reads images."""
    async with harness(**ai(fake)) as h:
        [answer] = await h.say(pdf(scanned_pdf(pages=3), "¿está bien?", name="escaneo.pdf"))
        counters = h.bot.pipeline.counters
    pages = shown_photos(fake.chat_requests[-1])
    assert len(pages) == 2  # MAX_SCANNED_PAGES of the 3
    assert all(page.format == "JPEG" and page.height == 1536 for page in pages)
    assert answer.startswith("2 foto(s): (El cliente envía el PDF «escaneo.pdf», escaneado")
    assert answer.endswith("¿está bien?")
    assert (counters.documents, counters.documents_unread) == (1, 0)


async def test_a_scanned_pdf_without_photos_asks_for_a_photo_or_words(harness, fake: FakeOpenAI) -> None:
    async with harness(**ai(fake), openai_vision=False) as h:
        assert await h.say(pdf(scanned_pdf())) == [reply("pdf_no_text", "es")]
    assert fake.chat_count == 0


async def test_a_scan_refused_by_a_model_that_reads_no_images(harness, fake: FakeOpenAI) -> None:
    """gpt-3.5 refuses image parts: the customer is asked to write, not told "I can only read ... PDFs"."""
    refusal = {"message": "Invalid content type. image_url is only supported by certain models."}
    fake.raw_next.append((400, "application/json", json.dumps({"error": refusal})))
    async with harness(**ai(fake)) as h:
        assert await h.say(pdf(scanned_pdf())) == [reply("pdf_no_text", "es")]


async def test_other_documents_get_the_polite_reply_naming_pdfs(harness, fake: FakeOpenAI) -> None:
    sheet = MediaRef(mimetype="application/vnd.ms-excel", size_bytes=10, file_name="precios.xls", handle=b"x")
    async with harness(**ai(fake)) as h:
        sent = await h.say(inbound("", kind=MessageKind.DOCUMENT, media=sheet))
    assert sent == [reply("media_unsupported_photos_pdf", "es")]
    assert "PDF" in sent[0]


async def test_with_pdfs_off_a_pdf_gets_the_reply_of_before(harness, fake: FakeOpenAI) -> None:
    async with harness(**ai(fake), read_pdfs=False) as h:
        assert await h.say(pdf(RECEIPT)) == [reply("media_unsupported_photos", "es")]
        [answer] = await h.say(pdf(RECEIPT, "¿os ha llegado?"))
    assert answer == f"texto: ¿os ha llegado?\n\n{reply('attachment_note', 'es')}"


async def test_a_pdf_named_but_not_typed_is_read() -> None:
    """Some phones send application/octet-stream: the name tells."""
    assert is_pdf("application/octet-stream", "Factura.PDF") and is_pdf("application/pdf; charset=binary")
    assert not is_pdf("application/octet-stream", "precios.xlsx") and not is_pdf("image/png", "x.pdf")


async def test_two_pdfs_at_once_are_read_together(harness, fake: FakeOpenAI) -> None:
    other = text_pdf(["Presupuesto 77", "Reparación de calzado", "Total: 120,00 EUR"])
    async with harness(**ai(fake)) as h:
        h.bot.pipeline.gather_s = 0.3  # as WA_GATHER_S sets it on WhatsApp
        sent = await h.say(pdf(RECEIPT, id="D1"), pdf(other, name="presupuesto.pdf", id="D2"))
    assert len(sent) == 1
    text = asked(fake)
    assert text.index("Importe: 45,00") < text.index("Presupuesto 77")  # in the order sent


async def test_a_pdf_that_cannot_be_downloaded_is_asked_for_again(harness, fake: FakeOpenAI) -> None:
    gone = MediaRef("application/pdf", size_bytes=100, file_name="f.pdf", handle="/nonexistent/f.pdf")
    async with harness(**ai(fake)) as h:
        sent = await h.say(inbound("", kind=MessageKind.DOCUMENT, media=gone))
    assert sent == [reply("pdf_unreadable", "es")]


async def test_a_pdf_waits_for_memory_like_a_photo(harness, fake: FakeOpenAI) -> None:
    """While memory is critical nothing is downloaded or read: pdftotext would take memory too."""
    async with harness(**ai(fake)) as h:
        h.bot.pipeline.model_gate.clear()
        h.bot.pipeline.submit(pdf(RECEIPT))
        await asyncio.sleep(0.3)
        assert h.transport.sent == [] and h.bot.pipeline.counters.documents == 0
        h.bot.pipeline.model_gate.set()
        assert await h.bot.pipeline.drain(10)
        assert len(h.transport.sent) == 1 and h.bot.pipeline.counters.documents == 1


def test_the_console_reads_a_document_line(tmp_path: Path) -> None:
    path = tmp_path / "factura.pdf"
    path.write_bytes(RECEIPT)
    message = parse_jsonl(json.dumps({"from": "34600111222", "document": str(path), "text": "¿bien?"}))
    assert (message.kind, message.text) == (MessageKind.DOCUMENT, "¿bien?")
    assert message.media is not None and message.media.file_name == "factura.pdf"
    assert message.media.mimetype == "application/pdf" and message.media.size_bytes == len(RECEIPT)


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("foto.jpg", MessageKind.IMAGE),
        ("video.mp4", MessageKind.VIDEO),
        ("precios.xlsx", MessageKind.DOCUMENT),
    ],
)
def test_the_console_reads_a_photo_or_video_sent_as_a_document_as_whatsapp_does(
    tmp_path: Path, name: str, kind: MessageKind
) -> None:
    """ "I can only read ... photos, videos" to a photo: the console disagreed with WhatsApp's adapter."""
    path = tmp_path / name
    path.write_bytes(b"x")
    assert parse_jsonl(json.dumps({"from": "34600111222", "document": str(path)})).kind is kind


async def test_a_pdf_through_python_m_bot_chat(tmp_path: Path, fake_openai: FakeOpenAI) -> None:
    fake_openai.reply = describes
    path = tmp_path / "factura.pdf"
    path.write_bytes(RECEIPT)
    line = json.dumps({"from": "34600111222", "document": str(path), "text": "¿os ha llegado?"})
    env = {"OPENAI_API_KEY": "test-key", "OPENAI_BASE_URL": fake_openai.base_url}
    code, out, err = await run_chat(tmp_path, line + "\n", "--jsonl", **env)
    assert code == 0, err
    [sent] = lines(out)
    assert "Importe: 45,00 EUR" in sent["text"] and sent["text"].endswith("¿os ha llegado?")


async def test_a_program_that_leaves_its_input_unread_is_no_error() -> None:
    """pdftotext stops reading a file that is not a PDF: its exit code tells, not a broken pipe here."""
    result = await run(["sh", "-c", "exit 3"], timeout_s=10, stdin_data=b"x" * (4 * 1024 * 1024))
    assert result.returncode == 3


async def test_without_pdftotext_pdfs_are_not_read(tmp_path: Path) -> None:
    reader = PdfReader(enabled=True, pdftotext=str(tmp_path / "no-such-pdftotext"))
    assert not reader.enabled and reader.missing_tool
    with pytest.raises(DocumentRejected):
        await reader.read(RECEIPT)


@pytest.mark.skipif(shutil.which("prlimit") is None, reason="no prlimit on this system")
async def test_pdftotext_runs_capped_in_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """A crafted PDF must not take the bot's container past its memory: pdftotext's address space is
    capped."""
    monkeypatch.setattr("media.document.ADDRESS_SPACE_BYTES", 4 * 1024 * 1024)  # too small to even start
    with pytest.raises(DocumentRejected):
        await PdfReader(enabled=True).read(RECEIPT)


# -- how PDFs meet the rest of a turn (from the review of the first version) ----------------------------

REFUSAL = json.dumps(
    {"error": {"message": "Invalid content type. image_url is only supported by certain models."}}
)


def watermarked_scan() -> bytes:
    """A scanned page (an image) with the one line of text scanner apps stamp on it."""
    from pypdf import PdfReader as PyPdfReader
    from pypdf import PdfWriter

    writer = PdfWriter(clone_from=PyPdfReader(io.BytesIO(scanned_pdf())))
    writer.pages[0].merge_page(PyPdfReader(io.BytesIO(text_pdf(["Escaneado con CamScanner"]))).pages[0])
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


async def test_a_scan_stamped_by_a_scanner_app_is_still_shown_as_a_scan(harness, fake: FakeOpenAI) -> None:
    """CamScanner stamps "Escaneado con CamScanner" on each page: that line was all the model got."""
    async with harness(**ai(fake)) as h:
        [answer] = await h.say(pdf(watermarked_scan(), "¿os ha llegado el pago?", name="escaneo.pdf"))
    assert len(shown_photos(fake.chat_requests[-1])) == 1
    assert answer.startswith("1 foto(s): (El cliente envía el PDF «escaneo.pdf», escaneado")


async def test_a_pdf_recovered_after_a_restart_is_asked_for_again(harness, fake: FakeOpenAI) -> None:
    """Its download handle, name and type are gone: it was told "I can read PDFs... could you type it?"."""
    async with harness(**ai(fake)) as h:
        row = StoredMessage("D9", CHAT, Direction.IN, "document", "", MessageStatus.RECEIVED, time.time())
        await h.bot.store.add_message(row)
    async with BotHarness(h.settings) as again:
        await again.bot.recover()
        assert await again.bot.pipeline.drain(10)
        sent = again.transport.texts_to(CHAT)
        unread = again.bot.pipeline.counters.documents_unread
    assert sent == [reply("document_unreadable", "es")] and unread == 1


async def test_a_spilled_pdf_comes_back_readable_with_its_name(harness, fake: FakeOpenAI) -> None:
    """Held in the store while memory was critical, it keeps its download handle and name (up to 1,000)."""
    async with harness(**ai(fake)) as h:
        h.bot.pipeline.model_gate.clear()
        h.bot.pipeline.submit(pdf(RECEIPT, "¿os ha llegado?", name="pago.pdf", id="D1"))
        await asyncio.sleep(0.2)
        assert h.bot.pipeline.counters.spilled == 1
        h.bot.pipeline.open_model_gate()
        assert await h.bot.pipeline.drain(10)
    assert "«pago.pdf»" in asked(fake) and "Importe: 45,00 EUR" in asked(fake)


async def test_a_corrupt_pdf_and_an_unreadable_photo_get_a_reply_not_a_blind_answer(
    harness, fake: FakeOpenAI
) -> None:
    """The model got two copies of "a file you cannot see came" and nothing else, and made up an answer."""
    async with harness(**ai(fake)) as h:
        h.bot.pipeline.gather_s = 0.3
        sent = await h.say(pdf(b"%PDF-1.4 broken", id="D1"), photo(b"junk", id="P1"))
    assert fake.chat_count == 0
    assert sent in ([reply("pdf_unreadable", "es")], [reply("photo_unreadable", "es")])


async def test_a_corrupt_pdf_with_a_photo_shown_tells_the_model_once(harness, fake: FakeOpenAI) -> None:
    async with harness(**ai(fake)) as h:
        h.bot.pipeline.gather_s = 0.3
        [answer] = await h.say(pdf(b"%PDF-1.4 broken", id="D1"), photo(jpeg(), id="P1"))
    assert answer == f"1 foto(s): {reply('pdf_unread_note', 'es', why=reply('pdf_unreadable', 'es'))}"


async def test_a_refused_scan_with_words_tells_the_model_a_file_came(harness, fake: FakeOpenAI) -> None:
    """ "¿os ha llegado el pago?" under a scanned receipt, on a text-only model, was answered blind."""
    fake.raw_next.append((400, "application/json", REFUSAL))
    async with harness(**ai(fake)) as h:
        await h.say(pdf(scanned_pdf(), "¿os ha llegado el pago?", name="escaneo.pdf"))
        counters = h.bot.pipeline.counters
    assert fake.chat_count == 2
    assert asked(fake) == f"¿os ha llegado el pago?\n\n{reply('attachment_note', 'es')}"
    assert (counters.documents, counters.documents_unread, counters.photos_unseen) == (0, 1, 0)


async def test_a_refused_scan_and_photo_are_asked_to_write(harness, fake: FakeOpenAI) -> None:
    """They were told "I can only read text, PDFs and voice notes" for a PDF."""
    fake.raw_next.append((400, "application/json", REFUSAL))
    async with harness(**ai(fake)) as h:
        h.bot.pipeline.gather_s = 0.3
        sent = await h.say(pdf(scanned_pdf(), name="escaneo.pdf", id="D1"), photo(jpeg(), id="P1"))
    assert sent == [reply("pdf_no_text", "es")]


async def test_a_scan_shown_counts_as_a_document_not_as_photos(harness, fake: FakeOpenAI) -> None:
    async with harness(**ai(fake)) as h:
        await h.say(pdf(scanned_pdf(pages=2)))
        counters = h.bot.pipeline.counters
    assert (counters.documents, counters.documents_unread, counters.photos) == (1, 0, 0)


async def test_a_scan_replying_to_a_photo_does_not_show_that_photo(harness, fake: FakeOpenAI) -> None:
    """ "esta foto" with a scan's pages and the quoted photo: the model could not tell which one."""
    media = MediaRef(mimetype="application/pdf", size_bytes=1, file_name="escaneo.pdf", handle=scanned_pdf())
    message = inbound(
        "¿es este?", kind=MessageKind.DOCUMENT, media=media, quoted_from="bot",
        quoted_kind=MessageKind.IMAGE, quoted_media=MediaRef("image/jpeg", 10, handle=jpeg()),
    )  # fmt: skip
    async with harness(**ai(fake)) as h:
        await h.say(message)
    assert len(shown_photos(fake.chat_requests[-1])) == 1 and "esta foto" not in asked(fake)


async def test_a_text_pdf_replying_to_a_photo_shows_that_photo(harness, fake: FakeOpenAI) -> None:
    media = MediaRef(mimetype="application/pdf", size_bytes=1, file_name="p.pdf", handle=RECEIPT)
    message = inbound(
        "¿es este?", kind=MessageKind.DOCUMENT, media=media, quoted_from="bot",
        quoted_kind=MessageKind.IMAGE, quoted_media=MediaRef("image/jpeg", 10, handle=jpeg()),
    )  # fmt: skip
    async with harness(**ai(fake)) as h:
        [answer] = await h.say(message)
    assert answer.startswith("1 foto(s): (El cliente envía el PDF «p.pdf»") and "esta foto" in answer


async def test_a_turn_shows_the_model_at_most_max_burst_photos_images(harness, fake: FakeOpenAI) -> None:
    """5 photos and 3 two-page scans were 11 images in one request, twice the cost the cap allows."""
    async with harness(**ai(fake)) as h:
        h.bot.pipeline.gather_s = 0.3
        messages = [photo(jpeg(), id=f"P{n}") for n in range(4)]
        messages += [pdf(scanned_pdf(pages=2), id=f"S{n}", name=f"s{n}.pdf") for n in range(3)]
        await h.say(*messages)
    assert max(len(shown_photos(r)) for r in fake.chat_requests) <= MAX_BURST_PHOTOS


async def test_a_pdf_in_english(harness, fake: FakeOpenAI) -> None:
    async with harness(**ai(fake), bot_language="en") as h:
        await h.say(pdf(RECEIPT, "did you get it?", name=""))
        assert await h.say(pdf(b"broken")) == [reply("pdf_unreadable", "en")]
    assert asked(fake, 0).startswith("(The customer sends the PDF “document.pdf”; this is its text:)")


async def test_a_scan_and_a_text_pdf_refused_are_answered_from_the_text(harness, fake: FakeOpenAI) -> None:
    fake.raw_next.append((400, "application/json", REFUSAL))
    async with harness(**ai(fake)) as h:
        h.bot.pipeline.gather_s = 0.3
        [answer] = await h.say(pdf(scanned_pdf(), id="D1", name="s.pdf"), pdf(RECEIPT, id="D2"))
    assert "Importe" in answer and "escaneado" not in answer


async def test_without_photos_a_customer_is_not_asked_for_a_screenshot(harness, fake: FakeOpenAI) -> None:
    """The screenshot would get "I can only read text, PDFs and voice notes"."""
    async with harness(**ai(fake), openai_vision=False) as h:
        sent = await h.say(pdf(protected_pdf(RECEIPT)))
    assert sent == [reply("pdf_protected", "es")] and "captura" not in sent[0]
