"""What a customer sends beyond text, made ready for the model: voice notes heard, photos prepared, PDFs
read, videos watched and heard; and what the customer is told when one cannot be (a limit, "send it again").

The pipeline decides when (after the memory gate) and in which turn; `MediaReader` does the work, counts it
in the pipeline's counters, and keeps what is heard (a transcript, a video's words) in the store and the
history, as the customer's own words.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from loguru import logger

from bot.counters import MessageCounters
from bot.replies import Language, duration, reply
from bot.responder import PhotoRefused
from bot.text import clean_text, joined
from connection.types import Inbound, MessageKind, Transport, TransportError
from media.document import DocumentRejected, PdfText, is_pdf
from media.image import PhotoRejected
from media.video import Frames, VideoRejected
from memory.history import ChatHistory
from memory.store import MessageStatus, Store, StoreUnavailable, db_text

# The pages of a scanned PDF (no text) shown to the model as photos, when it is shown photos.
MAX_SCANNED_PAGES = 2
# A video is shown to the model as this many frames, spread over it.
MAX_VIDEO_FRAMES = 3
# What `Pipeline._understand` and `MediaReader.look` give for a message that needs no reply at all (a sticker
# the model cannot be shown): kept, unanswered. Never a real reply's text.
NO_REPLY = "\x00no reply"
# Shown to the model as images: a sticker is a small WebP picture ("👍", "gracias", "?").
PHOTO_KINDS = {MessageKind.IMAGE, MessageKind.STICKER}
# Voice notes: not the customer's doing. "no_transcription": the server has no speech-to-text (Ollama).
_OUR_SIDE_FAILURES = ("transcription_failed", "timeout", "no_transcription")


class VoiceTranscriber(Protocol):
    """What MediaReader needs to hear voice notes (see media.audio.VoiceTranscriber)."""

    @property
    def enabled(self) -> bool: ...

    def check_declared_size(self, size_bytes: int | None) -> None: ...

    async def transcribe(self, data: bytes, mimetype: str = ...) -> str: ...


class PhotoPreparer(Protocol):
    """What MediaReader needs to show photos to the model (see media.image.PhotoReader)."""

    @property
    def enabled(self) -> bool: ...

    @property
    def max_mb(self) -> float | None: ...

    def check_declared_size(self, size_bytes: int | None) -> None: ...

    async def prepare(self, data: bytes) -> str: ...


class DocumentReader(Protocol):
    """What MediaReader needs to read PDFs (see media.document.PdfReader)."""

    @property
    def enabled(self) -> bool: ...

    @property
    def max_mb(self) -> float: ...

    def check_declared_size(self, size_bytes: int | None) -> None: ...

    async def read(self, data: bytes, scan_pages: int = 0) -> PdfText | list[bytes]: ...


class VideoWatcher(Protocol):
    """What MediaReader needs to show videos (see media.video.VideoReader)."""

    @property
    def enabled(self) -> bool: ...

    @property
    def max_mb(self) -> float: ...

    def check_declared_size(self, size_bytes: int | None) -> None: ...

    async def frames(self, data: bytes, count: int, duration_hint: float | None = None) -> Frames: ...


@dataclass
class Attached:
    """What a turn's PDFs and videos give the model (see MediaReader.read_attachments)."""

    texts: str = ""  # the PDFs' texts, each after a note naming it: read with or without photos
    scans: str = ""  # a note on each scan or video shown as images: said only with the images
    pages: list[str] = field(default_factory=list)  # scans' pages and videos' frames, as photos (data: URLs)
    scanned: int = 0  # the PDFs shown as pages: counted read once the model has seen them
    videos: int = 0  # the videos shown as frames: counted seen once the model has seen them
    speech: str = ""  # what is said in the videos: the customer's words, as a voice note's
    unread: list[TransportError | DocumentRejected | VideoRejected] = field(default_factory=list)
    heard_unseen: int = 0  # videos heard but not seen: their words are answered, the model told they came

    @property
    def missed(self) -> bool:
        """Something the model is not given: a PDF or video not read, or a video only heard."""
        return bool(self.unread or self.heard_unseen)


