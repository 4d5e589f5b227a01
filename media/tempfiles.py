"""Temporary files of voice notes and videos: one folder each, names we own, removed on every path, old
leftovers swept."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from loguru import logger

PREFIX = "voice-"


class TempScope:
    """The files of one job; all of them are deleted when the scope closes, whatever happened."""

    def __init__(self, owner: TempDir) -> None:
        self._owner = owner
        self._paths: list[Path] = []

    def new(self, suffix: str) -> Path:
        path = self._owner.root / f"{self._owner.prefix}{uuid.uuid4().hex}{suffix}"
        self._paths.append(path)
        self._owner.live.add(path)
        return path

    def close(self) -> None:
        for path in self._paths:
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:  # a sweep gets it later
                logger.warning("could not remove temp file {}: {}", path.name, exc)
            self._owner.live.discard(path)
        self._paths.clear()


class TempDir:
    def __init__(self, root: Path, prefix: str = PREFIX) -> None:
        self.root = root
        self.prefix = prefix  # every file of ours starts so: a sweep removes nothing else
        self.live: set[Path] = set()
        self.sweeps = 0
        self.removed = 0
        self.bytes_removed = 0

    @contextlib.contextmanager
    def scope(self) -> Iterator[TempScope]:
        self.root.mkdir(parents=True, exist_ok=True)
        scope = TempScope(self)
        try:
            yield scope
        finally:
            scope.close()

    def sweep(self, older_than_s: float = 3600, now: float | None = None) -> int:
        """Remove our files older than `older_than_s` (a crash's leftovers) that no job here is using."""
        self.sweeps += 1
        if not self.root.is_dir():
            return 0
        cutoff = (time.time() if now is None else now) - older_than_s
        removed = 0
        for path in self.root.glob(f"{self.prefix}*"):
            if path in self.live:
                continue
            try:
                stat = path.stat()
                if not path.is_file() or stat.st_mtime > cutoff:
                    continue
                path.unlink()
            except OSError:
                continue  # gone meanwhile, or not ours to remove
            removed += 1
            self.bytes_removed += stat.st_size
        self.removed += removed
        if removed:
            logger.info("swept {} leftover temp file(s) from {}", removed, self.root.name)
        return removed
