"""PDFs customers send (a payment receipt, an invoice, a quote, a list), read as text for the model.

The pipeline uses one PdfReader:

    reader.check_declared_size(size)        # before downloading, when WhatsApp says the size
    pdf = await reader.read(data)           # PdfText: its text, the pages read, whether it was cut
    # DocumentRejected: e.reason ("too_large", "protected", "no_text", "unreadable"); str(e) is log-safe

Why pdftotext (poppler-utils) in a subprocess and not a Python PDF library in the bot's process: a crafted or
broken PDF can make a parser loop or allocate without end, and a thread cannot be stopped. A subprocess is
killed at its timeout, capped in address space (`prlimit`, where the system has it) and takes the bot's
memory with it when it exits. It reads the PDF from its stdin: no temporary file. About 10 MB and 20 ms for
a receipt.
"""

from __future__ import annotations

import asyncio
import re
import shutil
from dataclasses import dataclass
from typing import Literal

from media.proc import ProcOutputTooLarge, ProcTimeout, last_error_line, run
from media.settings import MB

# A quote or a menu is a few pages; a 200-page catalogue is not read whole, and its first pages are what a
# question is about most often.
MAX_PAGES = 30
# About 3,000 tokens: $0.0005 a PDF on gpt-4o-mini, and room left for the conversation.
MAX_CHARS = 12_000
# Fewer visible characters a page than this and a PDF reads as a scan: "Escaneado con CamScanner" is 22, a
# receipt a few hundred.
SPARSE_CHARS_PER_PAGE = 30
MAX_READS_AT_ONCE = 2
READ_TIMEOUT_S = 20.0
PAGE_SIDE = 1536  # a scanned page's longer side as drawn for the model (media.image.MAX_SIDE)
ADDRESS_SPACE_BYTES = 512 * MB  # pdftotext reading a receipt maps about 10 MB
_STDOUT_LIMIT = 8 * MB  # 30 pages of text are a few hundred KB; more is a crafted file

DocumentReason = Literal["too_large", "protected", "no_text", "unreadable"]
PDF_MIMETYPES = frozenset({"application/pdf", "application/x-pdf"})

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
    """A PDF by its mimetype, or by its name when the phone did not say (application/octet-stream)."""
    kind = mimetype.split(";", 1)[0].strip().lower()
    unnamed = kind in ("", "application/octet-stream")
    return kind in PDF_MIMETYPES or (unnamed and file_name.lower().endswith(".pdf"))


class PdfReader:
    """Reads PDFs' text with pdftotext. `enabled` is False when no model would read it, or pdftotext is not
    installed (`missing_tool` says so)."""

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
        self._limit_prefix = (
            ["prlimit", f"--as={ADDRESS_SPACE_BYTES}", "--"] if shutil.which("prlimit") else []
        )
        self._reading = asyncio.Semaphore(MAX_READS_AT_ONCE)

    @property
    def max_bytes(self) -> int:
        return int(self.max_mb * MB)

    def check_declared_size(self, size_bytes: int | None) -> None:
        if size_bytes is not None and size_bytes > self.max_bytes:
            raise DocumentRejected("too_large", f"{size_bytes} bytes declared, limit {self.max_bytes}")

    async def page_images(self, data: bytes, pages: int) -> list[bytes]:
        """The first `pages` pages as JPEGs fitting PAGE_SIDE (a scan the model is shown as photos); fewer
        when the PDF has fewer. DocumentRejected when not even the first can be drawn."""
        if self.pdftoppm is None:
            raise DocumentRejected("unreadable", "pdftoppm is not installed")
        images: list[bytes] = []
        for page in range(1, pages + 1):
            argv = [self.pdftoppm, "-jpeg", "-scale-to", str(PAGE_SIDE), "-f", str(page), "-l", str(page)]
            try:
                async with self._reading:
                    result = await run(
                        [*self._limit_prefix, *argv, "-singlefile", "-"],
                        timeout_s=READ_TIMEOUT_S,
                        stdout_limit=_STDOUT_LIMIT,
                        stdin_data=data,
                    )
            except (ProcTimeout, ProcOutputTooLarge) as error:
                if images:
                    break
                raise DocumentRejected("unreadable", str(error)) from None
            if result.returncode != 0 or not result.stdout:
                if images:  # past the last page
                    break
                raise DocumentRejected("unreadable", last_error_line(result.stderr) or "no image")
            images.append(result.stdout)
        return images

    async def read(self, data: bytes) -> PdfText:
        """The PDF's text, at most MAX_PAGES pages and MAX_CHARS characters."""
        if len(data) > self.max_bytes:
            raise DocumentRejected("too_large", f"{len(data)} bytes, limit {self.max_bytes}")
        if self.pdftotext is None:
            raise DocumentRejected("unreadable", "pdftotext is not installed")
        # One page more than is read: a PDF of exactly MAX_PAGES pages is not called cut.
        argv = [self.pdftotext, "-enc", "UTF-8", "-eol", "unix", "-l", str(MAX_PAGES + 1), "-", "-"]
        try:
            async with self._reading:
                result = await run(
                    [*self._limit_prefix, *argv],
                    timeout_s=READ_TIMEOUT_S,
                    stdout_limit=_STDOUT_LIMIT,
                    stdin_data=data,
                )
        except ProcTimeout:
            raise DocumentRejected("unreadable", f"pdftotext ran over {READ_TIMEOUT_S:g}s") from None
        except ProcOutputTooLarge:
            raise DocumentRejected("unreadable", f"over {_STDOUT_LIMIT} bytes of text") from None
        if result.returncode != 0:
            error = last_error_line(result.stderr) or f"exit code {result.returncode}"
            if "password" in result.stderr.lower():
                raise DocumentRejected("protected", error)
            raise DocumentRejected("unreadable", error)
        return _tidy(result.stdout.decode("utf-8", "replace"))


def _tidy(raw: str) -> PdfText:
    """pdftotext's output as the model reads it: pages apart by a blank line, no runs of blank lines, cut
    at MAX_PAGES and MAX_CHARS (at a line's end where there is one)."""
    pages = raw.split("\f")
    if pages and not pages[-1].strip():
        pages.pop()  # every page ends with a form feed: the last split is what follows it
    cut = len(pages) > MAX_PAGES
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
