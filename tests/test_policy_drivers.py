"""One policy, two drivers: the daemon's lease loop and the fleet simulator,
each driven by daemon/policy.py, make the same decisions on a small scripted
scenario: who is asked to sleep, in which order, and whose lease is granted
in which order.

Each scenario is a trace of requests for models of 4 chunks on a small pool,
played under both policies. The simulator plays it with free switches and
says what it decided (``Result.decisions``). The daemon, a live one in this
process, plays it in real time with fake instances whose controllers do what
the real ones do (report their requests; asked to sleep, admit nothing more,
finish what they admitted, then sleep; a request to a model not awake waits
and wakes it), recording what the daemon asked of them. Events that could
change a decision are half a second or more apart, beyond the daemon's
quarter-second asks, so only the order is compared, never the times.
"""

import math
import os
import socket
import threading
import time

import pytest

from conftest import LiveDaemon, assert_books_balance
from vllm_mux.bench.simulate import Costs, Model, Request, simulate
from vllm_mux.daemon import protocol
from vllm_mux.daemon.client import Client
from vllm_mux.daemon.policy import Knobs

CHUNKS = 4  # each model's, unless its scenario says otherwise
CHUNK = 128 << 20
DECODE_S = 0.01  # a request of n output tokens runs n * DECODE_S seconds
# Switches cost nothing, as the fakes' do (all but the daemon's own latency).
COSTS = Costs(h2d_gb_s=math.inf, wake_fixed_s=0.0, sleep_s=0.0, prefill_s_per_token=0.0,
              decode_s_per_token=DECODE_S, batch=16)  # fmt: skip
KNOBS = {"quantum_s": 2.5, "linger_s": 0.6, "max_wait_s": 4.0}


def request(t: float, model: str, seconds: float) -> Request:
    return Request(t, model, 0, round(seconds / DECODE_S))


# Taking turns: a pinned model ("p") and three that take turns in the two
# other places of a pool of 12, one of them ("c") of a higher priority. The
# most requested start awake while they fit (the simulator's start, which the
# daemon's is made to match): p, a and b; c asleep. Under switch-per-request
# an idle holder goes before a busy one, the least recently active first;
# under batched a busy model keeps the device through its quantum (a, at 1.8,
# until 2.5) and from a lower priority (c, for ever).
TURNS = {
    "pool": 12,
    "models": {  # name: (pinned, knobs)
        "p": (True, KNOBS),
        "a": (False, KNOBS),
        "b": (False, KNOBS),
        "c": (False, KNOBS | {"priority": 1}),
    },
    "trace": [
        *(request(0.0, "p", 0.2) for _ in range(3)),
        request(0.0, "b", 0.1),
        request(0.2, "a", 0.1),
        request(0.5, "c", 4.0),  # b is the least recently active
        request(0.9, "a", 0.2),  # a more recently active than c
        request(1.3, "a", 3.0),
        request(1.8, "b", 0.3),  # a and c both busy
        request(5.5, "c", 0.3),
        request(6.0, "a", 0.3),
    ],
    "expected": {  # what both drivers do, written out for the reader
        "switch-per-request": [
            ("sleep", "b"), ("wake", "c"),
            ("sleep", "c"), ("wake", "b"),  # c: least recently active of two busy ones
            ("sleep", "a"), ("wake", "c"),
            ("sleep", "b"), ("wake", "a"),
        ],
        "batched": [
            ("sleep", "b"), ("wake", "c"),
            ("sleep", "a"), ("wake", "b"),  # a once its quantum is over; never c
            ("sleep", "b"), ("wake", "a"),  # c awake at 5.5 already; b lower priority
        ],
    },
}  # fmt: skip

# The wait bound: a pool of 8 holds x and y; z's request at 1.0 finds x busy
# in its quantum (until 2.5) and y idle but lingering (until 10). Under
# batched, z's bound (1 s) passes first, and then the idle one goes: y, at
# 2.0; without the bound it would have been x, at 2.5. Switch-per-request
# takes idle y at once.
BOUND = {
    "pool": 8,
    "models": {
        "x": (False, {"quantum_s": 2.5}),
        "y": (False, {"quantum_s": 10.0, "linger_s": 10.0}),
        "z": (False, {"max_wait_s": 1.0}),
    },
    "trace": [
        *(request(0.0, "x", 0.1) for _ in range(2)),
        request(0.2, "y", 0.1),
        request(0.5, "x", 3.0),
        request(1.0, "z", 0.3),
    ],
    "expected": {policy: [("sleep", "y"), ("wake", "z")]
                 for policy in ("switch-per-request", "batched")},
}  # fmt: skip


