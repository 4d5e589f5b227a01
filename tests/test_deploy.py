"""Deploying on Railway: railway.json, .railway/railway.ts, the Dockerfile, and the start command run the
way the platform runs it.

Railway's own JSON schema (https://railway.com/railway.schema.json) cannot be fetched from the test
machines, so railway.json is checked twice, against what the platform documents and ships:
- the rules of the Config as Code reference (https://docs.railway.com/config-as-code/reference, source
  railwayapp/docs content/docs/config-as-code/reference.md): the keys, the builder and restart-policy values,
  `null` allowed where the reference says so;
- the types of the `railway` npm package (.railway/node_modules/railway/dist/iac: `BuildConfig`,
  `DeployConfig`, the service config the Railway API takes, which railway.json feeds) with `tsc`;
- numbers as JSON numbers: the reference shows overlapSeconds/drainingSeconds as strings, but the deploy
  parser rejects those ("deploy.drainingSeconds: Expected number, received string", railwayapp/docs#1243).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.supabase_stack import SupabaseStack, in_ci

REPO = Path(__file__).resolve().parents[1]
RAILWAY_DIR = REPO / ".railway"
SCHEMA_URL = "https://railway.com/railway.schema.json"


def railway_json() -> dict[str, Any]:
    return json.loads((REPO / "railway.json").read_text())


# -- railway.json against the documented rules ---------------------------------------------------------------

NULLABLE = object()  # marker: the reference says "This field can be set to null"


def _enum(*values: str) -> Any:
    return lambda v: v in values


def _int(minimum: int) -> Any:
    # JSON numbers, never strings (railwayapp/docs#1243); integers: seconds and counts.
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= minimum


def _str(v: Any) -> bool:
    return isinstance(v, str) and v != ""


def _strings(v: Any) -> bool:
    return isinstance(v, list) and all(_str(item) for item in v)


TOP_LEVEL = {"$schema": _str, "build": dict, "deploy": dict, "environments": dict}
BUILD_RULES: dict[str, tuple[Any, bool]] = {  # key -> (check, may be null)
    "builder": (_enum("RAILPACK", "DOCKERFILE", "NIXPACKS"), False),
    "watchPatterns": (_strings, False),
    "buildCommand": (_str, True),
    "dockerfilePath": (_str, True),
    "railpackVersion": (_str, True),
    "nixpacksConfigPath": (_str, True),
    "nixpacksPlan": (lambda v: isinstance(v, dict), True),
    "nixpacksVersion": (_str, True),
}
DEPLOY_RULES: dict[str, tuple[Any, bool]] = {
    "startCommand": (_str, True),
    "preDeployCommand": (_strings, False),
    "multiRegionConfig": (lambda v: isinstance(v, dict), True),
    "numReplicas": (_int(1), True),  # not on the reference page; DeployConfig.numReplicas in the SDK
    "healthcheckPath": (lambda v: _str(v) and v.startswith("/"), True),
    "healthcheckTimeout": (_int(1), True),
    "restartPolicyType": (_enum("ON_FAILURE", "ALWAYS", "NEVER"), False),
    "restartPolicyMaxRetries": (_int(0), True),
    "cronSchedule": (_str, True),
    "overlapSeconds": (_int(0), True),
    "drainingSeconds": (_int(0), True),
}


def railway_json_violations(config: Any) -> list[str]:
    """What Railway would reject in a railway.json, by the documented rules above."""
    if not isinstance(config, dict):
        return ["railway.json must be a JSON object"]
    problems = [f"unknown top-level key {k!r}" for k in config if k not in TOP_LEVEL]
    if config.get("$schema") != SCHEMA_URL:
        problems.append(f"$schema must be {SCHEMA_URL}")
    sections = [("build", config.get("build"), BUILD_RULES), ("deploy", config.get("deploy"), DEPLOY_RULES)]
    for env_name, env in (config.get("environments") or {}).items():
        sections += [
            (f"environments.{env_name}.build", (env or {}).get("build"), BUILD_RULES),
            (f"environments.{env_name}.deploy", (env or {}).get("deploy"), DEPLOY_RULES),
        ]
    for where, section, rules in sections:
        if section is None:
            continue
        if not isinstance(section, dict):
            problems.append(f"{where} must be an object")
            continue
        for key, value in section.items():
            if key not in rules:
                problems.append(f"{where}.{key}: unknown key")
                continue
            check, nullable = rules[key]
            if value is None:
                if not nullable:
                    problems.append(f"{where}.{key}: cannot be null")
            elif not check(value):
                problems.append(f"{where}.{key}: {value!r} is not accepted")
    return problems


def test_railway_json_follows_the_documented_rules() -> None:
    assert railway_json_violations(railway_json()) == []


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"drainingSeconds": "10"}, "drainingSeconds: '10' is not accepted"),  # the docs' own example
        ({"overlapSeconds": "60"}, "overlapSeconds: '60' is not accepted"),
        ({"restartPolicyType": "on_failure"}, "restartPolicyType"),
        ({"healthcheckPath": "health"}, "healthcheckPath"),
        ({"restartPolicyMaxRetries": 2.5}, "restartPolicyMaxRetries"),
        ({"drainingSecs": 10}, "drainingSecs: unknown key"),
        ({"restartPolicyType": None}, "restartPolicyType: cannot be null"),
    ],
)
def test_the_rules_catch_what_railway_rejects(change: dict[str, Any], problem: str) -> None:
    config = railway_json()
    config["deploy"].update(change)
    assert any(problem in p for p in railway_json_violations(config))


def test_railway_json_values_for_one_whatsapp_session() -> None:
    config = railway_json()
    build, deploy = config["build"], config["deploy"]
    assert build == {"builder": "DOCKERFILE", "dockerfilePath": "Dockerfile"}
    assert (REPO / build["dockerfilePath"]).is_file()
    assert deploy["startCommand"] == "python -m bot run"
    assert deploy["healthcheckPath"] == "/health"
    assert 30 <= deploy["healthcheckTimeout"] <= 300  # startup is seconds; pairing must not be needed to pass
    assert deploy["restartPolicyType"] == "ON_FAILURE" and 1 <= deploy["restartPolicyMaxRetries"] <= 20
    assert deploy["numReplicas"] == 1
    # No overlap: two processes on one WhatsApp session fight over it. Draining: long enough for the bot's
    # own shutdown (replies in flight, then the transport), short enough for a quick deploy.
    assert deploy["overlapSeconds"] == 0
    assert 5 <= deploy["drainingSeconds"] <= 30


# -- the railway npm package: its types, and .railway/railway.ts ---------------------------------------------


@pytest.fixture(scope="module")
def railway_sdk() -> Path:
    """.railway/node_modules (the `railway` package, TypeScript), installed from the lock file if missing."""
    tsc = RAILWAY_DIR / "node_modules" / ".bin" / "tsc"
    sdk = RAILWAY_DIR / "node_modules" / "railway" / "package.json"
    if not (tsc.exists() and sdk.exists()):
        npm = shutil.which("npm")
        if npm is None:
            reason = "npm is missing: cannot install .railway's packages (railway, typescript)"
            if in_ci():
                pytest.fail(reason + " (CI is set, so this is not skipped)", pytrace=False)
            pytest.skip(reason)
        result = subprocess.run(
            [npm, "ci", "--prefix", str(RAILWAY_DIR), "--no-audit", "--no-fund", "--loglevel=error"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, f"npm ci --prefix .railway failed:\n{result.stdout}\n{result.stderr}"
    assert (
        json.loads(sdk.read_text())["version"]
        == json.loads((RAILWAY_DIR / "package.json").read_text())["dependencies"]["railway"]
    ), ".railway/node_modules is not what package.json pins: run npm ci --prefix .railway"
    return tsc


def _tsc(tsc: Path, project: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(tsc), "--noEmit", "-p", str(project)], capture_output=True, text=True, timeout=120
    )


def test_railway_ts_type_checks_against_the_sdk(railway_sdk: Path) -> None:
    result = _tsc(railway_sdk, RAILWAY_DIR)
    assert result.returncode == 0, result.stdout + result.stderr


def test_railway_json_type_checks_against_the_sdk(railway_sdk: Path, tmp_path: Path) -> None:
    """railway.json as a TypeScript literal typed with the SDK's BuildConfig/DeployConfig: an unknown key or a
    wrong type is a compile error. Two bad variants prove the check is not vacuous."""
    iac_types = RAILWAY_DIR / "node_modules" / "railway" / "dist" / "iac" / "index.d.ts"
    header = 'import type { BuildConfig, DeployConfig } from "railway/iac";\n'
    shape = '{ "$schema": string; build: BuildConfig; deploy: DeployConfig }'

    def check_file(name: str, config: dict[str, Any]) -> None:
        (tmp_path / name).write_text(
            f"{header}export const config: {shape} = {json.dumps(config, indent=2)};\n"
        )

    good = railway_json()
    check_file("good.ts", good)
    (tmp_path / "tsconfig.json").write_text(
        json.dumps(
            {
                "compilerOptions": {
                    "target": "es2022",
                    "module": "nodenext",
                    "moduleResolution": "nodenext",
                    "strict": True,
                    "noEmit": True,
                    "types": [],
                    "exactOptionalPropertyTypes": True,
                    "paths": {"railway/iac": [str(iac_types)]},
                },
                "files": ["good.ts", "string_seconds.ts", "unknown_key.ts"],
            }
        )
    )
    check_file("string_seconds.ts", {**good, "deploy": {**good["deploy"], "drainingSeconds": "10"}})
    check_file("unknown_key.ts", {**good, "deploy": {**good["deploy"], "overlapSecs": 0}})
    result = _tsc(railway_sdk, tmp_path)
    errors = [line for line in (result.stdout + result.stderr).splitlines() if "error TS" in line]
    assert not [e for e in errors if e.startswith("good.ts")], errors
    assert any(e.startswith("string_seconds.ts") and "not assignable to type 'number'" in e for e in errors)
    assert any(
        e.startswith("unknown_key.ts") and "overlapSecs" in e and "does not exist" in e for e in errors
    )


def evaluate_railway_ts(environment: str = "production") -> dict[str, Any]:
    """Run .railway/railway.ts as the CLI does (default export, given a context); the project it returns."""
    script = (
        'Promise.all([import("./railway.ts"), import("railway/iac")]).then(async ([mod, iac]) => {'
        f" const ctx = iac.createRailwayContext({{ environment: {json.dumps(environment)},"
        " command: 'plan' });"
        " const project = await mod.default(ctx, iac.project);"
        " process.stdout.write(JSON.stringify(project)); });"
    )
    tsx = RAILWAY_DIR / "node_modules" / ".bin" / "tsx"
    result = subprocess.run(
        [str(tsx), "--eval", script], cwd=RAILWAY_DIR, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_railway_ts_describes_the_same_single_service(railway_sdk: Path) -> None:
    project = evaluate_railway_ts()
    services = [r for r in project["resources"] if r["type"] == "service"]
    volumes = [r for r in project["resources"] if r["type"] == "volume"]
    assert len(services) == 1 and len(volumes) == 1
    service, volume = services[0], volumes[0]

    config = railway_json()
    assert service["build"] == config["build"]
    deploy = service["deploy"]
    for key in ("startCommand", "healthcheckPath", "healthcheckTimeout", "restartPolicyType",
                "restartPolicyMaxRetries", "numReplicas", "overlapSeconds", "drainingSeconds"):  # fmt: skip
        assert deploy[key] == config["deploy"][key], key
    assert deploy["numReplicas"] == 1

    (mount,) = service["volumeAttachments"].values()
    assert mount["volume"] == volume["address"]
    variables = service["variables"]
    assert variables["DATA_DIR"] == {"type": "literal", "value": mount["mountPath"]}
    assert variables["APP_ENV"]["value"] == "production"
    # Secrets are never written in the file: kept from what is set in Railway.
    for secret in ("OPENAI_API_KEY", "ADMIN_TOKEN", "SUPABASE_KEY", "SUPABASE_DB_URL"):
        assert variables[secret] == {"type": "preserve"}
    # The same in every environment (a staging environment must not get a second replica, say).
    assert evaluate_railway_ts("staging") == project


# -- the Dockerfile ------------------------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; continuation lines joined, comments and directives dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in (REPO / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, "the Dockerfile ends inside a continuation"
    return out


def _index(instructions: list[tuple[str, str]], predicate: Any) -> int:
    matches = [i for i, item in enumerate(instructions) if predicate(*item)]
    assert matches, "instruction not found"
    return matches[0]


def test_dockerfile_base_system_packages_and_user() -> None:
    ins = dockerfile()
    froms = [args for word, args in ins if word == "FROM"]
    assert len(froms) == 1
    assert re.fullmatch(r"python:3\.11-slim(-[a-z]+)?(@sha256:[0-9a-f]{64})?", froms[0]), froms[0]
    assert (REPO / ".python-version").read_text().strip() == "3.11"

    runs = [args for word, args in ins if word == "RUN"]
    apt = [r for r in runs if "apt-get install" in r]
    assert len(apt) == 1
    assert "--no-install-recommends" in apt[0] and re.search(r"\bffmpeg\b", apt[0])
    assert re.search(r"\blibmagic1(t64)?\b", apt[0])  # python-magic, imported by neonize
    assert "apt-get update" in apt[0] and "rm -rf /var/lib/apt/lists/*" in apt[0]

    users = [args for word, args in ins if word == "USER"]
    assert users, "no USER: the bot would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    created = [r for r in runs if "useradd" in r]
    assert created and re.search(rf"--uid {user}\b", created[0]), "USER is not the user the image creates"
    assert _index(ins, lambda w, a: w == "USER") > max(
        i for i, (w, _) in enumerate(ins) if w in ("RUN", "COPY")
    )


def test_dockerfile_start_is_exec_form_and_matches_railway() -> None:
    ins = dockerfile()
    cmds = [args for word, args in ins if word == "CMD"]
    assert len(cmds) == 1
    cmd = json.loads(cmds[0])  # exec form: a JSON array, no shell between the platform and python
    assert cmd == ["python", "-m", "bot", "run"]
    assert cmd == shlex.split(railway_json()["deploy"]["startCommand"])
    assert "$PORT" not in cmds[0]  # the app reads PORT itself
    # Railway's start command replaces ENTRYPOINT, so nothing may hide there.
    assert not [args for word, args in ins if word == "ENTRYPOINT"]
    assert "STOPSIGNAL" not in {w for w, _ in ins} or ("STOPSIGNAL", "SIGTERM") in ins
    health = [args for word, args in ins if word == "HEALTHCHECK"]
    assert all("/health" in h and "CMD [" in h for h in health)


def test_dockerfile_installs_requirements_before_copying_the_code() -> None:
    ins = dockerfile()
    copy_requirements = _index(ins, lambda w, a: w == "COPY" and a.split()[0] == "requirements.txt")
    pip = _index(ins, lambda w, a: w == "RUN" and "pip install" in a)
    copy_all = _index(ins, lambda w, a: w == "COPY" and a.split()[0] == ".")
    assert copy_requirements < pip < copy_all
    assert "-r /tmp/requirements.txt" in ins[pip][1] or "-r requirements.txt" in ins[pip][1]
    assert "--no-cache-dir" in ins[pip][1]


def test_dockerfile_data_dir_and_no_secrets() -> None:
    ins = dockerfile()
    env = " ".join(args for word, args in ins if word == "ENV")
    assert re.search(r"\bDATA_DIR=/data\b", env) and re.search(r"\bAPP_ENV=production\b", env)
    assert any("/data" in args and "-o bot" in args for word, args in ins if word == "RUN")
    assert "VOLUME" not in {w for w, _ in ins}  # Railway rejects VOLUME; volumes are attached to the service
    secretish = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|PASSWD|DB_URL|CREDENTIAL)", re.I)
    for word, args in ins:
        if word in ("ENV", "ARG"):
            names = re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", args) or [args.split()[0]]
            assert not [n for n in names if secretish.search(n)], f"{word} {args}"
        if word in ("COPY", "ADD"):
            assert ".env" not in args.split()[:-1]
    assert "ADD" not in {w for w, _ in ins}  # COPY only: no remote URLs or archive magic


def _docker_pattern(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as a regex: Go's filepath.Match (`*`, `?` within one path element) plus
    Docker's `**` (any number of elements)."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether Docker leaves `path` out of the build context: the last matching pattern wins, `!` re-includes,
    and a pattern that matches a directory leaves out everything under it."""
    ignored = False
    parts = path.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    for raw in patterns:
        negate = raw.startswith("!")
        regex = _docker_pattern(raw.removeprefix("!").strip("/"))
        if any(regex.match(prefix) for prefix in prefixes):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_secrets_and_state_out_and_the_app_in() -> None:
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    left_out = [".env", ".env.production", "data/bot.sqlite3", "data/whatsapp-session.sqlite3",
                "x.sqlite3-wal", ".git/config", ".venv/bin/python", "bot/__pycache__/app.cpython-311.pyc",
                ".cache/pip/x",
                ".railway/node_modules/railway/package.json", "tests/test_deploy.py"]  # fmt: skip
    for path in left_out:
        assert dockerignored(path, patterns), f"{path} would be sent to the image build"
    needed = ["requirements.txt", "flows.yaml", ".env.example", "bot/__main__.py", "connection/lease.py"]
    needed += [
        str(p.relative_to(REPO))
        for d in ("bot", "connection", "memory", "media")
        for p in (REPO / d).glob("*.py")
    ]
    for path in needed:
        assert not dockerignored(path, patterns), f"{path} is needed in the image but .dockerignore drops it"


