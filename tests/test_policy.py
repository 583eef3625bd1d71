"""The arbitration policies, on views of instances and in the simulator."""

import hypothesis.strategies as st
from hypothesis import given, settings

from vllm_mux.bench.simulate import Costs, Model, Request, simulate
from vllm_mux.daemon.policy import (
    DEFAULT,
    POLICIES,
    STATES,
    Batched,
    Decision,
    Knobs,
    SwitchPerRequest,
    View,
)

batched, per_request = Batched(), SwitchPerRequest()
KNOBS = Knobs(quantum_s=3.0, linger_s=1.0, max_wait_s=30.0)
NOW = 100.0


def awake(id_, **fields) -> View:
    """A holder of 10 chunks, busy, whose turn began a second ago."""
    defaults = dict(chunks=10, knobs=KNOBS, in_flight=1, turn_began=NOW - 1, last_active=NOW)
    return View(id_, f"m{id_}", "awake", **(defaults | fields))


def asker(id_=0, waited=1.0, **fields) -> View:
    """An asleep instance whose oldest request came ``waited`` seconds ago."""
    defaults = dict(chunks=0, knobs=KNOBS, waiting=1, oldest_wait=NOW - waited)
    return View(id_, f"m{id_}", "asleep", **(defaults | fields))


def test_the_default_is_switch_per_request_until_batched_is_shown_to_win():
    # docs/benchmarks.md: batched lost on the CPU trace and in the simulated fleet.
    assert DEFAULT == "switch-per-request" and isinstance(POLICIES[DEFAULT], SwitchPerRequest)
    assert set(POLICIES) == {"batched", "switch-per-request"}


def test_a_busy_model_in_its_quantum_is_not_preempted():
    me, holder = asker(), awake(1)
    decision = batched.victims(me, 10, 0, [me, holder], NOW)
    assert decision.sleep == ()
    assert decision.retry_at == holder.turn_began + KNOBS.quantum_s  # when its quantum ends
    later = batched.victims(me, 10, 0, [me, holder], decision.retry_at)
    assert later.sleep == (1,)


def test_an_idle_model_lingers_then_gives_way():
    me, holder = asker(), awake(1, in_flight=0, last_active=NOW - 0.25)
    decision = batched.victims(me, 10, 0, [me, holder], NOW)
    assert decision.sleep == () and decision.retry_at == NOW + 0.75
    assert batched.victims(me, 10, 0, [me, holder], NOW + 0.75).sleep == (1,)
    # Idle since before its quantum ended: no linger past the quantum.
    old = awake(1, in_flight=0, turn_began=NOW - 10, last_active=NOW - 0.25)
    assert batched.victims(me, 10, 0, [me, old], NOW).sleep == (1,)


def test_a_waiter_that_protections_hold_up_says_so():
    """``held`` opens the free chunks to later waiters (backfill): only when
    the asker is short and may ask nobody yet."""
    me, busy = asker(), awake(1)  # busy in its quantum
    assert batched.victims(me, 10, 0, [me, busy], NOW) == Decision(
        retry_at=busy.turn_began + KNOBS.quantum_s, held=True
    )
    idle = awake(1, in_flight=0, turn_began=NOW - 10, last_active=NOW - 5)
    assert batched.victims(me, 10, 0, [me, idle], NOW) == Decision(sleep=(1,))
    assert batched.victims(me, 10, 10, [me, busy], NOW) == Decision()  # it fits: not short
    draining = awake(1, draining=True)
    assert batched.victims(me, 10, 0, [me, draining], NOW) == Decision()  # memory is coming
    # First come, first served asks whom it can at once: never held.
    assert not SwitchPerRequest().victims(me, 10, 0, [me, busy], NOW).held


def test_by_default_an_idle_model_gives_way_at_once():
    me = asker(knobs=Knobs())
    holder = awake(1, in_flight=0, last_active=NOW, knobs=Knobs())  # in its quantum, idle
    assert batched.victims(me, 10, 0, [me, holder], NOW).sleep == (1,)


def test_past_its_wait_bound_a_request_takes_the_device_from_a_quantum():
    holder = awake(1)
    soon = asker(waited=KNOBS.max_wait_s - 0.5)
    decision = batched.victims(soon, 10, 0, [soon, holder], NOW)
    assert decision.sleep == () and decision.retry_at == NOW + 0.5  # its bound, before the quantum
    overdue = asker(waited=KNOBS.max_wait_s)
    assert batched.victims(overdue, 10, 0, [overdue, holder], NOW).sleep == (1,)


def test_nobody_is_put_to_sleep_for_too_little():
    """Emptying half the device while the other half keeps it helps nobody."""
    me = asker()
    idle, busy = awake(1, in_flight=0, last_active=0), awake(2)
    decision = batched.victims(me, 20, 0, [me, idle, busy], NOW)
    assert decision.sleep == () and decision.retry_at == busy.turn_began + KNOBS.quantum_s
    assert batched.victims(me, 20, 0, [me, idle, busy], decision.retry_at).sleep == (1, 2)
    # switch-per-request asks whoever it can meanwhile, as the daemon did.
    assert per_request.victims(me, 20, 0, [me, idle, busy], NOW).sleep == (1, 2)


