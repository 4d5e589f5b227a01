"""Real PDFs for the tests, written here byte by byte: text pages (Helvetica, WinAnsi), a scan (Pillow), and
a password-protected one (pypdf)."""

from __future__ import annotations

import io

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
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    trailer = b"trailer\n<< /Size %d /Root %d 0 R >>\nstartxref\n%d\n%%%%EOF\n"
    out += trailer % (len(objects) + 1, catalog, xref)
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
