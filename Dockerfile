# syntax=docker/dockerfile:1
# The bot's image. Railway builds it whenever a Dockerfile is at the repository root (railway.json and
# .railway/railway.ts also select it); it builds with nothing but Debian's and PyPI's package registries.
#
#   docker build -t whatsapp-ai-bot .
#   docker run --rm -p 8080:8080 -v bot-data:/data --env-file .env whatsapp-ai-bot
#
# Python 3.11: pydub imports audioop, which Python 3.13 removed. Debian trixie, pinned, so the apt package
# names below cannot change under a rebuild.
FROM python:3.11-slim-trixie

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONFAULTHANDLER=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# ffmpeg: pydub transcodes voice notes with it. poppler-utils: pdftotext and pdftoppm read the PDFs customers
# send. libmagic1t64 (libmagic1 before trixie): python-magic, which neonize imports.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ffmpeg poppler-utils libmagic1t64 \
    && rm -rf /var/lib/apt/lists/*

# Dependencies before the code, so a code change reuses this layer. Every requirement has a manylinux
# wheel for CPython 3.11, so no compiler is needed.
COPY requirements.txt /tmp/requirements.txt
RUN python -m venv "$VIRTUAL_ENV" \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# The bot runs as this user. /data is its data directory (a volume's mount point when one is attached);
# the code stays owned by root, read-only to the bot.
RUN groupadd --system --gid 10001 bot \
    && useradd --system --uid 10001 --gid bot --home-dir /home/bot --create-home --shell /usr/sbin/nologin bot \
    && install -d -o bot -g bot -m 0750 /data

WORKDIR /app
COPY . .
# Bytecode now, as root: the bot cannot write /app, and would otherwise compile every module at each start.
RUN python -m compileall -q bot connection media memory

# PORT is the platform's (Railway sets it); 8080 otherwise. APP_ENV=production: warnings and up in the log.
# BOT_RUN_AS: the user `python -m bot` switches to when started as root, which Railway does with a volume
# attached and RAILWAY_RUN_UID=0 (its volumes are owned by root): it hands DATA_DIR to that user first.
ENV APP_ENV=production \
    DATA_DIR=/data \
    PORT=8080 \
    BOT_RUN_AS=bot
EXPOSE 8080

USER 10001:10001

# Railway checks /health itself (healthcheckPath); this is for plain Docker. No curl in the slim image.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '8080'), timeout=4)"]

# Exec form: python is PID 1 and gets SIGTERM itself; the bot reads PORT from the environment.
# A start command set on the platform replaces this (Railway runs it in exec form too).
CMD ["python", "-m", "bot", "run"]
