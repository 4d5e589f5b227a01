"""The HTTP side, over real requests on loopback: /health, /v1/metrics, /qr; and `python -m bot` itself."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import json
import logging
import os
import re
import signal
import socket
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from loguru import logger

from bot.http import build_app, prometheus_text, start_http
from tests.conftest import inbound
from tests.fake_openai import FakeOpenAI

REPO = Path(__file__).resolve().parent.parent
TOKEN = "test-admin-token-0123456789"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}"


async def get(url: str, **kwargs: Any) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(url, **kwargs) as response:
        return response.status, await response.text()


async def test_health_and_metrics_after_a_conversation(harness, fake_openai: FakeOpenAI) -> None:
    number = "34600111222"
    async with harness(openai_api_key="k", openai_base_url=fake_openai.base_url) as h:
        await h.say(inbound("mi pedido es el 4521", chat=f"{number}@s.whatsapp.net"))
        qr = {"qr": None, "pair_code": None, "state": "connected"}
        runner, base = await serve(build_app(h.bot.metrics, lambda: qr, admin_token=None))
        try:
            assert await get(f"{base}/health") == (200, '{"status": "ok"}')
            status, body = await get(f"{base}/v1/metrics")
            status_p, prom = await get(f"{base}/v1/metrics?format=prometheus")
        finally:
            await runner.cleanup()
    assert status == 200 and status_p == 200
    metrics = json.loads(body)
    assert {"memory", "connection", "messages", "cache", "ai", "uptime_s"} <= set(metrics)
    assert {"rss_mb", "limit_mb", "percent", "state"} <= set(metrics["memory"])
    assert metrics["memory"]["state"] == "normal" and metrics["memory"]["rss_mb"] > 10
    assert metrics["messages"]["received"] == 1 and metrics["messages"]["answered"] == 1
    assert metrics["ai"]["requests"] == 1 and "p95" in metrics["ai"]["latency_ms"]
    assert {"hits", "misses", "size", "hit_rate"} <= set(metrics["cache"])
    assert metrics["connection"]["state"] == "connected"
    for text in (body, prom):  # no numbers, no message text
        assert number not in text and "4521" not in text and "pedido" not in text
    assert "whatsapp_bot_messages_answered 1" in prom


_PROMETHEUS_LINE = re.compile(
    r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{value="(?:[^"\\\n]|\\[\\"n])*"\})? (NaN|[+-]Inf|-?[0-9.]+(e[+-]?[0-9]+)?)$'
)


def test_prometheus_text_stays_parseable_with_real_error_texts() -> None:
    """A live scrape during an outage carried `Get "https://web.whatsapp.com/ws/chat": dial tcp` unescaped,
    which made the whole scrape fail exactly when the owner wanted it. Error texts are now left out (each
    would be a new series); any other text is escaped."""
    error = 'NeonizeError: request: Get "https://web.whatsapp.com/ws/chat": dial tcp\\nsecond line\nthird'
    model = 'my "local" model\\v2\nbeta'
    text = prometheus_text(
        {
            "connection": {"last_error": error, "latency-ms.p95": float("nan"), "x": float("inf")},
            "model": model,
        }
    )
    lines = text.splitlines()
    assert len(lines) == 3 and "last_error" not in text
    for line in lines:
        assert _PROMETHEUS_LINE.match(line), line
    # And the label reads back as the very text (a Windows path keeps its backslashes).
    path = 'C:\\data\\x and a "quote"\nand a line'
    [line] = prometheus_text({"p": path}).splitlines()
    label = line.split('value="', 1)[1].rsplit('"} 1', 1)[0]
    assert re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), label) == path


def test_prometheus_text_flattens_numbers_and_labels_strings() -> None:
    text = prometheus_text({"memory": {"rss_mb": 50.5, "state": "normal"}, "connection": {"connected": True}})
    assert text.splitlines() == [
        "whatsapp_bot_memory_rss_mb 50.5",
        'whatsapp_bot_memory_state_info{value="normal"} 1',
        "whatsapp_bot_connection_connected 1",
    ]


async def test_qr_page_needs_the_admin_token() -> None:
    qr = {"qr": "2@abcdefghijklmnop,ref,key", "pair_code": "ABCD-EFGH", "state": "pairing"}
    runner, base = await serve(build_app(dict, lambda: qr, admin_token=TOKEN))
    off_runner, off_base = await serve(build_app(dict, lambda: qr, admin_token=None))
    try:
        assert (await get(f"{base}/qr"))[0] == 401
        assert (await get(f"{base}/qr?token=wrong-token-wrong-token"))[0] == 401
        assert (await get(f"{off_base}/qr?token={TOKEN}"))[0] == 403  # no token configured: off
        status, page = await get(f"{base}/qr?token={TOKEN}")
        status_h, page_h = await get(f"{base}/qr", headers={"Authorization": f"Bearer {TOKEN}"})
        # The scheme name is case-insensitive (RFC 9110); curl users type it every which way.
        assert (await get(f"{base}/qr", headers={"Authorization": f"bearer {TOKEN}"}))[0] == 200
        assert (await get(f"{base}/qr", headers={"Authorization": f"Basic {TOKEN}"}))[0] == 401
        # Bytes that are not UTF-8 in the header were a 500 and an ERROR traceback, for anyone, at will.
        port = int(base.rsplit(":", 1)[1])
        for auth in (b"Bearer \xff\xfe", b"Bearer \xed\xa0\x80" + TOKEN.encode()):
            head = b"GET /qr HTTP/1.1\r\nHost: x\r\nAuthorization: " + auth + b"\r\nConnection: close\r\n\r\n"
            assert status_of(await raw_request(port, head)) == 401
    finally:
        await runner.cleanup()
        await off_runner.cleanup()
    assert status == status_h == 200
    assert all("<svg" in shown and "ABCD-EFGH" in shown for shown in (page, page_h))


async def test_the_qr_pages_refresh_keeps_what_the_page_was_opened_with() -> None:
    """With the token given twice, the page checked the first and its refresh kept the last: a 401."""
    import html
    import re

    qr = {"qr": None, "pair_code": None, "state": "pairing"}
    asked: list[int] = []
    runner, base = await serve(
        build_app(dict, lambda: qr, admin_token=TOKEN, pair_now=lambda: asked.append(1))
    )
    try:
        status, page = await get(f"{base}/qr?token={TOKEN}&token=something-else&lang=es")
        found = re.search(r'content="5;url=([^"]+)"', page)
        assert status == 200 and found is not None
        refresh = html.unescape(found.group(1))
        assert (await get(base + refresh))[0] == 200
    finally:
        await runner.cleanup()
    assert "lang=es" in refresh and asked == [1]  # the refresh did not count as a person opening the page


async def wait_for(url: str, deadline_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            status, body = await get(url)
            if status == 200:
                return json.loads(body)
        except aiohttp.ClientError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{url} did not answer in {deadline_s} s")
        await asyncio.sleep(0.2)


async def start_bot(tmp_path: Path, port: int, **env: str) -> asyncio.subprocess.Process:
    """`python -m bot` as a platform runs it (stdin closed, PORT set); this machine has no network."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "SUPABASE_", "WA_"))}
    base.update(PYTHONPATH=str(REPO), PORT=str(port), DATA_DIR=str(tmp_path / "data"), **env)
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bot",
        cwd=tmp_path,
        env=base,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


