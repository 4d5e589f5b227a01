"""The memory gate at each place a turn's media are fetched: shut after the message passed intake (so it is
not left in the store) and before its media are downloaded, read or transcribed, it holds them."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.fake_openai import FakeOpenAI
from tests.test_documents import RECEIPT, pdf
from tests.test_photos import ai, count_downloads, jpeg, photo, under
from tests.test_videos import three_colours, video  # noqa: F401 (the fixture)
from tests.test_voice_notes import note, voice_note  # noqa: F401 (the fixture)

CHAT = "34600111222@s.whatsapp.net"


@pytest.mark.parametrize("kind", ["photo", "quoted photo", "pdf", "video"])
async def test_media_wait_for_a_gate_shut_while_the_turn_gathers(
    harness,
    fake_openai: FakeOpenAI,
    three_colours: bytes,  # noqa: F811 (the fixture)
    kind: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with harness(**ai(fake_openai)) as h:
        downloads = count_downloads(h, monkeypatch)
        h.bot.pipeline.gather_s = 0.3
        message = {
            "photo": lambda: photo(jpeg(), id="X1"),
            "quoted photo": lambda: under(jpeg(), id="X1"),
            "pdf": lambda: pdf(RECEIPT, id="X1"),
            "video": lambda: video(three_colours, id="X1"),
        }[kind]()
        h.bot.pipeline.submit(message)
        h.bot.pipeline.model_gate.clear()  # memory critical after intake: the worker is gathering
        await asyncio.sleep(1.0)
        assert downloads == [], f"{kind}: downloaded while memory is critical"
        assert h.bot.pipeline.counters.spilled == 0
        h.bot.pipeline.open_model_gate()
        assert await h.bot.pipeline.drain(10)
    assert downloads == ["X1"]


async def test_voice_notes_in_a_row_wait_for_a_gate_shut_while_the_turn_gathers(
    harness,
    fake_openai: FakeOpenAI,
    voice_note: Path,  # noqa: F811 (the fixture)
) -> None:
    fake_openai.transcripts.extend(["uno", "dos"])
    async with harness(openai_api_key="k", openai_base_url=fake_openai.base_url) as h:
        h.bot.pipeline.gather_s = 0.3
        h.bot.pipeline.submit(note(voice_note))
        h.bot.pipeline.submit(note(voice_note))
        h.bot.pipeline.model_gate.clear()
        await asyncio.sleep(1.5)
        assert fake_openai.transcriptions == [], "transcribed while memory is critical"
        h.bot.pipeline.open_model_gate()
        assert await h.bot.pipeline.drain(10)
        assert h.transport.texts_to(CHAT) == ["echo: uno\ndos"]
