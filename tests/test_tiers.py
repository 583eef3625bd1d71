"""The tiers of memory against a real daemon, without vLLM: a warm wake copies
nothing, a partial one only what was taken, equal weights share one sealed
host copy, the host budget holds, and a cold model reloads."""

import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

from conftest import LiveDaemon, assert_books_balance, take_chunks
from vllm_mux.daemon import protocol
from vllm_mux.daemon.client import Client, DaemonError
from vllm_mux.instance import Instance
from vllm_mux.memory import host as host_memory

CHUNK = 1 << 20
POOL = 16  # chunks


def weights(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(300, 1000), (1000, 441), (7,), (512, 512)]  # 5.5 chunks of float32
    return [torch.randn(s, generator=g) for s in shapes]


@pytest.fixture
def daemon(tmp_path):
    d = LiveDaemon(str(tmp_path / "d.sock"), POOL, CHUNK, wait_timeout=2)
    yield d
    d.stop()


def status(daemon: LiveDaemon) -> dict:
    s = daemon.status()
    assert_books_balance(s)
    return s


def test_a_warm_wake_copies_nothing_and_keeps_the_kv_cache(daemon):
    inst = Instance(daemon.path, "m", key="a")
    tensors = weights()
    expected = [t.clone() for t in tensors]
    inst.adopt_weights(tensors)
    kv = inst.alloc(inst.kv_cache, CHUNK)
    kv.fill_(5)
    inst.sleep()
    (me,) = status(daemon)["instances"]
    assert me["chunks"] == 0 and me["resident_chunks"] == inst.weights.size // CHUNK + 1
    inst.wake()
    assert inst.last_wake["tier"] == "warm" and inst.last_wake["copied_bytes"] == 0
    assert inst.kv_intact and bool((kv == 5).all())  # the KV cache's bytes survived
    assert all(torch.equal(t, e) for t, e in zip(tensors, expected))
    status(daemon)  # the books of both tiers balance
    inst.client.close()


def test_a_partial_wake_copies_only_the_chunks_taken(daemon):
    inst = Instance(daemon.path, "m", key="a")
    tensors = weights()
    expected = [t.clone() for t in tensors]
    inst.adopt_weights(tensors)
    kv = inst.alloc(inst.kv_cache, CHUNK)
    n = inst.weights.size // CHUNK + 1
    inst.sleep()
    take_chunks(daemon.path, POOL - n + 2)  # every chunk nobody slept on, and 2 of ours
    inst.wake()
    facts = inst.last_wake
    assert facts["tier"] in ("partial", "host") and facts["chunks_kept"] == n - 2
    assert 0 < facts["copied_bytes"] <= 2 * CHUNK
    assert all(torch.equal(t, e) for t, e in zip(tensors, expected))
    take_chunks(daemon.path, POOL - n)  # the free chunks only: ours were all given back
    inst.sleep()
    take_chunks(daemon.path, POOL)
    inst.wake()
    assert inst.last_wake["tier"] == "host" and not inst.kv_intact
    assert inst.last_wake["copied_bytes"] == inst.weights.used
    assert all(torch.equal(t, e) for t, e in zip(tensors, expected))
    kv.fill_(1)
    status(daemon)  # the books of both tiers balance
    inst.client.close()


def test_equal_weights_share_one_sealed_host_copy_and_different_ones_do_not(daemon):
    a, b, c = (Instance(daemon.path, name, key=name) for name in "abc")
    a.adopt_weights(weights())
    b.adopt_weights(weights())
    other = weights()
    other[2][3] += 1  # one tensor differs, in one element
    c.adopt_weights(other)
    s = status(daemon)
    copies = {x["digest"]: x for x in s["host_copies"]}
    assert len(copies) == 2 and a.digest == b.digest != c.digest
    assert sorted(copies[a.digest]["users"]) == [a.id, b.id] and copies[a.digest]["sealed"]
    assert s["host_used"] == a.weights.used + c.weights.used
    # Sealed: nobody can write the shared bytes, the daemon's fd included.
    fd = daemon.daemon.host_fds[a.digest]
    with pytest.raises(PermissionError):
        os.pwrite(fd, b"x", 0)
    for inst in (a, b, c):
        inst.client.close()


