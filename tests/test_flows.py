"""Keyword flows: the flows file is checked and bounded at start; flows answer only what they fully answer."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from bot import flows as flows_module
from bot.flows import (
    MAX_FACTS,
    MAX_FLOWS,
    MAX_FLOWS_FILE_BYTES,
    FlowMatcher,
    FlowsFileError,
    load_flows_file,
)
from bot.replies import reply
from memory.store import Flow
from tests.conftest import inbound
from tests.fake_openai import FakeOpenAI
from tests.test_config import run_bot


def write(tmp_path: Path, text: str, name: str = "flows.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# -- the file's bounds ------------------------------------------------------------------------------------


def test_a_flows_file_over_the_size_bound_stops_start_up_with_one_line(tmp_path: Path) -> None:
    """An 8 MB file took 31 s to load and left the process at ~500 MB: refused at once instead."""
    entry = "- keywords: [horario]\n  answer: " + "x" * 200 + "\n"
    write(tmp_path, entry * (MAX_FLOWS_FILE_BYTES // len(entry) + 1))
    result = run_bot(tmp_path, "chat", "--jsonl", FLOWS_FILE="flows.yaml")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0] == (
        "invalid configuration: FLOWS_FILE: flows file flows.yaml: larger than 1 MB "
        "(a flows file holds at most 5,000 short flows)"
    )


def test_more_flows_than_the_bound_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "".join(f"- {{keywords: k{i}, answer: a}}\n" for i in range(MAX_FLOWS + 1)))
    assert path.stat().st_size < MAX_FLOWS_FILE_BYTES  # small, but too many flows
    with pytest.raises(FlowsFileError, match=r"5,001 flows, at most 5,000$"):
        load_flows_file(path)


def test_the_bounds_allow_a_full_file(tmp_path: Path) -> None:
    path = write(tmp_path, "".join(f"- {{keywords: k{i}, answer: a}}\n" for i in range(MAX_FLOWS)))
    assert len(load_flows_file(path)) == MAX_FLOWS


@pytest.mark.skipif(not yaml.__with_libyaml__, reason="PyYAML built without libyaml")
def test_yaml_is_read_with_libyaml() -> None:
    assert flows_module._YAML_LOADER is yaml.CSafeLoader


# -- the file's entries -----------------------------------------------------------------------------------


def test_keywords_of_the_wrong_type_stop_start_up_with_one_line(tmp_path: Path) -> None:
    """`keywords: 123` was a traceback (TypeError: 'int' object is not iterable)."""
    write(tmp_path, "- keywords: [horario]\n  answer: Abrimos a las 9.\n- keywords: 123\n  answer: Hola.\n")
    result = run_bot(tmp_path, "chat", "--jsonl", FLOWS_FILE="flows.yaml")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip() == (
        "invalid configuration: FLOWS_FILE: flows file flows.yaml: entry 2: "
        "'keywords' must be a string or a non-empty list of strings"
    )


@pytest.mark.parametrize(
    ("entries", "error"),
    [
        ("- {keywords: true, answer: Hola}", "entry 1: 'keywords' must be a string or a non-empty list"),
        ("- {keywords: {horario: 1}, answer: Hola}", "entry 1: 'keywords' must be a string or a non-empty"),
        ("- {keywords: [], answer: Hola}", "entry 1: 'keywords' must be a string or a non-empty list"),
        ("- {keywords: [horario, 5], answer: Hola}", "entry 1: 'keywords' must hold strings only, not 5"),
        ("- {keywords: [horario, [a]], answer: Hola}", "entry 1: 'keywords' must hold strings only"),
        ("- {keywords: horario, answer: 5}", "entry 1: 'answer' must be a non-empty string"),
        ("- {keywords: horario}", "entry 1: 'answer' must be a non-empty string"),
        ('- {keywords: horario, answer: Hola, enabled: "false"}', "entry 1: 'enabled' must be true or false"),
        ('- {keywords: horario, answer: Hola, enabled: "no"}', "entry 1: 'enabled' must be true or false"),
        ("- {keywords: horario, answer: Hola, enabled: 0}", "entry 1: 'enabled' must be true or false"),
        ("- {keywords: [horario, '¿?'], answer: Hola}", "entry 1: keyword '¿?' has no letters or digits"),
        ("- {keywords: ['  '], answer: Hola}", "entry 1: keyword '  ' has no letters or digits"),
        ("- {keywords: horario, answer: Hola, enable: false}", "entry 1: unknown field(s) enable (known: "),
        (
            "- {keywords: [horario], answer: Hola}\n- {keywords: [precio, 'HORÁRIO'], answer: Adiós}",
            "entry 2: keyword 'HORÁRIO' is already a keyword of entry 1",
        ),
    ],
)
def test_a_malformed_entry_is_named_with_its_field(tmp_path: Path, entries: str, error: str) -> None:
    with pytest.raises(FlowsFileError, match=r"^flows file .*flows\.yaml: " + re.escape(error)):
        load_flows_file(write(tmp_path, entries + "\n"))


def test_enabled_false_in_json_must_be_a_boolean(tmp_path: Path) -> None:
    path = write(tmp_path, '[{"keywords": ["precio"], "answer": "10 euros", "enabled": "false"}]', "f.json")
    with pytest.raises(FlowsFileError, match=r"entry 1: 'enabled' must be true or false .*not 'false'$"):
        load_flows_file(path)


def test_real_booleans_switch_a_flow_and_a_disabled_flow_may_share_keywords(tmp_path: Path) -> None:
    """A disabled flow is a spare (the summer hours, say): it may repeat an enabled flow's keyword."""
    path = write(
        tmp_path,
        "- {keywords: [horario, Horario], answer: Invierno}\n"
        "- {keywords: [horario], answer: Verano, enabled: false}\n"
        "- {keywords: [precio], answer: Caro, enabled: no}\n"  # YAML's own boolean
        "- {keywords: envio, answer: Gratis, enabled: true}\n",
    )
    assert [(flow.answer, flow.enabled) for flow in load_flows_file(path)] == [
        ("Invierno", True),
        ("Verano", False),
        ("Caro", False),
        ("Gratis", True),
    ]