def test_chunks_on_their_way_back_count():
    me = asker()
    going = awake(1, draining=True, in_flight=2)
    sleeping = View(2, "m2", "sleeping", chunks=10)
    other = awake(3, in_flight=0, last_active=0)
    for policy in POLICIES.values():
        assert policy.victims(me, 20, 0, [me, going, sleeping, other], NOW).sleep == ()
        assert policy.victims(me, 25, 0, [me, going, sleeping, other], NOW).sleep == (3,)
        assert policy.victims(me, 5, 5, [me, other], NOW).sleep == ()  # it fits already


def test_priorities():
    low, high = Knobs(priority=0), Knobs(priority=1)
    # A higher priority takes the device from a busy lower one in its quantum.
    me = asker(knobs=high)
    assert batched.victims(me, 10, 0, [me, awake(1, knobs=low)], NOW).sleep == (1,)
    # A lower one waits for a busy higher one, past its quantum, until its own bound.
    me = asker(knobs=low, waited=1.0)
    holder = awake(1, knobs=high, turn_began=NOW - 60)
    decision = batched.victims(me, 10, 0, [me, holder], NOW)
    assert decision.sleep == () and decision.retry_at == me.deadline
    assert batched.victims(me, 10, 0, [me, holder], me.deadline).sleep == (1,)
    # ... but not for an idle one.
    idle = awake(1, knobs=high, in_flight=0, turn_began=NOW - 60, last_active=NOW - 60)
    assert batched.victims(me, 10, 0, [me, idle], NOW).sleep == (1,)
    # Of two it could take, the lower priority goes first.
    a = awake(1, knobs=Knobs(priority=-1), in_flight=0, last_active=NOW - 5)
    b = awake(2, knobs=Knobs(priority=-2), in_flight=0, last_active=NOW - 1)
    assert batched.victims(asker(), 10, 0, [a, b], NOW).sleep == (2,)


def test_who_wakes_first():
    first, second = asker(1, waited=2), asker(2, waited=5, knobs=Knobs(priority=1))
    assert per_request.next_to_wake([first, second], NOW) == 1  # first come, first served
    assert batched.next_to_wake([first, second], NOW) == 2  # higher priority
    assert batched.next_to_wake([first, asker(2, waited=5)], NOW) == 1  # equal: first come
    # Past the bound, the longest past goes first, whatever the priorities.
    overdue = [
        asker(1, waited=31),
        asker(2, waited=40),
        asker(3, waited=1, knobs=Knobs(priority=9)),
    ]
    assert batched.next_to_wake(overdue, NOW) == 2


def test_switch_per_request_is_the_daemons_order():
    """server.py's _ask_to_sleep: awake holders with a controller, not pinned,
    idle before busy, least recently active first, until enough are asked."""
    me = asker()
    views = [
        awake(1, in_flight=1, last_active=1.0),
        awake(2, in_flight=0, last_active=5.0),
        awake(3, in_flight=0, waiting=1, last_active=0.5),  # waiting counts as busy
        awake(4, in_flight=0, last_active=2.0),
        awake(5, in_flight=0, last_active=0.0, pinned=True),
        View(6, "m6", "waking", chunks=10),
        awake(7, in_flight=0, last_active=0.0, chunks=0),
        awake(8, in_flight=0, turn_began=NOW, last_active=NOW),  # just woke: taken all the same
    ]
    assert per_request.victims(me, 10, 0, [me, *views], NOW).sleep == (4,)
    assert per_request.victims(me, 25, 0, [me, *views], NOW).sleep == (4, 2, 8)
    assert per_request.victims(me, 100, 0, [me, *views], NOW).sleep == (4, 2, 8, 3, 1)


views = st.builds(
    View,
    id=st.integers(0, 5),
    model=st.just("m"),
    state=st.sampled_from(STATES),
    chunks=st.integers(0, 4),
    pinned=st.booleans(),
    knobs=st.builds(
        Knobs,
        quantum_s=st.floats(0, 5),
        linger_s=st.floats(0, 2),
        max_wait_s=st.floats(0, 10),
        priority=st.integers(-1, 1),
    ),  # fmt: skip
    draining=st.booleans(),
    in_flight=st.integers(0, 2),
    waiting=st.integers(0, 2),
    oldest_wait=st.none() | st.floats(0, 20),
    turn_began=st.floats(0, 20),
    last_active=st.floats(0, 20),
)