@pytest.mark.timeout(90)
async def test_the_bot_serves_http_and_keeps_retrying_without_network(tmp_path: Path) -> None:
    """`python -m bot` as a platform runs it: no network here, so WhatsApp never connects."""
    port = free_port()
    process = await start_bot(tmp_path, port, APP_ENV="production")
    try:
        await wait_for(f"http://127.0.0.1:{port}/health", 30)
        deadline = time.monotonic() + 40
        while True:
            metrics = await wait_for(f"http://127.0.0.1:{port}/v1/metrics", 5)
            if metrics["connection"]["connect_attempts"] >= 2 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        assert metrics["connection"]["connect_attempts"] >= 2
        assert metrics["connection"]["connected"] is False
        assert process.returncode is None, "the process is still alive"
        process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(process.wait(), 15)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert code == 0


async def test_metrics_keep_their_shape_when_idle_and_when_ai_is_off(harness) -> None:
    """The rate-limit block vanished whenever no chat window was live (an empty limiter reads as false),
    and the ai block lost its latency fields with AI off: dashboards broke on an idle bot."""
    async with harness() as h:
        metrics = h.bot.metrics()
    assert {"limited", "notices"} <= set(metrics["rate_limit"])
    assert metrics["memory"]["structures"]["rate_limit_windows"]["max"] > 0
    assert metrics["ai"]["enabled"] is False and {"p50", "p95"} <= set(metrics["ai"]["latency_ms"])


