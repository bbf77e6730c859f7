"""The LRU prediction cache keyed by (model, version, input digest)."""

from __future__ import annotations

import pytest

from mlcycle.serve.online.cache import PredictionCache, input_digest


def test_digest_is_canonical_and_distinguishes_inputs() -> None:
    assert input_digest({"a": 1, "b": [1.0, 2.0]}) == input_digest({"b": [1.0, 2.0], "a": 1})
    assert input_digest([1, 2]) != input_digest([2, 1])
    assert len(input_digest([0.5] * 256)) == 16


def test_lru_eviction_and_counters() -> None:
    cache = PredictionCache(capacity=2)
    k1, k2, k3 = (input_digest(i) for i in range(3))
    cache.put("m", "1", k1, "one")
    cache.put("m", "1", k2, "two")
    assert cache.get("m", "1", k1) == "one"  # k1 is now the most recent
    cache.put("m", "1", k3, "three")  # evicts k2
    assert cache.get("m", "1", k2) is None
    assert cache.get("m", "1", k3) == "three"
    assert (cache.hits, cache.misses) == (2, 1)
    assert len(cache) == 2


def test_versions_are_separate_and_invalidate_drops_old_ones() -> None:
    cache = PredictionCache()
    key = input_digest([1.0])
    cache.put("m", "1", key, "old")
    cache.put("m", "2", key, "new")
    cache.put("other", "1", key, "x")
    assert cache.get("m", "1", key) == "old" and cache.get("m", "2", key) == "new"
    assert cache.invalidate("m", keep_version="2") == 1
    assert cache.get("m", "1", key) is None and cache.get("m", "2", key) == "new"
    assert cache.invalidate("m") == 1
    assert cache.get("other", "1", key) == "x"


def test_zero_capacity_disables_and_bad_capacity_is_explained() -> None:
    cache = PredictionCache(0)
    cache.put("m", "1", b"k", 1)
    assert len(cache) == 0
    with pytest.raises(ValueError, match="capacity"):
        PredictionCache(-1)