# -- the start command, run as the platform runs it ----------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Instance:
    """`python -m bot run` as Railway starts it: PORT set, APP_ENV=production, no TTY, stdin closed."""

    def __init__(self, tmp: Path, name: str, **env: str) -> None:
        self.port = _free_port()
        self.dir = tmp / name
        self.dir.mkdir()
        self.log_path = self.dir / "stderr.log"
        argv = shlex.split(railway_json()["deploy"]["startCommand"])
        assert argv[0] == "python"
        self.env = {
            **os.environ,  # already cleaned of the developer's bot settings by conftest's _clean_env
            "PORT": str(self.port),
            "APP_ENV": "production",
            "LOG_JSON": "true",
            "DATA_DIR": str(self.dir / "data"),
            "PYTHONPATH": str(REPO),
            "PYTHONUNBUFFERED": "1",
            "RAILWAY_ENVIRONMENT": "production",
            "RAILWAY_DEPLOYMENT_ID": f"deploy-{name}",
            "RAILWAY_REPLICA_ID": f"replica-{name}",
            "RAILWAY_DEPLOYMENT_DRAINING_SECONDS": str(railway_json()["deploy"]["drainingSeconds"]),
            **env,
        }
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, *argv[1:]],
            cwd=self.dir,  # like /app: no .env of the developer's
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # no controlling terminal
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def get(self, http: aiohttp.ClientSession, path: str, **kw: Any) -> tuple[int, Any]:
        async with http.get(self.url + path, **kw) as r:
            body = await r.json() if r.content_type == "application/json" else await r.text()
            return r.status, body

    async def wait_healthy(self, http: aiohttp.ClientSession, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"exited {self.proc.returncode}:\n{self.log()}"
            try:
                if (await self.get(http, "/health"))[0] == 200:
                    return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
        raise AssertionError(f"/health did not answer within {timeout}s:\n{self.log()}")

    def terminate(self) -> tuple[int | None, float]:
        """SIGTERM, as Railway sends when draining: exit code (None: still running) and seconds taken."""
        start = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code: int | None = self.proc.wait(railway_json()["deploy"]["drainingSeconds"] + 1)
        except subprocess.TimeoutExpired:
            code = None
        return code, time.monotonic() - start

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()

    def log(self, tail: int = 4000) -> str:
        self._log.flush()
        text = self.log_path.read_text(errors="replace")
        return text[-tail:] if tail else text


@pytest.fixture
def instances(tmp_path: Path) -> Iterator[list[Instance]]:
    started: list[Instance] = []
    yield started
    for instance in started:
        instance.kill()


async def test_start_command_as_railway_runs_it(tmp_path: Path, instances: list[Instance]) -> None:
    token = "t0ken-for-the-qr-page-0123456789"
    bot = Instance(tmp_path, "solo", ADMIN_TOKEN=token)
    instances.append(bot)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
        await bot.wait_healthy(http)
        status, health = await bot.get(http, "/health")
        assert status == 200 and health == {"status": "ok"}  # also while WhatsApp is unreachable/unpaired

        status, metrics = await bot.get(http, "/v1/metrics")
        assert status == 200
        assert {"memory", "connection", "messages", "cache", "ai", "uptime_s"} <= set(metrics)
        assert metrics["connection"]["connected"] is False
        status, text = await bot.get(http, "/v1/metrics", params={"format": "prometheus"})
        assert status == 200 and "whatsapp_bot_uptime_s" in text

        assert (await bot.get(http, "/qr"))[0] == 401
        status, page = await bot.get(http, "/qr", params={"token": token})
        assert status == 200 and "<html" in page

    code, took = bot.terminate()
    assert code == 0, f"exit {code} after SIGTERM:\n{bot.log()}"
    assert took < railway_json()["deploy"]["drainingSeconds"]
    lines = [line for line in bot.log(tail=0).split("\n") if line.strip()]
    assert lines, "nothing logged"
    not_json = [line for line in lines if not line.startswith("{")]
    assert not not_json, f"LOG_JSON=true, yet: {not_json[:3]}"
    assert all("record" in json.loads(line) for line in lines)
    assert token not in bot.log(tail=0)


# -- two instances, one WhatsApp session ---------------------------------------------------------------------


def _app_takes_the_lease() -> bool:
    return "connection.lease" in (REPO / "bot" / "app.py").read_text()


@pytest.mark.skipif(
    not _app_takes_the_lease(), reason="bot/app.py does not take the session lease yet (issue 8)"
)
async def test_two_instances_one_connects_the_other_waits_then_takes_over(
    tmp_path: Path, instances: list[Instance], stack: SupabaseStack
) -> None:
    env = {"SUPABASE_DB_URL": stack.db_url, "WA_SESSION_NAME": f"deploy-{os.getpid()}"}
    first, second = Instance(tmp_path, "one", **env), Instance(tmp_path, "two", **env)
    instances += [first, second]

    async def lease_of(bot: Instance, http: aiohttp.ClientSession) -> dict[str, Any]:
        status, metrics = await bot.get(http, "/v1/metrics")
        assert status == 200
        return metrics["lease"] | {"connection_state": metrics["connection"]["state"]}

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
        await asyncio.gather(first.wait_healthy(http), second.wait_healthy(http))
        deadline = time.monotonic() + 20
        while True:
            leases = [await lease_of(b, http) for b in (first, second)]
            if sorted(lease["state"] for lease in leases) == ["held", "waiting"] and all(
                lease["holder"] for lease in leases
            ):
                break
            assert time.monotonic() < deadline, leases
            await asyncio.sleep(0.2)
        holder, waiter = (first, second) if leases[0]["state"] == "held" else (second, first)
        held, waiting = (leases[0], leases[1]) if holder is first else (leases[1], leases[0])
        assert held["kind"] == "postgres-advisory"
        assert waiting["holder"] == held["instance"]  # it says whom it waits for
        # The waiting one has not even tried WhatsApp; the holder has (no network here: it keeps retrying).
        assert waiting["connection_state"] not in ("connecting", "reconnecting", "pairing", "connected")
        assert held["connection_state"] in ("connecting", "reconnecting", "pairing", "connected")

        code, _ = holder.terminate()  # a deploy: the old one gets SIGTERM and gives the lease back
        assert code == 0, holder.log()
        deadline = time.monotonic() + 10
        while (await lease_of(waiter, http))["state"] != "held":
            assert time.monotonic() < deadline, waiter.log()
            await asyncio.sleep(0.2)
    code, _ = waiter.terminate()
    assert code == 0, waiter.log()
