"""The business's local date and time, told to the model: "¿abrís hoy?", "¿llego antes del cierre?" and
"¿me lo traéis mañana?" need today's weekday and the time, which a model does not know.

Names are written out here rather than taken from the C locale, which containers seldom have in Spanish.
"""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

from bot.replies import Language

_WEEKDAYS = {
    "es": ("lunes", "martes", "miércoles", "jueves", "viernes", "sábado", "domingo"),
    "en": ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"),
}
_MONTHS = {
    "es": ("enero", "febrero", "marzo", "abril", "mayo", "junio", "julio", "agosto", "septiembre", "octubre",
           "noviembre", "diciembre"),
    "en": ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December"),
}  # fmt: skip


# Files of a system's zone database that are no zone of a place: the host's own zone (UTC in a container),
# and a placeholder.
_NOT_PLACES = frozenset({"localtime", "Factory"})


def time_zone(name: str) -> ZoneInfo:
    """The IANA zone called `name` ("Europe/Madrid"); ValueError naming what is accepted otherwise. Only
    names of the zone list (the system's, else the tzdata package's), so a setting reads the same in every
    image: not a folder ("America/Argentina"), not "localtime" or a "right/" variant."""
    if name in _NOT_PLACES or name not in available_timezones():
        raise ValueError(
            "not a time zone name; use an IANA name such as Europe/Madrid or America/Mexico_City"
        )
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ValueError(f"time zone {name} cannot be read from the zone database") from None


def local_time_line(zone: ZoneInfo, language: Language, timestamp: float) -> str:
    """One sentence for the system prompt, to the minute: "Ahora es domingo 22 de noviembre de 2026, las
    21:05 (hora de Europe/Madrid)." """
    now = datetime.fromtimestamp(timestamp, zone)
    weekday, month = _WEEKDAYS[language][now.weekday()], _MONTHS[language][now.month - 1]
    if language == "es":
        return f"Ahora es {weekday} {now.day} de {month} de {now.year}, las {now:%H:%M} (hora de {zone.key})."
    return f"It is now {weekday} {now.day} {month} {now.year}, {now:%H:%M} ({zone.key} time)."