def test_yaml_aliases_cannot_multiply_the_keywords(tmp_path: Path) -> None:
    many = ", ".join(f"k{i}" for i in range(20_000))
    entries = "".join("- {keywords: *k, answer: a, enabled: false}\n" for _ in range(10))
    path = write(tmp_path, f"- {{keywords: &k [{many}], answer: a, enabled: false}}\n{entries}")
    with pytest.raises(FlowsFileError, match="more than 50,000 keywords in all"):
        load_flows_file(path)


# -- which messages a flow answers ------------------------------------------------------------------------

HOURS = "Abrimos de lunes a viernes de 9:00 a 18:00 y los sábados de 10:00 a 14:00."
PLACE = "Estamos en Calle Mayor 1, Madrid."
TWO_FLOWS = (
    f'- keywords: [horario, "a que hora abren"]\n  answer: "{HOURS}"\n'
    f'- keywords: ["donde estais", "vuestra direccion"]\n  answer: "{PLACE}"\n'
)


def ai(fake: FakeOpenAI, flows: Path, **extra: object) -> dict[str, object]:
    return {"openai_api_key": "test-key", "openai_base_url": fake.base_url, "flows_file": flows, **extra}


def test_a_flow_answers_alone_only_a_message_that_is_just_its_question() -> None:
    matcher = FlowMatcher([Flow(("horario",), HOURS)])
    for question in (
        "¿horario?",
        "¿Cuál es el HORARIO?",
        "Hola buenas tardes, quisiera saber cuál es su horario por favor, muchas gracias",
        "horario horario",
        "what is your horario please",
    ):
        assert matcher.match(question) == HOURS, question
    for question in (
        "¿cuál es el horario de entrega?",  # got the opening hours
        "¿Cuál es el HORARIO del sábado?",
        "horario 2",
        "no quiero el horario, quiero cancelar",
        "hola",
    ):
        assert matcher.match(question) is None, question
    assert matcher.facts("¿cuál es el horario de entrega?") == [HOURS]


@pytest.mark.parametrize(
    "question",
    [
        "¿Cuál es la dirección de la tienda?",  # two keywords of one flow overlap ("direccion")
        "What's your address?",  # an apostrophe split "whats" in two
        "¿Cuál es su horario de atención?",
        "Hola q horario tienen",
        "¿Me das el horario?",
        "Do you have opening hours?",
        "Where is your store located?",
        "¿Horarios de apertura?",
    ],
)
def test_everyday_wordings_of_the_shipped_questions_get_the_flow(question: str) -> None:
    assert FlowMatcher(load_flows_file(SHIPPED)).match(question) is not None


