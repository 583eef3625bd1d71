"""The daemon's arbitration, with fake instances: who is asked to sleep, and when."""

import os
import socket
import threading
import time

import pytest

from conftest import LiveDaemon, assert_books_balance
from vllm_mux.daemon import protocol
from vllm_mux.daemon.client import Client, DaemonError

CS = 64 << 10


class FakeInstance:
    """A worker connection that leases, and a controller that answers the daemon
    like the real one: report at once, and on "sleep" release everything."""

    def __init__(
        self, path: str, model: str, *, pinned=False, in_flight=0, last_active=0.0, knobs=None
    ):
        self.model, self.in_flight, self.last_active = model, in_flight, last_active
        self.worker = Client(path, timeout=30)
        self.worker.hello(model, key=model)
        self.ids: list[int] = []
        self.fds: list[int] = []
        self.asked = 0
        self.first_asked = 0.0  # time.monotonic() of the first "sleep"
        self.sleeping = False
        self.control = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.control.connect(path)
        protocol.send(
            self.control,
            {"op": "hello", "role": "controller", "key": model, "pinned": pinned, "idle_ttl": 0}
            | {"knobs": knobs or {}},
        )
        reply, _ = protocol.recv(self.control)
        assert reply["ok"], reply
        threading.Thread(target=self._answer, daemon=True).start()

    def lease(self, n: int) -> None:
        ids, fds = self.worker.lease(n)
        self.ids += ids
        self.fds += fds
        self.worker.set_state("awake")

    def sleep(self) -> None:
        self.worker.set_state("sleeping")
        self.worker.release(self.ids)
        for fd in self.fds:
            os.close(fd)
        self.ids, self.fds = [], []
        self.worker.set_state("asleep")
        self.sleeping = False

    def _answer(self) -> None:
        while True:
            try:
                message, _ = protocol.recv(self.control)
            except OSError:
                return
            if message is None:
                return
            if message["op"] == "report":
                reply = {"ok": True, "state": "awake", "draining": False, "waiting": 0}
                reply |= {"in_flight": self.in_flight, "last_active": self.last_active}
            else:  # sleep: like the real controller, answer now, sleep after
                self.asked += 1
                self.first_asked = self.first_asked or time.monotonic()
                if self.ids and not self.in_flight and not self.sleeping:
                    self.sleeping = True
                    threading.Thread(target=self.sleep).start()
                reply = {"ok": True}
            protocol.send(self.control, {**reply, "seq": message.get("seq")})

    def close(self) -> None:
        self.worker.close()
        self.control.close()


@pytest.fixture
def pool(tmp_path):
    """A live daemon of 10 chunks that waits up to 2 s, under the
    switch-per-request policy (the mechanism's plain order); its fake
    instances."""
    daemon = LiveDaemon(
        str(tmp_path / "d.sock"), 10, CS, wait_timeout=2, policy="switch-per-request"
    )
    made: list[FakeInstance] = []

    def instance(model: str, **kwargs) -> FakeInstance:
        made.append(FakeInstance(daemon.path, model, **kwargs))
        return made[-1]

    yield daemon, instance
    for i in made:
        i.close()
    daemon.stop()


def held(daemon: LiveDaemon) -> dict:
    return {i["model"]: i["chunks"] for i in daemon.status()["instances"]}


def test_the_least_recently_used_idle_instance_sleeps(pool):
    daemon, instance = pool
    old, new = instance("old", last_active=1.0), instance("new", last_active=2.0)
    old.lease(4)
    new.lease(4)
    instance("third").lease(4)  # 2 free: one of the others must go
    assert held(daemon) == {"old": 0, "new": 4, "third": 4}
    assert new.asked == 0
    assert_books_balance(daemon.status())


def test_idle_before_busy_and_never_pinned(pool):
    daemon, instance = pool
    pinned = instance("pinned", pinned=True, last_active=0.0)
    busy = instance("busy", in_flight=1, last_active=1.0)
    idle = instance("idle", last_active=5.0)
    for i in (pinned, busy, idle):
        i.lease(3)
    instance("fourth").lease(3)  # 1 free: the idle one goes, though most recent
    assert held(daemon) == {"pinned": 3, "busy": 3, "idle": 0, "fourth": 3}
    assert pinned.asked == 0 and busy.asked == 0
    assert_books_balance(daemon.status())


def test_a_busy_holder_is_asked_until_it_is_done(pool):
    daemon, instance = pool
    busy = instance("busy", in_flight=1)
    busy.lease(8)

    def finish():
        time.sleep(0.6)
        busy.in_flight = 0  # its last request ends; the next ask puts it to sleep

    threading.Thread(target=finish).start()
    start = time.monotonic()
    instance("waker").lease(5)
    assert 0.5 < time.monotonic() - start < 2
    assert held(daemon) == {"busy": 0, "waker": 5}
    assert busy.asked >= 2  # asked again while it was busy
    assert_books_balance(daemon.status())


