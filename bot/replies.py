"""The bot's canned replies, in Spanish by default and English by setting (BOT_LANGUAGE)."""

from __future__ import annotations

from typing import Literal

Language = Literal["es", "en"]

_REPLIES: dict[str, dict[Language, str]] = {
    "ai_off": {
        "es": "Gracias por tu mensaje. Ahora mismo las respuestas automáticas con IA están desactivadas; "
        "te responderemos lo antes posible.",
        "en": "Thanks for your message. Automatic AI answers are turned off right now; "
        "we will get back to you as soon as we can.",
    },
    "chat_with": {"es": "el chat de {number}", "en": "the chat with {number}"},
    "that_chat": {"es": "ese chat", "en": "that chat"},
    "a_customer_lower": {"es": "un cliente", "en": "a customer"},
    "reply_too_late": {
        "es": "⚠️ Una respuesta para {who} no llegó a salir: WhatsApp estuvo desconectado tanto tiempo que ya "
        "llegaba tarde (OUTBOX_MAX_AGE_MINUTES). Quizá quieras escribirle tú.",
        "en": "⚠️ A reply to {who} never went out: WhatsApp was disconnected so long that it was too late "
        "(OUTBOX_MAX_AGE_MINUTES). You may want to write to them yourself.",
    },
    "ai_down": {
        "es": "⚠️ La IA no responde: {why}{code}. Los clientes reciben una disculpa hasta que vuelva; te "
        "aviso cuando responda de nuevo.",
        "en": "⚠️ The AI is not answering: {why}{code}. Customers get an apology until it is back; I will "
        "tell you when it answers again.",
    },
    "ai_down_key": {
        "es": "el servidor rechaza la clave (OPENAI_API_KEY)",
        "en": "the server refuses the key (OPENAI_API_KEY)",
    },
    "ai_down_quota": {
        "es": "se ha alcanzado el límite de uso o se ha agotado el saldo de la cuenta",
        "en": "the usage limit was reached or the account ran out of credit",
    },
    "ai_down_model": {
        "es": "el servidor no tiene el modelo (OPENAI_MODEL)",
        "en": "the server does not have the model (OPENAI_MODEL)",
    },
    "ai_down_service": {
        "es": "el servicio no contesta o falla",
        "en": "the service does not answer or fails",
    },
    "ai_back": {
        "es": "✅ La IA vuelve a responder a los clientes.",
        "en": "✅ The AI is answering customers again.",
    },
    "ai_error_after_facts": {
        "es": "Para cualquier otra cosa, no he podido procesar tu mensaje ahora mismo; inténtalo de nuevo "
        "en unos minutos.",
        "en": "For anything else, I couldn't process your message right now; please try again in a few "
        "minutes.",
    },
    "ai_error": {
        "es": "Lo siento, no he podido procesar tu mensaje en este momento. "
        "Por favor, inténtalo de nuevo en unos minutos.",
        "en": "Sorry, I couldn't process your message right now. Please try again in a few minutes.",
    },
    "empty": {
        "es": "No he recibido texto en tu mensaje. ¿En qué puedo ayudarte?",
        "en": "Your message had no text. How can I help you?",
    },
    # Answers to the owner's commands (bot/takeover.py), in the owner's own chat.
    "owner_paused_all": {
        "es": "Bot en pausa en todos los chats hasta «!bot reanuda todos».",
        "en": "Bot paused in every chat until '!bot resume all'.",
    },
    "owner_paused_all_for": {
        "es": "Bot en pausa en todos los chats durante {length}.",
        "en": "Bot paused in every chat for {length}.",
    },
    "owner_paused_chat": {
        "es": "Bot en pausa en {where} hasta «!bot reanuda».",
        "en": "Bot paused in {where} until '!bot resume'.",
    },
    "owner_paused_chat_for": {
        "es": "Bot en pausa en {where} durante {length}.",
        "en": "Bot paused in {where} for {length}.",
    },
    "owner_resumed_all": {
        "es": "El bot vuelve a responder en todos los chats.",
        "en": "The bot answers every chat again.",
    },
    "owner_resumed_chat": {
        "es": "El bot vuelve a responder en {where}.",
        "en": "The bot answers {where} again.",
    },
    "owner_status_answering": {
        "es": "Estado del bot: respondiendo; chats en pausa: {paused}{which}.",
        "en": "Bot status: answering; chats paused: {paused}{which}.",
    },
    "owner_status_paused": {
        "es": "Estado del bot: en pausa en todos los chats. Al reanudar, seguirán en pausa por su cuenta: "
        "{paused}{which}.",
        "en": "Bot status: paused in every chat. Once resumed, chats still paused on their own: "
        "{paused}{which}.",
    },
    "owner_usage": {
        "es": "Uso: !bot pausa [30 | 2h | 1 día] [todos] | !bot reanuda [todos] | !bot estado (!bot off y "
        "!bot on también valen). Desde tu propio chat, valen para todos los chats.",
        "en": "Usage: !bot pause [30 | 2h | 1 day] [all] | !bot resume [all] | !bot status (!bot off and "
        "!bot on work too). From your own chat they apply to every chat.",
    },
    "attachment_note": {
        "es": "(El cliente adjuntó además un archivo, una imagen o un vídeo que no puedes ver.)",
        "en": "(The customer also attached a file, an image or a video that you cannot see.)",
    },
    "quote_note": {
        "es": "(El cliente responde a este mensaje anterior: «{quoted}»)",
        "en": "(The customer is replying to this earlier message: “{quoted}”)",
    },
    "quote_of_bot_note": {
        "es": "(El cliente responde a este mensaje tuyo: «{quoted}»)",
        "en": "(The customer is replying to this message of yours: “{quoted}”)",
    },
    "handoff": {
        "es": "De acuerdo, aviso a una persona del equipo y te escribirá por aquí en cuanto pueda.",
        "en": "Sure, I'm letting someone from the team know; they'll write to you here as soon as they can.",
    },
    "order_handoff": {
        "es": "¡Gracias por tu pedido! Una persona del equipo lo revisa y te escribe por aquí para "
        "confirmarlo.",
        "en": "Thank you for your order! Someone from the team will check it and write to you here to "
        "confirm it.",
    },
    "order_owner_notice": {
        "es": "🛒 {who} ha enviado un pedido: «{text}». No le contestaré durante {duration}, o hasta que "
        "escribas «!bot reanuda» en su chat.",
        "en": "🛒 {who} has sent an order: “{text}”. I won't answer them for {duration}, or until you write "
        "“!bot resume” in their chat.",
    },
    "a_customer": {"es": "Un cliente", "en": "A customer"},
    "handoff_owner_notice": {
        "es": "🙋 {who} quiere hablar con una persona: «{text}». No le contestaré durante {duration}, "
        "o hasta que escribas «!bot reanuda» en su chat.",
        "en": "🙋 {who} wants to talk to a person: “{text}”. I won't answer them for {duration}, "
        "or until you write “!bot resume” in their chat.",
    },
    "quote_media_note": {
        "es": "(El cliente responde a {what}, un mensaje {whose}, que no puedes ver.)",
        "en": "(The customer is replying to {what}, a message of {whose}, that you cannot see.)",
    },
    "quote_media_caption_note": {
        "es": "(El cliente responde a {what}, un mensaje {whose}, que no puedes ver, con este texto: "
        "«{quoted}»)",
        "en": "(The customer is replying to {what}, a message of {whose}, that you cannot see, captioned: "
        "“{quoted}”)",
    },
    # Before a PDF's text, for the model only.
    "pdf_text_note": {
        "es": "(El cliente envía el PDF «{name}»; este es su texto:)",
        "en": "(The customer sends the PDF “{name}”; this is its text:)",
    },
    "voice_note_unheard_note": {
        "es": "(El cliente envió además una nota de voz que no has podido escuchar. Díselo así: «{why}»)",
        "en": "(The customer also sent a voice note you could not listen to. Tell them so: “{why}”)",
    },
    "pdf_unread_note": {
        "es": "(El cliente envió además un PDF que no has podido abrir. Díselo así: «{why}»)",
        "en": "(The customer also sent a PDF you could not open. Tell them so: “{why}”)",
    },
    "video_unread_note": {
        "es": "(El cliente envió además un vídeo que no has podido ver. Díselo así: «{why}»)",
        "en": "(The customer also sent a video you could not watch. Tell them so: “{why}”)",
    },
    "pdf_unnamed": {"es": "documento.pdf", "en": "document.pdf"},
    "pdf_cut_note": {
        "es": "(El PDF sigue, pero solo tienes su principio: si te preguntan por el resto, dilo.)",
        "en": "(The PDF goes on, but you only have its beginning: if asked about the rest, say so.)",
    },
    "video_note": {
        "es": "(El cliente envía un vídeo{length}: ves {frames}; no oyes su sonido.)",
        "en": "(The customer sends a video{length}: you see {frames}; you do not hear its sound.)",
    },
    "video_note_heard": {
        "es": "(El cliente envía un vídeo{length}: ves {frames}; lo que se dice en él, transcrito, va en su "
        "mensaje.)",
        "en": "(The customer sends a video{length}: you see {frames}; what is said in it, transcribed, is in "
        "their message.)",
    },
    "video_length": {"es": " de {seconds} s", "en": " of {seconds} s"},
    "video_frame": {"es": "{frames} fotograma de él", "en": "{frames} frame of it"},
    "video_frames": {
        "es": "{frames} fotogramas repartidos por él, en orden",
        "en": "{frames} frames spread over it, in order",
    },
    "pdf_scan_note": {
        "es": "(El cliente envía el PDF «{name}», escaneado: ves sus primeras páginas como imágenes.)",
        "en": "(The customer sends the PDF “{name}”, a scan: you see its first pages as images.)",
    },
    "quote_photo_note": {
        "es": "(El cliente responde a esta foto, un mensaje {whose}.)",
        "en": "(The customer is replying to this photo, a message of {whose}.)",
    },
    "quote_photo_caption_note": {
        "es": "(El cliente responde a esta foto, un mensaje {whose}, con este texto: «{quoted}»)",
        "en": "(The customer is replying to this photo, a message of {whose}, captioned: “{quoted}”)",
    },
    "quote_audio_note": {
        "es": "(El cliente responde a una nota de voz, un mensaje {whose}.)",
        "en": "(The customer is replying to a voice note, a message of {whose}.)",
    },
    "whose_bot": {"es": "tuyo", "en": "yours"},
    "whose_customer": {"es": "suyo", "en": "theirs"},
    "label_image": {"es": "una foto", "en": "a photo"},
    "label_video": {"es": "un vídeo", "en": "a video"},
    "label_sticker": {"es": "un sticker", "en": "a sticker"},
    "label_document": {"es": "un documento", "en": "a document"},
    "product_note": {
        "es": "(El cliente envía este producto de tu catálogo: «{quoted}»)",
        "en": "(The customer is sending this product from your catalog: “{quoted}”)",
    },
    "other_product_note": {
        "es": "(El cliente envía este producto del catálogo de otro negocio, no del tuyo: «{quoted}»)",
        "en": "(The customer is sending this product from another business's catalog, not yours: “{quoted}”)",
    },
    "order_note": {
        "es": "(El cliente envía un pedido de tu catálogo: «{quoted}». No ves sus artículos.)",
        "en": "(The customer is sending an order from your catalog: “{quoted}”. You cannot see its items.)",
    },
    "ad_note": {
        "es": "(El mensaje del cliente dice venir de un anuncio con este texto: «{quoted}»)",
        "en": "(The customer's message says it comes from an ad with this text: “{quoted}”)",
    },
    "too_long_note": {
        "es": "(Tu mensaje era muy largo; he leído solo el principio.)",
        "en": "(Your message was very long; I only read the beginning.)",
    },
    "answer_cut_note": {
        "es": "(La respuesta era demasiado larga y la he acortado. Si quieres el resto, pídemelo.)",
        "en": "(The answer was too long, so I shortened it. Ask me if you want the rest.)",
    },
    "rate_limited": {
        "es": "Estás enviando muchos mensajes seguidos. Espera un poco y vuelve a escribirme, por favor.",
        "en": "You're sending a lot of messages in a row. Please wait a little and write to me again.",
    },
    "busy": {
        "es": "Estoy atendiendo muchas consultas ahora mismo; te respondo en breve.",
        "en": "I'm handling a lot of questions right now; I'll answer you shortly.",
    },
    "resend": {
        "es": "No he podido leer tu último mensaje. ¿Podrías enviarlo de nuevo, por favor?",
        "en": "I couldn't read your last message. Could you send it again, please?",
    },
    "call_rejected": {
        "es": "No puedo atender llamadas por aquí. Escríbeme tu consulta y te respondo enseguida.",
        "en": "I can't take calls here. Write me your question and I'll answer right away.",
    },
    "media_unsupported": {
        "es": "Por ahora solo puedo leer mensajes de texto y notas de voz. ¿Me lo escribes, por favor?",
        "en": "For now I can only read text messages and voice notes. Could you type it, please?",
    },
    "media_unsupported_photos": {
        "es": "Por ahora solo puedo leer mensajes de texto, fotos, vídeos y notas de voz. ¿Me lo escribes, "
        "por favor?",
        "en": "For now I can only read text messages, photos, videos and voice notes. Could you type it, "
        "please?",
    },
    "media_unsupported_pdf": {
        "es": "Por ahora solo puedo leer mensajes de texto, PDF y notas de voz. ¿Me lo escribes, por favor?",
        "en": "For now I can only read text messages, PDFs and voice notes. Could you type it, please?",
    },
    "media_unsupported_photos_pdf": {
        "es": "Por ahora solo puedo leer mensajes de texto, fotos, vídeos, PDF y notas de voz. ¿Me lo "
        "escribes, por favor?",
        "en": "For now I can only read text messages, photos, videos, PDFs and voice notes. Could you type "
        "it, please?",
    },
    "video_unreadable": {
        "es": "No he podido ver tu vídeo. ¿Puedes enviarlo de nuevo o contarme por escrito qué necesitas?",
        "en": "I couldn't watch your video. Could you send it again or tell me in writing what you need?",
    },
    "video_too_large": {
        "es": "Tu vídeo es demasiado grande para mí (el máximo es {limit:g} MB). ¿Puedes enviar uno más "
        "corto o contarme por escrito qué necesitas?",
        "en": "Your video is too large for me (the limit is {limit:g} MB). Could you send a shorter one or "
        "tell me in writing what you need?",
    },
    "pdf_unreadable": {
        "es": "No he podido abrir tu PDF. ¿Puedes enviarlo de nuevo o contarme por escrito qué necesitas?",
        "en": "I couldn't open your PDF. Could you send it again or tell me in writing what you need?",
    },
    "document_unreadable": {
        "es": "No he podido abrir tu archivo. ¿Puedes enviarlo de nuevo o contarme por escrito qué "
        "necesitas?",
        "en": "I couldn't open your file. Could you send it again or tell me in writing what you need?",
    },
    "pdf_too_large": {
        "es": "Tu PDF es demasiado grande para mí (el máximo es {limit:g} MB). ¿Puedes contarme por escrito "
        "qué necesitas?",
        "en": "Your PDF is too large for me (the limit is {limit:g} MB). Could you tell me in writing what "
        "you need?",
    },
    "pdf_too_large_photos": {
        "es": "Tu PDF es demasiado grande para mí (el máximo es {limit:g} MB). ¿Puedes enviarme una "
        "captura de lo importante o contarme por escrito qué necesitas?",
        "en": "Your PDF is too large for me (the limit is {limit:g} MB). Could you send me a screenshot of "
        "what matters or tell me in writing what you need?",
    },
    "pdf_protected": {
        "es": "Tu PDF está protegido con contraseña y no puedo abrirlo. ¿Puedes contarme por escrito qué "
        "necesitas?",
        "en": "Your PDF is password-protected and I can't open it. Could you tell me in writing what you "
        "need?",
    },
    "pdf_protected_photos": {
        "es": "Tu PDF está protegido con contraseña y no puedo abrirlo. ¿Puedes enviarme una captura o "
        "contarme por escrito qué necesitas?",
        "en": "Your PDF is password-protected and I can't open it. Could you send me a screenshot or tell "
        "me in writing what you need?",
    },
    "pdf_no_text": {
        "es": "Tu PDF no tiene texto que yo pueda leer (parece escaneado). ¿Puedes contarme por escrito qué "
        "necesitas?",
        "en": "Your PDF has no text I can read (it looks scanned). Could you tell me in writing what you "
        "need?",
    },
    "pdf_no_text_photos": {
        "es": "Tu PDF no tiene texto que yo pueda leer (parece escaneado). ¿Puedes enviarme una foto o una "
        "captura, o contarme por escrito qué necesitas?",
        "en": "Your PDF has no text I can read (it looks scanned). Could you send me a photo or a "
        "screenshot, or tell me in writing what you need?",
    },
    "photo_too_large": {
        "es": "Tu foto es demasiado grande para mí (el máximo es {limit:g} MB). ¿Puedes enviarla como foto y "
        "no como documento, o contarme por escrito qué necesitas?",
        "en": "Your photo is too large for me (the limit is {limit:g} MB). Could you send it as a photo "
        "rather than a document, or tell me in writing what you need?",
    },
    "photo_unreadable_again": {
        "es": "Sigo sin poder ver tu foto. ¿Puedes contarme por escrito qué necesitas?",
        "en": "I still can't see your photo. Could you tell me in writing what you need?",
    },
    "video_unreadable_again": {
        "es": "Sigo sin poder ver tu vídeo. ¿Puedes contarme por escrito qué necesitas?",
        "en": "I still can't see your video. Could you tell me in writing what you need?",
    },
    "photo_unreadable": {
        "es": "No he podido ver tu foto. ¿Puedes enviarla de nuevo o contarme por escrito qué necesitas?",
        "en": "I couldn't see your photo. Could you send it again or tell me in writing what you need?",
    },
    "audio_too_large": {
        "es": "La nota de voz es demasiado grande (el máximo es {limit:g} MB). ¿Puedes enviar una más corta?",
        "en": "That voice note is too large (the limit is {limit:g} MB). Could you send a shorter one?",
    },
    "audio_too_long": {
        "es": "La nota de voz es demasiado larga (el máximo es {duration}). ¿Puedes enviar una más corta?",
        "en": "That voice note is too long (the limit is {duration}). Could you send a shorter one?",
    },
    "audio_unreadable": {
        "es": "No he podido escuchar tu nota de voz. ¿Puedes enviarla de nuevo o escribirme el mensaje?",
        "en": "I couldn't listen to your voice note. Could you send it again or type your message?",
    },
    "audio_empty": {
        "es": "Tu nota de voz parece estar vacía o en silencio. ¿Puedes repetirla?",
        "en": "Your voice note seems to be empty or silent. Could you record it again?",
    },
    "audio_ai_off": {
        "es": "Ahora mismo no puedo escuchar notas de voz. ¿Me escribes tu mensaje, por favor?",
        "en": "I can't listen to voice notes right now. Could you type your message, please?",
    },
}


