"""LRU prediction cache keyed by (model, version, input hash) (Clipper Sec. 4.2).

Clipper caches predictions in front of each model so that repeated queries (popular items,
feedback that re-queries a model) are answered without a model call. Keys name the model
version, so a new version never serves the old one's outputs; :meth:`invalidate` also drops a
model's entries outright when a new version is deployed, which frees their memory at once.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from typing import Any

__all__ = ["PredictionCache", "input_digest"]

try:  # orjson is ~5x faster on the float lists that models take; plain json otherwise
    import orjson as _orjson

    def _dumps(value: Any) -> bytes:
        return _orjson.dumps(value, option=_orjson.OPT_SORT_KEYS)

except ImportError:  # pragma: no cover - the serve extra installs orjson

    def _dumps(value: Any) -> bytes:
        return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def input_digest(value: Any) -> bytes:
    """A 16-byte BLAKE2b digest of the input's canonical JSON (object keys sorted).

    Raises:
        TypeError: when the input is not JSON-serializable.
    """
    return hashlib.blake2b(_dumps(value), digest_size=16).digest()


class PredictionCache:
    """A bounded least-recently-used map from (model, version, digest) to an output.

    Args:
        capacity: the most entries kept; 0 disables the cache.
    """

    def __init__(self, capacity: int = 65536) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
            raise ValueError(f"capacity must be an int >= 0 entries (0 disables), got {capacity!r}")
        self.capacity = capacity
        self._data: OrderedDict[tuple[str, str, bytes], Any] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._data)

    def get(self, model: str, version: str, digest: bytes, default: Any = None) -> Any:
        """The cached output, or ``default`` (a miss); a hit becomes most recently used."""
        key = (model, version, digest)
        try:
            value = self._data[key]
        except KeyError:
            self.misses += 1
            return default
        self._data.move_to_end(key)
        self.hits += 1
        return value

    def put(self, model: str, version: str, digest: bytes, output: Any) -> None:
        """Store an output, evicting the least recently used entry when full."""
        if self.capacity == 0:
            return
        key = (model, version, digest)
        data = self._data
        data[key] = output
        data.move_to_end(key)
        if len(data) > self.capacity:
            data.popitem(last=False)

    def invalidate(self, model: str, keep_version: str | None = None) -> int:
        """Drop a model's entries (all versions but ``keep_version``); returns how many."""
        stale = [k for k in self._data if k[0] == model and k[1] != keep_version]
        for key in stale:
            del self._data[key]
        return len(stale)

    def clear(self) -> None:
        """Drop every entry."""
        self._data.clear()
