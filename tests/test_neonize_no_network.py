"""A real neonize client with a temp sqlite session and no network: it must keep retrying.

The connect fails at once here (DNS lookup of web.whatsapp.com), so neonize's blocking Go call
returns and its worker thread ends; stop() then has nothing left running and returns quickly.
"""

from __future__ import annotations

import asyncio
import re
import time
import warnings
from pathlib import Path

import pytest

from connection.types import ConnectionState, Inbound

with warnings.catch_warnings():
    # neonize leaves `os.popen("uname -a")` unclosed at import (neonize/utils/platform.py:39).
    warnings.simplefilter("ignore", ResourceWarning)
    from connection.neonize_adapter import NeonizeTransport


@pytest.mark.timeout(60)
async def test_connect_without_network_keeps_retrying(tmp_path: Path) -> None:
    received: list[Inbound] = []
    transport = NeonizeTransport(
        str(tmp_path / "session.db"),
        on_inbound=received.append,
        name="nonet-test",
        retry_delay_s=0.05,
        max_retry_delay_s=0.2,
        log_level="WARNING",
    )
    await transport.start()
    try:
        deadline = time.monotonic() + 20
        while transport.stats()["connect_attempts"] < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        stats = transport.stats()
        assert stats["connect_attempts"] >= 2, stats
        assert transport.state is not ConnectionState.CONNECTED
        assert stats["connected"] is False
        assert stats["connected_since"] is None
        assert stats["last_error"]
        assert not re.search(r"\d{6,}", stats["last_error"])  # nothing phone-like
        assert await transport.is_connected() is False
        # the event loop is alive and responsive while the Go side fails and retries
        assert await asyncio.wait_for(asyncio.sleep(0, result="alive"), timeout=1) == "alive"
    finally:
        await asyncio.wait_for(transport.stop(), timeout=20)

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