class MediaReader:
    """Hears, looks at and reads what a chat's messages carry (see the module's docstring)."""

    def __init__(
        self,
        *,
        transport: Transport,
        store: Store,
        history: ChatHistory,
        counters: MessageCounters,
        language: Language,
        max_inbound_chars: int,
        transcriber: VoiceTranscriber | None = None,
        photos: PhotoPreparer | None = None,
        documents: DocumentReader | None = None,
        videos: VideoWatcher | None = None,
    ) -> None:
        self.transport = transport
        self.store = store
        self.history = history
        self.counters = counters
        self.language = language
        self.max_inbound_chars = max_inbound_chars
        self.transcriber = transcriber
        self.photos = photos  # None, or not enabled: a photo gets its caption answered, or a polite reply
        self.documents = documents  # None, or not enabled: a PDF gets its caption answered, or a polite reply
        self.videos = videos  # None, or not enabled (or photos off): as a PDF
        self._transcription_warned_at = -60.0
        self._photos_warned_at = -60.0

    @property
    def reads_photos(self) -> bool:
        return self.photos is not None and self.photos.enabled

    @property
    def hears_voice_notes(self) -> bool:
        return self.transcriber is not None and self.transcriber.enabled

    @property
    def reads_pdfs(self) -> bool:
        return self.documents is not None and self.documents.enabled

    def reads_pdf(self, message: Inbound) -> bool:
        """A PDF whose text the model is given: PDFs are read, and it can still be downloaded (not after a
        restart)."""
        media = message.media
        return (
            message.kind is MessageKind.DOCUMENT
            and self.reads_pdfs
            and media is not None
            and media.handle is not None
            and is_pdf(media.mimetype, media.file_name)
        )

    @property
    def shows_videos(self) -> bool:
        return self.reads_photos and self.videos is not None and self.videos.enabled

    def shows_video(self, message: Inbound) -> bool:
        """A video the model is shown as frames: photos and videos are on, and it can still be downloaded."""
        return (
            message.kind is MessageKind.VIDEO
            and self.shows_videos
            and message.media is not None
            and message.media.handle is not None
        )

    def gives(self, message: Inbound) -> bool:
        """A photo (or sticker), PDF or video the model is given: downloaded and read with its words."""
        return self.shows_photo(message) or self.reads_pdf(message) or self.shows_video(message)

    def shows_photo(self, message: Inbound) -> bool:
        """A photo the model can be shown: photos are on, and it can still be downloaded (not after a
        restart)."""
        media = message.media
        if message.kind is MessageKind.STICKER and (
            message.is_group or not media or "image/" not in media.mimetype
        ):
            return False  # a group's chatter, or an animated (Lottie) sticker: no picture to show
        return (
            message.kind in PHOTO_KINDS
            and self.reads_photos
            and media is not None
            and media.handle is not None
        )

    @property
    def media_unsupported(self) -> str:
        """The polite reply to what the bot cannot read: it names photos and PDFs when the model gets them."""
        return self.unsupported(photos=self.reads_photos)

    def unsupported(self, *, photos: bool) -> str:
        key = "media_unsupported" + ("_photos" if photos else "") + ("_pdf" if self.reads_pdfs else "")
        return reply(key, self.language)

    async def look(
        self, photos: list[Inbound], text: str, more: bool = False
    ) -> tuple[list[str], str, str | None]:
        """The photos as the model is shown them (called past the memory gate: a download and a decode take
        memory), with the text to answer, or a canned reply. A photo that cannot be downloaded or read is
        left out and the model told so; with nothing left to answer (no text, and not `more`: a PDF read)
        the customer is asked to send it again."""
        assert self.photos is not None
        # Downloaded together: an album's five photos one after another could take minutes on a bad network.
        outcomes = await asyncio.gather(*map(self._prepare_photo, photos))
        shown = [url for url in outcomes if isinstance(url, str)]
        # A sticker that could not be shown is no attachment the model must be told of: only photos count.
        unseen = [
            outcome
            for photo, outcome in zip(photos, outcomes, strict=True)
            if photo.kind is MessageKind.IMAGE and not isinstance(outcome, str)
        ]
        if not unseen:
            return shown, text, (None if shown or text or more else NO_REPLY)
        if not shown and not text and not more:
            too_large = [e for e in unseen if isinstance(e, PhotoRejected) and e.reason == "too_large"]
            if too_large and self.photos.max_mb is not None:
                # Sending it again would not help: a camera original sent as a document, most often.
                return [], "", reply("photo_too_large", self.language, limit=self.photos.max_mb)
            return [], "", reply("photo_unreadable", self.language)
        return shown, f"{text}\n\n{reply('attachment_note', self.language)}".lstrip(), None

    async def hear(self, burst: Sequence[Inbound], last: Inbound, last_text: str) -> tuple[str, list[str]]:
        """A burst's words with its voice notes transcribed, in order (each as a voice note alone: stored,
        limits); and the replies for those that could not be heard (a limit, "send it again"). Called past
        the memory gate, as for a voice note alone."""
        words: list[str] = []
        unheard: list[str] = []
        for item, own_text in [*((m, m.text) for m in burst), (last, last_text)]:
            if item.kind is not MessageKind.AUDIO:
                words.append(own_text)
                continue
            heard, canned = await self.transcribe(item)
            if canned is not None:
                unheard.append(canned)
                continue
            words.append(heard)
        return "\n".join(word for word in words if word), list(dict.fromkeys(unheard))

    def heard(self, words: str, unheard: list[str], *, media: bool, notes: int) -> tuple[str, str | None]:
        """A burst's words once heard, as Pipeline._understand gives a message's: the text to answer, or the
        reply when there is nothing (no word, no photo, PDF or video: what a voice note alone would have
        got). Each message was within MAX_INBOUND_CHARS: together they are not cut. A voice note not heard
        is told to the model with the reply it would have had alone, for the customer to be told (a limit,
        "send it again")."""
        text = clean_text(words, self.max_inbound_chars * notes)[0]
        if not text and not media:
            return "", unheard[0] if unheard else reply("empty", self.language)
        for why in unheard:
            text = joined(text, reply("voice_note_unheard_note", self.language, why=why))
        return text, None

    def noted(self, text: str) -> str:
        """`text`, with the model told (once) that a file, photo or video it cannot see came with it."""
        note = reply("attachment_note", self.language)
        return text if note in text else joined(text, note)

    async def read_attachments(self, pdfs: list[Inbound], videos: list[Inbound], images: int) -> Attached:
        """The PDFs' texts for the model, each after a note naming it; a note on each scan and video and
        their pages and frames as photos (`images` at most in all, when the model is shown photos); and why
        the others could not be read. Called past the memory gate: a download, pdftotext and ffmpeg take
        memory."""
        # Videos first (their frames are all they show); a PDF is seldom a scan, and takes what is left.
        frames = min(MAX_VIDEO_FRAMES, images // len(videos)) if videos else 0
        pages = min(MAX_SCANNED_PAGES, (images - frames * len(videos)) // len(pdfs)) if pdfs else 0
        # Together, as an album's photos.
        watched, pdf_outcomes = await asyncio.gather(
            asyncio.gather(*(self._watch_video(video, frames) for video in videos)),
            asyncio.gather(*(self._read_pdf(pdf, pages) for pdf in pdfs)),
        )
        notes: list[str] = []
        scans: list[str] = []
        read = Attached()
        for outcome in watched:
            if isinstance(outcome, VideoRejected):
                read.unread.append(outcome)
                continue
            shown, seconds, speech = outcome
            read.speech = joined(read.speech, speech)
            if not shown:  # heard, not seen: the model told a video it cannot see came
                read.heard_unseen += 1
                continue
            scans.append(self._video_note(len(shown), seconds, heard=bool(speech)))
            read.pages.extend(shown)
            read.videos += 1
        for pdf, pdf_outcome in zip(pdfs, pdf_outcomes, strict=True):
            name = (pdf.media.file_name if pdf.media else "") or reply("pdf_unnamed", self.language)
            if isinstance(pdf_outcome, PdfText):
                cut = reply("pdf_cut_note", self.language) if pdf_outcome.cut else ""
                note = reply("pdf_text_note", self.language, name=name)
                notes.append(joined(f"{note}\n{pdf_outcome.text}", cut))
            elif isinstance(pdf_outcome, list):
                scans.append(reply("pdf_scan_note", self.language, name=name))
                read.pages.extend(pdf_outcome)
                read.scanned += 1
            else:
                read.unread.append(pdf_outcome)
        read.texts, read.scans = joined(*notes), joined(*scans)
        return read

    def _video_note(self, frames: int, seconds: float | None, heard: bool) -> str:
        length = reply("video_length", self.language, seconds=max(1, round(seconds))) if seconds else ""
        shown = reply("video_frame" if frames == 1 else "video_frames", self.language, frames=frames)
        key = "video_note_heard" if heard else "video_note"
        return reply(key, self.language, length=length, frames=shown)

    async def _speech_in(self, video: Inbound, data: bytes) -> str:
        """What is said in a video ("este es el que quiero, ¿lo tenéis en 42?"), transcribed like a voice
        note and kept like one (with the caption, in the store and the history); "" when nothing is (no
        sound track, silence, music without words, transcription off or failing: the frames are shown all
        the same)."""
        if self.transcriber is None or not self.transcriber.enabled:
            return ""
        mimetype = video.media.mimetype if video.media and video.media.mimetype else "video/mp4"
        try:
            text = await self.transcriber.transcribe(data, mimetype)
        except Exception as error:
            reason = getattr(error, "reason", None)
            if reason is None:
                raise
            if reason in _OUR_SIDE_FAILURES:  # the owner's to fix, as for voice notes
                self._warn_transcription_failing(reason, error)
            else:  # no sound track, silence, music: nothing said
                logger.debug("the sound of video {} not transcribed: {}", video.id, error)
            return ""
        self.counters.transcribed += 1
        speech = db_text(clean_text(text, self.max_inbound_chars)[0])
        body = self.heard_body(video.text, speech)
        self.history.set_body(video.chat, video.id, body)
        try:
            await self.store.set_status(video.id, MessageStatus.RECEIVED, body=body)
        except StoreUnavailable as error:  # kept for a retry by the store; the answer does not wait for it
            logger.debug("what video {} says not saved yet: {}", video.id, error)
        return speech

    def heard_body(self, caption: str, speech: str) -> str:
        """A video's stored body once heard: its caption, then what is said in it."""
        return db_text(
            clean_text("\n".join(part for part in (caption, speech) if part), self.max_inbound_chars)[0]
        )

    async def _watch_video(
        self, video: Inbound, frames: int
    ) -> tuple[list[str], float | None, str] | VideoRejected:
        """A video's frames as the model is shown photos (none when they cannot be taken but its words were
        heard), its length and what is said in it; or why it cannot be shown (logged and counted)."""
        assert self.videos is not None
        try:
            self.videos.check_declared_size(video.media.size_bytes if video.media else None)
            try:
                data = await self.transport.download_media(video)
            except TransportError as error:  # told "couldn't watch your video", not "couldn't open your PDF"
                raise VideoRejected("unreadable", f"download failed: {error}") from None
            duration_hint = video.media.duration_s if video.media else None
            # The words while the frames are taken; a video that shows nothing may still say something.
            seen, speech = await asyncio.gather(
                self._frames_of(data, frames, duration_hint), self._speech_in(video, data)
            )
            if isinstance(seen, VideoRejected):
                if not speech:
                    raise seen
                self.counters.videos_unseen += 1
                logger.info("video {} in {}: its words only ({})", video.id, video.chat, seen)
                return [], None, speech
            return seen[0], seen[1], speech
        except VideoRejected as error:
            self.counters.videos_unseen += 1
            say = logger.warning if str(error).startswith("unreadable: download failed") else logger.info
            say("video {} in {} not shown to the model: {}", video.id, video.chat, error)
            return error

    async def _frames_of(
        self, data: bytes, frames: int, duration_hint: float | None
    ) -> tuple[list[str], float | None] | VideoRejected:
        """A video's frames as the model is shown photos, and its length; or why there are none."""
        assert self.videos is not None
        if frames < 1:
            return VideoRejected("unreadable", "no room left for its frames in this turn")
        try:
            seen = await self.videos.frames(data, frames, duration_hint)
        except VideoRejected as error:
            return error
        shown = await self._as_photos(seen.images)
        return (
            (shown, seen.duration_s) if shown else VideoRejected("unreadable", "no frame could be prepared")
        )

    async def _read_pdf(
        self, pdf: Inbound, pages: int
    ) -> PdfText | list[str] | TransportError | DocumentRejected:
        """One PDF's text; a scan's first `pages` pages as the model is shown photos; or why it cannot be read
        (logged and counted; a scan is counted read once the model has seen it)."""
        assert self.documents is not None
        try:
            self.documents.check_declared_size(pdf.media.size_bytes if pdf.media else None)
            data = await self.transport.download_media(pdf)
            # A scan (no text, or only "Escaneado con CamScanner") comes back as its first pages.
            outcome = await self.documents.read(data, scan_pages=pages if self.reads_photos else 0)
            if isinstance(outcome, PdfText):
                self.counters.documents += 1
                return outcome
            if not (scan := await self._as_photos(outcome)):
                raise DocumentRejected("no_text", "its pages could not be shown")
            return scan
        except (TransportError, DocumentRejected) as error:
            self.counters.documents_unread += 1
            say = logger.warning if isinstance(error, TransportError) else logger.info
            say("PDF {} in {} not read: {}", pdf.id, pdf.chat, error)
            return error

    async def _as_photos(self, images: list[bytes]) -> list[str]:
        """A scan's pages or a video's frames as the model is shown photos."""
        assert self.photos is not None
        pages: list[str] = []
        for image in images:
            with contextlib.suppress(PhotoRejected):  # a page too large to decode: the others are shown
                pages.append(await self.photos.prepare(image))
        return pages

    def unread_noted(self, text: str, read: Attached) -> str:
        """`text`, with the model told of each PDF or video that could not be read and of what the customer
        would have been told of it alone ("it is password-protected", "send it again"), for the customer to
        hear it: a vague "a file came that you cannot see" let the model answer "¡recibido!". A video only
        heard is told as such: its words are answered."""
        for error in read.unread:
            key = "video_unread_note" if isinstance(error, VideoRejected) else "pdf_unread_note"
            note = reply(key, self.language, why=self.unread_reply(error))
            if note not in text:
                text = joined(text, note)
        return self.noted(text) if read.heard_unseen else text

    def unread_reply(self, error: TransportError | DocumentRejected | VideoRejected) -> str:
        """What a customer whose PDF or video could not be read is told."""
        if isinstance(error, VideoRejected):
            assert self.videos is not None
            if error.reason == "too_large":
                return reply("video_too_large", self.language, limit=self.videos.max_mb)
            return reply("video_unreadable", self.language)
        reason = error.reason if isinstance(error, DocumentRejected) else "unreadable"
        # "Send me a screenshot" only to a customer whose screenshot the model would be shown.
        photos = "_photos" if self.reads_photos else ""
        if reason == "too_large":
            assert self.documents is not None
            return reply(f"pdf_too_large{photos}", self.language, limit=self.documents.max_mb)
        if reason == "protected":
            return reply(f"pdf_protected{photos}", self.language)
        if reason == "no_text":
            return reply(f"pdf_no_text{photos}", self.language)
        return reply("pdf_unreadable", self.language)

    async def look_at_quote(self, message: Inbound) -> str | None:
        """The photo `message` replies to, as the model is shown it; None when it cannot be downloaded (the
        model is then told of a photo it cannot see, as before)."""
        seen = await self._prepare_photo(replace(message, kind=MessageKind.IMAGE, media=message.quoted_media))
        return seen if isinstance(seen, str) else None

    async def _prepare_photo(self, photo: Inbound) -> str | TransportError | PhotoRejected:
        """One photo as the model is shown it, or why it cannot be (logged and counted)."""
        assert self.photos is not None
        try:
            self.photos.check_declared_size(photo.media.size_bytes if photo.media else None)
            return await self.photos.prepare(await self.transport.download_media(photo))
        except (TransportError, PhotoRejected) as error:
            self.counters.photos_unseen += 1
            # An animated (Lottie) sticker is no picture Pillow reads: common, and nobody's to fix.
            say = logger.debug if photo.kind is MessageKind.STICKER else logger.warning
            say("{} {} in {} not shown to the model: {}", photo.kind.value, photo.id, photo.chat, error)
            return error

    def warn_photos_refused(self, error: PhotoRefused) -> None:
        """A model that reads no images is the owner's to fix (OPENAI_VISION=false, or a model that does):
        said at WARNING, once a minute at most."""
        now = time.monotonic()
        if now - self._photos_warned_at < 60:
            logger.debug("the model refused photos: {}", error)
            return
        self._photos_warned_at = now
        logger.warning(
            "the model refused photos ({}): answered without them; set OPENAI_VISION=false or use a model "
            "that reads images",
            error,
        )

    async def transcribe(self, message: Inbound) -> tuple[str, str | None]:
        if self.transcriber is None or not self.transcriber.enabled:
            return "", reply("audio_ai_off", self.language)
        try:
            size = message.media.size_bytes if message.media else None
            self.transcriber.check_declared_size(size)
            data = await self.transport.download_media(message)
            mimetype = message.media.mimetype if message.media else "audio/ogg"
            text = await self.transcriber.transcribe(data, mimetype or "audio/ogg")
        except TransportError as error:
            logger.warning("voice note {} could not be downloaded: {}", message.id, error)
            return "", reply("audio_unreadable", self.language)
        except Exception as error:
            reason = getattr(error, "reason", None)
            if reason is None:
                raise
            if reason in _OUR_SIDE_FAILURES:
                self._warn_transcription_failing(reason, error)
            else:  # the customer's note (too long, corrupt, ...): they are told why
                logger.debug("voice note {} not transcribed: {} ({})", message.id, reason, error)
            return "", self._audio_reply(reason, getattr(error, "limit", None))
        self.counters.transcribed += 1
        # The same text in the store, in the history in memory and before the model: the row came in
        # empty at intake, and the chat's next message must see what the customer said.
        text = db_text(clean_text(text, self.max_inbound_chars)[0])
        self.history.set_body(message.chat, message.id, text)
        try:
            await self.store.set_status(message.id, MessageStatus.RECEIVED, body=text)
        except StoreUnavailable as error:  # kept for a retry by the store; the answer does not wait for it
            logger.debug("transcript of {} not saved yet: {}", message.id, error)
        return text, None

    def _warn_transcription_failing(self, reason: str, error: Exception) -> None:
        """A transcription server that fails (a wrong OPENAI_TRANSCRIBE_MODEL, an outage) is the owner's to
        fix: said at WARNING, once a minute at most, not only to the customers as an apology."""
        now = time.monotonic()
        if now - self._transcription_warned_at < 60:
            logger.debug("voice note not transcribed: {} ({})", reason, error)
            return
        self._transcription_warned_at = now
        logger.warning("voice notes are not transcribed ({}); customers get an apology", error)

    def _audio_reply(self, reason: str, limit: float | None) -> str:
        if reason == "too_large":
            return reply("audio_too_large", self.language, limit=limit or 0)
        if reason == "too_long":
            return reply("audio_too_long", self.language, duration=duration(limit or 0, self.language))
        if reason == "empty":
            return reply("audio_empty", self.language)
        if reason in ("ai_off", "no_transcription"):  # asked to type it: trying again would not help
            return reply("audio_ai_off", self.language)
        if reason in _OUR_SIDE_FAILURES:
            return reply("ai_error", self.language)
        return reply("audio_unreadable", self.language)
