"""PDFs customers send (a payment receipt, an invoice, a quote, a list), read as text for the model.

The pipeline uses one PdfReader:

    reader.check_declared_size(size)        # before downloading, when WhatsApp says the size
    pdf = await reader.read(data, scan_pages=2)
    # PdfText: its text, the pages read, whether it was cut; or a scan's first pages as JPEGs
    # DocumentRejected: e.reason ("too_large", "protected", "no_text", "unreadable"); str(e) is log-safe

Why pdftotext (poppler-utils) in a subprocess and not a Python PDF library in the bot's process: a crafted or
broken PDF can make a parser loop or allocate without end, and a thread cannot be stopped. A subprocess is
killed at its timeout, capped in address space (`prlimit`), first in line for the kernel's OOM killer
(`choom`), and gives its memory back when it exits. It reads the PDF from its stdin: no temporary file.
About 10 MB and 10 ms for a receipt (bench.pdfs).
"""

from __future__ import annotations

import asyncio
import io
import re
import shutil
from dataclasses import dataclass
from typing import Literal, cast

from media.proc import ProcOutputTooLarge, ProcResult, ProcTimeout, capped, last_error_line, run
from media.settings import MB

# A quote or a menu is a few pages; a 200-page catalogue is not read whole, and its first pages are what a
# question is about most often.
MAX_PAGES = 30
# About 3,000 tokens: $0.0005 a PDF on gpt-4o-mini, and room left for the conversation.
MAX_CHARS = 12_000
# Fewer visible characters a page than this and a PDF reads as a scan: "Escaneado con CamScanner" is 22, a
# receipt a few hundred.
SPARSE_CHARS_PER_PAGE = 30
# One at a time, under a cap of ADDRESS_SPACE_BYTES: a crafted PDF can take pdftotext to its cap (a page of
# 300 MB of words), and two at once could not both fit beside the bot on a 512 MB plan.
MAX_READS_AT_ONCE = 1
READ_TIMEOUT_S = 20.0
PAGE_SIDE = 1536  # a scanned page's longer side as drawn for the model (media.image.MAX_SIDE)
ADDRESS_SPACE_BYTES = 256 * MB  # pdftotext reading a receipt maps about 10 MB, a 40 MB PDF of photos 74
_STDOUT_LIMIT = 8 * MB  # 30 pages of text are a few hundred KB; more is a crafted file

DocumentReason = Literal["too_large", "protected", "no_text", "unreadable"]
PDF_MIMETYPES = frozenset({"application/pdf", "application/x-pdf", "application/acrobat", "text/pdf"})
# Sent as it was downloaded ("application/x-download", "binary/octet-stream"...): a ".pdf" name tells, unless
# the type says it is something else a customer sends.
_NOT_PDF = (
    "image/",
    "audio/",
    "video/",
    "text/plain",
    "application/vnd.",
    "application/msword",
    "application/zip",
)

_BLANK_LINES = re.compile(r"\n[ \t]*(?:\n[ \t]*){2,}")
_TRAILING_SPACE = re.compile(r"[ \t]+\n")
# Control characters pdftotext passes through from a PDF's text (not tabs or newlines).
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


class DocumentRejected(Exception):
    """A PDF whose text the model is not given; `str(e)` is log-safe (sizes and pdftotext's error, never
    content)."""

    def __init__(self, reason: DocumentReason, detail: str) -> None:
        self.reason: DocumentReason = reason
        super().__init__(f"{reason}: {detail}")


@dataclass(frozen=True, slots=True)
class PdfText:
    text: str
    pages: int  # the pages read (at most MAX_PAGES)
    cut: bool  # more pages or more text than was read

    @property
    def sparse(self) -> bool:
        """Hardly any text for its pages: a scan with a scanner app's stamp ("Escaneado con CamScanner") or a
        page number, whose pages say more than its text."""
        return len("".join(self.text.split())) < SPARSE_CHARS_PER_PAGE * self.pages


def is_pdf(mimetype: str, file_name: str = "") -> bool:
    """A PDF by its mimetype, or by its name when the type is a download's (application/octet-stream)."""
    kind = mimetype.split(";", 1)[0].strip().lower()
    return kind in PDF_MIMETYPES or (file_name.lower().endswith(".pdf") and not kind.startswith(_NOT_PDF))