@pytest.mark.parametrize(
    "question",
    [
        "¿Dónde está la tienda y a qué hora abren?",
        "Where is your store and when do you open?",
        "¿A qué hora abren? ¿Dónde estáis?",
    ],
)
def test_a_message_asking_two_flows_questions_gets_neither_alone(question: str) -> None:
    """Each got the opening hours only: the address question's words counted as filler for the hours flow."""
    matcher = FlowMatcher(load_flows_file(SHIPPED))
    assert matcher.match(question) is None
    assert len(matcher.facts(question)) == 2  # the model is told both


def test_a_question_word_or_a_noun_is_not_filler() -> None:
    matcher = FlowMatcher(
        [Flow(("hola", "buenas"), "¡Hola! ¿En qué te ayudo?"), Flow(("envio",), "Enviamos a toda España.")]
    )
    assert matcher.match("hola, ¿cuándo es el envío?") is None
    assert matcher.match("Hola, ¿tenéis tienda?") is None
    assert matcher.match("¡Hola, buenas!") == "¡Hola! ¿En qué te ayudo?"


def test_thanks_for_an_answer_is_not_the_question_again() -> None:
    matcher = FlowMatcher([Flow(("horario",), HOURS)])
    assert matcher.match("Ok vale muchas gracias por el horario") is None
    assert matcher.match("thank you for the horario") is None
    assert matcher.match("gracias por la info, ¿y el horario?") is not None  # it asks
    assert matcher.match("¿horario? gracias") == HOURS


def test_a_flows_keywords_match_whatever_their_order() -> None:
    keywords = ("cual es la direccion", "direccion de la tienda")
    for flow in (Flow(keywords, PLACE), Flow(keywords[::-1], PLACE)):
        assert FlowMatcher([flow]).match("¿Cuál es la dirección de la tienda?") == PLACE


def test_a_more_specific_flow_answers_what_a_broader_one_does_not() -> None:
    delivery = "Repartimos de 10:00 a 20:00."
    matcher = FlowMatcher([Flow(("horario",), HOURS), Flow(("horario de entrega",), delivery)])
    assert matcher.match("¿cuál es el horario de entrega?") == delivery
    assert matcher.match("¿horario?") == HOURS


def test_the_customers_own_things_are_not_the_shops() -> None:
    matcher = FlowMatcher([Flow(("direccion",), PLACE)])
    assert matcher.match("¿cuál es su dirección?") == PLACE
    assert matcher.match("¿mi dirección?") is None
    assert matcher.match("my direccion") is None


def test_facts_are_the_matched_flows_in_file_order_and_bounded() -> None:
    flows = [Flow((f"tema{i}",), f"respuesta {i}") for i in range(MAX_FACTS + 2)]
    matcher = FlowMatcher([Flow(("nada",), "x"), *reversed(flows), Flow(("tema0", "otro"), "y", False)])
    text = " ".join(f"tema{i}" for i in range(MAX_FACTS + 2))
    assert MAX_FACTS == 3
    assert matcher.facts(text) == ["respuesta 4", "respuesta 3", "respuesta 2"]
    assert matcher.facts("de otra cosa") == []


