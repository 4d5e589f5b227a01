"""`python -m bot run`'s shutdown, in process: neonize replaced by a loopback transport at its import, the
session lease by a recording one. What the next instance reads must be saved before the lease goes."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from bot import whatsapp
from bot.config import Settings
from connection import neonize_adapter
from connection.lease import NoopLease
from connection.loopback import LoopbackTransport
from connection.types import ChatId, Inbound, MessageId, MessageKind

CHAT = "34600111222@s.whatsapp.net"


class FakeNeonize(LoopbackTransport):
    """What run_whatsapp uses of NeonizeTransport, without a network."""

    instance: FakeNeonize | None = None

    def __init__(self, session: str, *, on_inbound: Any, **_: Any) -> None:
        super().__init__()
        self.on_inbound = on_inbound
        self.hard_exit_needed = False
        FakeNeonize.instance = self

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def stats(self) -> dict[str, Any]:
        return {}

    def group_parts(self, reply: MessageId, part_ids: list[MessageId]) -> None:
        pass

    def pair_now(self) -> None:
        pass

    def pairing_rest_s(self) -> float | None:
        return None


class RecordingLease(NoopLease):
    def __init__(self, events: list[str]) -> None:
        super().__init__("test")
        self.events = events

    async def release(self) -> None:
        self.events.append("lease released")
        await super().release()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def start_run(tmp_path: Path, **overrides: Any) -> tuple[asyncio.Task[int], FakeNeonize]:
    """`run_whatsapp` on the embedded defaults (and `overrides`), up: the lease held and recovery done."""
    FakeNeonize.instance = None
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        data_dir=tmp_path,
        flows_file=None,
        port=free_port(),
        wa_typing_chars_per_s=0,
        **overrides,
    )
    run = asyncio.create_task(whatsapp.run_whatsapp(settings))
    while FakeNeonize.instance is None:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.3)
    return run, FakeNeonize.instance


@pytest.mark.timeout(60)
async def test_the_store_is_closed_before_the_session_lease_is_released(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lease went first: with Supabase, replies recorded while draining were still in the local journal
    when the next instance took the lease and recovered, so it answered those messages again."""
    events: list[str] = []
    monkeypatch.setattr(neonize_adapter, "NeonizeTransport", FakeNeonize)
    monkeypatch.setattr(whatsapp, "make_lease", lambda *a, **k: RecordingLease(events))
    closes = whatsapp.Bot.stop

    async def stop_and_note(self: Any, timeout: float = 10.0) -> None:
        await closes(self, timeout)
        events.append("store closed")

    monkeypatch.setattr(whatsapp.Bot, "stop", stop_and_note)
    async with asyncio.timeout(20):
        run, transport = await start_run(tmp_path)
        transport.on_inbound(
            Inbound(MessageId("M1"), ChatId(CHAT), CHAT, MessageKind.TEXT, "hola", time.time())
        )
        while not transport.sent:
            await asyncio.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)  # as the platform stops it
        assert await run == 0
    assert events == ["store closed", "lease released"]


def test_railway_without_a_volume_warns_that_the_supabase_journal_is_ephemeral(tmp_path: Path) -> None:
    from loguru import logger

    supabase = Settings(  # type: ignore[call-arg]
        _env_file=None, data_dir=tmp_path, supabase_url="https://x.supabase.co", supabase_key="k" * 20
    )
    sqlite = Settings(_env_file=None, data_dir=tmp_path)  # type: ignore[call-arg]
    railway = {"RAILWAY_PROJECT_ID": "p"}
    lines: list[str] = []
    sink = logger.add(lines.append, level="WARNING")
    try:
        assert whatsapp.warn_if_the_journal_is_ephemeral(supabase, railway)
        assert not whatsapp.warn_if_the_journal_is_ephemeral(
            supabase, {**railway, "RAILWAY_VOLUME_MOUNT_PATH": "/data"}
        )
        assert not whatsapp.warn_if_the_journal_is_ephemeral(sqlite, railway)  # the whole store is local
        assert not whatsapp.warn_if_the_journal_is_ephemeral(supabase, {})  # not on Railway: unknown
    finally:
        logger.remove(sink)
    assert len(lines) == 1 and "attach a volume" in lines[0]


class StuckNeonize(FakeNeonize):
    """A send that never completes (the socket hangs) and a stop that hangs too."""

    async def send_text(self, chat: ChatId, text: str, file: str | None = None) -> MessageId:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def stop(self) -> None:
        await asyncio.Event().wait()


@pytest.mark.timeout(60)
async def test_a_stop_with_every_step_stuck_keeps_to_its_budget_and_still_releases_the_lease(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pipeline.stop(8) took 10 s (2 s more after its timeout) and squeezed the steps after it; the lease
    must go before the platform's kill whatever hangs."""
    events: list[str] = []
    monkeypatch.setattr(neonize_adapter, "NeonizeTransport", StuckNeonize)
    monkeypatch.setattr(whatsapp, "make_lease", lambda *a, **k: RecordingLease(events))
    monkeypatch.setattr(whatsapp, "STOP_BUDGET_S", 3.0)
    async with asyncio.timeout(20):
        run, transport = await start_run(tmp_path)
        hola = Inbound(MessageId("M1"), ChatId(CHAT), CHAT, MessageKind.TEXT, "hola", time.time())
        transport.on_inbound(hola)  # its answer's send hangs
        me = "34699999999@s.whatsapp.net"
        status = Inbound(
            MessageId("M2"),
            ChatId(me),
            me,
            MessageKind.TEXT,
            "!bot status",
            time.time(),
            from_me=True,
            is_self_chat=True,
        )
        transport.on_inbound(status)  # the owner's answer (a side task) hangs as well
        await asyncio.sleep(0.2)
        started = time.monotonic()
        os.kill(os.getpid(), signal.SIGTERM)
        assert await run == 0
    took = time.monotonic() - started
    assert events == ["lease released"]
    assert took < 3.0 + 2.0, f"stopping took {took:.1f} s with a 3 s budget"
