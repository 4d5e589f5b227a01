"""Photos customers send, made ready for the model: size limits, then downscaled and re-encoded as JPEG.

The pipeline uses one PhotoReader:

    reader.check_declared_size(size)        # before downloading, when WhatsApp says the size
    url = await reader.prepare(data)        # a data: URL for the model's image_url part
    # PhotoRejected: e.reason ("too_large", "unreadable"); str(e) is log-safe

A photo WhatsApp sends in HD is 12 megapixels (48 MB decoded, Pillow keeps RGB in 4 bytes a pixel). A JPEG
is decoded at 1/2, 1/4 or 1/8 of its size straight away (Pillow's draft mode) when that still covers
MAX_SIDE, so a 12 MP photo peaks at about 30 MB (measured); other formats are decoded whole, and refused past
MAX_DECODE_PIXELS. At most MAX_DECODES_AT_ONCE are decoded at a time, whatever the number of chats. Larger
than MAX_SIDE is wasted on the model: OpenAI scales a photo down to fit 2048 px, then its short side to
768 px.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from connection.types import MAX_PHOTO_PIXELS
from media.settings import MB

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

MAX_SIDE = 1536
MAX_DECODES_AT_ONCE = 2
MAX_DECODE_PIXELS = MAX_PHOTO_PIXELS
JPEG_QUALITY = 85

PhotoReason = Literal["too_large", "unreadable"]


class PhotoRejected(Exception):
    """A photo the model is not shown; `str(e)` is log-safe (sizes and Pillow's error, never content)."""

    def __init__(self, reason: PhotoReason, detail: str) -> None:
        self.reason: PhotoReason = reason
        super().__init__(f"{reason}: {detail}")


@dataclass(frozen=True, slots=True)
class PhotoSettings:
    max_mb: float = 10.0
    max_side: int = MAX_SIDE


class PhotoReader:
    """Checks and shrinks photos for the model. `enabled` is False when no model reads them."""

    def __init__(self, settings: PhotoSettings, *, enabled: bool) -> None:
        self.settings = settings
        self.enabled = enabled
        if enabled:
            _quiet_pillow()  # here, before any thread uses Pillow (a flow's photo being sent, say)
        self.prepared = 0
        self.rejected = 0
        self._decoding = asyncio.Semaphore(MAX_DECODES_AT_ONCE)

    @property
    def max_mb(self) -> float:
        return self.settings.max_mb

    @property
    def max_bytes(self) -> int:
        return int(self.settings.max_mb * MB)

    def check_declared_size(self, size_bytes: int | None) -> None:
        if size_bytes is not None and size_bytes > self.max_bytes:
            self.rejected += 1
            raise PhotoRejected("too_large", f"{size_bytes} bytes declared, limit {self.max_bytes}")

    async def prepare(self, data: bytes) -> str:
        """The photo as a `data:image/jpeg;base64,...` URL, at most `max_side` pixels a side."""
        if len(data) > self.max_bytes:
            self.rejected += 1
            raise PhotoRejected("too_large", f"{len(data)} bytes, limit {self.max_bytes}")
        try:
            async with self._decoding:
                jpeg = await asyncio.to_thread(shrink, data, self.settings.max_side)
        except PhotoRejected:
            self.rejected += 1
            raise
        self.prepared += 1
        return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")

    def stats(self) -> dict[str, int | bool]:
        return {"enabled": self.enabled, "prepared": self.prepared, "rejected": self.rejected}


def _quiet_pillow() -> None:
    """Pillow warns of a header claiming 89+ megapixels and of corrupt EXIF on stderr, past loguru; what
    matters is said by PhotoRejected. Set on the event loop's thread, once (the filters are global)."""
    global _quieted
    if not _quieted:
        from PIL import Image

        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
        _quieted = True


_quieted = False


def shrink(data: bytes, max_side: int) -> bytes:
    """`data` (any format Pillow reads) as a JPEG fitting `max_side`, upright, on white where transparent."""
    from PIL import Image, ImageOps, UnidentifiedImageError  # loaded by neonize anyway; not in the console

    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format in ("JPEG", "MPO"):  # decoded at 1/2, 1/4 or 1/8 at once, still covering the fit
                scale = max_side / max(image.size)
                if scale < 1:
                    image.draft("RGB", (math.ceil(image.width * scale), math.ceil(image.height * scale)))
            width, height = image.size
            if width * height > MAX_DECODE_PIXELS:
                raise PhotoRejected("too_large", f"{width}x{height} pixels to decode")
            # In place: a copy of the whole photo otherwise. An EXIF tag of an odd type (struct.error): the
            # photo is shown as stored, not refused.
            with contextlib.suppress(Exception):
                ImageOps.exif_transpose(image, in_place=True)
            image.thumbnail((max_side, max_side))
            flat = _on_white(image)
            out = io.BytesIO()
            flat.save(out, "JPEG", quality=JPEG_QUALITY)
            return out.getvalue()
    except PhotoRejected:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError) as error:
        raise PhotoRejected("unreadable", type(error).__name__) from None
    except Exception as error:  # truncated or corrupt data, odd EXIF (struct.error): as Pillow says it
        raise PhotoRejected("unreadable", f"{type(error).__name__}: {error}"[:200]) from None


def _on_white(image: PILImage) -> PILImage:
    """RGB for the JPEG: transparency (an alpha channel, or a palette's or tRNS transparent colour) on white,
    not on the black it would be; 16-bit greys scaled to 8 bits, not clipped to white."""
    from PIL import Image

    if image.mode.startswith("I;16") or image.mode == "I":
        image = image.convert("I").point(lambda value: value / 256).convert("L")
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, "white")
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image if image.mode == "RGB" else image.convert("RGB")