# Backfill: a pool of 12 holds a, b and d (4 each); a's and b's first
# requests end at 0.1 and 0.3. w (6) asks at 1.5: idle d and busy a (under
# batched, its quantum of 0.8 s over) go for it, and w takes 6 of their 8
# chunks once a's request ends (3.5), and is busy till 5.0. big (8) asks at
# 4.0: under batched it is short by 6, with b (busy till 5.4, 4 chunks) the
# only one it may take and w in its quantum: held up. So c (2), asking at
# 4.5, takes the 2 chunks left free at once (backfill) instead of waiting
# behind big; at 5.0, with c idle since 4.8 and w now idle, those two go
# for big. Under switch-per-request big asks busy b and w at once (the least
# recently active first), and c waits behind big.
# The arrivals are 0.5 s or more apart, busy models were busy a second before
# anyone asks, and the last activities that order victims are 0.2 s apart.
BACKFILL = {
    "pool": 12,
    "models": {  # name: (pinned, knobs, chunks)
        "a": (False, KNOBS | {"quantum_s": 0.8}),
        "b": (False, KNOBS),
        "d": (False, KNOBS),
        "w": (False, KNOBS, 6),
        "big": (False, KNOBS, 8),
        "c": (False, KNOBS, 2),
    },
    "trace": [
        *(request(0.0, m, 0.1) for m in ("a", "d") for _ in range(2)),
        *(request(0.2, "b", 0.1) for _ in range(2)),
        request(0.3, "a", 3.2),
        request(0.4, "b", 5.0),
        request(1.5, "w", 1.5),
        request(4.0, "big", 0.3),
        request(4.5, "c", 0.3),
    ],
    "expected": {
        "switch-per-request": [
            ("sleep", "d"), ("sleep", "a"), ("wake", "w"),  # idle d, then the least recent
            ("sleep", "b"), ("sleep", "w"), ("wake", "big"),
            ("wake", "c"),  # behind big, in what big left free
        ],
        "batched": [
            ("sleep", "d"), ("sleep", "a"), ("wake", "w"),
            ("wake", "c"),  # backfilled while big is held up
            ("sleep", "c"), ("sleep", "w"), ("wake", "big"),  # idle since 4.8 and 5.0
        ],
    },
}  # fmt: skip


class FakeModel:
    """An instance's worker and controller, doing with requests what the real
    controller does; ``log`` gets ("sleep", model) when the daemon first asks
    it to sleep in a turn (the daemon waits for the answer)."""

    def __init__(self, path: str, model: str, log: list, pinned: bool, knobs: dict, chunks: int):
        self.model, self.log, self.chunks = model, log, chunks
        self.lock = threading.Lock()
        self.state = "asleep"  # asleep, waking, awake, sleeping
        self.draining = False
        self.in_flight, self.waiting = 0, []  # the durations of those waiting
        self.last_active = 0.0
        self.ids: list[int] = []
        self.fds: list[int] = []
        self.worker = Client(path, timeout=30)
        self.worker.hello(model, key=model)
        self.control = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.control.connect(path)
        hello = {"op": "hello", "role": "controller", "key": model, "idle_ttl": 0}
        protocol.send(self.control, hello | {"pinned": pinned, "knobs": knobs})
        reply, _ = protocol.recv(self.control)
        assert reply["ok"], reply
        threading.Thread(target=self._answer, daemon=True).start()

    def wake(self) -> None:
        ids, fds = self.worker.lease(self.chunks)  # the daemon logs the grant (live())
        self.ids, self.fds = ids, fds
        self.worker.set_state("awake")
        with self.lock:
            self.state = "awake"
            while self.waiting:
                self._start(self.waiting.pop(0))

    def arrive(self, seconds: float) -> None:
        with self.lock:
            if self.state == "awake" and not self.draining:
                self._start(seconds)
                return
            self.waiting.append(seconds)
            if self.state == "asleep" and len(self.waiting) == 1:
                self.state = "waking"
                threading.Thread(target=self.wake).start()

    def idle(self) -> bool:
        with self.lock:
            return not (self.in_flight or self.waiting) and self.state in ("awake", "asleep")

    def _start(self, seconds: float) -> None:  # under the lock
        self.in_flight += 1
        threading.Timer(seconds, self._finish).start()

    def _finish(self) -> None:
        with self.lock:
            self.in_flight -= 1
            self.last_active = time.time()
            if self.draining and not self.in_flight:
                self._begin_sleep()

    def _begin_sleep(self) -> None:  # under the lock
        self.state = "sleeping"
        threading.Thread(target=self._sleep).start()

    def _sleep(self) -> None:
        self.worker.set_state("sleeping")
        self.worker.release(self.ids)
        for fd in self.fds:
            os.close(fd)
        self.ids, self.fds = [], []
        self.worker.set_state("asleep")
        with self.lock:
            self.state, self.draining = "asleep", False
            if self.waiting:  # requests came while it drained: they wake it again
                self.state = "waking"
                threading.Thread(target=self.wake).start()

    def _answer(self) -> None:
        while True:
            try:
                message, _ = protocol.recv(self.control)
            except OSError:
                return
            if message is None:
                return
            with self.lock:
                if message["op"] == "report":
                    reply = {"ok": True, "state": self.state, "draining": self.draining,
                             "in_flight": self.in_flight, "waiting": len(self.waiting),
                             "last_active": self.last_active}  # fmt: skip
                else:  # sleep: asking one already draining again changes nothing
                    if self.state == "awake" and not self.draining:
                        self.log.append(("sleep", self.model))
                        self.draining = True
                        if not self.in_flight:
                            self._begin_sleep()
                    reply = {"ok": True}
            protocol.send(self.control, {**reply, "seq": message.get("seq")})

    def close(self) -> None:
        self.worker.close()
        self.control.close()


