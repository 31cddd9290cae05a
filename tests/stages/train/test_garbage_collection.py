"""The train loop turns Python's automatic GC off and collects between steps, every gc_every."""

from __future__ import annotations

import gc

from stages.train.core import collect_garbage_between_steps


def collections_during(action) -> int:
    seen = []

    def count(phase: str, info: dict) -> None:
        if phase == "start":
            seen.append(info["generation"])

    gc.callbacks.append(count)
    try:
        action()
    finally:
        gc.callbacks.remove(count)
    return len(seen)


def test_collects_every_n_steps_and_never_on_its_own() -> None:
    with collect_garbage_between_steps(2) as collect:
        assert not gc.isenabled()
        assert collections_during(lambda: collect(1)) == 0
        assert collections_during(lambda: collect(2)) == 1
        assert collections_during(lambda: [[object()] for _ in range(100_000)]) == 0  # no automatic pass
    assert gc.isenabled()


def test_zero_leaves_pythons_gc_alone() -> None:
    with collect_garbage_between_steps(0) as collect:
        assert gc.isenabled()
        assert collections_during(lambda: collect(50)) == 0
    assert gc.isenabled()
