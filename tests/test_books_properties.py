"""The tiers' books under random sequences of what instances do, against a
model of what they must say: the warm tier (free chunks that still hold a
sleeper's bytes) and the host tier (shared copies within a budget)."""

import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from vllm_mux.daemon.host import HostBooks, HostError
from vllm_mux.daemon.pool import Pool, PoolError

TOTAL = 12
INSTANCES = st.integers(1, 4)


class WarmPool(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.pool = Pool(TOTAL, 1)
        self.held: dict[int, list[int]] = {}  # instance -> ids, in the order leased
        self.bytes_of: dict[int, int | None] = {i: None for i in range(TOTAL)}  # whose bytes
        self.slept_on: dict[int, list[int]] = {}

    @rule(who=INSTANCES, n=st.integers(1, TOTAL), wake=st.booleans())
    def lease(self, who, n, wake):
        want = self.slept_on.get(who, [])[:n] if wake else []
        free_before = list(self.pool.free)
        try:
            ids = self.pool.lease(who, n, want)
        except PoolError:
            assert n > len(free_before) or self.held.get(who)  # refused only when it cannot fit
            return
        assert len(ids) == n == len(set(ids)) and set(ids) <= set(free_before)
        for k, i in enumerate(ids):
            if k < len(want) and self.bytes_of[want[k]] == who:
                assert i == want[k], "a chunk still holding our bytes comes back in its place"
        fresh = [i for i in free_before if self.bytes_of[i] is None]
        if any(self.bytes_of[i] not in (None, who) for i in ids):
            assert set(fresh) <= set(ids), "a sleeper's chunk went before nobody's"
        for i in ids:
            self.bytes_of[i] = who
        self.held[who] = self.held.get(who, []) + ids
        self.slept_on.pop(who, None)

    @precondition(lambda self: any(self.held.values()))
    @rule(data=st.data(), keep=st.booleans())
    def release(self, data, keep):
        who = data.draw(st.sampled_from(sorted(w for w, ids in self.held.items() if ids)))
        ids = self.held.pop(who)
        self.pool.release(who, ids, keep)
        for i in ids:
            self.bytes_of[i] = who if keep else None
        if keep:
            self.slept_on[who] = ids

    @rule(who=INSTANCES)
    def forget(self, who):
        if self.held.get(who):
            return
        self.pool.forget(who)
        for i, owner in self.bytes_of.items():
            if owner == who and i in self.pool.free:
                self.bytes_of[i] = None
        self.slept_on.pop(who, None)

    @invariant()
    def books(self):
        assert self.pool.balanced()
        for who in range(1, 5):
            kept = [i for i in self.pool.free if self.bytes_of[i] == who]
            assert self.pool.resident(who) == len(kept)
            assert self.pool.intact(who, range(TOTAL)) == set(kept)
        holders = {i: w for w, ids in self.held.items() for i in ids}
        for i, cell in enumerate(self.pool.chunk_map()):  # the status page's picture
            want = holders.get(i) or -(self.bytes_of[i] or 0)
            assert cell == want, f"chunk {i}: the map says {cell}, the books {want}"


BUDGET = 100
DIGESTS = st.sampled_from([f"{c}" * 64 for c in "0123"])


class HostTier(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.books = HostBooks(BUDGET)
        self.asleep: set[int] = set()

    @rule(who=INSTANCES, digest=DIGESTS, size=st.integers(1, 60), seal=st.booleans())
    def make_or_take(self, who, digest, size, seal):
        if self.books.take(who, digest):
            return
        try:
            copy = self.books.make(who, digest, size)
        except HostError:
            assert size > self.books.free or digest in self.books.copies
            victims = self.books.victims(size, lambda u: u in self.asleep)
            if victims:  # what the daemon would drop: only copies all of whose users sleep
                assert sum(c.size for c in victims) + self.books.free >= size
                for c in victims:
                    assert c.sealed and all(u in self.asleep for u in c.users)
            return
        if seal:  # else it is being filled: nobody else may take it
            self.books.seal(who, digest)
        else:
            assert self.books.take(who % 4 + 1, digest) is None
        assert copy.users == {who}

    @rule(who=INSTANCES, digest=DIGESTS)
    def release(self, who, digest):
        copy = self.books.copies.get(digest)
        try:
            freed = self.books.release(who, digest)
        except HostError:
            assert copy is None or who not in copy.users
            return
        assert (freed is not None) == (not copy.users)

    @rule(who=INSTANCES)
    def exits(self, who):
        self.books.release_all(who)
        assert not self.books.held_by(who)

    @rule(who=INSTANCES, asleep=st.booleans())
    def sleeps_or_wakes(self, who, asleep):
        (self.asleep.add if asleep else self.asleep.discard)(who)

    @invariant()
    def within_budget(self):
        assert self.books.balanced() and self.books.used <= BUDGET


TestWarmPool = WarmPool.TestCase
TestHostTier = HostTier.TestCase
TestWarmPool.settings = TestHostTier.settings = settings(max_examples=150, deadline=None)
