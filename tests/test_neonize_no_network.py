"""A real neonize client with a temp sqlite session and no network: it must keep retrying, with backoff.

The connect fails at once here (DNS lookup of web.whatsapp.com), so neonize's blocking Go call
returns and its worker thread ends; stop() then has nothing left running and returns quickly.
After three failures in a row the driver's TCP probe gates the real connect; it fails the same way.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import time
import warnings
from pathlib import Path

import pytest

from connection.types import ChatId, ConnectionState, Inbound, TransportError

with warnings.catch_warnings():
    # neonize leaves `os.popen("uname -a")` unclosed at import (neonize/utils/platform.py:39).
    warnings.simplefilter("ignore", ResourceWarning)
    from connection.neonize_adapter import NeonizeTransport

BASE_S, CAP_S = 0.05, 0.4


@pytest.mark.timeout(60)
async def test_connect_without_network_keeps_retrying_with_backoff(tmp_path: Path) -> None:
    received: list[Inbound] = []
    attempts_at: list[float] = []

    def on_state(state: ConnectionState) -> None:
        if state is ConnectionState.CONNECTING:
            attempts_at.append(time.monotonic())

    transport = NeonizeTransport(
        str(tmp_path / "session.db"),
        on_inbound=received.append,
        name="nonet-test",
        retry_delay_s=BASE_S,
        max_retry_delay_s=CAP_S,
        log_level="WARNING",
        on_state=on_state,
        outbox_path=tmp_path / "outbox.db",
    )
    await transport.start()
    try:
        deadline = time.monotonic() + 20
        while transport.stats()["connect_attempts"] < 6 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        stats = transport.stats()
        assert stats["connect_attempts"] >= 6, stats
        assert stats["attempts"] >= 5  # consecutive failures: nothing ever connected
        assert stats["retry_owner"] == "supervisor"
        assert transport.state in (ConnectionState.CONNECTING, ConnectionState.RECONNECTING)
        assert stats["connected"] is False
        assert stats["connected_since"] is None and stats["uptime_s"] == 0.0
        assert stats["last_error"]
        assert not re.search(r"\d{6,}", stats["last_error"])  # nothing phone-like
        assert await transport.is_connected() is False
        # waits follow the backoff: never longer than the cap (plus the failed attempt itself)
        waits = [b - a for a, b in itertools.pairwise(attempts_at)]
        assert max(waits) < CAP_S + 2.0, waits
        # a reply while WhatsApp is unreachable is kept, not failed
        queued = await transport.send_text(ChatId("34600111222@s.whatsapp.net"), "hola")
        assert queued.startswith("outbox-")
        assert transport.stats()["outbox_pending"] == 1
        # the event loop is alive and responsive while the Go side fails and retries
        assert await asyncio.wait_for(asyncio.sleep(0, result="alive"), timeout=1) == "alive"
    finally:
        started = time.monotonic()
        await asyncio.wait_for(transport.stop(), timeout=20)
        assert time.monotonic() - started < 5  # prompt, inside any platform's drain time

    assert transport.state is ConnectionState.STOPPED
    attempts = transport.stats()["connect_attempts"]
    await asyncio.sleep(0.5)
    assert transport.stats()["connect_attempts"] == attempts  # no retries after stop
    await transport.stop()  # idempotent
    assert received == []
    # neonize's blocking Go call has returned: no worker thread left to hang the loop's teardown
    client = transport._client
    assert client is not None and client.connect_task is not None
    assert client.connect_task.done()


@pytest.mark.timeout(60)
async def test_logout_without_network_deletes_the_local_session(tmp_path: Path) -> None:
    session = tmp_path / "session.db"
    session.write_bytes(b"")  # a session file, as neonize leaves it
    transport = NeonizeTransport(
        str(session), on_inbound=lambda _: None, name="nonet-logout", retry_delay_s=0.05, log_level="WARNING"
    )
    started = time.monotonic()
    with pytest.raises(TransportError, match="could not reach WhatsApp"):
        await transport.logout(timeout_s=1.0)
    assert time.monotonic() - started < 8
    assert not session.exists()
    assert transport.state is ConnectionState.LOGGED_OUT
