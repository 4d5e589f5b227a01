"""PDFs made to hurt the reader: pdftotext and pdftoppm as they really run (capped by prlimit, one at a time,
one deadline a PDF), watched from outside."""

from __future__ import annotations

import asyncio
import contextlib
import io
import shutil
import time

import psutil
import pytest
from PIL import Image, ImageDraw

from media.document import ADDRESS_SPACE_BYTES, DocumentRejected, PdfReader, is_pdf
from tests.pdfs import jpeg_page_pdf, slow_scan_pdf, text_pdf, words_bomb_pdf

needs_prlimit = pytest.mark.skipif(shutil.which("prlimit") is None, reason="no prlimit on this system")


@needs_prlimit
async def test_two_crafted_pdfs_at_once_stay_under_the_cap_together() -> None:
    """A 1 MB PDF with 300 MB of words on a page takes pdftotext to its cap: two read at once used nearly
    1 GB together, twice a 512 MB plan, unseen by the memory manager (it watches the bot's own RSS)."""
    data = words_bomb_pdf()
    assert len(data) < 1024 * 1024
    reader = PdfReader(enabled=True)
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            total = 0
            for child in psutil.Process().children(recursive=True):  # the suite's databases too: not those
                with contextlib.suppress(psutil.Error):
                    if child.name() in ("pdftotext", "prlimit", "choom"):
                        total += child.memory_info().rss
            peak = max(peak, total)
            await asyncio.sleep(0.02)

    watcher = asyncio.create_task(watch())
    outcomes = await asyncio.gather(reader.read(data), reader.read(data), return_exceptions=True)
    watcher.cancel()
    assert all(isinstance(outcome, DocumentRejected) for outcome in outcomes), outcomes
    assert peak <= ADDRESS_SPACE_BYTES, f"the readers peaked at {peak / 2**20:.0f} MB together"


async def test_a_pdf_is_read_within_one_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    """The timeout bounded each subprocess, not the PDF: the text just under it, then each of its scanned
    pages just under it (48 s for one 6.6 MB PDF at 20 s), while every other chat's PDF waited."""
    monkeypatch.setattr("media.document.READ_TIMEOUT_S", 2.0)
    data = slow_scan_pdf(20_000, 300)  # about 1.6 s of text and 3.4 s of pages here
    started = time.monotonic()
    try:
        await PdfReader(enabled=True).read(data, scan_pages=2)
    except DocumentRejected as error:
        assert "prlimit" not in str(error) and "choom" not in str(error)  # the tool that ran over is named
    assert time.monotonic() - started < 2.0 * 1.5


@needs_prlimit
async def test_a_scan_too_large_to_draw_under_the_cap_is_not_shown_blank() -> None:
    """pdftoppm short of memory under its cap draws a white page and exits 0: the model was shown a blank
    page for a 1200-dpi progressive scan."""
    width, height = 6000, 8000
    image = Image.new("RGB", (width, height), "white")
    ImageDraw.Draw(image).rectangle((500, 500, width - 500, height - 500), fill="black")
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90, progressive=True, subsampling=0)
    del image
    try:
        pages = await PdfReader(enabled=True).read(jpeg_page_pdf(out.getvalue(), width, height), scan_pages=1)
    except DocumentRejected as error:
        assert error.reason == "no_text"  # the customer is asked to send a photo, or write
        return
    assert isinstance(pages, list)
    for page in pages:
        assert Image.open(io.BytesIO(page)).convert("L").getextrema()[0] < 128, "a blank page"


async def test_a_scan_is_drawn_for_the_model() -> None:
    page = Image.new("RGB", (1240, 1754), "white")
    ImageDraw.Draw(page).rectangle((100, 100, 1100, 400), fill="black")
    out = io.BytesIO()
    page.save(out, "JPEG")
    [drawn] = await PdfReader(enabled=True).read(jpeg_page_pdf(out.getvalue(), 1240, 1754), scan_pages=2)
    image = Image.open(io.BytesIO(drawn))
    assert image.format == "JPEG" and max(image.size) == 1536 and image.convert("L").getextrema() == (0, 255)


async def test_a_blank_last_page_does_not_make_a_pdf_cut() -> None:
    """Word leaves a blank page at the end: the model was told it had only the beginning."""
    pages = [[f"Cláusula {n}: condiciones generales de venta"] for n in range(1, 31)]
    read = await PdfReader(enabled=True).read(text_pdf(*pages, []))
    assert (read.pages, read.cut) == (30, False)


@pytest.mark.parametrize(
    "mimetype",
    ["application/x-download", "application/force-download", "binary/octet-stream", "application/binary"],
)
def test_a_pdf_named_so_under_a_download_type_is_a_pdf(mimetype: str) -> None:
    """Android shares a downloaded file with the type its server sent: a bank's receipt, "comprobante.pdf"."""
    assert is_pdf(mimetype, "comprobante.pdf")
    assert not is_pdf(mimetype, "comprobante.docx")
