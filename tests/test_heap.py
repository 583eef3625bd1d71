"""The Heap that a device allocator loads weights through, over the cpu backend:
first fit, frees that leave holes, holes that merge, a top that shrinks, and
growth that leases chunks only when the mapped part is used up."""

import pytest

from vllm_mux.memory import backend
from vllm_mux.memory.arena import ALIGN, Arena
from vllm_mux.memory.heap import Heap

CHUNK = 1 << 20


@pytest.fixture
def heap():
    cpu = backend("cpu")
    arena = Arena(cpu, 8 * CHUNK, CHUNK)
    grown = []

    def grow(n):
        grown.append(n)
        arena.map([cpu.create(CHUNK) for _ in range(n)])

    yield Heap(arena, grow), grown
    arena.close()


def test_bump_then_first_fit_in_holes(heap):
    h, grown = heap
    base = h.arena.base
    a = h.malloc(100)  # rounded up to ALIGN
    b = h.malloc(CHUNK)  # crosses into a second chunk
    c = h.malloc(ALIGN)
    assert (a, b, c) == (base, base + ALIGN, base + ALIGN + CHUNK)
    assert grown == [1, 1] and h.arena.used == 2 * ALIGN + CHUNK
    h.free(b)
    assert h.holes == [(ALIGN, CHUNK)] and h.hole_bytes == CHUNK
    assert h.malloc(3 * ALIGN) == base + ALIGN  # first fit, the hole shrinks from its start
    assert h.holes == [(4 * ALIGN, CHUNK - 3 * ALIGN)]
    assert grown == [1, 1], "a request that fits a hole leases nothing"
    h.arena.backend.tensor(c, ALIGN).fill_(7)  # memory handed out is mapped and writable


def test_neighbouring_holes_merge_and_the_top_shrinks(heap):
    h, _ = heap
    a, b, c, d = (h.malloc(ALIGN) for _ in range(4))
    h.free(a)
    h.free(c)
    assert h.holes == [(0, ALIGN), (2 * ALIGN, ALIGN)]
    h.free(b)  # joins both neighbours
    assert h.holes == [(0, 3 * ALIGN)]
    h.free(d)  # the top: everything below it is free too, so the arena is empty again
    assert h.holes == [] and h.arena.used == 0 and h.live_bytes == 0


def test_free_of_a_stranger_is_refused_and_changes_nothing(heap):
    h, _ = heap
    a = h.malloc(ALIGN)
    for bad in (a + 1, a + ALIGN, 0):
        with pytest.raises(ValueError, match="not an allocation"):
            h.free(bad)
    assert h.live == {0: ALIGN}
    h.free(a)
    with pytest.raises(ValueError, match="not an allocation"):
        h.free(a)  # twice


def test_a_request_beyond_the_arena_fails_and_leaves_the_books_as_they_were(heap):
    h, grown = heap
    h.malloc(CHUNK)
    with pytest.raises(MemoryError, match="capacity"):
        h.malloc(8 * CHUNK)
    assert h.live == {0: CHUNK} and h.arena.used == CHUNK and grown == [1], "nothing leased"
    with pytest.raises(ValueError, match="at least one byte"):
        h.malloc(0)
    assert h.malloc(CHUNK) == h.arena.base + CHUNK  # still serves what fits