async def test_a_long_message_goes_to_the_model_with_the_flows_answers_as_facts(
    harness, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    """ "¿horario del sábado? Y quiero cancelar mi pedido 123" got only the hours: the cancellation never
    reached the model. Now the model answers it all, told the business's hours."""
    question = "Hola, ¿horario del sábado? Y quiero cancelar mi pedido 123"
    async with harness(**ai(fake_openai, write(tmp_path, TWO_FLOWS))) as h:
        assert await h.say(question) == [f"echo: {question}"]
        assert await h.say("¿horario?") == [HOURS]  # a short question is still the flow's, without the model
    [request] = fake_openai.chat_requests
    system, user = request["messages"][0], request["messages"][-1]
    assert system["role"] == "system" and system["content"].startswith(h.settings.bot_system_prompt)
    assert f"\n- {HOURS}" in system["content"] and PLACE not in system["content"]
    assert user == {"role": "user", "content": question}


async def test_a_long_message_without_a_flow_keyword_has_no_facts(
    harness, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    async with harness(**ai(fake_openai, write(tmp_path, TWO_FLOWS))) as h:
        await h.say("quiero cancelar mi pedido 123 por favor")
    assert fake_openai.chat_requests[0]["messages"][0]["content"] == h.settings.bot_system_prompt


async def test_a_cached_answer_is_reused_only_with_the_same_facts(
    harness, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    question = "hola, ¿a que hora abren el sábado y hacen envíos?"
    answers = iter(["primera", "segunda", "tercera"])
    fake_openai.reply = lambda messages: next(answers)
    async with harness(**ai(fake_openai, write(tmp_path, TWO_FLOWS))) as h:
        assert await h.say(inbound(question, chat="34600000001@s.whatsapp.net")) == ["primera"]
        assert await h.say(inbound(question, chat="34600000002@s.whatsapp.net")) == ["primera"]  # cached
        # The hours change (bot_flows is re-read every minute): the cached answer told the old ones.
        h.bot.pipeline.responder.flows.replace([Flow(("a que hora abren",), "Abrimos a las 8.")])
        assert await h.say(inbound(question, chat="34600000003@s.whatsapp.net")) == ["segunda"]
        h.bot.pipeline.responder.flows.replace([])
        assert await h.say(inbound(question, chat="34600000004@s.whatsapp.net")) == ["tercera"]
    assert fake_openai.chat_count == 3
    systems = [request["messages"][0]["content"] for request in fake_openai.chat_requests]
    assert HOURS in systems[0] and "Abrimos a las 8." in systems[1] and "Abrimos" not in systems[2]


async def test_without_a_key_a_long_message_gets_the_flows_answers_and_the_polite_reply(
    harness, tmp_path: Path
) -> None:
    async with harness(flows_file=write(tmp_path, TWO_FLOWS)) as h:
        [answer] = await h.say("Hola, ¿horario del sábado? Y quiero cancelar mi pedido 123")
    assert answer == f"{HOURS}\n\n{reply('ai_off', 'es')}"


async def test_without_a_key_a_complaint_naming_a_keyword_gets_the_polite_reply_alone(
    harness, tmp_path: Path
) -> None:
    """ "el horario de ayer fue un desastre, nadie me atendió y me fui" got the opening hours."""
    async with harness(flows_file=write(tmp_path, TWO_FLOWS)) as h:
        [answer] = await h.say("el horario de ayer fue un desastre, nadie me atendió y me fui")
    assert answer == reply("ai_off", "es")


# -- the shipped flows.yaml -------------------------------------------------------------------------------

SHIPPED = Path(__file__).resolve().parent.parent / "flows.yaml"


@pytest.mark.parametrize(
    ("question", "topic"),
    [
        ("horario", "Abrimos"),
        ("¿Cuál es vuestro horario?", "Abrimos"),
        ("¿A qué hora abren?", "Abrimos"),
        ("¿a qué hora cerráis hoy?", "Abrimos"),
        ("opening hours?", "We're open"),  # in the language asked in
        ("What time do you open?", "We're open"),  # in the language asked in
        ("¿Dónde estáis?", "Calle Mayor"),
        ("¿Cuál es vuestra dirección?", "Calle Mayor"),
        ("¿cómo llegar?", "Calle Mayor"),
        ("Where are you located?", "We're at"),  # in the language asked in
        ("What are your hours?", "We're open"),  # in the language asked in
        ("¿Cuál es la dirección? 📍", "Calle Mayor"),
        ("¿Dónde se encuentran?", "Calle Mayor"),
    ],
)
def test_the_shipped_flows_answer_their_questions(question: str, topic: str) -> None:
    answer = FlowMatcher(load_flows_file(SHIPPED)).match(question)
    assert answer is not None and topic in answer


@pytest.mark.parametrize(
    "question",
    [
        "My order is 3 hours late, I want a refund",
        "3 hours late",
        "No me llega la ubicacion de mi pedido",
        "ubicacion del pedido?",
        "Quiero cambiar la dirección de entrega",
        "mi dirección ha cambiado",
        "¿A qué hora llega mi pedido?",
        "Where is my order? Its location says Madrid",
        "can I change my address?",
        "¿Dónde están mis paquetes?",
    ],
)
def test_the_shipped_keywords_stay_out_of_unrelated_questions(question: str) -> None:
    """ "hours", "location", "ubicacion", "direccion" and "donde estan" answered late or lost orders."""
    matcher = FlowMatcher(load_flows_file(SHIPPED))
    assert matcher.match(question) is None and matcher.facts(question) == []
