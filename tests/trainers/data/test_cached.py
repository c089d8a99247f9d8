"""CachedItems: each item computed once (the tiny recipes' log-mel features)."""

from __future__ import annotations

from trainers.data.cached import CachedItems


def test_cached_items_computes_each_item_once() -> None:
    calls = []

    class Counting:
        stats = "stats"

        def __len__(self) -> int:
            return 3

        def __getitem__(self, i: int) -> int:
            calls.append(i)
            return i * 10

    cached = CachedItems(Counting())
    assert [cached[i] for i in (0, 1, 0, 2, 1)] == [0, 10, 0, 20, 10] and calls == [0, 1, 2]
    assert len(cached) == 3 and cached.stats == "stats"
