"""The HTTP side: /health for the platform, /v1/metrics for the owner, /qr for pairing."""

from __future__ import annotations

import errno
import hmac
import html
import math
import re
from collections.abc import Callable
from typing import Any

import segno
from aiohttp import web

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
    return hmac.compare_digest(given.encode(), expected.encode())


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


async def start_http(app: web.Application, port: int, host: str = "0.0.0.0") -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as error:
        await runner.cleanup()
        reason = "already in use" if error.errno == errno.EADDRINUSE else (error.strerror or str(error))
        config_error(f"PORT={port}: {reason}")
    return runner