def _models(scenario: dict) -> list[tuple[str, tuple]]:
    """Each model's name and (pinned, knobs, chunks), CHUNKS where not given."""
    return [(name, (*spec, CHUNKS)[:3]) for name, spec in scenario["models"].items()]


def simulated(scenario: dict, policy: str) -> tuple[list[str], list[tuple[str, str]]]:
    """The models awake at the start, and the simulator's decisions."""
    models = [Model(name, chunks * CHUNK, knobs=Knobs(**knobs), pinned=pinned)
              for name, (pinned, knobs, chunks) in _models(scenario)]  # fmt: skip
    result = simulate(scenario["trace"], models, COSTS, pool_bytes=scenario["pool"] * CHUNK,
                      chunk_bytes=CHUNK, policy=policy)  # fmt: skip
    awake = [t.model for t in result.turns if t.began == 0]
    return awake, [(what, model) for _, what, model in result.decisions]


def live(tmp_path, scenario: dict, policy: str, awake: list[str]) -> list[tuple[str, str]]:
    """The daemon's decisions on the same trace, played in real time."""
    path = str(tmp_path / "d.sock")
    # A lease waits up to 60 s: the daemon caps max_wait_s at half of it, the default 30.
    daemon = LiveDaemon(path, scenario["pool"], 64 << 10, wait_timeout=60, policy=policy)
    log: list = []
    # Grants are logged by the daemon as it makes them, under its lock: a fake's
    # own thread, once its lease returns, could log two grants of one moment
    # the other way round on a loaded machine.
    books, lease = daemon.daemon, daemon.daemon.pool.lease
    playing = threading.Event()

    def granted(instance: int, n: int, want=()):
        ids = lease(instance, n, want)
        if playing.is_set():
            log.append(("wake", books.instances[instance].model))
        return ids

    books.pool.lease = granted
    fakes = {name: FakeModel(path, name, log, pinned, knobs, chunks)
             for name, (pinned, knobs, chunks) in _models(scenario)}  # fmt: skip
    try:
        for name in awake:  # in the simulator's order: the first the least recently active
            fakes[name].wake()
        playing.set()
        start = time.monotonic()
        for r in scenario["trace"]:
            time.sleep(max(0.0, start + r.time - time.monotonic()))
            fakes[r.model].arrive(r.output_tokens * DECODE_S)
        deadline = time.monotonic() + 60
        while not all(f.idle() for f in fakes.values()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all(f.idle() for f in fakes.values()), "the scenario did not end"
        assert_books_balance(daemon.status())
        return log
    finally:
        for f in fakes.values():
            f.close()
        daemon.stop()


@pytest.mark.parametrize("policy", ["switch-per-request", "batched"])
@pytest.mark.parametrize(
    "scenario", [TURNS, BOUND, BACKFILL], ids=["turns", "wait-bound", "backfill"]
)
def test_the_daemon_and_the_simulator_decide_alike(tmp_path, scenario, policy):
    awake, by_simulator = simulated(scenario, policy)
    assert len(awake) < len(scenario["models"])  # one starts asleep: there is contention
    assert by_simulator == scenario["expected"][policy]
    assert live(tmp_path, scenario, policy, awake) == by_simulator
