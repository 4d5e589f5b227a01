"""`python -m bot [run|chat|doctor|logout]`."""

from __future__ import annotations

import argparse
import asyncio
import os
import stat
import sys
from pathlib import Path

from loguru import logger

from bot.config import Settings, config_error, data_dir_problem, load_settings, local_database_problems
from bot.logsetup import setup_logging


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bot", description="WhatsApp AI bot")
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("run", help="connect to WhatsApp and answer (the default)")
    chat = commands.add_parser("chat", help="talk to the bot on the console, through the same pipeline")
    chat.add_argument("--jsonl", action="store_true", help="read and write one JSON object per line")
    commands.add_parser("doctor", help="check ffmpeg, data dir, databases, OpenAI, flows, Supabase, session")
    commands.add_parser("logout", help="unlink this device from WhatsApp and delete the local session")
    return parser.parse_args(argv)


def drop_privileges(data_dir: Path) -> None:
    """Railway mounts a volume owned by root, so a service with a volume runs as root (RAILWAY_RUN_UID=0).
    The image names its unprivileged user in BOT_RUN_AS: give that user DATA_DIR, then become it, before
    anything else writes a file (only the settings have been read)."""
    user = os.environ.get("BOT_RUN_AS")
    if not user or os.geteuid() != 0:
        return
    import pwd

    entry = pwd.getpwnam(user)
    data_dir.mkdir(parents=True, exist_ok=True)
    for root, dirs, files in os.walk(data_dir):  # never follows symlinks, and lchown does not either
        for path in (root, *(os.path.join(root, name) for name in dirs + files)):
            os.lchown(path, entry.pw_uid, entry.pw_gid)
    os.setgroups([])
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)
    os.environ["HOME"] = entry.pw_dir


PRIVATE_UMASK = 0o077  # files 0600, directories 0700


def make_data_private(data_dir: Path) -> int:
    """Take group and other permissions off DATA_DIR and everything in it: the message database, and the
    WhatsApp session, whose device keys are enough to clone the linked device. Files the bot made before it
    set its umask were readable by every local user (0644 under the usual 022). Only what this user owns
    is changed; symlinks are left alone. Returns how many paths were changed."""
    uid, changed = os.geteuid(), 0
    for root, dirs, files in os.walk(data_dir):  # never follows symlinks
        for path in (root, *(os.path.join(root, name) for name in dirs + files)):
            try:
                info = os.lstat(path)
                if stat.S_ISLNK(info.st_mode) or info.st_uid != uid or not info.st_mode & 0o077:
                    continue
                os.chmod(path, stat.S_IMODE(info.st_mode) & ~0o077)
            except OSError:  # gone meanwhile
                continue
            changed += 1
    return changed


def check_local_databases(settings: Settings, *, outbox: bool) -> None:
    """A SQLite file that cannot be opened stops start-up with one line that says what to do, before
    anything else starts (else: a traceback, and on Railway a restart loop with HTTP never up)."""
    for path, problem, fix in local_database_problems(settings, outbox=outbox):
        config_error(f"{path}: {problem}; {fix}")


def main(argv: list[str] | None = None) -> int:
    # Everything the bot writes is private to its user: its files, SQLite's -wal and -shm, voice-note temp
    # files (ffmpeg's too: children inherit it), the session restored from Supabase.
    os.umask(PRIVATE_UMASK)
    args = parse_args(sys.argv[1:] if argv is None else argv)
    settings = load_settings()
    drop_privileges(settings.data_dir)  # DATA_DIR as configured, .env included
    setup_logging(settings.effective_log_level, json=settings.log_json)
    if changed := make_data_private(settings.data_dir):
        logger.debug("DATA_DIR: {} file(s) and folder(s) made private to this user", changed)
    command = args.command or "run"
    if command in ("run", "chat") and (problem := data_dir_problem(settings.data_dir)):
        config_error(f"DATA_DIR={settings.data_dir}: {problem}")
    if command in ("run", "chat"):
        check_local_databases(settings, outbox=command == "run")
    if command == "chat":
        from bot.app import run_chat

        return asyncio.run(run_chat(settings, jsonl=args.jsonl))
    if command == "doctor":
        from bot.doctor import run_doctor

        return asyncio.run(run_doctor(settings))
    if command == "logout":
        from bot.doctor import run_logout

        return asyncio.run(run_logout(settings))
    from bot.whatsapp import run_whatsapp

    return asyncio.run(run_whatsapp(settings))


if __name__ == "__main__":
    sys.exit(main())
