"""The HTTP side: /health for the platform, /v1/metrics for the owner, /qr for pairing."""

from __future__ import annotations

import asyncio
import errno
import hmac
import html
import math
import re
import socket
import time
from collections.abc import Callable
from typing import Any

import segno
from aiohttp import web
from loguru import logger

from bot.config import config_error

MetricsSource = Callable[[], dict[str, Any]]
QrSource = Callable[[], dict[str, Any]]


def prometheus_text(metrics: dict[str, Any], prefix: str = "whatsapp_bot") -> str:
    """Flatten the metrics JSON into Prometheus text: numbers and booleans only, strings as labels.

    Error texts (`last_error`...) stay in the JSON only: as labels, each distinct text would start a new
    series.
    """
    lines: list[str] = []

    def walk(value: Any, name: str, key: str = "") -> None:
        if isinstance(value, bool):
            lines.append(f"{name} {int(value)}")
        elif isinstance(value, int | float):
            lines.append(f"{name} {_sample(value)}")
        elif isinstance(value, str) and "error" not in key:
            # A text may quote URLs or span lines: escaped, or one scrape fails.
            label = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
            lines.append(f'{name}_info{{value="{label}"}} 1')
        elif isinstance(value, dict):
            for child, item in value.items():
                walk(item, f"{name}_{_NOT_IN_NAMES.sub('_', str(child))}", str(child))

    walk(metrics, prefix)
    return "\n".join(lines) + "\n"


_NOT_IN_NAMES = re.compile(r"[^a-zA-Z0-9_:]")


