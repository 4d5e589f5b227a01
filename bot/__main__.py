"""`python -m bot [run|chat|doctor|logout]`."""

from __future__ import annotations

import argparse
import asyncio
import sys

from bot.config import load_settings
from bot.logsetup import setup_logging


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bot", description="WhatsApp AI bot")
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("run", help="connect to WhatsApp and answer (the default)")
    chat = commands.add_parser("chat", help="talk to the bot on the console, through the same pipeline")
    chat.add_argument("--jsonl", action="store_true", help="read and write one JSON object per line")
    commands.add_parser("doctor", help="check ffmpeg, data dir, OpenAI, Supabase and the session")
    commands.add_parser("logout", help="unlink this device from WhatsApp and delete the local session")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    settings = load_settings()
    setup_logging(settings.effective_log_level, json=settings.log_json)
    command = args.command or "run"
    if command == "chat":
        from bot.app import run_chat

        return asyncio.run(run_chat(settings, jsonl=args.jsonl))
    if command == "doctor":
        from bot.doctor import run_doctor

        return asyncio.run(run_doctor(settings))
    if command == "logout":
        from bot.doctor import run_logout

        return asyncio.run(run_logout(settings))
    from bot.app import run_whatsapp

    return asyncio.run(run_whatsapp(settings))


if __name__ == "__main__":
    sys.exit(main())
