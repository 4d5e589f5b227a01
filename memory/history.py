"""The last messages of each chat: bounded deques in memory in front of the store.

Only a bounded number of chats, and of characters in all, is kept (least recently used out); a chat that
is not in memory is read back from the store, so history survives restarts.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import replace

from memory.store import BUSY_KIND, Store, StoredMessage


class ChatHistory:
    def __init__(
        self, store: Store, *, depth: int, max_chats: int = 5000, max_chars: int = 4_000_000
    ) -> None:
        self.store = store
        self.depth = depth
        self.max_chats = max_chats
        # Messages may be MAX_INBOUND_CHARS long: a bound on chats alone would allow 5,000 x 6 long ones.
        self.max_chars = max_chars
        self.chars = 0
        self._chats: OrderedDict[str, deque[StoredMessage]] = OrderedDict()
        self.memory_hits = 0
        self.store_reads = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._chats)

    async def recent(self, current: StoredMessage) -> list[StoredMessage]:
        """The last `depth` messages of the chat before `current` (the message being answered), oldest first.

        On a miss the store is read; rows from `current` on are dropped, since later messages of
        the chat may already be persisted (they are saved at intake) but must not count as history.
        """
        if self.depth <= 0:
            return []
        chat_id = current.chat_id
        cached = self._chats.get(chat_id)
        if cached is not None:
            self._chats.move_to_end(chat_id)
            self.memory_hits += 1
        else:
            self.store_reads += 1
            rows = await self.store.recent_messages(chat_id, self.depth * 2 + 20)
            ids = [row.wa_message_id for row in rows]
            if current.wa_message_id in ids:
                rows = rows[: ids.index(current.wa_message_id)]
            # A "busy" notice is not a turn of the conversation: it would take one of the `depth` places.
            rows = [row for row in rows if row.created_at <= current.created_at and row.kind != BUSY_KIND]
            cached = deque([*rows, current], maxlen=self.depth + 1)
            self._remember(chat_id, cached)
        return [m for m in cached if m.wa_message_id != current.wa_message_id][-self.depth :]

    def append(self, message: StoredMessage) -> None:
        """Record a message that was just persisted (only chats already in memory are updated; a message
        already there, read with the chat from the store, is not added twice)."""
        cached = self._chats.get(message.chat_id)
        if cached is not None and all(m.wa_message_id != message.wa_message_id for m in cached):
            if len(cached) == cached.maxlen:
                self.chars -= len(cached[0].body)  # pushed out by the append
            cached.append(message)
            self.chars += len(message.body)
            self._chats.move_to_end(message.chat_id)
            self._evict_over_bounds()

    def set_body(self, chat_id: str, wa_message_id: str, body: str) -> None:
        """Give a message in memory the text it has in the store now (a voice note's transcript: the row
        came in empty at intake), so the next turns' context matches what a read from the store gives."""
        cached = self._chats.get(chat_id)
        if cached is None:
            return
        for index, message in enumerate(cached):
            if message.wa_message_id == wa_message_id:
                cached[index] = replace(message, body=body)
                self.chars += len(body) - len(message.body)
        self._evict_over_bounds()

    def forget(self, chat_id: str, wa_message_id: str) -> None:
        """Drop one message from a chat in memory (a reply that never went out)."""
        cached = self._chats.get(chat_id)
        if cached is None:
            return
        for message in list(cached):
            if message.wa_message_id == wa_message_id:
                cached.remove(message)
                self.chars -= len(message.body)

    def _remember(self, chat_id: str, messages: deque[StoredMessage]) -> None:
        self._chats[chat_id] = messages
        self.chars += sum(len(m.body) for m in messages)
        self._evict_over_bounds()

    def _evict_over_bounds(self) -> None:
        # The most recent chat stays even if it alone is over the character bound: it is being answered.
        while len(self._chats) > 1 and (len(self._chats) > self.max_chats or self.chars > self.max_chars):
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        _, messages = self._chats.popitem(last=False)
        self.chars -= sum(len(m.body) for m in messages)
        self.evictions += 1

    def shrink(self, fraction: float) -> int:
        drop = int(len(self._chats) * fraction)
        for _ in range(drop):
            self._drop_oldest()
        return drop

    def stats(self) -> dict[str, int]:
        return {
            "chats": len(self._chats),
            "max_chats": self.max_chats,
            "chars": self.chars,
            "max_chars": self.max_chars,
            "memory_hits": self.memory_hits,
            "store_reads": self.store_reads,
            "evictions": self.evictions,
        }
