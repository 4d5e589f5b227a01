"""A fake OpenAI-compatible HTTP server on loopback, for the real `openai` SDK to talk to.

It records every request, and can be scripted to answer slowly, fail with an HTTP
status, or never answer before the client's timeout.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from bot.ai import ChatModel, Completion

Reply = Callable[[list[dict[str, Any]]], str]


def echo_reply(messages: list[dict[str, Any]]) -> str:
    """Default answer: repeats the last user message, so tests can tell answers apart."""
    return f"echo: {messages[-1]['content']}"


@dataclass
class Transcription:
    filename: str
    content_type: str
    size: int
    head: bytes
    model: str
    language: str | None


@dataclass
class FakeOpenAI:
    reply: Reply = echo_reply
    delay_s: float = 0.0
    transcript: str = "hola, quiero saber el horario"
    # Transcripts for the next transcriptions, one each, in order; then `transcript`.
    transcripts: deque[str] = field(default_factory=deque)
    api_key: str = "test-key"  # what /v1/models accepts (the other endpoints accept any key)
    chat_requests: list[dict[str, Any]] = field(default_factory=list)
    transcriptions: list[Transcription] = field(default_factory=list)
    # Statuses to answer the next requests with, one per request (e.g. [429, 500]).
    fail_next: deque[int] = field(default_factory=deque)
    transcribe_fail_next: deque[int] = field(default_factory=deque)
    # Raw answers (status, content type, body) for the next requests: a proxy's HTML page, broken JSON...
    raw_next: deque[tuple[int, str, str]] = field(default_factory=deque)
    # finish_reason of the next answers ("length", "content_filter"); "stop" when empty.
    finish_next: deque[str] = field(default_factory=deque)
    transcribe_raw_next: deque[tuple[int, str, str]] = field(default_factory=deque)
    # What /v1/models lists (some OpenAI-compatible servers list nothing, or other names for a model).
    models: list[str] = field(default_factory=lambda: ["gpt-4o-mini"])
    port: int = 0
    _runner: web.AppRunner | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def chat_count(self) -> int:
        return len(self.chat_requests)

    async def start(self) -> FakeOpenAI:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/audio/transcriptions", self._transcribe)
        app.router.add_get("/v1/models", self._models)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @staticmethod
    def _error(status: int) -> web.Response:
        body = {"error": {"message": f"fake failure {status}", "type": "server_error", "code": None}}
        return web.json_response(body, status=status)

    @staticmethod
    def _raw(status: int, content_type: str, body: str) -> web.Response:
        return web.Response(status=status, body=body.encode(), headers={"Content-Type": content_type})

    async def _chat(self, request: web.Request) -> web.Response:
        payload = await request.json()
        self.chat_requests.append(payload)
        if self.fail_next:
            return self._error(self.fail_next.popleft())
        if self.raw_next:
            return self._raw(*self.raw_next.popleft())
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        text = self.reply(payload["messages"])
        return web.json_response(
            {
                "id": f"chatcmpl-{len(self.chat_requests)}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": payload.get("model", "fake"),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": self.finish_next.popleft() if self.finish_next else "stop",
                    }
                ],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            }
        )

    async def _models(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return web.json_response({"error": {"message": "Incorrect API key provided"}}, status=401)
        return web.json_response(
            {"object": "list", "data": [{"id": name, "object": "model"} for name in self.models]}
        )

    async def _transcribe(self, request: web.Request) -> web.Response:
        form = await request.post()
        upload = form.get("file")
        if not isinstance(upload, web.FileField):
            return web.json_response({"error": {"message": "file is required"}}, status=400)
        data = upload.file.read()
        upload.file.close()
        language = form.get("language")
        self.transcriptions.append(
            Transcription(
                filename=upload.filename,
                content_type=upload.content_type,
                size=len(data),
                head=data[:64],
                model=str(form.get("model", "")),
                language=str(language) if language is not None else None,
            )
        )
        if self.transcribe_fail_next:
            return self._error(self.transcribe_fail_next.popleft())
        if self.transcribe_raw_next:
            return self._raw(*self.transcribe_raw_next.popleft())
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        # Like the real API: only some extensions are accepted.
        accepted = (".flac", ".m4a", ".mp3", ".mp4", ".mpeg", ".mpga", ".ogg", ".wav", ".webm")
        if not upload.filename.lower().endswith(accepted):
            message = f"Invalid file format. Supported formats: {[a[1:] for a in accepted]}"
            return web.json_response(
                {"error": {"message": message, "type": "invalid_request_error"}}, status=400
            )
        return web.json_response(
            {"text": self.transcripts.popleft() if self.transcripts else self.transcript}
        )


class InstantModel(ChatModel):
    """A model that answers at once, in process: for measuring everything but the model."""

    def __init__(self, gate: asyncio.Event | None = None) -> None:
        super().__init__(client=None, model="instant")  # type: ignore[arg-type]
        self.gate = gate  # when given, answers wait until it is set

    async def _call(self, messages: list[dict[str, Any]]) -> Completion:
        if self.gate is not None:
            await self.gate.wait()
        self.requests += 1
        return Completion(f"ok: {messages[-1]['content']}")

    async def close(self) -> None:
        pass