@given(
    st.lists(views, min_size=1, max_size=6, unique_by=lambda v: v.id),
    st.integers(1, 12),
    st.integers(0, 4),
    st.floats(0, 20),
    st.sampled_from(list(POLICIES)),
)
def test_only_those_that_can_be_asked_are_asked(instances, need, free, now, name):
    """Never the asker, a pinned one, one not awake or already draining, or
    one that holds nothing; and a retry is in the future."""
    me = instances[0]
    decision = POLICIES[name].victims(me, need, free, instances, now)
    by_id = {v.id: v for v in instances}
    assert len(set(decision.sleep)) == len(decision.sleep)
    for i in decision.sleep:
        v = by_id[i]
        assert i != me.id and not v.pinned and v.state == "awake"
        assert not v.draining and v.chunks
    assert decision.retry_at is None or decision.retry_at > now
    assert POLICIES[name].next_to_wake(instances, now) in by_id


# -- in the simulator --

GB = 10**9
COSTS = Costs(h2d_gb_s=20, wake_fixed_s=0.2, sleep_s=0.1, prefill_s_per_token=1e-3,
              decode_s_per_token=0.02, batch=64)  # fmt: skip


def run(trace, models=3, policy="batched"):
    """``models`` models of 16 GB on a pool of 20: one at a time."""
    fleet = [Model(f"m{k}", 16 * GB, knobs=KNOBS) for k in range(models)]
    return simulate(trace, fleet, COSTS, pool_bytes=20 * GB, policy=policy)


def test_waiting_requests_all_run_in_the_turn_they_woke_for():
    """A request that waits is admitted when the next turn of its model begins,
    and done before that turn ends, under either policy."""
    trace = [Request(0.1 * k, f"m{k % 3}", 50, 40) for k in range(60)]
    for policy in POLICIES:
        result = run(trace, policy=policy)
        assert len(result.turns) > 3
        for s in filter(lambda s: s.wait > 0, result.served):
            turn = min(
                (
                    t
                    for t in result.turns
                    if t.model == s.request.model and t.began > s.request.time
                ),
                key=lambda t: t.began,
            )
            assert s.admitted == turn.began and s.done <= turn.ended


def test_a_model_keeps_the_device_for_its_quantum_in_the_simulator():
    """Two busy models: each turn lasts its quantum (then the drain), not one request."""
    trace = [Request(0.05 * k, f"m{k % 2}", 10, 10) for k in range(400)]
    result = run(trace, models=2)
    middle = [t for t in result.turns if 0 < t.began and t.ended < 15]
    assert middle
    for t in middle:
        assert t.ended - t.began >= KNOBS.quantum_s


arrivals = st.lists(
    st.tuples(st.floats(0, 30), st.integers(0, 3), st.integers(1, 200), st.integers(1, 50)),
    min_size=1,
    max_size=40,
)


@settings(deadline=None, max_examples=300)
@given(
    arrivals,
    st.lists(st.integers(-1, 1), min_size=2, max_size=4),
    st.floats(0.0, 10.0),
    st.floats(0.0, 5.0),
)
def test_no_request_waits_past_its_bound(raw, priorities, max_wait, quantum):
    """Whatever the arrivals and priorities, a request waits for its model at
    most max_wait_s, then one drain and one switch for each model sharing the
    device: those past their bound before it go first, each with its drain and
    switch, and the switch under way when it came counts too. (The batch holds
    every request, so a drain lasts at most one request.)"""
    fleet = [
        Model(
            f"m{k}", 16 * GB, knobs=Knobs(quantum_s=quantum, max_wait_s=max_wait, priority=priority)
        )
        for k, priority in enumerate(priorities)
    ]
    trace = [Request(t, f"m{m % len(fleet)}", p, o) for t, m, p, o in raw]
    result = simulate(trace, fleet, COSTS, pool_bytes=20 * GB, policy="batched")
    drain = max(p * COSTS.prefill_s_per_token + o * COSTS.decode_s_per_token for _, _, p, o in raw)
    switch = COSTS.sleep_s + COSTS.wake_s(fleet[0])
    for s in result.served:
        assert s.wait <= max_wait + len(fleet) * (drain + switch) + 1e-9, s


def test_a_waiter_goes_first_the_moment_it_passes_its_bound():
    """Behind a waiter of higher priority, one that passes its bound goes first at
    that moment: the holder stops admitting then, not at the next event."""
    fleet = [
        Model("holder", 16 * GB, knobs=Knobs(quantum_s=0, priority=2)),
        Model("high", 16 * GB, knobs=Knobs(max_wait_s=100, priority=1)),
        Model("low", 16 * GB, knobs=Knobs(max_wait_s=1, priority=0)),
    ]
    long = Request(0.0, "holder", 0, 2500)  # 50 s, running all along
    trace = [long, Request(1, "high", 1, 1), Request(2, "low", 1, 1), Request(10, "holder", 1, 1)]
    served = simulate(trace, fleet, COSTS, pool_bytes=20 * GB, policy="batched").served
    assert served[3].admitted > 50  # the holder was draining since low's bound, at 3 s
    assert served[2].admitted < served[1].admitted
