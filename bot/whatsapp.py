"""`python -m bot run`: the bot on WhatsApp, from start to a clean exit.

Order of start: HTTP first (so /health passes while waiting for the session lease or a QR scan), then the
session lease (one instance per WhatsApp session), the session restored from Supabase if it lives there,
crash recovery, and the connection. On SIGTERM or SIGINT, the reverse: stop intake and finish replies in
flight, disconnect, save the session, release the lease, flush the store.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import signal
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loguru import logger

from bot.app import Bot
from bot.config import Settings
from bot.governor import GovernedTransport, GovernorLimits
from bot.http import build_app, start_http
from bot.limits import SlidingWindowLimiter
from bot.replies import all_canned_texts, reply
from connection.background import BackgroundTasks
from connection.lease import make_lease
from connection.types import ChatId, ConnectionState, Inbound, MessageId, MessageKind

if TYPE_CHECKING:
    from connection.neonize_adapter import NeonizeTransport
    from connection.session_backup import SessionBackup

STOP_BUDGET_S = 13.0  # of Railway's 15 s between SIGTERM and SIGKILL (railway.json drainingSeconds)
# The longest a pairing code lives: a QR code 60 s (later ones 20 s), a pairing code until the login
# websocket closes (160 s). Older ones are not shown on /qr while the bot rests between pairings.
CODE_LIFE_S = {"qr": 60.0, "pair_code": 160.0}
BLOCKING_THREADS = 32
EX_TEMPFAIL = 75  # the lease went to another instance: exit so the platform restarts this one as a waiter
CALL_NOTICE_EVERY_S = 600.0  # a caller is told to write at most once in this long (WA_REJECT_CALLS)
CALL_NOTICE_CHATS = 1000  # callers remembered for that (least recently calling out)


def session_backup_for(settings: Settings) -> SessionBackup | None:
    """With only SUPABASE_URL/KEY, the session file is snapshotted to Supabase, so a redeploy on an
    ephemeral disk keeps the pairing (with SUPABASE_DB_URL the session lives in Postgres already)."""
    if not (settings.supabase_url and settings.supabase_key) or settings.supabase_db_url:
        return None
    from connection.session_backup import SessionBackup  # supabase is heavy: imported only when used

    return SessionBackup(
        Path(settings.session_database),
        url=settings.supabase_url,
        key=settings.supabase_key,
        session_id=settings.wa_session_name,
    )


def warn_if_the_journal_is_ephemeral(settings: Settings, environ: Mapping[str, str]) -> bool:
    """On Railway without a volume, the Supabase store's local journal is on the container's disk."""
    on_railway = bool(environ.get("RAILWAY_PROJECT_ID"))
    if not (settings.supabase_url and on_railway) or environ.get("RAILWAY_VOLUME_MOUNT_PATH"):
        return False
    logger.warning(
        "no volume: writes waiting in the local journal during a Supabase outage are lost if the"
        " service is redeployed before Supabase is back; attach a volume to keep them"
    )
    return True


async def run_whatsapp(settings: Settings) -> int:
    """Serve HTTP and keep the WhatsApp connection up until SIGTERM or SIGINT; returns the exit code."""
    from connection.neonize_adapter import NeonizeTransport

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    # neonize runs every Go call on asyncio's default executor, which has 6 threads on 2 cores: the
    # connection's own call holds one for its whole life, and sends waiting for their ack (up to 80 s) could
    # take the rest, leaving the watchdog's probe to time out behind them (a false "socket dead"). Threads
    # start only when needed.
    asyncio.get_running_loop().set_default_executor(
        concurrent.futures.ThreadPoolExecutor(max_workers=BLOCKING_THREADS, thread_name_prefix="blocking")
    )
    background = BackgroundTasks("whatsapp-run")
    pairing: dict[str, Any] = {"qr": None, "pair_code": None}
    made_at: dict[str, float] = {}  # when each code came: /qr hides one older than any WhatsApp takes

    def new_code(kind: str, code: str) -> None:
        pairing[kind] = code
        made_at[kind] = time.monotonic()

    def qr_state() -> dict[str, Any]:
        now = time.monotonic()
        live = {
            kind: code for kind, code in pairing.items() if now - made_at.get(kind, now) < CODE_LIFE_S[kind]
        }
        return {
            **live,
            "state": transport.state.value,
            "rest_s": transport.pairing_rest_s(),
            "lease_wait": lease_wait(bot.lease.stats()) if bot.lease is not None else None,
        }

    stop = asyncio.Event()
    exit_code = 0

    backup = session_backup_for(settings)

    def on_state(state: ConnectionState) -> None:
        if state is ConnectionState.CONNECTED:
            pairing.update(qr=None, pair_code=None)
        elif state is ConnectionState.LOGGED_OUT and backup is not None:
            background.spawn(backup.forget(), "forget-session-backup")

    async def ask_to_resend(chat: ChatId) -> None:
        # The pipeline's own test (BLOCKED_NUMBERS, ALLOWED_NUMBERS and bot_contacts, as last read): a number
        # whose messages get no answer gets no request either.
        if bot.pipeline.refuses_number(chat):
            return
        # The governor only lets the bot write to chats that wrote to it: this one did, undecryptably.
        governor.note_inbound(Inbound(id=MessageId(""), chat=chat, sender=chat, kind=MessageKind.OTHER))
        await governor.send_text(chat, reply("resend", settings.bot_language))

    # One notice per caller per window: each call sent one, and each took a slot of the send budget every
    # customer's answers share (45 calls held a customer's answer for a minute).
    call_notices = SlidingWindowLimiter(1, CALL_NOTICE_EVERY_S, max_keys=CALL_NOTICE_CHATS)

    async def tell_caller(chat: ChatId) -> None:
        if bot.pipeline.refuses_number(chat) or call_notices.check(chat) != "ok":
            return  # the call is declined all the same
        governor.note_inbound(Inbound(id=MessageId(""), chat=chat, sender=chat, kind=MessageKind.OTHER))
        await governor.send_text(chat, reply("call_rejected", settings.bot_language))

    def on_inbound(message: Inbound) -> None:
        governor.note_inbound(message)
        bot.pipeline.submit(message)

    transport = NeonizeTransport(
        settings.session_database,
        on_inbound=on_inbound,
        name=settings.wa_session_name,
        pair_phone=settings.wa_pair_phone,
        on_qr=lambda code: new_code("qr", code),
        on_pair_code=lambda code: new_code("pair_code", code),
        log_level=settings.effective_log_level,
        heartbeat_s=settings.wa_heartbeat_s,
        presence_ping=settings.wa_presence_ping,
        on_state=on_state,
        outbox_path=settings.outbox_path,
        outbox_max_age_s=settings.outbox_max_age_minutes * 60,
        on_undecryptable=ask_to_resend,
        on_call=tell_caller if settings.wa_reject_calls else None,
        print_qr=not settings.log_json,
    )
    governor = GovernedTransport(
        transport,
        GovernorLimits(
            per_minute=settings.wa_send_per_minute,
            typing_chars_per_s=settings.wa_typing_chars_per_s,
            same_text_max_chats=settings.wa_same_text_max_chats,
        ),
        canned=all_canned_texts(),
    )
    bot = Bot.build(settings, governor)
    bot.pipeline.gather_s = settings.wa_gather_s  # the console answers each line at once
    if settings.wa_reject_calls:
        bot.call_notices = call_notices  # in /v1/metrics' memory.structures
    governor.hold = bot.pipeline.takeover.holds  # an answer is not sent once the owner has the chat
    transport.on_reply_dropped = bot.pipeline.reply_dropped  # nor remembered when it never went out
    bot.pipeline.on_reply_parts = transport.group_parts  # all of it, after a restart too
    bot.connection_stats = lambda: {
        **transport.stats(),
        **(backup.stats() if backup else {}),
        "governor": governor.stats(),
    }

    def lease_lost(why: str) -> None:
        nonlocal exit_code
        logger.error("session lease lost ({}): stopping so that only one instance answers", why)
        exit_code = EX_TEMPFAIL
        stop.set()

    # One instance per WhatsApp session: an advisory lock when the session is in Postgres, a lease row
    # in Supabase without a volume, nothing to guard with a volume.
    bot.lease = make_lease(
        settings.wa_session_name,
        db_url=settings.supabase_db_url,
        supabase_url=settings.supabase_url,
        supabase_key=settings.supabase_key,
        volume_path=os.environ.get("RAILWAY_VOLUME_MOUNT_PATH"),
        on_lost=lease_lost,
    )

    warn_if_the_journal_is_ephemeral(settings, os.environ)

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    await bot.start(recover=False)
    runner = await start_http(
        build_app(bot.metrics, qr_state, admin_token=settings.admin_token, pair_now=transport.pair_now),
        settings.port,
    )
    logger.info("HTTP on port {}: /health, /v1/metrics, /qr", settings.port)
    # /health answers while this waits: a new deployment must turn healthy for Railway to stop the old
    # one, and stopping the old one is what frees the lease.
    acquiring = asyncio.create_task(bot.lease.acquire(), name="session-lease")
    stopping = asyncio.create_task(stop.wait(), name="stop-signal")
    try:
        await asyncio.wait({acquiring, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not stop.is_set():
            acquiring.result()
            if backup is not None:
                await backup.restore_if_missing()
            await bot.recover()
            await transport.start()
            if backup is not None:
                await backup.start()
            await stop.wait()
        logger.info("stopping: finishing replies in flight")
    finally:
        for task in (acquiring, stopping):
            task.cancel()
        await asyncio.gather(acquiring, stopping, return_exceptions=True)
        # Railway kills the process `drainingSeconds` (15) after SIGTERM: every step shares one budget, so
        # the lease is released before that (else the next instance waits out the lease's TTL).
        deadline = loop.time() + STOP_BUDGET_S

        def left(cap: float) -> float:
            return max(0.5, min(cap, deadline - loop.time()))

        await bot.pipeline.stop(timeout=left(8.0))
        with contextlib.suppress(Exception):
            await asyncio.wait_for(transport.stop(), left(5.0))
        if backup is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(backup.stop(), left(10.0))  # the final snapshot, before the lease goes
        await bot.save_pauses(left(5.0))  # the next instance reads them as soon as it holds the lease
        # Replies recorded while draining must be in the database the next instance reads (Supabase
        # without a volume): the store is closed, its writes flushed, before the lease goes.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(bot.stop(timeout=1.0), left(6.0))
        await bot.lease.release()  # disconnected and saved: the next instance may connect now
        await runner.cleanup()
    logger.info("stopped")
    exit_now_if_stuck(transport, exit_code)
    return exit_code


def lease_wait(lease: Mapping[str, Any]) -> str | None:
    """Why the bot is not connecting yet, for /qr: the session lease it waits for (None: not waiting)."""
    if lease.get("state") != "waiting":
        return None
    if lease.get("last_error"):
        return f"the database cannot be reached: {lease['last_error']}"
    return f"another instance holds it ({lease.get('holder') or 'unknown'})"


def exit_now_if_stuck(transport: NeonizeTransport, code: int) -> None:
    """End the process here when a neonize Go call could not be stopped (its pairing call ignores Stop):
    its worker thread blocks, and `asyncio.run` would wait for it at exit."""
    if transport.hard_exit_needed:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