class PdfReader:
    """Reads PDFs' text with pdftotext, and draws a scan's pages with pdftoppm. `enabled` is False when no
    model would read it, or pdftotext is not installed (`missing_tool` says so)."""

    def __init__(
        self,
        *,
        max_mb: float = 10.0,
        enabled: bool,
        pdftotext: str = "pdftotext",
        pdftoppm: str = "pdftoppm",
    ) -> None:
        self.max_mb = max_mb
        self.pdftotext = shutil.which(pdftotext)
        self.pdftoppm = shutil.which(pdftoppm)  # the same package as pdftotext (poppler-utils)
        self.missing_tool = enabled and self.pdftotext is None
        self.enabled = enabled and self.pdftotext is not None
        self._prefix = capped(ADDRESS_SPACE_BYTES)
        self._reading = asyncio.Semaphore(MAX_READS_AT_ONCE)

    @property
    def max_bytes(self) -> int:
        return int(self.max_mb * MB)

    def check_declared_size(self, size_bytes: int | None) -> None:
        if size_bytes is not None and size_bytes > self.max_bytes:
            raise DocumentRejected("too_large", f"{size_bytes} bytes declared, limit {self.max_bytes}")

    async def read(self, data: bytes, scan_pages: int = 0) -> PdfText | list[bytes]:
        """The PDF's text, at most MAX_PAGES pages and MAX_CHARS characters; or, for a scan (no text, or
        hardly any: see PdfText.sparse), its first `scan_pages` pages as JPEGs fitting PAGE_SIDE, when asked
        for. Text and pages within one READ_TIMEOUT_S, one PDF at a time."""
        if len(data) > self.max_bytes:
            raise DocumentRejected("too_large", f"{len(data)} bytes, limit {self.max_bytes}")
        if self.pdftotext is None:
            raise DocumentRejected("unreadable", "pdftotext is not installed")
        async with self._reading:
            deadline = asyncio.get_running_loop().time() + READ_TIMEOUT_S
            try:
                text: PdfText | None = await self._text(data, deadline)
            except DocumentRejected as error:
                if error.reason != "no_text" or scan_pages < 1:
                    raise
                text = None
            if text is not None and (not text.sparse or scan_pages < 1):
                return text
            pages = await self._draw(data, scan_pages, deadline)
            if pages:
                return pages
            if text is not None:  # a little text and no page to show: the little text it is
                return text
            raise DocumentRejected("no_text", "no text, and no page could be drawn")

    async def _text(self, data: bytes, deadline: float) -> PdfText:
        assert self.pdftotext is not None  # read() checked
        # One page more than is read: a PDF of exactly MAX_PAGES pages is not called cut.
        argv = [self.pdftotext, "-enc", "UTF-8", "-eol", "unix", "-l", str(MAX_PAGES + 1), "-", "-"]
        result = await self._run(argv, data, deadline)
        if result.returncode != 0:
            error = last_error_line(result.stderr) or f"exit code {result.returncode}"
            if "password" in result.stderr.lower():
                raise DocumentRejected("protected", error)
            raise DocumentRejected("unreadable", error)
        return _tidy(result.stdout.decode("utf-8", "replace"))

    async def _draw(self, data: bytes, pages: int, deadline: float) -> list[bytes]:
        """The first `pages` pages that can be drawn, as JPEGs; a page drawn blank (pdftoppm short of memory
        under the cap draws white and says nothing) is none."""
        if self.pdftoppm is None:
            return []
        images: list[bytes] = []
        for page in range(1, pages + 1):
            argv = [self.pdftoppm, "-jpeg", "-scale-to", str(PAGE_SIDE), "-f", str(page), "-l", str(page)]
            try:
                result = await self._run([*argv, "-singlefile", "-"], data, deadline)
            except DocumentRejected:  # out of time: the pages drawn so far
                break
            if result.returncode != 0 or not result.stdout:  # past the last page, or a page it cannot draw
                break
            if not _blank(result.stdout):
                images.append(result.stdout)
        return images

    async def _run(self, argv: list[str], data: bytes, deadline: float) -> ProcResult:
        program = argv[0].rsplit("/", 1)[-1]
        left = deadline - asyncio.get_running_loop().time()
        if left <= 0:
            raise DocumentRejected("unreadable", f"over {READ_TIMEOUT_S:g}s before {program}")
        try:
            return await run(
                [*self._prefix, *argv], timeout_s=left, stdout_limit=_STDOUT_LIMIT, stdin_data=data
            )
        except ProcTimeout:
            raise DocumentRejected("unreadable", f"{program} ran over {READ_TIMEOUT_S:g}s") from None
        except ProcOutputTooLarge:
            raise DocumentRejected("unreadable", f"{program} wrote over {_STDOUT_LIMIT} bytes") from None


def _blank(jpeg: bytes) -> bool:
    """A page of one colour: nothing for the model to see."""
    from PIL import Image  # loaded by neonize anyway

    try:
        with Image.open(io.BytesIO(jpeg)) as image:
            image.draft("L", (image.width // 8, image.height // 8))  # decoded at 1/8: a few KB
            low, high = cast(tuple[int, int], image.convert("L").getextrema())  # one band
    except Exception:  # not a JPEG pdftoppm would write: not shown either
        return True
    return high - low <= 8  # JPEG noise on white


def _tidy(raw: str) -> PdfText:
    """pdftotext's output as the model reads it: pages apart by a blank line, no runs of blank lines, cut
    at MAX_PAGES and MAX_CHARS (at a line's end where there is one)."""
    pages = raw.split("\f")
    if pages and not pages[-1].strip():
        pages.pop()  # every page ends with a form feed: the last split is what follows it
    cut = any(page.strip() for page in pages[MAX_PAGES:])  # a blank last page (Word's) is no more to read
    pages = pages[:MAX_PAGES]
    text = "\n\n".join(_CONTROL.sub("", page).strip() for page in pages)
    text = _BLANK_LINES.sub("\n\n", _TRAILING_SPACE.sub("\n", text)).strip()
    if not text:
        raise DocumentRejected("no_text", f"{len(pages)} pages without text (a scan?)")
    if len(text) > MAX_CHARS:
        cut = True
        text = text[:MAX_CHARS]
        line_end = text.rfind("\n", MAX_CHARS // 2)
        text = text[:line_end] if line_end > 0 else text
    return PdfText(text=text, pages=len(pages), cut=cut)