def test_a_lease_that_pinned_holders_block_is_refused_at_once(pool):
    """Waiting would hold up every lease behind it, for nothing."""
    daemon, instance = pool
    instance("pinned", pinned=True).lease(8)
    with pytest.raises(
        DaemonError, match=r"5 chunks cannot .* 2 of 10 are free.*pinned pinned \(8\)"
    ) as e:
        instance("waker").lease(5)
    assert e.value.code == "pinned"
    instance("small").lease(2)  # what fits is granted
    assert held(daemon) == {"pinned": 8, "waker": 0, "small": 2}
    assert_books_balance(daemon.status())


def test_leases_are_granted_first_come_first_served(pool):
    daemon, instance = pool
    holder = instance("holder", in_flight=1)
    holder.lease(8)
    first, second = instance("first"), instance("second")
    seen = {}

    def lease(who, n):
        who.lease(n)
        seen[who.model] = held(daemon)  # what the others held once this one was granted

    threads = [threading.Thread(target=lease, args=(first, 6))]
    threads[0].start()
    time.sleep(0.3)
    threads.append(threading.Thread(target=lease, args=(second, 2)))  # would fit first
    threads[1].start()
    time.sleep(0.3)
    assert seen == {}  # 2 chunks are free, but "first" asked before "second"
    holder.in_flight = 0
    for t in threads:
        t.join(5)
    assert seen["second"]["first"] == 6  # granted only after "first" was
    assert held(daemon) == {"holder": 0, "first": 6, "second": 2}
    assert_books_balance(daemon.status())


def test_a_lease_larger_than_the_pool_is_refused_at_once(pool):
    daemon, instance = pool
    start = time.monotonic()
    with pytest.raises(DaemonError, match="whole pool is 10 chunks"):
        instance("huge").lease(11)
    assert time.monotonic() - start < 1
    assert_books_balance(daemon.status())


def test_a_controller_for_an_unknown_key_is_refused(pool):
    daemon, _ = pool
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.connect(daemon.path)
    protocol.send(sock, {"op": "hello", "role": "controller", "key": "nobody"})
    reply, _ = protocol.recv(sock)
    assert reply == {"ok": False, "error": "no instance registered with key 'nobody'"}
    sock.close()


def test_an_instance_killed_while_waiting_does_not_hold_up_the_queue(tmp_path):
    import signal
    import subprocess
    import sys

    daemon = LiveDaemon(str(tmp_path / "d.sock"), 10, CS, wait_timeout=60)
    path = daemon.path
    holder = FakeInstance(path, "holder", in_flight=1)
    holder.lease(8)
    script = (
        "import sys; from vllm_mux.daemon.client import Client; "
        f"c = Client({path!r}, timeout=None); c.hello('doomed'); print('waiting', flush=True); "
        "c.lease(5)"
    )
    doomed = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert doomed.stdout.readline().strip() == "waiting"
    time.sleep(0.5)  # now first in the queue, waiting for the busy holder
    doomed.send_signal(signal.SIGKILL)
    doomed.wait()
    start = time.monotonic()
    instance = FakeInstance(path, "next")
    instance.lease(2)  # 2 are free: granted once the dead waiter has left the queue
    assert time.monotonic() - start < 3
    status = daemon.status()
    assert [i["model"] for i in status["instances"]] == ["holder", "next"]
    assert status["balanced"] and status["free_chunks"] == 0
    for i in (holder, instance):
        i.close()
    daemon.stop()


def test_a_starting_instance_finishes_ahead_of_the_queue(pool):
    """Two instances starting at once: the first has its weights and needs its
    KV cache; the second waits for memory the first can only give back once it
    has started. The first may go ahead, or both would wait forever."""
    daemon, instance = pool
    path = daemon.path
    first = Client(path, timeout=30)
    first.hello("first", key="first")  # no controller yet: still starting
    weights, _ = first.lease(5)
    second = FakeInstance(path, "second")
    waiting = threading.Thread(target=second.lease, args=(6,))
    waiting.start()  # 5 free: second waits at the head of the queue
    time.sleep(0.3)
    start = time.monotonic()
    kv_cache, _ = first.lease(3)  # fits in what is free: granted at once
    assert time.monotonic() - start < 1
    assert held(daemon) == {"first": 8, "second": 0}
    first.release(weights + kv_cache)
    waiting.join(5)
    assert held(daemon) == {"first": 0, "second": 6}
    assert_books_balance(daemon.status())
    first.close()


def test_wake_and_sleep_latencies_are_kept_as_histograms(pool):
    daemon, instance = pool
    fake = instance("timed")
    fake.worker.set_state("waking")
    fake.worker.set_state("awake", wake={"seconds": 0.3})
    fake.worker.set_state("sleeping")
    fake.worker.set_state("asleep", sleep={"seconds": 0.04})
    (me,) = daemon.status()["instances"]
    wake, sleep = me["wake_latency"], me["sleep_latency"]
    assert (wake["count"], wake["sum"], sleep["count"], sleep["sum"]) == (1, 0.3, 1, 0.04)
    counts = dict(zip(wake["le"], wake["counts"]))
    assert counts[0.25] == 0 and counts[0.5] == 1 and counts[120.0] == 1  # cumulative
    assert dict(zip(sleep["le"], sleep["counts"]))[0.05] == 1
    assert me["last_wake"] == {"seconds": 0.3} and me["wakes"] == 1 and me["sleeps"] == 1
    assert_books_balance(daemon.status())


