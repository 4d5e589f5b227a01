"""A model's Markdown reaches the customer in WhatsApp's own formatting, not as stray symbols."""

from __future__ import annotations

import pytest

from bot.formatting import for_whatsapp
from tests.conftest import inbound
from tests.fake_openai import FakeOpenAI


@pytest.mark.parametrize(
    ("markdown", "whatsapp"),
    [
        ("**Horario:** de 9 a 14", "*Horario:* de 9 a 14"),
        ("__Horario:__ de 9 a 14", "*Horario:* de 9 a 14"),
        ("***Oferta***", "*Oferta*"),
        ("~~30 €~~ 25 €", "~30 €~ 25 €"),
        ("### Precios", "*Precios*"),
        ("## **Precios** ##", "*Precios*"),
        ("Reserva [aquí](https://x.es/r?a=1)", "Reserva aquí (https://x.es/r?a=1)"),
        ("[https://x.es](https://x.es)", "https://x.es"),
        ("Mira <https://x.es/carta>", "Mira https://x.es/carta"),
        ("![la tarta](https://x.es/t.jpg)", "la tarta (https://x.es/t.jpg)"),
        ("* uno\n+ dos\n- tres\n  * cuatro", "- uno\n- dos\n- tres\n  - cuatro"),
        ("* **Tarta**: 20 €", "- *Tarta*: 20 €"),
        (
            "| Producto | Precio |\n|:---|---:|\n| **Tarta** | 20 € |\n| Café | 1,50 € |",
            "Producto · Precio\n*Tarta* · 20 €\nCafé · 1,50 €",
        ),
        ("Hola\n\n---\n\nAdiós", "Hola\n\n\nAdiós"),
        # What the review threw at it
        ("| Plato | Precio |\r\n|---|---|\r\n| Paella | 12 € |", "Plato · Precio\nPaella · 12 €"),
        ("Usa el cupón **`VERANO10`** al pagar", "Usa el cupón *`VERANO10`* al pagar"),
        ("**Negrita con *cursiva* dentro**", "*Negrita con _cursiva_ dentro*"),
        ("| Paella |  | 12 € |", "Paella · 12 €"),
        ("[web](https://x.es/a_b_) y **ok**", "web (https://x.es/a_b_) y *ok*"),
    ],
)
def test_markdown_becomes_whatsapp_formatting(markdown: str, whatsapp: str) -> None:
    assert for_whatsapp(markdown) == whatsapp


@pytest.mark.parametrize(
    "text",
    [
        "Hola, ¿en qué te ayudo?",
        "*negrita* y _cursiva_ de WhatsApp",
        "2 * 3 * 4 = 24",
        "mi_usuario_2 o snake__case__name",
        "usa `**esto**` tal cual",
        "```\n**código** | a | b |\n# no es un título\n```",
        "a | b",
        "1. uno\n2. dos\n> una cita",
        "precio -- 20 €",
        "Síguenos en https://instagram.com/__lacasita__ o escribe a @__lacasita__",
        "x**2 + y**2",
        "```\n# un comentario\n**sin cerrar",  # an answer cut inside its code block
    ],
)
def test_whatsapp_text_and_code_are_left_as_written(text: str) -> None:
    assert for_whatsapp(text) == text


async def test_the_customer_gets_the_models_markdown_as_whatsapp_formatting(
    harness, fake_openai: FakeOpenAI
) -> None:
    fake_openai.reply = lambda messages: "### Horario\n**Lunes a viernes:** 9-14\n* Sábados: cerrado"
    async with harness(openai_api_key="k", openai_base_url=fake_openai.base_url) as h:
        await h.say(inbound("¿qué horario tenéis?"))
        # Another customer's first question: from the cache, converted as well
        await h.say(inbound("¿qué horario tenéis?", chat="34600999888@s.whatsapp.net", id="other"))
    assert [sent.text for sent in h.transport.sent] == [
        "*Horario*\n*Lunes a viernes:* 9-14\n- Sábados: cerrado"
    ] * 2
    assert fake_openai.chat_count == 1