def _sample(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return str(value)


def token_ok(request: web.Request, expected: str | None) -> bool:
    if not expected:
        return False
    scheme, _, credentials = request.headers.get("Authorization", "").strip().partition(" ")
    given = request.query.get("token") or (credentials.strip() if scheme.casefold() == "bearer" else "")
    # A header's bytes that are not UTF-8 arrive as lone surrogates, which plain .encode() refuses (a 500 for
    # anyone): "surrogatepass" encodes every str, and never as the bytes of a valid UTF-8 token.
    return hmac.compare_digest(
        given.encode("utf-8", "surrogatepass"), expected.encode("utf-8", "surrogatepass")
    )


_QR_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>WhatsApp pairing</title>
<meta http-equiv="refresh" content="{refresh};url={again}">
<style>body{{font-family:sans-serif;text-align:center;margin:2em}} svg{{width:320px;height:320px}}</style>
</head><body><h1>{title}</h1>{body}</body></html>"""

AUTO = "auto"  # query parameter of the page's own refreshes: they show codes but never end a rest


def qr_page(qr: dict[str, Any], *, again: str = "", now: str = "") -> str:
    """The pairing page. `again`: the URL the page refreshes itself to; `now`: the URL a person follows to end
    a rest between unscanned pairings (both carry the caller's own query, token included)."""
    code, pair_code, state, rest_s = (
        qr.get("qr"),
        qr.get("pair_code"),
        qr.get("state", "unknown"),
        qr.get("rest_s"),
    )
    again = html.escape(again, quote=True)
    if state == "connected":
        body = "<p>The bot is connected to WhatsApp.</p>"
        return _QR_PAGE.format(refresh=30, again=again, title="Paired", body=body)
    parts = []
    if pair_code:
        parts.append(f"<p>Pairing code: <b style='font-size:2em'>{html.escape(pair_code)}</b></p>")
    if code:
        parts.append(segno.make(code, error="l").svg_inline(scale=6))
        parts.append(
            "<p>WhatsApp &gt; Linked devices &gt; Link a device, then scan. The page follows new codes.</p>"
        )
    if not parts and qr.get("lease_wait"):
        parts.append(
            "<p>Not connecting to WhatsApp yet: waiting for the session lease, "
            f"{html.escape(str(qr['lease_wait']))}.</p>"
        )
    if not parts and rest_s is not None:
        parts.append(
            "<p>Nobody scanned the last codes, so the bot waits before asking WhatsApp for new ones "
            f"(next in {math.ceil(rest_s / 60)} min).</p>"
            f"<p><a href='{html.escape(now, quote=True)}'>Get a code now</a></p>"
        )
    if not parts:
        parts.append(
            f"<p>No code yet (connection state: {html.escape(state)}). This page refreshes itself.</p>"
        )
    return _QR_PAGE.format(refresh=5, again=again, title="Link this bot to WhatsApp", body="".join(parts))


def build_app(
    metrics: MetricsSource,
    qr: QrSource,
    *,
    admin_token: str | None,
    pair_now: Callable[[], None] | None = None,
) -> web.Application:
    """`pair_now`: called when a person opens /qr (not on the page's own refreshes: a tab left open would
    end every rest between unscanned pairings, and each pairing costs neonize a database handle)."""

    async def health(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def metrics_view(request: web.Request) -> web.Response:
        snapshot = metrics()
        if request.query.get("format") == "prometheus":
            return web.Response(text=prometheus_text(snapshot), content_type="text/plain")
        return web.json_response(snapshot)

    async def qr_view(request: web.Request) -> web.Response:
        if not admin_token:
            return web.Response(status=403, text="set ADMIN_TOKEN to use /qr\n")
        if not token_ok(request, admin_token):
            return web.Response(status=401, text="missing or wrong token\n")
        if AUTO not in request.query and pair_now is not None:
            pair_now()
        own = request.rel_url.without_query_params(AUTO)  # every other parameter as given, repeats too
        page = qr_page(qr(), again=str(own.update_query({AUTO: "1"})), now=str(own))
        return web.Response(text=page, content_type="text/html", headers={"Cache-Control": "no-store"})

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/v1/metrics", metrics_view)
    app.router.add_get("/qr", qr_view)
    return app


# /health, /v1/metrics and /qr take tiny requests (a /qr URL with its token, a browser's usual headers), so
# aiohttp's limits (128 headers of 8 KB each) only let anyone make the bot hold megabytes per connection.
MAX_LINE_BYTES = 2048  # the request line: a path with a token
MAX_FIELD_BYTES = 4096  # one header line: a browser's cookies on a custom domain
MAX_HEADERS = 32  # a browser sends about 15, the platform's proxy adds about 8
REQUEST_DEADLINE_S = 10.0  # a connection gets this long for a complete request, and as much idle after one
MAX_CONNECTIONS = 128  # open at once: health checks and scrapes need a handful; fds are the bot's too
RECEIVE_BUFFER_BYTES = 8192  # per connection, in the kernel (Linux doubles it); see _listening_socket


async def start_http(
    app: web.Application,
    port: int,
    host: str | None = None,
    *,
    request_deadline_s: float = REQUEST_DEADLINE_S,
    max_connections: int = MAX_CONNECTIONS,
) -> web.AppRunner:
    """Serve `app` with limits that keep anyone on the internet from holding the bot's memory.

    aiohttp's `keepalive_timeout` is armed when a connection opens and re-armed after each response, and
    closes the connection if no complete request has arrived by then: with a short one, that is also the
    deadline for a request whose headers come slowly (slowloris).

    `host`: None (the default) listens on every address, IPv6 and IPv4 alike; an explicit address listens on
    that address only, in its own family ("0.0.0.0" is IPv4 only).
    """
    runner = web.AppRunner(
        app,
        access_log=None,
        handle_signals=False,
        keepalive_timeout=request_deadline_s,
        max_line_size=MAX_LINE_BYTES,
        max_field_size=MAX_FIELD_BYTES,
        max_headers=MAX_HEADERS,
    )
    await runner.setup()
    assert runner.server is not None
    _cap_connections(runner.server, max_connections)
    try:
        await web.SockSite(runner, _listening_socket(host, port)).start()
    except OSError as error:
        await runner.cleanup()
        reason = "already in use" if error.errno == errno.EADDRINUSE else (error.strerror or str(error))
        config_error(f"PORT={port}: {reason}")
    return runner


def _listening_socket(host: str | None, port: int) -> socket.socket:
    """The socket `web.TCPSite` would make, with a small receive buffer, which aiohttp has no option for.

    A request aiohttp cannot parse (a header over the limit) keeps what was read with it referenced from the
    error's traceback, a reference cycle that lives until Python's cyclic garbage collector runs: with the
    default buffer each read is up to 256 KB, and a burst of 3,000 such requests held 470 MB. A small buffer
    makes every read, and what a connection can push before it is answered 400 and closed, a few KB.

    With no `host`, one dual-stack socket: Railway's private network (`<service>.railway.internal`) is IPv6
    only in environments created before 16 October 2025, so a scraper in the same project could not reach a
    bot on IPv4 alone; IPv4 clients still connect (as IPv4-mapped addresses). A machine without IPv6 (a
    container with it disabled) gets the IPv4 socket of before.
    """
    if host is not None:
        return _bound_socket(socket.AF_INET6 if ":" in host else socket.AF_INET, host, port)
    try:
        return _bound_socket(socket.AF_INET6, "::", port, dual_stack=True)
    except OSError as error:
        if error.errno in (errno.EADDRINUSE, errno.EACCES):  # the port's fault, not a missing IPv6: say so
            raise
        logger.info("HTTP: no IPv6 here ({}), listening on IPv4 only", error.strerror or error)
    return _bound_socket(socket.AF_INET, "0.0.0.0", port)


def _bound_socket(
    family: socket.AddressFamily, host: str, port: int, *, dual_stack: bool = False
) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if dual_stack:  # explicit: the system default (net.ipv6.bindv6only, or BSD's and Windows' 1) varies
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio's create_server does
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER_BYTES)  # before listen()
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def _cap_connections(server: web.Server, limit: int) -> None:
    """Keep at most `limit` connections open: a new one past it closes the oldest.

    aiohttp has no option for this (`backlog` only bounds connections not yet accepted), and the `Server`
    is built inside `AppRunner`, so its `connection_made` is wrapped here. Without a cap, connections opened
    faster than the request deadline closes them pile up, each with its memory and a file descriptor the
    bot's databases and WhatsApp socket need too. The oldest goes rather than the newest: connections held
    open on purpose are the old ones, and a health check or a scrape arriving meanwhile is answered.
    """
    admit = server.connection_made
    warned_at = -math.inf

    def connection_made(handler: web.RequestHandler, transport: asyncio.Transport) -> None:
        nonlocal warned_at
        admit(handler, transport)
        live = [other for other in server.connections if other.connected]  # closed ones linger a moment
        if len(live) <= limit:
            return
        if live[0] is not handler:
            live[0].force_close()
        else:
            # Not at once: aiohttp starts the connection's task right after this, and that task fails
            # (an AssertionError logged as "never retrieved") when it finds the connection already lost.
            asyncio.get_running_loop().call_soon(handler.force_close)
        now = time.monotonic()
        if now - warned_at >= 60:  # at most a line a minute, however many are closed
            warned_at = now
            logger.warning("HTTP: {} connections open, closing the oldest", limit)

    server.connection_made = connection_made  # type: ignore[method-assign]