def reply(key: str, language: Language, **values: object) -> str:
    text = _REPLIES[key][language]
    if not values:
        return text
    if language == "es":  # "el máximo es 2,5 MB"
        values = {name: _DecimalComma(v) if isinstance(v, float) else v for name, v in values.items()}
    return text.format(**values)


class _DecimalComma(float):
    """A number written the Spanish way: a comma before its decimals."""

    def __format__(self, spec: str) -> str:
        return format(float(self), spec).replace(".", ",")


_UNITS = {
    "es": (("minuto", "minutos"), ("segundo", "segundos")),
    "en": (("minute", "minutes"), ("second", "seconds")),
}


_DAYS = {"es": ("día", "días"), "en": ("day", "days")}


def pause_length(minutes: float, language: Language) -> str:
    """A pause as the owner wrote it: "30 min", "2 h", "1,5 h", "1 día", not "1440 min"."""
    if minutes >= 24 * 60 and minutes % (24 * 60) == 0:
        days = int(minutes // (24 * 60))
        return f"{days} {_DAYS[language][days != 1]}"
    number, unit = (minutes / 60, "h") if minutes >= 60 and minutes % 6 == 0 else (minutes, "min")
    text = f"{number:g} {unit}"
    return text.replace(".", ",") if language == "es" else text


def duration(minutes: float, language: Language) -> str:
    """A limit as a customer reads it: "1 minuto", "10 minutos", and in seconds when not whole minutes
    ("90 segundos", "30 segundos") rather than "1.5 minutos"."""
    (minute, minutes_word), (second, seconds_word) = _UNITS[language]
    if minutes == int(minutes) and minutes >= 1:
        return f"{int(minutes)} {minute if minutes == 1 else minutes_word}"
    seconds = round(minutes * 60)
    return f"{seconds} {second if seconds == 1 else seconds_word}"


def all_canned_texts() -> set[str]:
    """Every canned text in every language (the ban-risk guard lets these repeat)."""
    return {text for by_language in _REPLIES.values() for text in by_language.values()}
