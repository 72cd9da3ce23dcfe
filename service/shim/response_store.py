"""Stored responses of the Responses API (`store`, `previous_response_id`, GET / DELETE
/v1/responses/{id}): kept in this shim process's memory, bounded by count and by bytes, each
for a limited time. A restart or another replica does not have them: `previous_response_id` is
then a 400 naming the field, and a client sends the whole conversation instead."""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from clients.weft.v1 import inference_pb2 as pb

MAX_STORED_RESPONSES = 1024
MAX_STORED_BYTES = 64 * 2**20
STORED_RESPONSE_TTL_S = 3600.0


@dataclass(slots=True)
class StoredResponse:
    body: dict[str, Any]                 # the response object as returned
    conversation: list[pb.ChatMessage]   # the turns to continue from (instructions not included)
    size: int
    expires: float


class ResponseStore:
    """Least recently stored first out, past the count or byte limit; expired entries are gone."""

    def __init__(self, max_items: int = MAX_STORED_RESPONSES, max_bytes: int = MAX_STORED_BYTES,
                 ttl_s: float = STORED_RESPONSE_TTL_S) -> None:
        self.max_items, self.max_bytes, self.ttl_s = max_items, max_bytes, ttl_s
        self._items: OrderedDict[str, StoredResponse] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()   # the shim is one event loop, but tests and `weft shim` may share it

    def put(self, response_id: str, body: dict[str, Any], conversation: list[pb.ChatMessage], body_bytes: int) -> None:
        size = body_bytes + sum(m.ByteSize() for m in conversation)
        if size > self.max_bytes:
            return   # larger than the whole store: not kept (a later previous_response_id is a 400)
        with self._lock:
            self._drop(response_id)
            self._items[response_id] = StoredResponse(body, conversation, size, time.monotonic() + self.ttl_s)
            self._bytes += size
            while len(self._items) > self.max_items or self._bytes > self.max_bytes:
                self._drop(next(iter(self._items)))

    def get(self, response_id: str) -> StoredResponse | None:
        with self._lock:
            item = self._items.get(response_id)
            if item is not None and item.expires < time.monotonic():
                self._drop(response_id)
                return None
            return item

    def delete(self, response_id: str) -> bool:
        with self._lock:
            return self._drop(response_id)

    def __len__(self) -> int:
        return len(self._items)

    def _drop(self, response_id: str) -> bool:
        item = self._items.pop(response_id, None)
        if item is None:
            return False
        self._bytes -= item.size
        return True
