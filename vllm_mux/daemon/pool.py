"""The books: which instance holds which chunk.

Pure bookkeeping, no I/O, so that every rule about ownership is in one place
and unit-testable: a chunk is free or held by exactly one instance, and
leased + free = total at every moment.

A free chunk may still hold the bytes of the instance that slept on it (the
warm tier): nobody maps a free chunk, so they stay until another instance
takes it. A lease hands out chunks that hold nobody's bytes first, then those
of the sleepers that slept longest ago, each sleeper's from the end of the
list it released (an instance lists its weights before its KV cache: losing
a KV chunk costs a prefix cache, losing a weights chunk a copy); a waking
instance names the chunks
it slept on (``want``) and gets back every one still untouched, at the same
place in its list, so that it copies only what it lost.
"""


class PoolError(Exception):
    """A request the books refuse; they are unchanged."""


class Pool:
    def __init__(self, total_chunks: int, chunk_size: int):
        self.total = total_chunks
        self.chunk_size = chunk_size
        self.free: list[int] = list(range(total_chunks))
        self.holder: dict[int, int] = {}  # chunk id -> instance id
        # Free chunk id -> (instance whose bytes it still holds, when it
        # slept, its place in the list released).
        self.kept: dict[int, tuple[int, int, int]] = {}
        self._clock = 0

    def lease(self, instance: int, n: int, want: list[int] = ()) -> list[int]:
        """``n`` free chunks. Where ``want[k]`` still holds this instance's
        bytes, it is the k-th chunk granted; the others come from the free
        chunks that hold nobody's bytes, then from the oldest sleepers'."""
        self.check(n)
        if n > len(self.free):
            raise PoolError(
                f"asks for {n} chunks but only {len(self.free)} of {self.total} are free"
            )
        if len(want) > n or len(set(want)) != len(want):
            raise PoolError("want names at most as many chunks as asked for, each once")
        mine = self.intact(instance, want)
        ids = [i if i in mine else None for i in want]
        ids += [None] * (n - len(ids))
        taken = {i for i in ids if i is not None}
        others = sorted(
            (i for i in self.free if i not in taken),
            key=lambda i: (self.kept[i][1], -self.kept[i][2]) if i in self.kept else (-1, 0),
        )
        others.reverse()  # pop() from the end: the best first
        ids = [others.pop() if i is None else i for i in ids]
        for i in ids:
            self.holder[i] = instance
            self.kept.pop(i, None)
        taken = set(ids)
        self.free = [i for i in self.free if i not in taken]
        return ids

    def intact(self, instance: int, ids) -> set[int]:
        """Those of ``ids`` that are free and still hold ``instance``'s bytes."""
        return {i for i in ids if self.kept.get(i, (None,))[0] == instance}

    def resident(self, instance: int) -> int:
        """How many free chunks still hold ``instance``'s bytes."""
        return sum(k[0] == instance for k in self.kept.values())

    def forget(self, instance: int) -> None:
        """Its bytes are of no use any more (it exited): its chunks hold nobody's."""
        self.kept = {i: k for i, k in self.kept.items() if k[0] != instance}

    def hold(self, instance: int, ids: list[int]) -> None:
        """Mark these free chunks held by ``instance``: what a restarted daemon
        reads from its books, before the instance reconnects."""
        if len(set(ids)) != len(ids):
            raise PoolError("hold names a chunk twice")
        taken = set(ids) - set(self.free)
        if taken:
            raise PoolError(f"chunks not free: {sorted(taken)[:8]}")
        for i in ids:
            self.holder[i] = instance
            self.kept.pop(i, None)
        self.free = [i for i in self.free if i not in self.holder]

    def check(self, n: int) -> None:
        """Refuse a lease that could never be granted."""
        if n <= 0:
            raise PoolError(f"a lease is for at least one chunk, not {n}")
        if n > self.total:
            raise PoolError(
                f"asks for {n} chunks ({_gib(n * self.chunk_size)}) but the whole pool is "
                f"{self.total} chunks ({_gib(self.total * self.chunk_size)}): start the "
                "daemon with a larger --device-memory or give the model less memory"
            )

    def release(self, instance: int, ids: list[int], keep: bool = False) -> None:
        """Free ``ids``; ``keep``: they still hold the instance's bytes (it
        sleeps on them), to give back untouched if nobody takes them."""
        if len(set(ids)) != len(ids):
            raise PoolError("release names a chunk twice")
        strangers = [i for i in ids if self.holder.get(i) != instance]
        if strangers:
            raise PoolError(f"release of chunks this instance does not hold: {strangers[:8]}")
        self._clock += 1
        for place, i in enumerate(ids):
            del self.holder[i]
            if keep:
                self.kept[i] = (instance, self._clock, place)
        self.free.extend(ids)

    def held_by(self, instance: int) -> list[int]:
        return [i for i, owner in self.holder.items() if owner == instance]

    def release_all(self, instance: int) -> list[int]:
        ids = self.held_by(instance)
        self.release(instance, ids)
        return ids

    def chunk_map(self) -> list[int]:
        """Each chunk's standing, by id, for a picture of the pool (the status
        page): the id of the instance holding it; minus the id of the sleeper
        whose bytes it still holds, if free (the warm tier); 0 if free and
        holding nobody's bytes."""
        return [self.holder.get(i) or -self.kept.get(i, (0,))[0] for i in range(self.total)]

    @property
    def leased(self) -> int:
        return len(self.holder)

    def balanced(self) -> bool:
        return (
            self.leased + len(self.free) == self.total
            and not set(self.free) & set(self.holder)
            and set(self.kept) <= set(self.free)
        )


def _gib(nbytes: int) -> str:
    return f"{nbytes / (1 << 30):.2f} GiB"
