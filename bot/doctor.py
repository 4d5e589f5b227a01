"""`doctor` checks what the bot needs and says how to fix what is missing; `logout` unlinks the device."""

from __future__ import annotations

import contextlib
import difflib
import shutil
import sqlite3
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

from bot.ai import OPENAI_DEFAULT_BASE_URL
from bot.config import Settings, data_dir_problem, local_database_problems
from bot.flows import FlowsFileError, load_flows_file
from connection.supervisor import scrub


def _line(ok: bool, what: str, fix: str = "", *, warn: bool = False) -> bool:
    """Print one check; `warn` marks something that works only in part (it does not fail `doctor`)."""
    mark = "FAIL" if not ok else "warn" if warn else "ok  "
    print(f"[{mark}] {what}" + (f"\n       fix: {fix}" if fix and (warn or not ok) else ""))
    return ok


async def _check_openai(settings: Settings) -> bool:
    if not settings.openai_key:
        return _line(
            True,
            "OpenAI: no OPENAI_API_KEY nor OPENAI_BASE_URL, AI answers are off (keyword flows still work)",
        )
    import openai

    client = openai.AsyncOpenAI(
        api_key=settings.openai_key,
        base_url=settings.openai_base_url or OPENAI_DEFAULT_BASE_URL,
        timeout=10,
        max_retries=0,
    )
    try:
        page = await client.models.list()
    except openai.AuthenticationError:
        missing = not settings.openai_api_key
        return _line(
            False,
            "OpenAI: the server wants an API key" if missing else "OpenAI: the API key was refused",
            "set OPENAI_API_KEY" if missing else "check OPENAI_API_KEY",
        )
    except openai.NotFoundError:  # the server answered: the path is wrong (Ollama's URL without /v1)
        where = scrub(settings.openai_base_url or "api.openai.com")
        return _line(
            False,
            f"OpenAI: {where} answers, but has no OpenAI API there (HTTP 404)",
            "check OPENAI_BASE_URL: it usually ends in /v1 (Ollama: http://localhost:11434/v1)",
        )
    except openai.OpenAIError as error:
        where = scrub(settings.openai_base_url or "api.openai.com")  # a proxy's URL may hold a password
        return _line(
            False,
            f"OpenAI: cannot reach {where} ({type(error).__name__})",
            "check the network",
        )
    model = settings.openai_model
    listed = sorted({str(m.id) for m in getattr(page, "data", None) or () if getattr(m, "id", None)})
    if not listed:  # some OpenAI-compatible servers list nothing: nothing to check the name against
        return _line(True, f"OpenAI: reachable, model {model} (the server lists no models to check it)")
    if len(listed) == 1 and settings.openai_base_url and not _offered(model, listed):
        # llama.cpp's server (one model loaded) lists it by its file name and answers to any name
        return _line(True, f"OpenAI: reachable, model {model} (the server lists one model, {listed[0]})")
    if not _offered(model, listed):
        where = scrub(settings.openai_base_url or "api.openai.com")
        close = difflib.get_close_matches(model, listed, n=3, cutoff=0.6)
        return _line(
            False,
            f"OpenAI: model {model} is not among the {len(listed)} model(s) {where} lists"
            + (f"; close names: {', '.join(close)}" if close else ""),
            "set OPENAI_MODEL to a model the server offers",
        )
    _line(True, f"OpenAI: reachable, model {model}")
    return _check_transcribe_model(settings, listed)


def _check_transcribe_model(settings: Settings, listed: list[str]) -> bool:
    """Voice notes go to OPENAI_TRANSCRIBE_MODEL on the same server; a server without it (Ollama has no
    speech-to-text) answers every voice note with an apology, but texts work: a warning, not a failure."""
    model = settings.openai_transcribe_model
    if _offered(model, listed):
        return _line(True, f"OpenAI: voice notes transcribed by {model}")
    return _line(
        True,
        f"OpenAI: transcription model {model} is not among the models the server lists:"
        " voice notes will get an apology asking for text",
        "set OPENAI_TRANSCRIBE_MODEL to a speech-to-text model the server offers",
        warn=True,
    )


def _offered(model: str, listed: list[str]) -> bool:
    """Whether the server lists the model, under any name servers use for it: Gemini lists
    `models/gemini-2.0-flash` and takes `gemini-2.0-flash`; Ollama lists `llama3:latest`, takes `llama3`."""
    names: set[str] = set()
    for name in listed:
        names.update((name, name.rsplit("/", 1)[-1], name.removesuffix(":latest")))
    return model in names or model.removesuffix(":latest") in names


