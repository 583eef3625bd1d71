"""Who sleeps, who wakes, and when: the daemon's arbitration as a pure function.

The daemon (server.py) keeps the books and asks controllers to sleep; this
module only decides, from a frozen view of each instance, the chunks asked
for and a clock passed in. It has no sockets, threads or clock of its own, so
that the daemon's lease loop and the fleet simulator (bench/simulate.py) make
the same decisions from the same facts.

A driver holds the instances waiting for a lease on one device. While the
first of them (``next_to_wake``) does not fit, it asks ``victims`` whom to ask
to sleep, asks them, and asks the policy again when something changes (a
lease, a release, a request that starts or ends) or at ``retry_at``. What the
mechanism guarantees, the policy relies on: a victim stops admitting, finishes
every request it admitted and then sleeps; a wake admits every request that
waited for it. So the requests waiting for a model when its turn begins all
run in that turn, under either policy.

Two policies, by name in ``POLICIES``:

- ``switch-per-request`` (``DEFAULT``): the daemon's arbitration before this module. Leases
  go first come, first served; the first waiter asks idle instances before
  busy ones, least recently active first, never a pinned one; knobs ignored.
  Two models taking turns on a pool for one switch on almost every request.
- ``batched``: a model that just woke keeps the device for its
  quantum or until it has had nothing to do for ``linger_s``, whichever comes
  first, so that a switch buys a batch of work; a busy model keeps the device
  from a model of lower priority and gives it up to a higher one at once; past
  a waiting request's ``max_wait_s`` every protection but pinning gives way, so
  no model starves. While the first waiter is held up so, a later one that
  fits in the free chunks takes them (``Decision.held``: backfill).
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

STATES = ("starting", "awake", "sleeping", "asleep", "waking")


@dataclass(frozen=True)
class Knobs:
    """A model's scheduling knobs (``batched`` reads them; ``switch-per-request`` does not)."""

    quantum_s: float = 3.0
    """Seconds a model that just woke keeps a contested device while it has work.
    A switch costs about a second for an 8B model on a GPU (a sleep, a copy at the
    host link's speed, a wake): three seconds of work per switch keeps switching
    under a quarter of a contested device's time, and a turn short enough that
    the models after it still answer a chat within seconds."""

    linger_s: float = 0.0
    """Seconds a model in its quantum keeps the device after its queue empties,
    in case more comes, while another waits. 0 because in the simulated sweep
    of docs/benchmarks.md a linger of 1 s cost batched 9-40% of its goodput
    wherever a switch cost 1 s or less (the GPU kit measured 0.31 s for an 8B
    model's weights), and made its p99 TTFT 1.3-4.6 times longer everywhere;
    it won (8-23% more goodput) only with 3 s switches. Ski rental argues for about
    one switch's worth where a model's requests come in trains: set it per
    model there."""

    max_wait_s: float = 30.0
    """Seconds a request may wait for its model to get the device before every
    quantum and priority gives way to it: the bound that keeps a model from
    starving. Half of the 60 s that HTTP clients commonly wait, leaving room for
    the drain, the switch and the request itself."""

    priority: int = 0
    """A busy model keeps the device from a model of lower priority (until that
    one's wait bound) and gives it up to a higher one at once."""


