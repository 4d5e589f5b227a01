"""Settings: one typed object built once at start-up from the environment and `.env`."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sqlite3
import sys
import tempfile
from pathlib import Path
from typing import Literal, NoReturn
from urllib.parse import urlsplit

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from bot.handoff import DEFAULT_PHRASES, spans_clauses
from bot.localtime import time_zone

MAX_HANDOFF_PHRASES = 200
PLACEHOLDERS = {"changeme", "your-key-here", "sk-...", "xxx", "<your key>"}

# The two-letter (ISO 639-1) codes in openai/whisper's whisper/tokenizer.py `LANGUAGES`, in its order; its
# three-letter haw and yue are left out (TRANSCRIBE_LANGUAGE takes two letters). The transcription API
# answers any other code with HTTP 400, so a typo (sp for es) would fail every voice note, not start-up.
# Text, not a list literal (SIM905): formatted as a list it would take 98 lines.
WHISPER_LANGUAGES = frozenset(
    "en zh de es ru ko fr ja pt tr pl ca nl ar sv it id hi fi vi he uk el ms cs ro da hu ta no th ur hr bg lt"  # noqa: SIM905
    " la mi ml cy sk te fa lv bn sr az sl kn et mk br eu is hy ne mn bs kk sq sw gl mr pa si km sn yo so af"
    " oc ka be tg sd gu am yi lo uz fo ht ps tk nn mt sa lb my bo tl mg as tt ln ha ba jw su".split()
)


def _split_phrases(value: str) -> tuple[str, ...]:
    """HANDOFF_PHRASES as a list: comma-separated, blanks dropped ("a, b," is a and b)."""
    return tuple(phrase.strip() for phrase in value.split(",") if phrase.strip())


class Settings(BaseSettings):
    """Every number has a lower and an upper bound: an absurd value is one line naming the variable at
    start-up, not an OverflowError from SQLite (or an hour-long sleep) once the bot runs."""

    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", env_ignore_empty=True, extra="ignore", allow_inf_nan=False
    )

    # OpenAI (or any OpenAI-compatible server)
    openai_api_key: str | None = None
    openai_base_url: str | None = None
    openai_model: str = "gpt-4o-mini"
    openai_transcribe_model: str = "whisper-1"
    openai_timeout: float = Field(30.0, gt=0, le=600)
    openai_max_concurrency: int = Field(8, ge=1, le=256)
    openai_max_tokens: int = Field(600, ge=16, le=32_768)
    bot_system_prompt: str = (
        "You are the friendly WhatsApp assistant of a small business. "
        "Answer briefly and clearly, in the customer's language."
    )
    bot_system_prompt_file: Path | None = None
    bot_language: Literal["es", "en"] = "es"
    # The business's time zone (IANA name): the model is told the local date and time ("¿abrís hoy?").
    bot_timezone: str | None = None
    flows_file: Path | None = Path("flows.yaml")

    # Database
    supabase_url: str | None = None
    supabase_key: str | None = None
    supabase_db_url: str | None = None
    # On Railway with a volume attached, the volume is where data lives unless DATA_DIR says otherwise.
    data_dir: Path = Field(
        default_factory=lambda: Path(os.environ.get("RAILWAY_VOLUME_MOUNT_PATH") or "data")
    )
    retention_days: int = Field(30, ge=1, le=36_500)

    # Process
    port: int = Field(8080, ge=1, le=65535)
    app_env: Literal["development", "production"] = "development"
    log_level: Literal["TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL"] | None = None
    log_json: bool = False
    memory_limit: int | None = Field(None, ge=128, le=1_048_576, description="MB")

    # Conversation
    max_chat_history: int = Field(5, ge=0, le=100)
    max_reply_chars: int = Field(1500, ge=200, le=60000)
    max_inbound_chars: int = Field(4000, ge=100, le=100000)
    recovery_window_minutes: float = Field(10.0, ge=0, le=43_200)
    outbox_max_age_minutes: float = Field(60.0, ge=1, le=1440)
    reply_to_groups: Literal["never", "mentioned", "always"] = "never"
    cache_ttl_s: float = Field(3600.0, ge=0, le=2_592_000)
    cache_max_entries: int = Field(1000, ge=0, le=1_000_000)
    rate_limit_max_messages: int = Field(30, ge=1, le=1_000_000)
    rate_limit_cooldown: int = Field(60000, ge=1000, le=86_400_000, description="ms")
    human_takeover_minutes: float = Field(30.0, ge=0, le=525_600)
    allowed_numbers: str = ""
    blocked_numbers: str = ""
    # Comma-separated phrases with which a customer asks for a person; unset: bot.handoff's own, "off": none.
    handoff_phrases: str | None = None
    ai_circuit_failures: int = Field(5, ge=1, le=1000)
    ai_circuit_cooldown_s: float = Field(30.0, gt=0, le=3600)

    # Memory
    memory_warning: float = Field(0.8, gt=0, lt=1)
    memory_critical: float = Field(0.9, gt=0, lt=1)
    memory_shrink_fraction: float = Field(0.5, gt=0, le=1)
    busy_reply_after_s: float = Field(30.0, gt=0, le=86_400)
    max_active_chats: int = Field(1024, ge=1, le=100_000)
    max_waiting_messages: int = Field(10_000, ge=10, le=1_000_000)

    # Media
    audio_max_mb: float = Field(25.0, gt=0, le=100)
    audio_max_minutes: float = Field(10.0, gt=0, le=120)
    # The voice notes' language for the transcription model (ISO 639-1), or "auto" to let it detect it;
    # unset: BOT_LANGUAGE. A hint helps short notes, but a note in another language comes out translated.
    transcribe_language: str | None = None
    # Photos are shown to the model (it must read images: gpt-4o-mini does); off: their captions only.
    openai_vision: bool = True
    image_max_mb: float = Field(10.0, gt=0, le=64)
    # How closely OpenAI looks at a photo: "low" (512 px, a fixed small cost), "high" (tiles of 512 px: small
    # print, receipts) or "auto" (the model picks).
    image_detail: Literal["auto", "low", "high"] = "auto"
    # PDFs are read as text for the model (pdftotext); a scan without text is shown as photos when photos are.
    read_pdfs: bool = True
    pdf_max_mb: float = Field(10.0, gt=0, le=100)
    # Videos are shown to the model as frames when photos are (OPENAI_VISION); larger ones are not downloaded.
    video_max_mb: float = Field(20.0, gt=0, le=100)

    # WhatsApp
    wa_pair_phone: str | None = None
    wa_session_name: str = "bot"
    wa_heartbeat_s: float = Field(30.0, ge=5, le=3600)
    wa_presence_ping: bool = False
    wa_reject_calls: bool = False
    wa_send_per_minute: int = Field(40, ge=1, le=1000)
    wa_typing_chars_per_s: float = Field(25.0, ge=0, le=1000)
    wa_same_text_max_chats: int = Field(5, ge=1, le=10_000)
    # A customer's texts are answered once the chat has been quiet this long, together: "hola" / "quería
    # saber" / "¿precio del plan pro?" get one answer, not three. 0: each message on its own.
    wa_gather_s: float = Field(3.0, ge=0, le=30)
    admin_token: str | None = None

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) and value else value or None

    @field_validator(
        "openai_api_key",
        "openai_base_url",
        "supabase_url",
        "supabase_key",
        "supabase_db_url",
        "wa_pair_phone",
        "admin_token",
        "bot_system_prompt_file",
        "flows_file",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        if isinstance(value, str):
            value = value.strip()
            if not value:
                return None
            if value.lower() in PLACEHOLDERS:
                raise ValueError("is a placeholder: set the real value or leave it empty")
        return value

    @field_validator("bot_timezone")
    @classmethod
    def _time_zone_name(cls, value: str | None) -> str | None:
        if value is not None:
            value = time_zone(value.strip()).key
        return value

    @field_validator("transcribe_language", mode="before")
    @classmethod
    def _language_code(cls, value: object) -> object:
        """Only codes Whisper knows: the transcription server refuses any other, at each voice note."""
        if isinstance(value, str) and value.strip():
            code = value.strip().lower()
            if code != "auto" and not re.fullmatch(r"[a-z]{2}", code):
                raise ValueError("must be a two-letter language code such as es or en, or auto")
            if code != "auto" and code not in WHISPER_LANGUAGES:
                raise ValueError(
                    "is not a language Whisper knows: use a two-letter ISO 639-1 code such as es or en,"
                    " or auto"
                )
            return code
        return value

    @field_validator("openai_base_url", "supabase_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None:
            parts = urlsplit(value)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError("must be an http:// or https:// URL")
        return value

    @field_validator("wa_pair_phone")
    @classmethod
    def _digits_only(cls, value: str | None) -> str | None:
        if value is None:
            return None
        digits = value.lstrip("+").replace(" ", "")
        if not digits.isdigit() or not 8 <= len(digits) <= 15:
            raise ValueError(
                "must be the phone number in international format, digits only (e.g. 34600111222)"
            )
        if digits.startswith("0"):  # whatsmeow refuses it at every pairing, in a log line only
            raise ValueError(
                "starts with 0: use the international format, country code first, without 00 or a trunk"
                " 0 (e.g. 34600111222, not 0034600111222 or 0600111222)"
            )
        return digits

    @field_validator("allowed_numbers", "blocked_numbers")
    @classmethod
    def _number_list(cls, value: str) -> str:
        for position, number in enumerate(_split_numbers(value), 1):
            entry = f"entry {position} ({_masked(number)})"  # the line goes to the logs: no full numbers
            if not number.isdigit():
                raise ValueError(f"{entry} is not a phone number: use digits, comma-separated")
            if not 6 <= len(number) <= 15:
                raise ValueError(
                    f"{entry} has {len(number)} digits: a phone number in international format has"
                    " 6 to 15, country code included (e.g. 34600111222)"
                )
        return value

    @field_validator("admin_token")
    @classmethod
    def _long_token(cls, value: str | None) -> str | None:
        if value is not None and len(value) < 16:
            raise ValueError("must be at least 16 characters (use `openssl rand -hex 24`)")
        return value

    @field_validator("supabase_db_url")
    @classmethod
    def _postgres_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("postgres://", "postgresql://")):
            raise ValueError("must be a Postgres URL starting with postgresql://")
        if value is not None:
            try:
                parts = urlsplit(value)
                parts.port  # noqa: B018 - raises on a password that breaks the URL
                if parts.netloc.count("@") > 1 or "@" in parts.path:  # read apart differently by drivers
                    raise ValueError
            except ValueError:
                raise ValueError(
                    "cannot be read: percent-encode the password's special characters"
                    " (/ as %2F, # as %23, ? as %3F, @ as %40)"
                ) from None
        if value is not None and ".pooler.supabase.com:6543" in value:
            raise ValueError(
                "is Supabase's transaction pooler (port 6543): use the session pooler (port 5432)"
            )
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if bool(self.supabase_url) != bool(self.supabase_key):
            raise ValueError("SUPABASE_URL and SUPABASE_KEY must be set together")
        if self.memory_warning >= self.memory_critical:
            raise ValueError("MEMORY_WARNING must be lower than MEMORY_CRITICAL")
        return self

    @field_validator("handoff_phrases")
    @classmethod
    def _phrase_list(cls, value: str | None) -> str | None:
        if value is None or value.strip().lower() == "off":
            return value
        phrases = _split_phrases(value)
        if not phrases:
            raise ValueError("has no phrases: list some, comma-separated, or write off")
        if len(phrases) > MAX_HANDOFF_PHRASES:
            raise ValueError(f"{len(phrases)} phrases, at most {MAX_HANDOFF_PHRASES}")
        for position, phrase in enumerate(phrases, 1):
            if not any(ch.isalnum() for ch in phrase):
                raise ValueError(f"entry {position} ({phrase!r}) has no letters: it can never match")
            if spans_clauses(phrase):
                raise ValueError(
                    f"entry {position} ({phrase!r}) has ; ! ? ¡ or ¿ between its words: messages are read"
                    " clause by clause, so it can never match (make it two phrases)"
                )
        return value

    @property
    def handoff_phrase_list(self) -> tuple[str, ...]:
        """The phrases that hand a chat to a person; none when HANDOFF_PHRASES is off, or when
        HUMAN_TAKEOVER_MINUTES=0 (the bot would go on answering the customer it said a person would)."""
        if self.human_takeover_minutes <= 0 or (self.handoff_phrases or "").strip().lower() == "off":
            return ()
        if self.handoff_phrases is None:
            return DEFAULT_PHRASES
        return _split_phrases(self.handoff_phrases)

    @property
    def allowed(self) -> frozenset[str]:
        return frozenset(_split_numbers(self.allowed_numbers))

    @property
    def blocked(self) -> frozenset[str]:
        return frozenset(_split_numbers(self.blocked_numbers))

    @property
    def effective_log_level(self) -> str:
        if self.log_level:
            return self.log_level
        return "WARNING" if self.app_env == "production" else "INFO"

    @property
    def transcription_hint(self) -> str | None:
        """The language sent with each voice note; None: the model detects it."""
        if self.transcribe_language == "auto":
            return None
        return self.transcribe_language or self.bot_language

    @property
    def ai_enabled(self) -> bool:
        """A key, or a base URL alone: local servers (Ollama, llama.cpp, vLLM) need no key."""
        return self.openai_key is not None

    @property
    def openai_key(self) -> str | None:
        """The key the SDK sends; with a base URL and no key a placeholder, since the SDK wants one (not for
        OpenAI's own URL: without a key, AI is off, as with no URL)."""
        local = self.openai_base_url and "api.openai.com" not in self.openai_base_url
        return self.openai_api_key or ("no-key" if local else None)

    @property
    def system_prompt(self) -> str:
        if self.bot_system_prompt_file is not None:
            return self.bot_system_prompt_file.read_text(encoding="utf-8").strip()
        return self.bot_system_prompt

    @property
    def session_database(self) -> str:
        """What neonize gets as its database: a Postgres URL, or the sqlite session file."""
        return self.supabase_db_url or str(self.data_dir / "whatsapp-session.sqlite3")

    @property
    def store_path(self) -> Path:
        return self.data_dir / "bot.sqlite3"

    @property
    def journal_path(self) -> Path:
        """The Supabase store's local journal (memory.supabase_store.JOURNAL_FILE)."""
        return self.data_dir / "supabase-journal.sqlite3"

    @property
    def outbox_path(self) -> Path:
        """Replies waiting for the WhatsApp connection (`run` only)."""
        return self.data_dir / "outbox.sqlite3"

    def local_databases(self, *, outbox: bool) -> list[tuple[Path, str]]:
        """The SQLite files the bot opens at start, each with what a fresh start without it goes without."""
        if self.supabase_url:
            files = [(self.journal_path, "its writes not yet sent to Supabase")]
        else:
            files = [(self.store_path, "its message history")]
        if outbox:
            files.append((self.outbox_path, "its replies waiting for the connection"))
        return files

    @property
    def session_whereabouts(self) -> str:
        """Where the WhatsApp session is, for a message (never the Postgres URL: it holds a password)."""
        return "in Postgres (SUPABASE_DB_URL)" if self.supabase_db_url else f"in {self.session_database}"


def _split_numbers(value: str) -> list[str]:
    return [n.strip().lstrip("+").replace(" ", "") for n in value.split(",") if n.strip()]


def _masked(entry: str) -> str:
    return entry if len(entry) <= 6 else entry[:2] + "*" * (len(entry) - 4) + entry[-2:]


def describe_error(error: ValidationError) -> str:
    """One line naming the first bad variable and what it accepts (after "invalid configuration: ")."""
    first = error.errors()[0]
    name = "_".join(str(part) for part in first["loc"]).upper()
    message = first["msg"].removeprefix("Value error, ")
    if not name:
        return message
    value = first.get("input")
    hidden = ("KEY", "TOKEN", "URL", "NUMBERS", "PHONE")  # secrets, and customers' phone numbers
    shown = "" if name.endswith(hidden) or isinstance(value, dict) else f"={value!r}"
    return f"{name}{shown}: {message}"


def load_settings(**overrides: object) -> Settings:
    """Build the settings, or exit with one clear line if a value is bad."""
    try:
        settings = Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as error:
        config_error(describe_error(error))
    except UnicodeDecodeError as error:
        config_error(f".env is not UTF-8 text (byte {error.start})")
    if settings.bot_system_prompt_file is not None:
        problem = _text_file_problem(settings.bot_system_prompt_file)
        if problem:
            config_error(f"BOT_SYSTEM_PROMPT_FILE={settings.bot_system_prompt_file}: {problem}")
    if "flows_file" not in overrides and _set_but_empty("FLOWS_FILE"):
        settings.flows_file = None  # documented as "empty for none"; empty variables otherwise mean unset
    return settings


MIN_FREE_BYTES = 1 << 20
"""Below this much free space in DATA_DIR the bot does not start: SQLite cannot even open a database in WAL
mode (its shared-memory file needs room), and the errors it gives ("disk I/O error") do not say why."""


def data_dir_problem(data_dir: Path) -> str | None:
    """Why DATA_DIR cannot hold the bot's files (missing and not creatable, read-only, a file, a full
    disk), or None."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=data_dir):
            pass
        free = shutil.disk_usage(data_dir).free
    except OSError as error:
        return error.strerror or type(error).__name__
    if free < MIN_FREE_BYTES:
        return (
            f"the disk is full ({free // 1024} KB free, the bot needs at least {MIN_FREE_BYTES >> 20} MB to"
            " start); free some space or give the volume more room (the bot's files are kept)"
        )
    return None


def sqlite_file_problem(path: Path, *, thorough: bool = False) -> str | None:
    """Why the SQLite file at `path` cannot be opened for writing (a folder, read-only, not a database), or
    None; a missing file is no problem (it is created). `thorough` also runs `PRAGMA quick_check`, which
    reads every page (for `doctor`); without it only the header and the schema are read (start-up).
    A file that is locked now (a running bot holds it) counts as no problem: unknown is not broken."""
    if path.is_dir():
        return "is a directory, not a database file"
    if not path.exists():
        return None
    for part in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        name = "" if part == path else f"{part.name} "
        if part.exists() and not os.access(part, os.R_OK):
            return f"{name}cannot be read (permission denied)"
        if part.exists() and not os.access(part, os.W_OK):
            return f"{name}is read-only"
    try:
        with contextlib.closing(
            sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=2)
        ) as conn:
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
            if thorough:
                found = [row[0] for row in conn.execute("PRAGMA quick_check(5)")]
                if found != ["ok"]:
                    return f"is damaged ({'; '.join(found)})"
    except sqlite3.OperationalError as error:
        if "locked" in str(error) or "busy" in str(error):
            return None
        return str(error)
    except sqlite3.Error as error:  # "file is not a database", "database disk image is malformed"
        return str(error)
    return None


def local_database_problems(
    settings: Settings, *, outbox: bool, thorough: bool = False
) -> list[tuple[Path, str, str]]:
    """(file, problem, what to do) for each local SQLite file the bot opens at start that it could not."""
    found = []
    for path, without in settings.local_databases(outbox=outbox):
        if problem := sqlite_file_problem(path, thorough=thorough):
            fix = "move it aside to start fresh"
            if "read-only" in problem or "permission" in problem:
                fix = "give the bot's user write access, or " + fix
            where = settings.session_whereabouts
            fix = f"{fix} (without {without}){_with_journal_files(path)}"
            found.append((path, problem, f"{fix}; the WhatsApp session is {where} and is kept"))
    if outbox and not settings.supabase_db_url:  # `run` opens the session file too (else it is in Postgres)
        session = Path(settings.session_database)
        if problem := sqlite_file_problem(session, thorough=thorough):
            if "read-only" in problem or "permission" in problem:
                fix = "give the bot's user write access"
            elif settings.supabase_url and settings.supabase_key:
                fix = "move it aside: the next start restores the session from its backup in Supabase"
            else:
                fix = "move it aside and pair the number again (a new QR code or pairing code)"
            found.append(
                (session, problem, f"{fix}{_with_journal_files(session)}; the message history is kept")
            )
    return found


def _with_journal_files(path: Path) -> str:
    """SQLite replays a -wal file left behind onto whatever database takes the name: moved with it."""
    left = [part.name for part in (Path(f"{path}-wal"), Path(f"{path}-shm")) if part.exists()]
    return f", and {' and '.join(left)} with it" if left else ""


def _text_file_problem(path: Path) -> str | None:
    try:
        path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        return f"not UTF-8 text (byte {error.start})"
    except OSError as error:
        return error.strerror or "cannot be read"
    return None


def _set_but_empty(name: str) -> bool:
    """True when the variable is set to an empty value, in the environment or else in `.env`."""
    if name in os.environ:
        return not os.environ[name].strip()
    try:
        from dotenv import dotenv_values  # pydantic-settings' own .env reader

        value = dotenv_values(".env").get(name)
    except (OSError, UnicodeDecodeError):
        return False
    return value is not None and not value.strip()


def config_error(what: str) -> NoReturn:
    """Stop start-up with one line on stderr and exit status 2."""
    print(f"invalid configuration: {what}", file=sys.stderr)
    raise SystemExit(2)
