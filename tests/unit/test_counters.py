"""The in-process windowed counters behind rate limits and quotas."""

from __future__ import annotations

from salon.store.counters import InMemoryCounters, Window


async def test_counts_within_a_window() -> None:
    counters = InMemoryCounters()
    assert await counters.add("k", 1, 60, 120.0) == Window(1, 0)
    assert await counters.add("k", 2, 60, 179.9) == Window(3, 0)
    assert await counters.read("k", 60, 150.0) == Window(3, 0)
    assert await counters.read("other", 60, 150.0) == Window(0, 0)


async def test_the_current_window_becomes_the_previous_one() -> None:
    counters = InMemoryCounters()
    await counters.add("k", 5, 60, 100.0)
    assert await counters.read("k", 60, 130.0) == Window(0, 5)
    assert await counters.add("k", 1, 60, 130.0) == Window(1, 5)
    # Two windows on, nothing counts any more.
    assert await counters.read("k", 60, 250.0) == Window(0, 0)


async def test_windows_of_different_lengths_are_apart() -> None:
    counters = InMemoryCounters()
    await counters.add("k", 1, 60, 10.0)
    await counters.add("k", 100, 86_400, 10.0)
    assert await counters.read("k", 60, 10.0) == Window(1, 0)
    assert await counters.read("k", 86_400, 10.0) == Window(100, 0)


async def test_a_negative_amount_undoes() -> None:
    counters = InMemoryCounters()
    await counters.add("k", 1, 60, 10.0)
    assert await counters.add("k", -1, 60, 10.0) == Window(0, 0)


async def test_stale_counters_are_swept(monkeypatch: object) -> None:
    import salon.store.counters as module

    counters = InMemoryCounters()
    original = module.SWEEP_AT
    module.SWEEP_AT = 10
    try:
        for i in range(10):
            await counters.add(f"old{i}", 1, 60, 0.0)
        await counters.add("new", 1, 60, 1000.0)  # the 11th key triggers a sweep
        assert len(counters._data) == 1
        assert await counters.read("new", 60, 1000.0) == Window(1, 0)
    finally:
        module.SWEEP_AT = original
