"""The books: which instance holds which chunk.

Pure bookkeeping, no I/O, so that every rule about ownership is in one place
and unit-testable: a chunk is free or held by exactly one instance, and
leased + free = total at every moment.
"""


class PoolError(Exception):
    """A request the books refuse; they are unchanged."""


class Pool:
    def __init__(self, total_chunks: int, chunk_size: int):
        self.total = total_chunks
        self.chunk_size = chunk_size
        self.free: list[int] = list(range(total_chunks))
        self.holder: dict[int, int] = {}  # chunk id -> instance id

    def lease(self, instance: int, n: int) -> list[int]:
        self.check(n)
        if n > len(self.free):
            raise PoolError(
                f"asks for {n} chunks but only {len(self.free)} of {self.total} are free"
            )
        ids, self.free = self.free[:n], self.free[n:]
        for i in ids:
            self.holder[i] = instance
        return ids

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

    def release(self, instance: int, ids: list[int]) -> None:
        if len(set(ids)) != len(ids):
            raise PoolError("release names a chunk twice")
        strangers = [i for i in ids if self.holder.get(i) != instance]
        if strangers:
            raise PoolError(f"release of chunks this instance does not hold: {strangers[:8]}")
        for i in ids:
            del self.holder[i]
        self.free.extend(ids)

    def held_by(self, instance: int) -> list[int]:
        return [i for i, owner in self.holder.items() if owner == instance]

    def release_all(self, instance: int) -> list[int]:
        ids = self.held_by(instance)
        self.release(instance, ids)
        return ids

    @property
    def leased(self) -> int:
        return len(self.holder)

    def balanced(self) -> bool:
        return self.leased + len(self.free) == self.total and not set(self.free) & set(self.holder)


def _gib(nbytes: int) -> str:
    return f"{nbytes / (1 << 30):.2f} GiB"
