"""The host tier's books: which copies of weights the daemon keeps in host
memory, who uses each, and what is left of the host budget.

Pure bookkeeping, no I/O, like ``pool.py``: the daemon keeps one copy per set
of weights, named by the digest of its bytes, shared by every instance whose
weights are those bytes. A copy is made for its first user, who fills it; it
is sealed once filled, and every later user maps it read-only. The last
user's release frees it. When a new copy does not fit, the copies whose users
are all asleep go first, least recently used first: their models become cold
(their next wake reloads from the model's files). A copy is never larger than
the budget, and used + free = budget at every moment.
"""

import itertools
import os
from dataclasses import dataclass, field

# The host budget unless --host-memory says otherwise: half of the host's
# memory that the pool leaves (on the cpu device the pool is host memory too).
# The rest is for the instances' own processes: a vLLM server takes one to
# two GiB beside its weights.
DEFAULT_FRACTION = 0.5


def default_budget(pool_in_host_memory: int = 0) -> int:
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return max(0, int(DEFAULT_FRACTION * (ram - pool_in_host_memory)))


class HostError(Exception):
    """A request the host books refuse; they are unchanged."""


@dataclass
class Copy:
    digest: str
    size: int
    users: set[int] = field(default_factory=set)
    sealed: bool = False  # filled and sealed: others may map it
    dropping: bool = False  # its users are asked to let it go: nobody new takes it
    coldable: bool = True  # False once a user's weights were updated: files would be stale
    last_used: int = 0  # the books' clock at its last take or release


class HostBooks:
    def __init__(self, budget: int):
        if budget < 0:
            raise ValueError(f"a host budget is at least 0 bytes, not {budget}")
        self.budget = budget
        self.copies: dict[str, Copy] = {}
        self._clock = itertools.count(1)

    @property
    def used(self) -> int:
        return sum(c.size for c in self.copies.values())

    @property
    def free(self) -> int:
        return self.budget - self.used

    def take(self, instance: int, digest: str) -> Copy | None:
        """The sealed copy of these bytes, now also ``instance``'s; None if
        there is none to share (absent, being filled, or being dropped)."""
        copy = self.copies.get(digest)
        if copy is None or not copy.sealed or copy.dropping:
            return None
        copy.users.add(instance)
        copy.last_used = next(self._clock)
        return copy

    def make(self, instance: int, digest: str, size: int) -> Copy:
        """A new copy of ``size`` bytes for ``instance`` to fill. HostError if
        it does not fit in what is free (``victims`` says what could go)."""
        _check_digest(digest)
        if type(size) is not int or size <= 0:
            raise HostError(f"a host copy is a positive number of bytes, not {size!r:.40}")
        if digest in self.copies:
            raise HostError("a copy of these bytes exists already")
        if size > self.budget:
            raise HostError(
                f"this model's weights ({_gib(size)}) are more than the daemon's whole host "
                f"budget ({_gib(self.budget)}): start it with a larger --host-memory"
            )
        if size > self.free:
            raise HostError(
                f"{_gib(size)} of host memory asked, {_gib(self.free)} of {_gib(self.budget)} free"
            )
        copy = Copy(digest, size, {instance}, last_used=next(self._clock))
        self.copies[digest] = copy
        return copy

    def seal(self, instance: int, digest: str) -> Copy:
        copy = self.copies.get(digest)
        if copy is None or copy.sealed or instance not in copy.users:
            raise HostError("no copy of these bytes is being filled by this instance")
        copy.sealed = True
        return copy

    def release(self, instance: int, digest: str) -> Copy | None:
        """``instance`` no longer maps this copy. Returns the copy if that
        freed it (it had no other user): the caller closes its memory."""
        copy = self.copies.get(digest)
        if copy is None or instance not in copy.users:
            raise HostError("this instance holds no copy of these bytes")
        copy.users.discard(instance)
        copy.last_used = next(self._clock)
        if copy.users:
            return None
        del self.copies[digest]
        return copy

    def release_all(self, instance: int) -> list[Copy]:
        """Every copy ``instance`` used (it exited); returns those freed."""
        mine = [c.digest for c in self.copies.values() if instance in c.users]
        return [c for c in (self.release(instance, d) for d in mine) if c is not None]

    def held_by(self, instance: int) -> list[Copy]:
        return [c for c in self.copies.values() if instance in c.users]

    def victims(self, size: int, asleep) -> list[Copy]:
        """The copies to drop, least recently used first, so that ``size``
        bytes are free: sealed ones whose users all sleep (``asleep(id)``),
        that their files could restore. Empty if even all of those would not
        make room."""
        need = size - self.free
        if need <= 0:
            return []
        chosen = []
        candidates = sorted(
            (
                c
                for c in self.copies.values()
                if c.sealed and c.coldable and not c.dropping and all(map(asleep, c.users))
            ),
            key=lambda c: c.last_used,
        )
        for copy in candidates:
            if need <= 0:
                break
            chosen.append(copy)
            need -= copy.size
        return chosen if need <= 0 else []

    def balanced(self) -> bool:
        return (
            self.used + self.free == self.budget
            and 0 <= self.used <= self.budget
            and all(c.users for c in self.copies.values())
        )


def _check_digest(digest) -> None:
    if not (isinstance(digest, str) and len(digest) == 64 and _hex(digest)):
        raise HostError("a digest is 64 hexadecimal characters (sha256)")


def _hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)


def _gib(nbytes: int) -> str:
    if nbytes < 1 << 30:
        return f"{nbytes / (1 << 20):.1f} MiB"
    return f"{nbytes / (1 << 30):.2f} GiB"