def test_batched_a_busy_holder_keeps_the_device_for_its_quantum(tmp_path):
    """Under batched a holder that just woke and has work is not
    asked to sleep before its quantum ends; then it is."""
    daemon = LiveDaemon(str(tmp_path / "d.sock"), 10, CS, wait_timeout=30, policy="batched")
    try:
        busy = FakeInstance(daemon.path, "busy", in_flight=1, knobs={"quantum_s": 1.5})
        busy.lease(8)
        woke = time.monotonic()
        threading.Thread(target=lambda: (time.sleep(3), setattr(busy, "in_flight", 0))).start()
        waker = FakeInstance(daemon.path, "waker")
        waker.lease(5)
        # Asked only once the quantum was over (and then again until its drain).
        assert busy.first_asked - woke >= 1.5
        assert held(daemon) == {"busy": 0, "waker": 5}
        assert_books_balance(daemon.status())
        busy.close()
        waker.close()
    finally:
        daemon.stop()


def test_batched_a_request_past_its_wait_bound_takes_the_device(tmp_path):
    """A waiter's max_wait_s overrides the holder's quantum: no model starves."""
    daemon = LiveDaemon(str(tmp_path / "d.sock"), 10, CS, wait_timeout=30, policy="batched")
    try:
        busy = FakeInstance(daemon.path, "busy", in_flight=1, knobs={"quantum_s": 600})
        busy.lease(8)

        def finish_once_asked():  # busy all along until asked: only the bound can explain it
            while not busy.first_asked:
                time.sleep(0.05)
            busy.in_flight = 0

        threading.Thread(target=finish_once_asked, daemon=True).start()
        waker = FakeInstance(daemon.path, "waker", knobs={"max_wait_s": 1})
        start = time.monotonic()
        waker.lease(5)
        assert busy.first_asked - start >= 1  # not before the bound passed
        assert held(daemon) == {"busy": 0, "waker": 5}
        busy.close()
        waker.close()
    finally:
        daemon.stop()


def test_bad_knobs_at_hello_are_refused(tmp_path):
    daemon = LiveDaemon(str(tmp_path / "d.sock"), 10, CS)
    try:
        Client(daemon.path).hello("m", key="m")
        for knobs, says in (({"quantum_s": -1}, "quantum_s"), ({"speed": 1}, "unknown knob")):
            control = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            control.connect(daemon.path)
            protocol.send(
                control, {"op": "hello", "role": "controller", "key": "m"} | {"knobs": knobs}
            )
            reply, _ = protocol.recv(control)
            assert not reply["ok"] and "bad knobs" in reply["error"] and says in reply["error"]
            control.close()
    finally:
        daemon.stop()


def test_a_pinned_holder_already_sleeping_or_gone_does_not_refuse_a_lease(tmp_path):
    """Its chunks are coming back (sleeping) or will once its process is gone
    (disconnected): a lease waits for them rather than being refused as if
    pinned memory could never come free."""
    daemon = LiveDaemon(str(tmp_path / "d.sock"), 10, CS, wait_timeout=30)
    try:
        x = FakeInstance(daemon.path, "x", pinned=True)
        x.lease(8)
        x.worker.set_state("sleeping")  # pinned too late: on its way to sleep
        threading.Thread(target=lambda: (time.sleep(0.5), x.sleep())).start()
        FakeInstance(daemon.path, "y").lease(5)  # waits for x's chunks, not refused
        assert held(daemon)["y"] == 5
    finally:
        daemon.stop()
    daemon = LiveDaemon(str(tmp_path / "e.sock"), 10, CS, wait_timeout=1)
    try:
        z = FakeInstance(daemon.path, "z", pinned=True)
        z.lease(8)
        z.worker.close()  # disconnected, its process alive: nobody can unpin it
        with pytest.raises(DaemonError) as e:
            FakeInstance(daemon.path, "w").lease(5)
        assert e.value.code != "pinned" and "waited 1 s" in str(e.value)
    finally:
        daemon.stop()


def test_knobs_that_are_not_a_mapping_are_refused_and_a_wait_bound_past_the_lease_is_capped(
    tmp_path,
):
    daemon = LiveDaemon(str(tmp_path / "d.sock"), 10, CS, wait_timeout=30)
    try:
        Client(daemon.path).hello("m", key="m")
        control = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        control.connect(daemon.path)
        protocol.send(control, {"op": "hello", "role": "controller", "key": "m", "knobs": ["x"]})
        reply, _ = protocol.recv(control)
        assert not reply["ok"] and "knobs are a mapping, not list" in reply["error"]
        control.close()
        FakeInstance(daemon.path, "n", knobs={"max_wait_s": 100})
        (n,) = [i for i in daemon.status()["instances"] if i["model"] == "n"]
        assert n["knobs"]["max_wait_s"] == 15  # half the lease's 30 s: else it never acts
    finally:
        daemon.stop()