def _check_local_databases(settings: Settings) -> list[bool]:
    """Every SQLite file the bot opens at start, read through (`PRAGMA quick_check`): `run` refuses to
    start with one that is not a database, damaged, read-only or a directory."""
    problems = {
        path: (problem, fix)
        for path, problem, fix in local_database_problems(settings, outbox=True, thorough=True)
    }
    results = []
    for path, _ in settings.local_databases(outbox=True):
        if path in problems:
            problem, fix = problems[path]
            results.append(_line(False, f"SQLite file {path}: {problem}", fix))
        elif path == settings.store_path:
            new = "" if path.exists() else ", created at the first start"
            results.append(_line(True, f"database: SQLite at {path} (Supabase not configured{new})"))
        elif path.exists():
            results.append(_line(True, f"SQLite file {path} reads through"))
        problems.pop(path, None)
    for path, (problem, fix) in problems.items():  # the WhatsApp session file
        results.append(_line(False, f"SQLite file {path}: {problem}", fix))
    return results


def _check_flows(settings: Settings) -> bool:
    """The flows file as the bot reads it at start (the same loader): `run` refuses a malformed one."""
    path = settings.flows_file
    if path is None:
        return _line(True, "keyword flows: none (FLOWS_FILE is empty)")
    if not path.exists():
        if "flows_file" in settings.model_fields_set:  # named on purpose: the bot refuses to start
            return _line(
                False,
                f"keyword flows: FLOWS_FILE={path}: no such file",
                "create it, or leave FLOWS_FILE empty",
            )
        return _line(True, f"keyword flows: none ({path} not found)")
    try:
        flows = load_flows_file(path)
    except FlowsFileError as error:
        return _line(
            False,
            f"keyword flows: {' '.join(str(error).split())}",  # a YAML error spans lines
            "fix the file a flow sends (its path is relative to the flows file)"
            if " file '" in str(error) or " photo '" in str(error)
            else "fix the file: a YAML or JSON list of {keywords, answer} entries",
        )
    return _line(True, f"keyword flows: {len(flows)} in {path}")


async def _check_supabase(url: str, key: str | None) -> bool:
    import aiohttp

    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
            session.get(
                f"{url.rstrip('/')}/rest/v1/chats?select=chat_id&limit=1",
                headers={"apikey": key or "", "Authorization": f"Bearer {key}"},
            ) as response,
        ):
            ok = response.status == 200
            return _line(
                ok,
                f"Supabase: HTTP {response.status} reading table chats",
                "apply supabase/migrations and use the service_role key",
            )
    except (aiohttp.ClientError, TimeoutError) as error:
        return _line(
            False,
            f"Supabase: cannot reach it ({type(error).__name__})",
            "check SUPABASE_URL",
        )


def _check_data_dir(settings: Settings) -> bool:
    problem = data_dir_problem(settings.data_dir)
    if problem:
        fix = "" if "disk is full" in problem else "set DATA_DIR to a writable folder"
        return _line(False, f"data dir {settings.data_dir}: {problem}", fix)
    return _line(True, f"data dir {settings.data_dir.resolve()} is writable")


async def _check_session_database(url: str) -> bool:
    """SUPABASE_DB_URL is connected to before anything: a wrong one left `run` waiting for the session lease
    for ever, healthy and never on WhatsApp."""
    from connection.lease import PgConnection, PgParams, _describe

    try:
        conn = await PgConnection.connect(PgParams.from_url(url), application_name="whatsapp-bot-doctor")
    except ImportError as error:
        return _line(False, f"WhatsApp session: {error}", "pip install -r requirements.txt (asyncpg)")
    except Exception as error:
        return _line(
            False,
            f"WhatsApp session: Postgres at SUPABASE_DB_URL: {_describe(error)}",
            "check SUPABASE_DB_URL: use Supabase's session pooler (Connect > Session pooler, port 5432); "
            "the direct host db.<ref>.supabase.co needs IPv6",
        )
    await conn.close()
    return _line(True, "WhatsApp session: kept in Postgres (SUPABASE_DB_URL), reachable")


def _check_session(settings: Settings) -> bool:
    if settings.supabase_url:
        return _line(True, "WhatsApp session: local file, snapshotted to Supabase (wa_sessions) every 60 s")
    path = Path(settings.session_database)
    devices = _linked_devices(path)
    if devices is None:
        return _line(True, f"WhatsApp session: {path} cannot be read now (a running bot may hold it)")
    if devices:
        return _line(True, f"WhatsApp session: {path} holds a linked device (paired before)")
    return _line(True, f"WhatsApp session: none yet; `python -m bot` shows a QR to pair ({path})")


def _linked_devices(path: Path) -> int | None:
    """Devices in whatsmeow's session file (the file exists from the first start, paired or not); None
    when it cannot be read now (locked by a running bot, say): unknown is not "never paired"."""
    if not path.exists():
        return 0
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=2)) as conn:
            return int(conn.execute("SELECT count(*) FROM whatsmeow_device").fetchone()[0])
    except sqlite3.OperationalError as error:
        return 0 if "no such table" in str(error) else None
    except sqlite3.Error:
        return None