async def raw_request(port: int, head: bytes) -> bytes:
    """Send `head` on a fresh connection and read until the server closes it (b"" when it said nothing)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 5)
    except ConnectionResetError:  # closed with the request unread
        return b""
    finally:
        writer.close()


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer else 0


async def test_http_refuses_headers_no_endpoint_needs() -> None:
    """aiohttp's defaults (128 headers of 8 KB) let 300 unauthenticated connections hold 560 MB of the
    bot's memory; the endpoints need a fraction of that, a browser's usual request included."""
    runner = await start_http(build_app(dict, dict, admin_token=None), 0, host="127.0.0.1")
    port = runner.addresses[0][1]
    close = b"Connection: close\r\n\r\n"
    try:
        big_header = await raw_request(
            port, b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: " + b"b" * 8000 + b"\r\n"
        )
        many = b"".join(b"X-%d: b\r\n" % n for n in range(40))
        many_headers = await raw_request(port, b"GET /health HTTP/1.1\r\nHost: x\r\n" + many + close)
        browser = [
            b"User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131",
            b"Accept: text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8",
            b"Accept-Language: es-ES,es;q=0.9,en;q=0.8",
            b"Accept-Encoding: gzip, deflate, br, zstd",
            b"Cookie: " + b"; ".join(b"c%d=%s" % (n, b"v" * 100) for n in range(30)),
            *(b"Sec-Fetch-%d: ?1" % n for n in range(12)),
            *(b"X-Forwarded-%d: 203.0.113.7" % n for n in range(8)),
        ]
        ok = await raw_request(
            port, b"GET /qr HTTP/1.1\r\nHost: x\r\n" + b"\r\n".join(browser) + b"\r\n" + close
        )
    finally:
        await runner.cleanup()
    assert status_of(big_header) == status_of(many_headers) == 400
    assert status_of(ok) == 403  # served: /qr without ADMIN_TOKEN configured


async def test_http_closes_a_request_that_never_completes() -> None:
    """A connection sending one header every few seconds (slowloris) was held for ever, and so was one
    that sent nothing: both are closed once the request deadline passes, as is one idle after a request."""
    runner = await start_http(
        build_app(dict, dict, admin_token=None), 0, host="127.0.0.1", request_deadline_s=1
    )
    port = runner.addresses[0][1]
    started = time.monotonic()

    async def slow() -> float:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        while not reader.at_eof() and time.monotonic() - started < 10:
            with contextlib.suppress(ConnectionError):
                writer.write(b"X-A: b\r\n")
                await writer.drain()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(reader.read(), 0.2)
        writer.close()
        return time.monotonic() - started

    async def silent() -> float:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.wait_for(reader.read(), 10)
        writer.close()
        return time.monotonic() - started

    async def idle_after_a_request() -> tuple[bytes, float]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        return answer, time.monotonic() - started

    try:
        slow_s, silent_s, (answer, idle_s) = await asyncio.gather(slow(), silent(), idle_after_a_request())
    finally:
        await runner.cleanup()
    assert slow_s < 3 and silent_s < 3 and idle_s < 3
    assert status_of(answer) == 200 and answer.endswith(b'{"status": "ok"}')


async def test_http_caps_open_connections() -> None:
    """Without a cap, connections opened faster than the deadline closes them pile up, each with memory and
    a file descriptor the bot's databases and WhatsApp socket need: past the cap a new one closes the
    oldest (quietly: no task left failing behind it), so a health check is still answered."""
    loop_errors: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _, context: loop_errors.append(context))
    runner = await start_http(build_app(dict, dict, admin_token=None), 0, host="127.0.0.1", max_connections=3)
    port = runner.addresses[0][1]
    held = []
    try:
        for _ in range(6):
            held.append(await asyncio.open_connection("127.0.0.1", port))
            await asyncio.sleep(0.05)
        served = await raw_request(port, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        await asyncio.sleep(0.1)
        closed = []
        for reader, _ in held:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(reader.read(), 0.1)
            closed.append(reader.at_eof())
    finally:
        for _, writer in held:
            writer.close()
        await runner.cleanup()
    gc.collect()  # a task that failed and was never awaited is reported when it is collected
    await asyncio.sleep(0)
    assert status_of(served) == 200 and loop_errors == []
    assert closed == [True] * 4 + [False] * 2  # the oldest went; the last two and the check fit in 3


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not has_ipv6_loopback(), reason="this machine has no IPv6 loopback (::1) to connect over")
async def test_http_answers_over_ipv4_and_ipv6_by_default() -> None:
    """Railway's private network is IPv6 only in environments created before 16 October 2025: a scraper in
    the same project calling bot.railway.internal never reached a bot listening on 0.0.0.0. By default one
    socket takes both families; an explicit 0.0.0.0 still means IPv4 only."""
    runner = await start_http(build_app(dict, dict, admin_token=None), 0)
    port = runner.addresses[0][1]
    ipv4_runner = await start_http(build_app(dict, dict, admin_token=None), 0, host="0.0.0.0")
    ipv4_port = ipv4_runner.addresses[0][1]
    try:
        over_ipv4 = await get(f"http://127.0.0.1:{port}/health")
        over_ipv6 = await get(f"http://[::1]:{port}/health")
        explicit_over_ipv4 = await get(f"http://127.0.0.1:{ipv4_port}/health")
        with pytest.raises(aiohttp.ClientConnectionError):
            await get(f"http://[::1]:{ipv4_port}/health")
    finally:
        await runner.cleanup()
        await ipv4_runner.cleanup()
    assert over_ipv4 == over_ipv6 == explicit_over_ipv4 == (200, '{"status": "ok"}')


async def test_http_listens_on_ipv4_where_there_is_no_ipv6(monkeypatch: pytest.MonkeyPatch) -> None:
    """A container with IPv6 disabled refuses an IPv6 socket: the bot listens on IPv4 as before, and says
    so once, rather than failing to start."""

    class NoIPv6(socket.socket):
        def __init__(self, family: int = -1, *args: Any, **kwargs: Any) -> None:
            if family == socket.AF_INET6:
                raise OSError(errno.EAFNOSUPPORT, os.strerror(errno.EAFNOSUPPORT))
            super().__init__(family, *args, **kwargs)

    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(m.record["message"]), level="DEBUG", filter="bot.http")
    monkeypatch.setattr(socket, "socket", NoIPv6)
    try:
        runner = await start_http(build_app(dict, dict, admin_token=None), 0)
    finally:
        monkeypatch.undo()
        logger.remove(sink)
    try:
        address = runner.addresses[0]
        answer = await get(f"http://127.0.0.1:{address[1]}/health")
    finally:
        await runner.cleanup()
    assert address[0] == "0.0.0.0" and answer == (200, '{"status": "ok"}')
    assert len(lines) == 1 and "IPv4 only" in lines[0], lines


_BLAST = """
import asyncio, sys
async def main() -> None:
    port, count = int(sys.argv[1]), int(sys.argv[2])
    held = []
    for _ in range(count):  # requests with headers over the limit, sent as fast as the bot takes them
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /health HTTP/1.1\\r\\nHost: x\\r\\n")
            for n in range(120):
                writer.write(b"X-%d: " % n + b"b" * 8000 + b"\\r\\n")
            await writer.drain()
            held.append(writer)
        except OSError:
            pass
asyncio.run(main())
"""


@pytest.mark.timeout(90)
async def test_a_burst_of_oversized_requests_holds_little_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """aiohttp keeps what it read with a request it cannot parse referenced from the error's traceback until
    the cyclic garbage collector runs: at 256 KB a read, 3,000 oversized requests held 470 MB. Each read is
    a few KB now."""
    monkeypatch.setattr(logging.getLogger("aiohttp.server"), "disabled", True)  # pytest keeps records
    runner = await start_http(build_app(dict, dict, admin_token=None), 0, host="127.0.0.1")
    port = runner.addresses[0][1]
    tracemalloc.start()
    try:
        client = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _BLAST, str(port), "1000", stderr=asyncio.subprocess.DEVNULL
        )
        await client.wait()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        await runner.cleanup()
    assert client.returncode == 0 and peak < 64 * 2**20, f"{peak / 2**20:.0f} MB"