def test_the_last_user_frees_a_copy_and_a_weight_update_takes_a_new_one(daemon):
    a, b = Instance(daemon.path, "a", key="a"), Instance(daemon.path, "b", key="b")
    ta, tb = weights(), weights()
    a.adopt_weights(ta)
    b.adopt_weights(tb)
    old = a.digest
    ta[0].fill_(2.0)  # a's weights updated in place
    a.refresh_weights(ta)
    s = status(daemon)
    users = {x["digest"]: x["users"] for x in s["host_copies"]}
    assert users == {old: [b.id], a.digest: [a.id]}
    assert not next(x for x in s["host_copies"] if x["digest"] == a.digest)["coldable"]
    b.sleep()  # sleeping keeps the copy: a wake needs it
    assert status(daemon)["host_used"] == 2 * a.weights.used
    b._drop_host_copy()
    assert [x["digest"] for x in status(daemon)["host_copies"]] == [a.digest]
    for inst in (a, b):
        inst.client.close()


CHILD = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, {tests!r})
    from test_tiers import weights
    from vllm_mux.instance import Instance
    inst = Instance({path!r}, "child", key="child")
    inst.adopt_weights(weights())
    print(inst.digest, flush=True)
    sys.stdin.read()
    """
)


def test_an_instance_that_dies_leaves_a_shared_copy_to_the_others(daemon, children):
    code = CHILD.format(tests=os.path.dirname(__file__), path=daemon.path)
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    children.append(child)
    digest = child.stdout.readline().strip()
    inst = Instance(daemon.path, "m", key="a")
    tensors = weights()
    expected = [t.clone() for t in tensors]
    inst.adopt_weights(tensors)
    assert inst.digest == digest
    assert [len(x["users"]) for x in status(daemon)["host_copies"]] == [2]
    child.kill()
    child.wait()
    deadline = time.monotonic() + 30
    while len(status(daemon)["instances"]) > 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    s = status(daemon)
    assert [x["users"] for x in s["host_copies"]] == [[inst.id]]
    inst.sleep()
    take_chunks(daemon.path, POOL)
    inst.wake()  # from the copy the dead instance shared
    assert inst.last_wake["tier"] == "host"
    assert all(torch.equal(t, e) for t, e in zip(tensors, expected))
    status(daemon)  # the books of both tiers balance
    inst.client.close()


class Controller:
    """The daemon's other door into an instance, as the real controller and
    worker answer it: a report, and "drop_host" lets the host copy go."""

    def __init__(self, path: str, inst: Instance):
        self.inst, self.asked = inst, []
        self.conn = Client(path, timeout=None)
        self.conn.call("hello", role="controller", key=inst.key, pinned=False, idle_ttl=0)
        threading.Thread(target=self._answer, daemon=True).start()

    def _answer(self) -> None:
        while True:
            try:
                message, _ = protocol.recv(self.conn.sock)
            except OSError:
                return
            if message is None:
                return
            self.asked.append(message["op"])
            reply = {"ok": True, "state": self.inst.state, "draining": False}
            reply |= {"in_flight": 0, "waiting": 0, "last_active": 0.0}
            if message["op"] == "drop_host":
                reply = {"ok": self.inst.state == "asleep"}
                threading.Thread(target=self.inst.drop_host).start()
            protocol.send(self.conn.sock, {**reply, "seq": message.get("seq")})


def test_a_full_host_budget_makes_the_least_recently_used_sleeper_cold(tmp_path):
    tensors = [weights(seed) for seed in range(3)]
    budget = 10 * CHUNK  # two copies of these weights (3.8 MiB each), not three
    d = LiveDaemon(str(tmp_path / "d.sock"), 24, CHUNK, wait_timeout=5, host_memory=budget)
    try:
        insts = [Instance(d.path, f"m{i}", key=f"m{i}") for i in range(3)]
        expected = [[t.clone() for t in ts] for ts in tensors]
        reloads = []
        for inst, ts, es in zip(insts, tensors, expected):
            Controller(d.path, inst)

            def reload(ts=ts, es=es):  # what vLLM's loader does: the files' bytes, in place
                reloads.append(1)
                for t, e in zip(ts, es):
                    t.copy_(e)

            inst.reload = reload
        for i in (0, 1):
            insts[i].adopt_weights(tensors[i])
        insts[0].sleep()
        insts[1].sleep()
        insts[1].wake()  # m1 used last: m0 goes first
        insts[1].sleep()
        insts[2].adopt_weights(tensors[2])  # no room: m0 is made cold
        s = status(d)
        assert s["host_used"] <= budget and len(s["host_copies"]) == 2
        assert insts[0].host is None and insts[1].host is not None
        # m0's chunks are all still warm: a wake needs no reload.
        insts[0].wake()
        assert insts[0].last_wake["tier"] == "warm"
        insts[0].sleep()
        take_chunks(d.path, 24 - len(insts[2].leases[id(insts[2].weights)]))  # all but awake m2's
        insts[0].wake()  # cold: reloaded; its new copy makes sleeping m1 cold
        assert reloads and insts[0].last_wake["tier"] == "cold"
        assert insts[0].last_wake["same_bytes"]
        assert all(torch.equal(t, e) for t, e in zip(tensors[0], expected[0]))
        s = status(d)
        assert s["host_used"] <= budget
        assert sorted(x["users"][0] for x in s["host_copies"]) == [insts[0].id, insts[2].id]
        assert insts[1].host is None
        # An awake model is never made cold: with m0 and m2 awake, m1's next
        # copy finds no room and m1 stays cold.
        insts[1].wake()
        assert insts[1].last_wake["tier"] in ("warm", "cold") and insts[1].host is None
        assert all(torch.equal(t, e) for t, e in zip(tensors[1], expected[1]))
        s = status(d)
        assert sorted(x["users"][0] for x in s["host_copies"]) == [insts[0].id, insts[2].id]
    finally:
        d.stop()


def test_a_model_its_files_cannot_restore_is_never_made_cold(tmp_path):
    """No loader (dummy weights) or weights updated since loading: the copy
    stays, and the newcomer that needs its room is told why instead."""
    d = LiveDaemon(str(tmp_path / "d.sock"), 16, CHUNK, wait_timeout=2, host_memory=5 * CHUNK)
    try:
        a, b = Instance(d.path, "a", key="a"), Instance(d.path, "b", key="b")
        Controller(d.path, a)
        a.adopt_weights(weights(0))  # no reload: its files cannot restore it
        a.sleep()
        b.reload = lambda: None
        b.adopt_weights(weights(1))  # no room, and a's copy may not go
        assert a.host is not None and b.host is None
        (copy,) = status(d)["host_copies"]
        assert copy["users"] == [a.id] and not copy["coldable"]
        c = Instance(d.path, "c", key="c")  # neither can it run without a copy
        with pytest.raises(RuntimeError, match="need a host copy"):
            c.adopt_weights(weights(2))
    finally:
        d.stop()


def test_a_model_larger_than_the_host_budget_is_cold_from_the_start(tmp_path):
    d = LiveDaemon(str(tmp_path / "d.sock"), 16, CHUNK, host_memory=CHUNK)
    try:
        a = Instance(d.path, "a", key="a")
        a.reload = lambda: None  # its files could restore it
        a.adopt_weights(weights())  # warns, serves on without a host copy
        assert a.host is None and status(d)["host_used"] == 0
    finally:
        d.stop()


def test_the_daemon_refuses_a_copy_whose_bytes_are_not_the_ones_named(daemon):
    c = Client(daemon.path, timeout=10)
    c.hello("liar", key="liar")
    named = host_memory.digest(4096, lambda i, k: bytes(k))
    reply, fd = c.host_get(named, 4096, fill=True)
    assert reply["fill"]
    m = host_memory.Mapping(fd, 4096, writable=True)
    with pytest.raises(DaemonError, match="unmap it first"):
        c.host_filled(named)  # still mapped writable: cannot be sealed
    m.tensor[0] = 1  # not the bytes named
    m.close()
    with pytest.raises(DaemonError, match="not the .* they were named by"):
        c.host_filled(named)
    s = status(daemon)
    assert s["host_copies"] == [] and s["host_used"] == 0
    c.close()


@pytest.mark.parametrize(
    "message, error",
    [
        ({"op": "host_get", "digest": "x", "size": 1, "fill": True}, "64 hexadecimal"),
        ({"op": "host_get", "digest": "0" * 64, "size": -1, "fill": True}, "positive"),
        ({"op": "host_release", "digest": "0" * 64}, "holds no copy"),
        ({"op": "host_filled", "digest": "0" * 64}, "being filled"),
        ({"op": "lease", "chunks": 1, "want": [0, 0]}, "each once"),
        ({"op": "lease", "chunks": 1, "want": "all"}, "list of chunk ids"),
    ],
)
def test_bad_tier_requests_get_a_clear_error(daemon, message, error):
    c = Client(daemon.path, timeout=10)
    c.hello("m", key="m")
    op = message.pop("op")
    with pytest.raises(DaemonError, match=error):
        c.call(op, **message)
    assert_books_balance(daemon.status())
    c.close()


def test_status_shows_what_a_sleeper_still_has_on_the_device_and_the_host(daemon, capsys):
    from vllm_mux import cli

    inst = Instance(daemon.path, "sleeper", key="s")
    inst.adopt_weights(weights())
    inst.sleep()
    take_chunks(daemon.path, POOL - inst.weights.size // CHUNK + 1)  # one of its chunks
    assert cli.main(["status", "--socket", daemon.path]) == 0
    out = capsys.readouterr().out
    assert "RESIDENT" in out and "in 1 (shared by 1 instances)" in out
    (line,) = [x for x in out.splitlines() if "sleeper" in x]
    assert line.split()[3:6] == ["asleep", "0", str(inst.weights.size // CHUNK - 1)]
    inst._drop_host_copy()
    assert cli.main(["status", "--socket", daemon.path]) == 0
    (line,) = [x for x in capsys.readouterr().out.splitlines() if "sleeper" in x]
    assert line.split()[3:5] == ["asleep", "cold"]
    status(daemon)  # the books of both tiers balance
    inst.client.close()


class SlowController(Controller):
    """Lets the host copy go only after ``delay`` seconds: a slow sleeper."""

    delay = 1.5

    def _answer(self) -> None:
        drop = self.inst.drop_host
        self.inst.drop_host = lambda: time.sleep(self.delay) or drop()
        super()._answer()


def test_a_copy_made_after_a_slow_drop_is_granted_not_lost(tmp_path):
    """The copy made once a slow sleeper let its own go is the newcomer's,
    even past the wait's deadline: it was failed and left on the books,
    unsealed and without memory, for good (review finding)."""
    d = LiveDaemon(str(tmp_path / "d.sock"), 16, CHUNK, wait_timeout=1, host_memory=5 * CHUNK)
    try:
        a, b = Instance(d.path, "a", key="a"), Instance(d.path, "b", key="b")
        a.reload = b.reload = lambda: None
        SlowController(d.path, a)
        a.adopt_weights(weights(0))
        a.sleep()
        b.adopt_weights(weights(1))
        assert a.host is None and b.host is not None
        (copy,) = status(d)["host_copies"]
        assert copy["users"] == [b.id] and copy["sealed"]
    finally:
        d.stop()


def test_a_fill_that_fails_leaves_no_copy_behind(daemon, monkeypatch):
    """Filling fails in the instance (a driver error, no memory): the copy
    goes off the books at once, and the next attempt makes a new one."""
    inst = Instance(daemon.path, "m", key="m")
    inst.reload = lambda: None

    def broken(self, filling, used):
        filling.close()
        raise OSError(5, "injected: the fill failed")

    monkeypatch.setattr(Instance, "_fill", broken)
    inst.adopt_weights(weights())  # warns: cold for now
    assert inst.host is None and status(daemon)["host_copies"] == []
    monkeypatch.undo()
    inst._take_host_copy(fill=True)
    (copy,) = status(daemon)["host_copies"]
    assert copy["users"] == [inst.id] and copy["sealed"] and inst.host is not None
    inst.client.close()


def test_a_wrong_size_from_a_user_changes_nothing(daemon):
    inst = Instance(daemon.path, "m", key="m")
    inst.adopt_weights(weights())
    with pytest.raises(DaemonError, match="bytes, not 4096"):
        inst.client.host_get(inst.digest, 4096, fill=True)
    (copy,) = status(daemon)["host_copies"]  # still ours, its memfd still tracked
    assert copy["users"] == [inst.id]
    inst.client.close()


def test_a_sleeper_nobody_can_ask_is_not_waited_for(tmp_path):
    """No controller to ask (an offline LLM, a second worker): its copy is no
    candidate, and the newcomer hears why at once instead of after a wait."""
    d = LiveDaemon(str(tmp_path / "d.sock"), 16, CHUNK, wait_timeout=2, host_memory=5 * CHUNK)
    try:
        a, b = Instance(d.path, "a", key="a"), Instance(d.path, "b", key="b")
        a.reload = b.reload = lambda: None
        a.adopt_weights(weights(0))
        a.sleep()
        with pytest.raises(DaemonError, match="awake models, or to models their files"):
            b.client.host_get("1" * 64, a.weights.used, fill=True)
        assert a.host is not None and [c["users"] for c in status(d)["host_copies"]] == [[a.id]]
    finally:
        d.stop()


def test_updated_weights_never_let_their_copy_go(daemon):
    inst = Instance(daemon.path, "m", key="m")
    inst.reload = lambda: None
    tensors = weights()
    inst.adopt_weights(tensors)
    tensors[0].fill_(1.0)
    inst.refresh_weights(tensors)
    inst.sleep()
    assert not inst.drop_host() and inst.host is not None
    status(daemon)  # the books of both tiers balance
    inst.client.close()


def test_where_weights_load_straight_into_the_arena_no_model_goes_cold(daemon):
    """On CUDA the arena also holds what loading left alive besides the
    parameters: no reload restores that, so the host copy stays."""
    inst = Instance(daemon.path, "m", key="m")
    inst.reload = lambda: None
    assert inst.coldable
    inst.backend.device_type = "cuda"  # what decides it, on the cpu backend
    assert not inst.coldable
    inst.client.close()