def _check_admin_token(settings: Settings) -> bool:
    if settings.admin_token:
        return _line(True, "ADMIN_TOKEN set: the QR page /qr is on")
    # Not a failure: the QR is also drawn in the logs (unless LOG_JSON), and a pairing code needs neither.
    if settings.wa_pair_phone:
        return _line(
            True, "ADMIN_TOKEN not set: /qr is off; pairing uses the code in the logs (WA_PAIR_PHONE)"
        )
    if not settings.log_json:
        return _line(True, "ADMIN_TOKEN not set: /qr is off; pairing relies on the QR drawn in the logs")
    return _line(
        False,
        "ADMIN_TOKEN not set: /qr is off, and with LOG_JSON no QR is drawn in the logs: no way to pair",
        "set ADMIN_TOKEN (then open /qr) or WA_PAIR_PHONE (a pairing code in the logs)",
    )


def _check_time_zone(settings: Settings) -> bool:
    """Without BOT_TIMEZONE the model cannot tell "¿abrís hoy?" from yesterday: a warning, not a failure."""
    if settings.bot_timezone:
        now = datetime.now(ZoneInfo(settings.bot_timezone))
        return _line(
            True, f"BOT_TIMEZONE {settings.bot_timezone}: the model is told it is {now:%A %H:%M} there"
        )
    return _line(
        True,
        'BOT_TIMEZONE not set: the model does not know the local date or time ("¿abrís hoy?")',
        "set BOT_TIMEZONE to the business's time zone, such as Europe/Madrid",
        warn=settings.ai_enabled,
    )


def _check_pdftotext(settings: Settings) -> bool:
    if shutil.which("pdftotext") is not None:
        return _line(True, "pdftotext installed")
    if not settings.read_pdfs:
        return _line(True, "pdftotext not installed (READ_PDFS=false: PDFs are not read)")
    return _line(
        False,
        "pdftotext not installed: PDFs get the polite reply",
        "apt-get install poppler-utils, or set READ_PDFS=false",
    )


async def run_doctor(settings: Settings) -> int:
    results = [
        _line(
            shutil.which("ffmpeg") is not None,
            "ffmpeg installed",
            "apt-get install ffmpeg",
        ),
        _line(
            shutil.which("ffprobe") is not None,
            "ffprobe installed",
            "apt-get install ffmpeg",
        ),
        _check_pdftotext(settings),
        _check_data_dir(settings),
        *_check_local_databases(settings),
        _check_flows(settings),
        await _check_openai(settings),
        *(
            [await _check_supabase(settings.supabase_url, settings.supabase_key)]
            if settings.supabase_url
            else []
        ),
        await _check_session_database(settings.supabase_db_url)
        if settings.supabase_db_url
        else _check_session(settings),
        _check_admin_token(settings),
        _check_time_zone(settings),
    ]
    failed = results.count(False)
    print("all good" if not failed else f"{failed} problem(s) found")
    return 0 if not failed else 1


async def run_logout(settings: Settings) -> int:
    """Unlink the device on WhatsApp's side, then delete the session (local file, and its Supabase copy)."""
    from bot.whatsapp import exit_now_if_stuck, session_backup_for
    from connection.neonize_adapter import NeonizeTransport
    from connection.types import TransportError

    backup = session_backup_for(settings)
    if backup is not None:
        await backup.restore_if_missing()  # on an ephemeral disk the session is only in Supabase
    path = Path(settings.session_database)
    if not settings.supabase_db_url and not path.exists():
        print("no local session: nothing to log out")
        return 0
    if not settings.supabase_db_url and _linked_devices(path) == 0:
        # Never paired: nothing to unlink on WhatsApp's side (connecting would only retry and fail).
        for leftover in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
            leftover.unlink(missing_ok=True)
        print("the session was never paired: local session file deleted")
        if backup is not None:
            await backup.forget()
            await backup.close()
        return 0
    transport = NeonizeTransport(
        settings.session_database,
        on_inbound=lambda _: None,
        name=settings.wa_session_name,
        log_level="WARNING",
    )
    code = 0
    try:
        await transport.logout()
        print("device unlinked from WhatsApp; local session deleted")
    except TransportError as error:
        print(f"could not unlink on WhatsApp's side: {error}")
        if "no linked session" not in str(error):  # a device may still be linked: only the phone can tell
            print("remove the device on the phone: WhatsApp > Linked devices")
        code = 1
    if backup is not None:
        await backup.forget()
        await backup.close()
        print("the session copy in Supabase (wa_sessions) was deleted")
    exit_now_if_stuck(transport, code)  # an unpaired session in Postgres: whatsmeow's QR loop ignores Stop
    return code
