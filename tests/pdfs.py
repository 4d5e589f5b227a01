"""Real PDFs for the tests, written here byte by byte: text pages (Helvetica, WinAnsi), a scan (Pillow), a
password-protected one (pypdf), and hostile ones (300 MB of words on a page, images slow to draw)."""

from __future__ import annotations

import io
import zlib

from PIL import Image, ImageDraw


def text_pdf(*pages: list[str]) -> bytes:
    """A PDF with one page per list, each line of text on a line of its own."""
    objects: list[bytes] = []

    def add(body: bytes) -> int:
        objects.append(body)
        return len(objects)

    font = add(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>")
    contents = []
    for lines in pages:
        shown = []
        for line in lines:
            escaped = line.encode("cp1252")
            for special in (b"\\", b"(", b")"):  # the backslash first
                escaped = escaped.replace(special, b"\\" + special)
            shown.append(b"(" + escaped + b") '")
        stream = b"\n".join([b"BT /F1 11 Tf 50 800 Td 13 TL", *shown, b"ET"])
        contents.append(add(b"<< /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream)))
    parent = len(objects) + len(pages) + 1  # the /Pages object, added after the pages
    kids = [
        add(
            b"<< /Type /Page /Parent %d 0 R /MediaBox [0 0 595 842] /Resources << /Font << /F1 %d 0 R >> >> "
            b"/Contents %d 0 R >>" % (parent, font, content)
        )
        for content in contents
    ]
    refs = b" ".join(b"%d 0 R" % kid for kid in kids)
    assert add(b"<< /Type /Pages /Kids [%s] /Count %d >>" % (refs, len(kids))) == parent
    catalog = add(b"<< /Type /Catalog /Pages %d 0 R >>" % parent)
    return build(objects, catalog)


def build(objects: list[bytes], root: int) -> bytes:
    """A PDF of `objects` (numbered from 1) with its cross-reference table; `root` is the catalog's number."""
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    trailer = b"trailer\n<< /Size %d /Root %d 0 R >>\nstartxref\n%d\n%%%%EOF\n"
    out += trailer % (len(objects) + 1, root, xref)
    return bytes(out)


def scanned_pdf(pages: int = 1) -> bytes:
    """A PDF of images only, as a scanner app makes: no text to extract."""
    page = Image.new("RGB", (620, 877), "white")
    ImageDraw.Draw(page).rectangle((60, 60, 560, 200), outline="black", width=6)
    out = io.BytesIO()
    page.save(out, "PDF", save_all=True, append_images=[page] * (pages - 1), resolution=75)
    return out.getvalue()


def protected_pdf(pdf: bytes, password: str = "12345678") -> bytes:
    """`pdf` encrypted with a password needed to open it (a bank statement's, often the customer's ID)."""
    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(pdf)))
    writer.encrypt(user_password=password, owner_password="owner", algorithm="RC4-128")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def _flated(data: bytes | list[bytes], extra: bytes = b"") -> bytes:
    """A FlateDecode stream object of `data` (or of its parts in order, compressed as they come)."""
    compressor = zlib.compressobj(9)
    parts = data if isinstance(data, list) else [data]
    body = b"".join(compressor.compress(part) for part in parts) + compressor.flush()
    return b"<< /Length %d /Filter /FlateDecode%s >>\nstream\n%s\nendstream" % (len(body), extra, body)


def _zeros(megabytes: int) -> list[bytes]:
    return [bytes(1024 * 1024)] * megabytes


def words_bomb_pdf(megabytes: int = 300) -> bytes:
    """Under 1 MB: one page of `megabytes` MB of short words on lines that stay on the page. pdftotext keeps
    every word of a page before writing any: it grows until its cap stops it."""
    unit = b"(a b c d e f g h) Tj 0 -12 Td\n" * 60 + b"0 720 Td\n"
    chunk = unit * (1024 * 1024 // len(unit))
    content = _flated([b"BT /F1 10 Tf 20 800 Td ", *([chunk] * megabytes), b"ET"])
    font = b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"
    page = b"<< /Type /Page /Parent 4 0 R /MediaBox [0 0 595 842] /Resources << /Font << /F1 1 0 R >> >> "
    page += b"/Contents 2 0 R >>"
    return build([font, content, page, b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
                  b"<< /Type /Catalog /Pages 4 0 R >>"], 5)  # fmt: skip


def _stream(body: bytes, extra: bytes = b"") -> bytes:
    return b"<< /Length %d%s >>\nstream\n%s\nendstream" % (len(body), extra, body)


def _image_pages(contents: list[int], *, first: int = 3) -> list[bytes]:
    """Object 1 the image, object 2 the content drawing it on the page; then the pages, each with its
    contents object, the /Pages and the catalog (numbered from `first`)."""
    parent = first + len(contents)
    page = b"<< /Type /Page /Parent %d 0 R /MediaBox [0 0 595 842] " % parent
    page += b"/Resources << /XObject << /Im0 1 0 R >> >> /Contents %d 0 R >>"
    kids = b" ".join(b"%d 0 R" % (first + n) for n in range(len(contents)))
    return [
        *(page % content for content in contents),
        b"<< /Type /Pages /Kids [%s] /Count %d >>" % (kids, len(contents)),
        b"<< /Type /Catalog /Pages %d 0 R >>" % parent,
    ]


_DRAW_IMAGE = _stream(b"q 595 0 0 842 0 0 cm /Im0 Do Q")
_IMAGE = b" /Type /XObject /Subtype /Image /Width %d /Height %d /ColorSpace /%s /BitsPerComponent 8"


def slow_scan_pdf(image_side: int, zeros_mb: int) -> bytes:
    """No text at all (the scan path), and slow both ways: two pages each of an `image_side`² grey image of
    zeros, which pdftoppm decodes whole and pdftotext skips, and a third of `zeros_mb` MB of zeros in its
    content, which pdftotext reads through."""
    megabytes = image_side * image_side // (1024 * 1024) + 1
    image = _flated(_zeros(megabytes), _IMAGE % (image_side, image_side, b"DeviceGray"))
    objects = [image, _DRAW_IMAGE, _flated(_zeros(zeros_mb)), *_image_pages([2, 2, 3], first=4)]
    return build(objects, len(objects))


def jpeg_page_pdf(jpeg: bytes, width: int, height: int) -> bytes:
    """One A4 page that is a JPEG image (a scanner app's PDF)."""
    image = _stream(jpeg, _IMAGE % (width, height, b"DeviceRGB") + b" /Filter /DCTDecode")
    objects = [image, _DRAW_IMAGE, *_image_pages([2])]
    return build(objects, len(objects))
