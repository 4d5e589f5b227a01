"""Logs of full runs at DEBUG never show the secrets they were given or full phone numbers."""

from __future__ import annotations

import asyncio
import json
import re
import signal
from pathlib import Path

import pytest

from tests.fake_openai import FakeOpenAI
from tests.test_console import run_chat
from tests.test_http import free_port, get, start_bot

REPO = Path(__file__).resolve().parent.parent
OPENAI_KEY = "sk-test-Zq8vN3kLw9RtY2pXc7Hs"
ADMIN_TOKEN = "admin-Pv7Kd2Lq9Wm4Xz8Rt3Ny"
DB_PASSWORD = "pw-Hq3Lz8Vn2Kc7Tx9"
PHONES = ["34600111222", "5491122334455"]


def assert_clean(text: str) -> None:
    for secret in (OPENAI_KEY, ADMIN_TOKEN, DB_PASSWORD):
        assert secret not in text, f"a secret reached the logs: {secret[:6]}..."
    for phone in PHONES:
        assert phone not in text, "a full phone number reached the logs"


async def test_a_chat_run_at_debug_level_logs_no_secrets_and_masks_numbers(
    tmp_path: Path, fake_openai: FakeOpenAI
) -> None:
    script = "".join(
        json.dumps({"from": phone, "text": f"hola, mi número es {phone}"}) + "\n" for phone in PHONES
    )
    code, out, err = await run_chat(
        tmp_path,
        script,
        "--jsonl",
        OPENAI_API_KEY=OPENAI_KEY,
        OPENAI_BASE_URL=fake_openai.base_url,
        ADMIN_TOKEN=ADMIN_TOKEN,
        LOG_LEVEL="DEBUG",
    )
    assert code == 0 and len(out.splitlines()) == 2
    assert re.search(r"34\*+22@s\.whatsapp\.net", err), "numbers are logged masked"
    assert_clean(err)


@pytest.mark.timeout(60)
async def test_a_whatsapp_run_with_a_postgres_session_url_logs_no_password(tmp_path: Path) -> None:
    port = free_port()
    process = await start_bot(
        tmp_path,
        port,
        LOG_LEVEL="DEBUG",
        OPENAI_API_KEY=OPENAI_KEY,
        ADMIN_TOKEN=ADMIN_TOKEN,
        SUPABASE_DB_URL=f"postgresql://bot:{DB_PASSWORD}@127.0.0.1:9/postgres",
        WA_PAIR_PHONE=PHONES[0],
    )
    try:
        for _ in range(100):
            try:
                status, metrics = await get(f"http://127.0.0.1:{port}/v1/metrics")
                if status == 200:
                    break
            except Exception:
                pass
            await asyncio.sleep(0.2)
        await asyncio.sleep(3)  # let a few connection attempts fail and log
        assert_clean(metrics)
        process.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(process.communicate(), 20)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert_clean(out.decode(errors="replace") + err.decode(errors="replace"))


async def test_a_malformed_request_is_one_line_without_what_it_carried() -> None:
    """A 100 kB URL logged an ERROR with a traceback and the start of the request line: anyone could make
    the bot print that as often as they liked, a /qr token included."""
    import aiohttp
    from loguru import logger

    from bot.http import build_app, start_http
    from bot.logsetup import setup_logging

    lines: list[str] = []
    setup_logging("INFO")
    sink = logger.add(lambda m: lines.append(str(m)), level="DEBUG")
    runner = await start_http(build_app(dict, dict, admin_token=None), 0, host="127.0.0.1")
    port = runner.addresses[0][1]
    try:
        url = f"http://127.0.0.1:{port}/qr?token=SECRET{'a' * 100_000}"
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            assert response.status == 400
    finally:
        await runner.cleanup()
        logger.remove(sink)
    refused = [line for line in lines if "bad HTTP request" in line]
    assert len(refused) == 1 and "Traceback" not in refused[0] and "SECRET" not in "".join(lines)


@pytest.mark.parametrize("json_lines", [False, True])
def test_numbers_in_an_exceptions_text_and_traceback_are_masked(
    capsys: pytest.CaptureFixture[str], json_lines: bool
) -> None:
    """Only the message was masked: an error quoting a JID (whatsmeow's, say) printed the full number in
    the traceback of an ERROR line."""
    from loguru import logger

    from bot.logsetup import setup_logging

    setup_logging("WARNING", json=json_lines)
    try:
        try:
            raise RuntimeError(f"failed to send to:\n{PHONES[1]}@s.whatsapp.net")  # after a line break
        except RuntimeError as error:
            raise ConnectionError(f"send failed: {error}") from error
    except ConnectionError:
        logger.exception("could not answer a message in {}", f"{PHONES[0]}@s.whatsapp.net")
    finally:
        setup_logging("WARNING")
    err = capsys.readouterr().err
    assert "could not answer" in err and "Traceback" in err and "s.whatsapp.net" in err
    assert_clean(err)
    if json_lines:  # still JSON, numbers (a timestamp, a thread id) untouched
        record = json.loads(err.strip())["record"]
        assert isinstance(record["time"]["timestamp"], float) and isinstance(record["thread"]["id"], int)
