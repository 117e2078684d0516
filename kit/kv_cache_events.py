"""KV-cache events: what the prefix cache stored and dropped, for `LLM.get_kv_cache_events`.

A bounded ring (`KvCacheConfig.event_buffer_max_size` entries) that the `KVCacheManager`
feeds from the executor's thread when it is attached (`manager.events = KVCacheEventRing(...)`)
and a caller drains. The entries are TensorRT-LLM's dicts:

    {"event_id": 0, "data": {"type": "created", "num_blocks_per_cache_level": [num_blocks, 0]}, "window_size": W}
    {"event_id": 1, "data": {"type": "stored", "parent_hash": h0 | None,
                              "blocks": [{"type": "stored_block", "block_hash": h1, "lora_id": None,
                                          "cache_level": 0, "priority": 35,
                                          "tokens": [{"type": "unique_token", "token_id": t, "token_extra_id": 0}, ...]}]},
     "window_size": W}
    {"event_id": 2, "data": {"type": "removed", "block_hashes": [h1]}, "window_size": W}

Block hashes are the first 8 bytes of the kit's sha256 chain hash, as an unsigned int.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any, Sequence

__all__ = ["KVCacheEventRing", "block_hash_int"]

_PRIORITY = 35  # TensorRT-LLM's default retention priority


def block_hash_int(h: bytes | None) -> int | None:
    return None if h is None else int.from_bytes(h[:8], "big")


class KVCacheEventRing:
    """The last `max_size` events; `pop(timeout)` drains them (waiting up to `timeout` s for one)."""

    def __init__(self, max_size: int, num_blocks: int, window_size: int) -> None:
        if not isinstance(max_size, int) or isinstance(max_size, bool) or max_size < 1:
            raise ValueError(f"event_buffer_max_size must be an int >= 1, got {max_size!r}")
        self.window_size = window_size
        self._events: deque[dict[str, Any]] = deque(maxlen=max_size)
        self._next_id = 0
        self._cond = threading.Condition()
        self._add({"type": "created", "num_blocks_per_cache_level": [num_blocks, 0]})

    def _add(self, data: dict[str, Any]) -> None:
        with self._cond:
            self._events.append({"event_id": self._next_id, "data": data, "window_size": self.window_size})
            self._next_id += 1
            self._cond.notify_all()

    def stored(self, parent: bytes | None, block_hash: bytes, token_ids: Sequence[int]) -> None:
        tokens = [{"type": "unique_token", "token_id": int(t), "token_extra_id": 0} for t in token_ids]
        self._add({"type": "stored", "parent_hash": block_hash_int(parent), "blocks": [
            {"type": "stored_block", "block_hash": block_hash_int(block_hash), "tokens": tokens, "lora_id": None,
             "cache_level": 0, "priority": _PRIORITY}]})

    def removed(self, block_hash: bytes) -> None:
        self._add({"type": "removed", "block_hashes": [block_hash_int(block_hash)]})

    def pop(self, timeout: float = 0.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._events and time.monotonic() < deadline:
                self._cond.wait(deadline - time.monotonic())
            out = list(self._events)
            self._events.clear()
        return out

    def __len__(self) -> int:
        return len(self._events)