def knobs_from(fields: dict) -> Knobs:
    """Knobs from a mapping of some of their names (a config's model entry, a
    controller's hello); ValueError, naming the knob, for anything else."""
    unknown = set(fields) - set(Knobs.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown knob {sorted(unknown)[0]!r}; known: {', '.join(KNOBS)}")
    for name, value in fields.items():
        ok = type(value) is int if name == "priority" else type(value) in (int, float)
        if not ok or (name != "priority" and not 0 <= value < math.inf):
            kind = "a whole number" if name == "priority" else "a number of seconds, 0 or more"
            raise ValueError(f"{name} must be {kind}, not {value!r}")
    return Knobs(**fields)


KNOBS = tuple(Knobs.__dataclass_fields__)


@dataclass(frozen=True)
class View:
    """One instance at one moment, as the policy sees it. Times are the caller's
    clock (any, the same for all: the daemon's time.time(), the simulator's)."""

    id: int
    model: str
    state: str  # one of STATES
    chunks: int  # chunks it holds now
    pinned: bool = False  # never asked to sleep
    knobs: Knobs = field(default_factory=Knobs)
    draining: bool = False  # asked to sleep: admits nothing, finishes what it has, sleeps
    in_flight: int = 0  # admitted and not done
    waiting: int = 0  # arrived, not admitted: waiting for a wake, or a drain and a wake
    oldest_wait: float | None = None  # when it asked for the lease it waits for (None: it does not)
    turn_began: float = 0.0  # when it last woke
    last_active: float = 0.0  # when a request of it last ended, or it last woke

    @property
    def busy(self) -> bool:
        return bool(self.in_flight or self.waiting)

    @property
    def deadline(self) -> float | None:
        """When its wait for the device reaches its bound. The bound runs from
        the lease's asking: a request that came while its model drained waited
        for that drain (bounded by the model's own work) before it."""
        return None if self.oldest_wait is None else self.oldest_wait + self.knobs.max_wait_s


@dataclass(frozen=True)
class Decision:
    sleep: tuple[int, ...] = ()  # instance ids to ask to sleep now
    retry_at: float | None = None  # ask again by then (a protection lapses); None: on a change
    held: bool = False
    """The asker is short and may ask nobody yet: protections hold it up. Until
    they lapse, a later waiter that fits in the free chunks may take them
    (backfill): they are too few for the asker, and the asker's wait bound
    still overrides the newcomer's protection."""


def _short(need: int, free: int, instances: Sequence[View]) -> int:
    """Chunks still missing once those of instances already on their way to
    sleep come back."""
    # A pinned one's drain may yet be called off by its pin: not counted.
    coming = sum(
        v.chunks for v in instances if v.state == "sleeping" or (v.draining and not v.pinned)
    )
    return need - free - coming


def _candidates(asker: View, instances: Sequence[View]) -> list[View]:
    """Those that could be asked: awake, not already asked, not pinned, holding chunks."""
    return [
        v
        for v in instances
        if v.id != asker.id and v.state == "awake" and not v.draining and not v.pinned and v.chunks
    ]


def _enough(ordered: list[View], short: int) -> list[View]:
    """The first of ``ordered`` that together hold ``short`` chunks (all if they do not)."""
    chosen = []
    for v in ordered:
        if short <= 0:
            break
        chosen.append(v)
        short -= v.chunks
    return chosen


class SwitchPerRequest:
    name = "switch-per-request"

    def next_to_wake(self, waiters: Sequence[View], now: float) -> int:
        """First come, first served (``waiters`` in the order they asked)."""
        return waiters[0].id

    def victims(
        self, asker: View, need: int, free: int, instances: Sequence[View], now: float
    ) -> Decision:
        """Idle before busy, least recently active first, as many as it takes
        (all it can if that is not enough: they sleep while it waits for more)."""
        short = _short(need, free, instances)
        if short <= 0:
            return Decision()
        ordered = sorted(_candidates(asker, instances), key=lambda v: (v.busy, v.last_active))
        return Decision(tuple(v.id for v in _enough(ordered, short)))


class Batched:
    name = "batched"

    def next_to_wake(self, waiters: Sequence[View], now: float) -> int:
        """Those past their wait bound first, the longest past first; then higher
        priority; then first come, first served."""

        def key(item):
            order, v = item
            deadline = v.deadline
            if deadline is not None and deadline <= now:
                return (0, deadline, 0, order)
            return (1, 0.0, -v.knobs.priority, order)

        return min(enumerate(waiters), key=key)[1].id

    def victims(
        self, asker: View, need: int, free: int, instances: Sequence[View], now: float
    ) -> Decision:
        """Enough of those not protected now (idle first, then lower priority, then
        least recently active), or nobody yet: putting some to sleep while the
        rest keep the device would only empty the device for nothing."""
        short = _short(need, free, instances)
        if short <= 0:
            return Decision()
        deadline = asker.deadline
        overdue = deadline is not None and deadline <= now
        takeable, lapses = [], []
        for v in _candidates(asker, instances):
            until = now if overdue else _protected_until(v, asker)
            if until <= now:
                takeable.append(v)
            elif until < math.inf:
                lapses.append(until)
        if sum(v.chunks for v in takeable) >= short:
            takeable.sort(key=lambda v: (v.busy, v.knobs.priority, v.last_active))
            return Decision(tuple(v.id for v in _enough(takeable, short)))
        if deadline is not None and not overdue:
            lapses.append(deadline)
        return Decision(retry_at=min(lapses, default=None), held=True)


def _protected_until(v: View, asker: View) -> float:
    """When ``v`` may be asked to give the device up to ``asker`` (the asker's
    wait bound aside); math.inf: not by the clock, only once it is idle."""
    if asker.knobs.priority > v.knobs.priority:
        return -math.inf
    quantum_end = v.turn_began + v.knobs.quantum_s
    if v.busy:
        return math.inf if asker.knobs.priority < v.knobs.priority else quantum_end
    return min(quantum_end, v.last_active + v.knobs.linger_s)


POLICIES = {p.name: p for p in (SwitchPerRequest(), Batched())}
# Not batched, yet: measured on a CPU trace and in a simulated fleet
# (docs/benchmarks.md) it did not beat switch-per-request; whether it does where
# a switch costs more than a request (a large model on a GPU) is still to measure.
DEFAULT = SwitchPerRequest.name
