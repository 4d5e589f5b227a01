"""WhatsApp over neonize (whatsmeow in a shared library): the only module that imports neonize.

Two parts:

- `translate_message`: a pure function from neonize's `MessageEv` protobuf to our `Inbound`.
- `NeonizeTransport`: the `Transport` implementation. It owns one `NewAClient`, maps neonize's
  connection events to `ConnectionState`, and retries `connect()` with a capped, jittered
  exponential backoff when it fails. whatsmeow reconnects by itself after a drop once it was
  connected, so this loop only runs when `connect()` itself fails or returns; logged-out,
  replaced and banned stop it for good.

neonize 0.5.x traps handled here:

- event handlers are scheduled with `run_coroutine_threadsafe` and the future is dropped, so an
  exception in a handler vanishes: every handler is wrapped and logs through loguru;
- handlers of one event run as separate tasks: `on_inbound` is called before any `await`, so
  arrival order holds;
- `NewAClient.is_connected` is a property that returns a coroutine (it must be awaited);
- neonize pins the event loop of the first `connect()` in a module global; `start()` re-points it
  to the running loop;
- the whatsmeow log level comes from the level of the stdlib logger `neonize.utils.log` (NOTSET
  ships every debug line through a ctypes callback), so it is set from `log_level`;
- every `Neonize()` call opens a database handle that is never closed: after a few failures in a
  row, a cheap TCP probe gates the next real `connect()` so a long outage does not leak handles.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import io
import logging
import os
import random
import re
import subprocess
import sys
import time
import warnings
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import segno
from loguru import logger

from connection.types import (
    ChatId,
    ConnectionState,
    Inbound,
    MediaRef,
    MessageId,
    MessageKind,
    TransportError,
)


@contextlib.contextmanager
def _closed_popen() -> Iterator[None]:
    """neonize probes the platform at import with `os.popen("uname -a").read()` and never closes
    the pipe (neonize/utils/platform.py:39); the orphaned process is reaped, and the pipe warned
    about, whenever the next subprocess starts. Run the probe to completion instead."""

    def popen(cmd: str, mode: str = "r", buffering: int = -1) -> io.StringIO:
        done = subprocess.run(cmd, shell=True, capture_output=True, text=True, check=False)
        return io.StringIO(done.stdout)

    original = os.popen
    os.popen = popen  # type: ignore[assignment]
    try:
        yield
    finally:
        os.popen = original


with warnings.catch_warnings(), _closed_popen():
    warnings.simplefilter("ignore", ResourceWarning)
    from neonize.aioze import events as _nz_events
    from neonize.aioze.client import NewAClient
    from neonize.aioze.events import (
        ClientOutdatedEv,
        ConnectedEv,
        ConnectFailureEv,
        DisconnectedEv,
        KeepAliveRestoredEv,
        KeepAliveTimeoutEv,
        LoggedOutEv,
        MessageEv,
        PairStatusEv,
        StreamErrorEv,
        StreamReplacedEv,
        TemporaryBanEv,
    )
    from neonize.proto import Neonize_pb2 as nz
    from neonize.proto.waE2E.WAWebProtobufsE2E_pb2 import Message as WAMessage
    from neonize.utils.enum import ChatPresence, ChatPresenceMedia, ReceiptType

__all__ = ["NeonizeTransport", "translate_message"]

STATUS_BROADCAST = "status@broadcast"
_PN_SERVER = "s.whatsapp.net"
_LID_SERVER = "lid"
_GROUP_SERVER = "g.us"

_TERMINAL = frozenset({ConnectionState.LOGGED_OUT, ConnectionState.REPLACED, ConnectionState.BANNED})
# ConnectFailureReason values (Neonize.proto) that mean the session is gone for good.
_LOGOUT_REASONS = frozenset({2, 4, 5})  # LOGGED_OUT, MAIN_DEVICE_GONE, UNKNOWN_LOGOUT
_BAN_REASON = 3  # TEMP_BANNED

# Wrappers whose inner `.message` is the real content (whatsmeow usually unwraps them already).
_WRAPPERS = (
    "ephemeralMessage",
    "viewOnceMessage",
    "viewOnceMessageV2",
    "viewOnceMessageV2Extension",
    "documentWithCaptionMessage",
)
_MEDIA_KINDS = (
    ("audioMessage", MessageKind.AUDIO),
    ("imageMessage", MessageKind.IMAGE),
    ("videoMessage", MessageKind.VIDEO),
    ("stickerMessage", MessageKind.STICKER),
    ("documentMessage", MessageKind.DOCUMENT),
)

_DIGITS = re.compile(r"\+?\d{6,}")


# --------------------------------------------------------------------------- helpers


def _mask(phone: str) -> str:
    """`34612345678` -> `+34*******78`; short or empty input -> `***`."""
    digits = "".join(ch for ch in phone if ch.isdigit())
    if len(digits) < 6:
        return "***"
    return f"+{digits[:2]}{'*' * (len(digits) - 4)}{digits[-2:]}"


def _scrub(text: str, limit: int = 300) -> str:
    """Mask every long digit run (phone numbers, LIDs) and cap the length."""
    return _DIGITS.sub(lambda m: _mask(m.group(0)), text)[:limit]


def _jid_str(jid: nz.JID) -> str:
    """`user@server` without device/agent; `""` for an empty JID."""
    if not jid.Server:
        return ""
    return f"{jid.User}@{jid.Server}" if jid.User else jid.Server


def _bare_user(jid: str) -> str:
    """The user part of a JID string: `34600:3@s.whatsapp.net` -> `34600`."""
    return jid.split("@", 1)[0].split(":", 1)[0].split(".", 1)[0].lstrip("+")


def _is_pn(jid: nz.JID) -> bool:
    return bool(jid.User) and jid.Server == _PN_SERVER


def _to_jid(value: str) -> nz.JID:
    """Parse a chat key (`user@server`, or bare digits for a phone) into a neonize JID."""
    user, _, server = value.partition("@")
    if not server:
        user, server = "".join(ch for ch in value if ch.isdigit()), _PN_SERVER
    user = user.split(":", 1)[0]
    return nz.JID(User=user, Server=server, Device=0, RawAgent=0, Integrator=0, IsEmpty=False)


def _timestamp(raw: int) -> float:
    """neonize sends milliseconds (`UnixMilli` in its encoder); accept seconds too."""
    if raw <= 0:
        return 0.0
    return raw / 1000.0 if raw > 100_000_000_000 else float(raw)


def _unwrap(msg: WAMessage) -> WAMessage:
    for _ in range(3):
        for name in _WRAPPERS:
            if msg.HasField(name) and getattr(msg, name).HasField("message"):
                msg = getattr(msg, name).message
                break
        else:
            return msg
    return msg


def _mentions(sub: Any, me: frozenset[str]) -> bool:
    if not me or not sub.HasField("contextInfo"):
        return False
    return any(_bare_user(j) in me for j in sub.contextInfo.mentionedJID)


def _body(msg: WAMessage, me: frozenset[str]) -> tuple[MessageKind, str, MediaRef | None, bool]:
    """Kind, text, media and mention flag of a waE2E message."""
    if msg.conversation:
        return MessageKind.TEXT, msg.conversation, None, False
    if msg.HasField("extendedTextMessage"):
        ext = msg.extendedTextMessage
        return MessageKind.TEXT, ext.text, None, _mentions(ext, me)
    for field, kind in _MEDIA_KINDS:
        if not msg.HasField(field):
            continue
        sub = getattr(msg, field)
        seconds = int(getattr(sub, "seconds", 0))
        media = MediaRef(
            mimetype=sub.mimetype,
            size_bytes=int(sub.fileLength) if sub.fileLength else None,
            duration_s=seconds or None,
            voice_note=bool(getattr(sub, "PTT", False)),
            handle=msg,  # download_any wants the whole waE2E Message
        )
        return kind, getattr(sub, "caption", ""), media, _mentions(sub, me)
    if msg.HasField("reactionMessage"):
        return MessageKind.REACTION, msg.reactionMessage.text, None, False
    return MessageKind.OTHER, "", None, False


# --------------------------------------------------------------------------- translation


def translate_message(ev: Any, me: set[str] | frozenset[str] | None = None) -> Inbound | None:
    """Turn a neonize `MessageEv` into an `Inbound`; None when it has no id or chat.

    `me` holds our own user ids (phone number and LID, bare or as JIDs) so a group mention of
    the bot sets `mentions_me`. A 1:1 chat addressed by LID is keyed by the phone-number JID
    when the event carries it (SenderAlt, or RecipientAlt for our own messages), so one person
    is always one chat. Never raises.
    """
    try:
        info = ev.Info
        src = info.MessageSource
        msg_id = info.ID
        chat = _jid_str(src.Chat)
        if not msg_id or not chat:
            logger.debug("skipping message event without id or chat")
            return None
        from_me = bool(src.IsFromMe)
        is_group = bool(src.IsGroup) or src.Chat.Server == _GROUP_SERVER
        sender = _jid_str(src.Sender)
        if src.Sender.Server == _LID_SERVER and _is_pn(src.SenderAlt):
            sender = _jid_str(src.SenderAlt)
        if not is_group and src.Chat.Server == _LID_SERVER:
            alt = src.RecipientAlt if from_me else src.SenderAlt
            if _is_pn(alt):
                chat = _jid_str(alt)
        if not sender and not is_group:
            sender = chat
        timestamp = _timestamp(int(info.Timestamp))
        push_name = info.Pushname
    except Exception as exc:
        logger.debug("unusable message event: {}", type(exc).__name__)
        return None

    own = frozenset(_bare_user(x) for x in me or ())
    try:
        kind, text, media, mentions_me = _body(_unwrap(ev.Message), own)
    except Exception as exc:
        logger.debug("message {} has an odd body ({}); kind=other", msg_id, type(exc).__name__)
        kind, text, media, mentions_me = MessageKind.OTHER, "", None, False

    return Inbound(
        id=MessageId(msg_id),
        chat=ChatId(chat),
        sender=sender,
        kind=kind,
        text=text,
        timestamp=timestamp,
        from_me=from_me,
        is_group=is_group,
        is_status=chat == STATUS_BROADCAST,
        mentions_me=mentions_me,
        push_name=push_name,
        media=media,
    )


# --------------------------------------------------------------------------- transport


def _configure_neonize_logging(level: str) -> None:
    """Set the whatsmeow (Go) log level and the stdlib loggers neonize writes to.

    `NewAClient.connect` passes `LogLevel.from_logging(neonize.utils.log.log.level)` to Go; the
    default NOTSET means "everything", debug included, shipped line by line through ctypes.
    """
    value = logging.getLevelName(level.upper())
    lvl = value if isinstance(value, int) else logging.INFO
    lvl = {50: logging.ERROR}.get(lvl, lvl)
    for name in ("neonize.utils.log", "whatsmeow", "Whatsmeow"):
        logging.getLogger(name).setLevel(lvl)


Handler = Callable[[NewAClient, Any], Awaitable[None]]


class NeonizeTransport:
    """`Transport` over a neonize `NewAClient` with a connect/retry loop."""

    ORIGIN_CACHE = 2048  # message id -> original (chat, sender) JIDs, for read receipts
    PROBE_AFTER_FAILURES = 3
    PROBE_ADDRESS = ("web.whatsapp.com", 443)

    def __init__(
        self,
        database: str,
        *,
        on_inbound: Callable[[Inbound], None],
        name: str = "bot",
        pair_phone: str | None = None,
        on_qr: Callable[[str], None] | None = None,
        on_pair_code: Callable[[str], None] | None = None,
        retry_delay_s: float = 5.0,
        max_retry_delay_s: float = 300.0,
        qr_timeout_s: float = 90.0,
        log_level: str = "INFO",
    ) -> None:
        self._database = database
        self._name = name
        self._on_inbound = on_inbound
        self._pair_phone = "".join(ch for ch in pair_phone or "" if ch.isdigit()) or None
        self._on_qr = on_qr
        self._on_pair_code = on_pair_code
        self._retry_delay_s = retry_delay_s
        self._max_retry_delay_s = max(max_retry_delay_s, retry_delay_s)
        self._qr_timeout_s = qr_timeout_s
        self._log_level = log_level

        self._client: NewAClient | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._state = ConnectionState.STARTING
        self._stopping = False
        self._ever_connected = False
        self._connect_attempts = 0
        self._failures_in_row = 0
        self._reconnects = 0
        self._last_error: str | None = None
        self._connected_since: float | None = None
        self._last_qr_at = 0.0
        self._qr_announced = False
        self._pair_requested = False
        self._own_ids: set[str] = set()
        self._origin: OrderedDict[str, tuple[nz.JID, nz.JID]] = OrderedDict()
        self._old_refs: list[Any] = []

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Create the client, register handlers and start connecting in the background."""
        if self._supervisor is not None:
            return
        _configure_neonize_logging(self._log_level)
        # neonize keeps the loop of the first connect() in a module global and only sets it once;
        # point it at ours so events are not sent to a loop that is gone.
        _nz_events.event_global_loop = asyncio.get_running_loop()
        # `uuid` explicitly: by default neonize uses the first argument (maybe a Postgres URL
        # with a password) as the session id, which then shows up in Go logs.
        client = NewAClient(self._database, uuid=self._name)
        handlers: dict[type, Callable[[Any], Any]] = {
            MessageEv: self._handle_message,
            ConnectedEv: self._handle_connected,
            DisconnectedEv: self._handle_disconnected,
            LoggedOutEv: self._handle_logged_out,
            StreamReplacedEv: self._handle_replaced,
            TemporaryBanEv: self._handle_ban,
            ConnectFailureEv: self._handle_connect_failure,
            KeepAliveTimeoutEv: self._handle_keepalive_timeout,
            KeepAliveRestoredEv: self._handle_keepalive_restored,
            PairStatusEv: self._handle_pair_status,
            ClientOutdatedEv: self._handle_outdated,
            StreamErrorEv: self._handle_stream_error,
        }
        for event_type, fn in handlers.items():
            client.event(event_type)(self._guard(event_type.__name__, fn))
        client.qr(self._guard("QR", self._handle_qr))
        self._client = client
        self._supervisor = asyncio.create_task(self._supervise(), name="neonize-supervisor")
        self._supervisor.add_done_callback(self._supervisor_done)

    async def stop(self) -> None:
        """Stop retrying, disconnect and wait (briefly) for neonize's connect task to end."""
        if self._stopping:
            return
        self._stopping = True
        if self._state not in _TERMINAL:
            self._state = ConnectionState.STOPPED
        self._connected_since = None
        if self._supervisor is not None:
            self._supervisor.cancel()
            await asyncio.gather(self._supervisor, return_exceptions=True)
        await self._release(wait_s=5.0)
        logger.info("whatsapp transport stopped")

    async def logout(self) -> None:
        """Unlink this device from the phone (whatsmeow deletes the session from the store)."""
        client = self._require_client()
        try:
            await client.logout()
        except Exception as exc:
            raise TransportError(f"logout failed: {_scrub(str(exc))}") from exc
        self._set_state(ConnectionState.LOGGED_OUT)
        logger.warning("logged out: the device is unlinked; pairing is needed to connect again")

    async def wait_connected(self) -> bool:
        """Wait until connected (True) or a state that will not connect (False).

        Bound it with `asyncio.timeout(...)`.
        """
        while self._state is not ConnectionState.CONNECTED:
            if self._state in _TERMINAL or self._stopping:
                return False
            await asyncio.sleep(0.1)
        return True

    # ------------------------------------------------------------------ Transport

    @property
    def state(self) -> ConnectionState:
        return self._state

    async def send_text(self, chat: ChatId, text: str) -> MessageId:
        """Send plain text (no neonize mention/link parsing); return the sent message id."""
        client = self._require_client()
        try:
            resp = await client.send_message(_to_jid(chat), WAMessage(conversation=text))
        except Exception as exc:
            raise TransportError(f"send failed: {_scrub(str(exc))}") from exc
        return MessageId(resp.ID)

    async def set_typing(self, chat: ChatId, typing: bool) -> None:
        client = self._require_client()
        presence = ChatPresence.CHAT_PRESENCE_COMPOSING if typing else ChatPresence.CHAT_PRESENCE_PAUSED
        try:
            await client.send_chat_presence(
                _to_jid(chat), presence, ChatPresenceMedia.CHAT_PRESENCE_MEDIA_TEXT
            )
        except Exception as exc:
            raise TransportError(f"typing failed: {_scrub(str(exc))}") from exc

    async def mark_read(self, message: Inbound) -> None:
        client = self._require_client()
        chat, sender = self._origin.get(message.id) or (
            _to_jid(message.chat),
            _to_jid(message.sender or message.chat),
        )
        try:
            await client.mark_read(message.id, chat=chat, sender=sender, receipt=ReceiptType.READ)
        except Exception as exc:
            raise TransportError(f"mark read failed: {_scrub(str(exc))}") from exc

    async def download_media(self, message: Inbound) -> bytes:
        client = self._require_client()
        handle = message.media.handle if message.media else None
        if not isinstance(handle, WAMessage):
            raise TransportError("message has no downloadable media")
        try:
            data = await client.download_any(handle)
        except Exception as exc:
            raise TransportError(f"download failed: {_scrub(str(exc))}") from exc
        if not data:
            raise TransportError("download returned no data")
        return data

    async def is_connected(self) -> bool:
        """Ask whatsmeow directly (neonize's property returns a coroutine)."""
        if self._client is None:
            return False
        try:
            return bool(await self._client.is_connected)
        except Exception:
            return False

    def stats(self) -> dict[str, Any]:
        """Connection numbers for /v1/metrics; no phone numbers."""
        return {
            "state": self._state.value,
            "connected": self._state is ConnectionState.CONNECTED,
            "connect_attempts": self._connect_attempts,
            "reconnects": self._reconnects,
            "last_error": self._last_error,
            "connected_since": self._connected_since,
        }

    # ------------------------------------------------------------------ supervisor

    async def _supervise(self) -> None:
        """Connect; when connect() fails or returns, wait (capped exponential + jitter), retry."""
        client = self._require_client()
        delay = self._retry_delay_s
        while not self._stopping and self._state not in _TERMINAL:
            self._connect_attempts += 1
            self._set_state(
                ConnectionState.RECONNECTING if self._connect_attempts > 1 else ConnectionState.CONNECTING
            )
            self._qr_announced = self._pair_requested = False
            started = time.monotonic()
            try:
                if self._failures_in_row >= self.PROBE_AFTER_FAILURES:
                    await self._probe()
                task = await client.connect()
                await self._watch(task)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._failures_in_row += 1
                self._last_error = _scrub(f"{type(exc).__name__}: {exc}")
                logger.warning(
                    "whatsapp connect attempt {} failed: {}", self._connect_attempts, self._last_error
                )
            await self._release(wait_s=10.0)
            if self._stopping or self._state in _TERMINAL:
                break
            if time.monotonic() - started > 60:
                delay = self._retry_delay_s  # that connection lived a while: start over
            pause = random.uniform(delay / 2, delay)
            logger.info("whatsapp: reconnecting in {:.1f}s", pause)
            self._set_state(ConnectionState.RECONNECTING)
            await asyncio.sleep(pause)
            delay = min(delay * 2, self._max_retry_delay_s)

    async def _watch(self, task: asyncio.Task[Any]) -> None:
        """Wait for neonize's connect task; end early on a terminal state or an expired QR."""
        while not task.done():
            await asyncio.wait({task}, timeout=1.0)
            if self._state in _TERMINAL:
                return
            if (
                self._state is ConnectionState.PAIRING
                and time.monotonic() - self._last_qr_at > self._qr_timeout_s
            ):
                # whatsmeow's QR codes ran out; neonize then idles forever without a socket.
                logger.warning("whatsapp: pairing QR expired; starting a new pairing")
                return
        task.result()  # raises NeonizeError when connect() failed

    async def _probe(self) -> None:
        """TCP reachability check; neonize leaks a DB handle per failed connect()."""
        host, port = self.PROBE_ADDRESS
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout=10)
        except (OSError, TimeoutError) as exc:
            raise ConnectionError(f"{host} unreachable ({type(exc).__name__}: {exc})") from exc
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()

    async def _release(self, wait_s: float) -> None:
        """Stop the Go client (cancels neonize's blocking call) and collect its task."""
        client = self._client
        if client is None:
            return
        # neonize replaces its ctypes callbacks on every connect(); keep the old ones alive in
        # case Go still calls them (a ctypes callback freed under Go would crash the process).
        refs = getattr(client, "_connect_refs", None)
        if refs is not None and all(refs is not r for r in self._old_refs):
            self._old_refs = [*self._old_refs[-3:], refs]
        try:
            await asyncio.wait_for(client.stop(), timeout=wait_s)
        except Exception as exc:
            logger.debug("neonize stop: {}", type(exc).__name__)
        task = client.connect_task
        if task is None:
            return
        if not task.done():
            await asyncio.wait({task}, timeout=wait_s)
        if not task.done():
            # Blocked in whatsmeow's QR loop, which ignores Stop until its codes run out
            # (about 160 s); cancelling frees our loop but its worker thread lives on.
            logger.warning("neonize connect call did not end; abandoning it")
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        elif not task.cancelled():
            task.exception()  # mark retrieved; the supervisor already logged it

    def _supervisor_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            logger.opt(exception=task.exception()).error("whatsapp supervisor crashed")

    # ------------------------------------------------------------------ state

    def _set_state(self, state: ConnectionState) -> None:
        if self._state in _TERMINAL or (self._stopping and state is not ConnectionState.STOPPED):
            return
        if state is not self._state:
            logger.debug("whatsapp state {} -> {}", self._state.value, state.value)
        self._state = state
        if state is not ConnectionState.CONNECTED:
            self._connected_since = None

    def _terminal(self, state: ConnectionState, why: str) -> None:
        self._set_state(state)
        self._last_error = why
        logger.error("whatsapp: {}; will not reconnect (needs an operator)", why)

    def _require_client(self) -> NewAClient:
        if self._client is None:
            raise TransportError("transport not started")
        return self._client

    def _me(self) -> frozenset[str]:
        ids = set(self._own_ids)
        me = getattr(self._client, "me", None)  # neonize's Device, set from event 0
        if me is not None:
            ids.update(u for u in (me.JID.User, me.LID.User) if u)
        return frozenset(ids)

    # ------------------------------------------------------------------ event handlers

    def _guard(self, name: str, fn: Callable[..., Any]) -> Handler:
        """Wrap a handler: neonize drops the future, so an exception would vanish silently."""

        async def handler(_client: NewAClient, ev: Any) -> None:
            try:
                result = fn(ev)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                logger.opt(exception=True).error("whatsapp {} handler failed", name)

        return handler

    def _handle_message(self, ev: Any) -> None:
        # Synchronous on purpose: nothing awaited before on_inbound, so order holds.
        inbound = translate_message(ev, self._me())
        if inbound is None:
            return
        src = ev.Info.MessageSource
        chat, sender = nz.JID(), nz.JID()
        chat.CopyFrom(src.Chat)
        sender.CopyFrom(src.Sender)
        self._origin[inbound.id] = (chat, sender)
        if len(self._origin) > self.ORIGIN_CACHE:
            self._origin.popitem(last=False)
        self._on_inbound(inbound)

    def _handle_connected(self, _ev: Any) -> None:
        if self._ever_connected:
            self._reconnects += 1
        self._ever_connected = True
        self._failures_in_row = 0
        self._set_state(ConnectionState.CONNECTED)
        if self._state is ConnectionState.CONNECTED:
            self._connected_since = time.time()
            logger.info("whatsapp connected")

    def _handle_disconnected(self, _ev: Any) -> None:
        if self._state is ConnectionState.CONNECTED:
            self._set_state(ConnectionState.RECONNECTING)
            logger.warning("whatsapp disconnected; whatsmeow is reconnecting")

    def _handle_logged_out(self, ev: Any) -> None:
        self._terminal(ConnectionState.LOGGED_OUT, f"logged out (reason {int(ev.Reason)})")

    def _handle_replaced(self, _ev: Any) -> None:
        self._terminal(ConnectionState.REPLACED, "session replaced by another client")

    def _handle_ban(self, ev: Any) -> None:
        self._terminal(
            ConnectionState.BANNED, f"temporarily banned (code {int(ev.Code)}, expire {ev.Expire}s)"
        )

    def _handle_connect_failure(self, ev: Any) -> None:
        reason = int(ev.Reason)
        if reason in _LOGOUT_REASONS:
            self._terminal(ConnectionState.LOGGED_OUT, f"connect failure: logged out ({reason})")
        elif reason == _BAN_REASON:
            self._terminal(ConnectionState.BANNED, "connect failure: temporarily banned")
        else:
            self._last_error = _scrub(f"connect failure {reason}: {ev.Message}")
            logger.warning("whatsapp {}", self._last_error)

    def _handle_keepalive_timeout(self, ev: Any) -> None:
        self._last_error = f"keepalive timeout ({ev.ErrorCount} errors)"
        logger.warning("whatsapp {}", self._last_error)

    def _handle_keepalive_restored(self, _ev: Any) -> None:
        logger.info("whatsapp keepalive restored")

    def _handle_outdated(self, _ev: Any) -> None:
        self._last_error = "client outdated: update neonize"
        logger.error("whatsapp {}", self._last_error)

    def _handle_stream_error(self, ev: Any) -> None:
        self._last_error = _scrub(f"stream error {ev.Code}")
        logger.warning("whatsapp {}", self._last_error)

    def _handle_pair_status(self, ev: Any) -> None:
        if ev.Status == nz.PairStatus.SUCCESS:
            if ev.ID.User:
                self._own_ids.add(ev.ID.User)
            self._set_state(ConnectionState.CONNECTING)
            logger.info("whatsapp paired as {}", _mask(ev.ID.User))
        else:
            self._last_error = _scrub(f"pairing failed: {ev.Error}")
            logger.error("whatsapp {}", self._last_error)

    async def _handle_qr(self, data: bytes) -> None:
        code = data.decode() if isinstance(data, bytes) else str(data)
        self._last_qr_at = time.monotonic()
        self._set_state(ConnectionState.PAIRING)
        if self._on_qr is not None:
            self._on_qr(code)
        if self._pair_phone:
            if not self._pair_requested:
                self._pair_requested = True
                await self._request_pair_code()
            return
        if sys.stdout.isatty():
            segno.make(code).terminal(compact=True)
        elif not self._qr_announced:
            logger.info("whatsapp: a QR code is waiting to be scanned on /qr")
        self._qr_announced = True

    async def _request_pair_code(self) -> None:
        client = self._require_client()
        phone = self._pair_phone or ""
        try:
            code = await client.PairPhone(phone, show_push_notification=True)
        except Exception as exc:
            self._last_error = _scrub(f"pair code failed: {exc}")
            logger.error("whatsapp {}", self._last_error)
            return
        if self._on_pair_code is not None:
            self._on_pair_code(code)
        logger.info(
            "whatsapp pairing code for {}: {} (WhatsApp > Linked devices > Link with phone number)",
            _mask(phone),
            code,
        )
