"""A Heap: ranges of an Arena handed out and taken back, for an allocator that frees.

An Arena only bumps a pointer: right for the KV cache (one tensor) and for
weights moved in once. A device allocator that loads weights straight into
leased memory (torch's ``MemPool`` over a pluggable allocator on CUDA) asks
for segments and may give some back while loading. The Heap serves those
calls: first fit in the holes that freed segments left, else more of the
arena, leasing chunks through ``grow`` when the mapped part is used up.
Neighbouring holes merge, and a hole at the top lowers the arena's use, so
the host copy of the weights (``Arena.view()``) covers only what is used.

The memory layer knows nothing of vLLM or torch's allocator: ``malloc`` and
``free`` take and give plain addresses and byte counts.
"""

import bisect
import threading

from vllm_mux.memory.arena import ALIGN, Arena


class Heap:
    def __init__(self, arena: Arena, grow):
        """``grow(n)`` maps ``n`` more chunks into ``arena`` (a lease), or raises."""
        self.arena = arena
        self.grow = grow
        self.live: dict[int, int] = {}  # offset -> size of each allocation
        self.holes: list[tuple[int, int]] = []  # (offset, size), sorted, never touching
        self._lock = threading.Lock()  # torch may allocate from more than one thread

    def malloc(self, nbytes: int) -> int:
        """The address of ``nbytes`` (rounded up to ALIGN) of mapped arena memory."""
        if nbytes <= 0:
            raise ValueError(f"an allocation is at least one byte, not {nbytes}")
        size = -(-nbytes // ALIGN) * ALIGN
        with self._lock:
            offset = self._from_hole(size)
            if offset is None:
                offset = self.arena.used
                if offset + size > self.arena.capacity:
                    raise MemoryError(
                        f"arena capacity exceeded: {size} bytes asked, "
                        f"{self.arena.capacity - offset} left of {self.arena.capacity}"
                    )
                if need := self.arena.chunks_needed(size):
                    self.grow(need)
                self.arena.used = offset + size
            self.live[offset] = size
            return self.arena.base + offset

    def free(self, addr: int) -> None:
        with self._lock:
            offset = addr - self.arena.base
            size = self.live.pop(offset, None)
            if size is None:
                raise ValueError(f"{addr:#x} is not an allocation of this heap")
            i = bisect.bisect(self.holes, (offset, 0))
            if i < len(self.holes) and self.holes[i][0] == offset + size:  # merge right
                size += self.holes.pop(i)[1]
            if i and sum(self.holes[i - 1]) == offset:  # merge left
                offset, left = self.holes.pop(i - 1)
                size += left
                i -= 1
            if offset + size == self.arena.used:  # the top: the arena shrinks back
                self.arena.used = offset
            else:
                self.holes.insert(i, (offset, size))

    @property
    def hole_bytes(self) -> int:
        """Bytes below the top that nothing holds: what freeing left behind."""
        return sum(size for _, size in self.holes)

    @property
    def live_bytes(self) -> int:
        return sum(self.live.values())

    def _from_hole(self, size: int) -> int | None:
        for i, (offset, hole) in enumerate(self.holes):
            if hole >= size:
                if hole == size:
                    del self.holes[i]
                else:
                    self.holes[i] = (offset + size, hole - size)
                return offset
        return None
