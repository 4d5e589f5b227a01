"""BOT_TIMEZONE: the model is told the business's local date and time ("¿abrís hoy?"), through the real
pipeline and SDK against the fake OpenAI server; the setting refused when it names no zone; doctor."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import pytest
from pydantic import ValidationError

from bot.config import Settings, describe_error
from bot.localtime import local_time_line, time_zone
from tests.conftest import inbound
from tests.fake_openai import FakeOpenAI
from tests.test_doctor import doctor_against

OTHER, THIRD = "5491122334455@s.whatsapp.net", "5491100000000@s.whatsapp.net"
# Sunday 22 November 2026, 20:05 UTC.
SUNDAY_EVENING = datetime(2026, 11, 22, 20, 5, tzinfo=ZoneInfo("UTC")).timestamp()


def ai(fake: FakeOpenAI, **extra: object) -> dict[str, object]:
    return {"openai_api_key": "test-key", "openai_base_url": fake.base_url, **extra}


def system_prompt(request: dict[str, object]) -> str:
    return request["messages"][0]["content"]  # type: ignore[index]


def test_the_line_says_the_weekday_date_and_time_there() -> None:
    madrid, mexico = time_zone("Europe/Madrid"), time_zone("America/Mexico_City")
    assert local_time_line(madrid, "es", SUNDAY_EVENING) == (
        "Ahora es domingo 22 de noviembre de 2026, las 21:05 (hora de Europe/Madrid)."
    )
    assert local_time_line(mexico, "en", SUNDAY_EVENING) == (
        "It is now Sunday 22 November 2026, 14:05 (America/Mexico_City time)."
    )
    # Summer time, and the day after midnight there while it is still the day before in UTC.
    july = datetime(2026, 7, 1, 22, 30, tzinfo=ZoneInfo("UTC")).timestamp()
    assert "jueves 2 de julio de 2026, las 00:30" in local_time_line(madrid, "es", july)


async def test_the_model_is_told_the_local_time(harness, fake_openai: FakeOpenAI) -> None:
    """Without it, "¿abrís hoy?" on a Sunday was answered from whatever day the model guessed."""
    async with harness(**ai(fake_openai, bot_timezone="Europe/Madrid")) as h:
        h.bot.pipeline.responder.clock = lambda: SUNDAY_EVENING
        await h.say("¿abrís hoy?")
    prompt = system_prompt(fake_openai.chat_requests[-1])
    assert prompt.startswith(h.settings.bot_system_prompt)
    assert prompt.endswith("Ahora es domingo 22 de noviembre de 2026, las 21:05 (hora de Europe/Madrid).")


async def test_without_a_time_zone_the_model_is_told_nothing(harness, fake_openai: FakeOpenAI) -> None:
    async with harness(**ai(fake_openai)) as h:
        await h.say("¿abrís hoy?")
    assert system_prompt(fake_openai.chat_requests[-1]) == h.settings.bot_system_prompt


async def test_a_cached_answer_is_reused_within_the_minute_only(harness, fake_openai: FakeOpenAI) -> None:
    """ "Sí, hasta las 21:00" must not be given again at 21:10."""
    now = [SUNDAY_EVENING]
    async with harness(**ai(fake_openai, bot_timezone="Europe/Madrid")) as h:
        h.bot.pipeline.responder.clock = lambda: now[0]
        await h.say("¿estáis abiertos?")
        now[0] += 30  # the same minute
        await h.say(inbound("¿estáis abiertos?", chat=OTHER))
        assert fake_openai.chat_count == 1
        now[0] += 60
        await h.say(inbound("¿estáis abiertos?", chat=THIRD))
    assert fake_openai.chat_count == 2
    assert "las 21:06" in system_prompt(fake_openai.chat_requests[-1])


@pytest.mark.parametrize(
    "value",
    [
        "Madrid",
        "GMT+1",
        "../etc/passwd",
        "europe/madrid",
        # A folder of the database, a name too long for a file name (each was a traceback at start-up), and
        # files that are no place's zone: the host's own, a leap-second variant.
        "America/Argentina",
        "A" * 300,
        "localtime",
        "right/Europe/Madrid",
    ],
)
def test_a_name_that_is_no_time_zone_stops_start_up(value: str) -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(_env_file=None, bot_timezone=value)  # type: ignore[call-arg]
    assert describe_error(caught.value) == (
        f"BOT_TIMEZONE={value!r}: not a time zone name; use an IANA name such as Europe/Madrid or "
        "America/Mexico_City"
    )


async def test_doctor_warns_when_the_model_does_not_know_the_time(tmp_path, fake_openai: FakeOpenAI) -> None:
    code, out = await doctor_against(tmp_path, fake_openai)
    assert code == 0, out
    assert (
        '[warn] BOT_TIMEZONE not set: the model does not know the local date or time ("¿abrís hoy?")' in out
    )
    code, out = await doctor_against(tmp_path, fake_openai, BOT_TIMEZONE="America/Bogota")
    assert code == 0, out
    assert "[ok  ] BOT_TIMEZONE America/Bogota: the model is told it is" in out
