"""The daemon: the books (Pool), the wire, a live server, dead instances, the CLI."""

import argparse
import json
import os
import random
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from conftest import LiveDaemon
from vllm_mux import cli
from vllm_mux.daemon import protocol
from vllm_mux.daemon.client import Client, DaemonError
from vllm_mux.daemon.pool import Pool, PoolError
from vllm_mux.daemon.server import Daemon
from vllm_mux.memory.cpu import Backend

KIB = 1 << 10
MIB = 1 << 20
CS = 64 * KIB  # small chunks keep pools cheap to create


# -- helpers --


def wait_for(predicate, timeout=5.0, interval=0.02):
    """Poll until ``predicate()`` is truthy; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def assert_balanced(status: dict) -> None:
    assert status["ok"] is True
    assert status["balanced"] is True
    assert status["leased_chunks"] + status["free_chunks"] == status["total_chunks"]
    assert sum(i["chunks"] for i in status["instances"]) == status["leased_chunks"]
    for i in status["instances"]:
        if i["state"] == "asleep":
            assert i["chunks"] == 0


def assert_pool_balanced(pool: Pool) -> None:
    assert pool.leased + len(pool.free) == pool.total
    assert pool.balanced()


def _sock_path(tmp_path) -> str:
    path = str(tmp_path / "d.sock")
    if len(path) < 100:  # sun_path holds 108 bytes
        return path
    return os.path.join(tempfile.mkdtemp(prefix="vmux"), "d.sock")


def _child_env():
    env = dict(os.environ)
    env.pop("PYTHONFAULTHANDLER", None)
    return env


@pytest.fixture
def sock_path(tmp_path):
    return _sock_path(tmp_path)


@pytest.fixture
def live(sock_path):
    """A factory of live daemons on ``sock_path``, stopped at teardown."""
    started = []

    def start(chunks=8, chunk_size=CS, path=None):
        d = LiveDaemon(path or sock_path, chunks, chunk_size)
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop()


def close_fds(fds):
    for fd in fds:
        os.close(fd)


def raw(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(10)
    s.connect(path)
    return s


def call(sock: socket.socket, message: dict):
    protocol.send(sock, message)
    return protocol.recv(sock)


# -- the books --


def test_pool_lease_and_release():
    p = Pool(4, CS)
    assert p.free == [0, 1, 2, 3] and p.leased == 0
    a = p.lease(1, 3)
    assert len(a) == len(set(a)) == 3
    assert sorted(p.held_by(1)) == sorted(a)
    assert p.leased == 3 and len(p.free) == 1
    assert_pool_balanced(p)
    b = p.lease(2, 1)
    assert not set(a) & set(b)
    assert p.free == []
    p.release(1, a[:2])
    assert sorted(p.held_by(1)) == [a[2]]
    assert p.leased == 2
    assert_pool_balanced(p)
    assert sorted(p.release_all(1)) == [a[2]]
    assert p.release_all(1) == []
    assert p.held_by(1) == []
    p.release(2, b)
    assert sorted(p.free) == [0, 1, 2, 3] and p.holder == {}
    assert_pool_balanced(p)


@pytest.mark.parametrize("n", [0, -1])
def test_pool_lease_of_nothing_refused(n):
    p = Pool(4, CS)
    with pytest.raises(PoolError):
        p.lease(1, n)
    assert p.leased == 0 and len(p.free) == 4


def test_pool_lease_beyond_total_names_the_pool_size():
    p = Pool(4, 32 * MIB)
    with pytest.raises(PoolError) as e:
        p.lease(1, 5)
    msg = str(e.value)
    assert "5 chunks" in msg and "4 chunks" in msg
    assert "0.12 GiB" in msg  # 4 x 32 MiB
    assert "--device-memory" in msg
    assert p.leased == 0
    assert_pool_balanced(p)


def test_pool_lease_beyond_free_refused():
    p = Pool(4, CS)
    held = p.lease(1, 3)
    with pytest.raises(PoolError, match="only 1 of 4"):
        p.lease(2, 2)
    assert p.held_by(2) == [] and sorted(p.held_by(1)) == sorted(held)
    assert len(p.free) == 1
    assert_pool_balanced(p)


def test_pool_release_of_chunk_not_held_changes_nothing():
    p = Pool(6, CS)
    mine = p.lease(1, 2)
    theirs = p.lease(2, 2)
    before = (list(p.free), dict(p.holder))
    for bad in ([theirs[0]], [mine[0], theirs[0]], [p.free[0]], [99], [-1]):
        with pytest.raises(PoolError, match="does not hold"):
            p.release(1, bad)
        assert (p.free, p.holder) == before
    assert_pool_balanced(p)


def test_pool_release_with_duplicate_ids_refused():
    p = Pool(4, CS)
    ids = p.lease(1, 2)
    before = (list(p.free), dict(p.holder))
    with pytest.raises(PoolError, match="twice"):
        p.release(1, [ids[0], ids[0]])
    assert (p.free, p.holder) == before
    with pytest.raises(PoolError):
        p.release(1, [ids[0], ids[1], ids[0]])
    assert (p.free, p.holder) == before
    p.release(1, ids)
    assert_pool_balanced(p)
    assert p.leased == 0


@pytest.mark.parametrize("seed", range(5))
def test_pool_random_operations_keep_books(seed):
    """A random mix of good and bad leases and releases across instances."""
    rng = random.Random(seed)
    total = 16
    p = Pool(total, CS)
    model = {i: set() for i in (1, 2, 3)}
    for _ in range(400):
        inst = rng.choice(list(model))
        before = (list(p.free), dict(p.holder))
        free_n = total - sum(len(s) for s in model.values())
        op = rng.random()
        try:
            if op < 0.4:
                n = rng.randint(-1, total + 2)
                ids = p.lease(inst, n)
                assert 1 <= n <= free_n, "the books granted a lease they should refuse"
                assert len(ids) == n == len(set(ids))
                assert not set(ids) & set().union(*model.values())
                model[inst] |= set(ids)
            elif op < 0.7:
                ids = rng.sample(sorted(model[inst]), rng.randint(0, len(model[inst])))
                p.release(inst, ids)
                model[inst] -= set(ids)
            elif op < 0.8:
                others = sorted(set(range(total)) - model[inst])
                if not others:
                    continue
                ids = sorted(model[inst])[:1] + [rng.choice(others)]
                p.release(inst, ids)
                pytest.fail("release of a chunk not held was granted")
            elif op < 0.9:
                if not model[inst]:
                    continue
                x = rng.choice(sorted(model[inst]))
                p.release(inst, [x, x])
                pytest.fail("release naming a chunk twice was granted")
            else:
                assert set(p.release_all(inst)) == model[inst]
                model[inst] = set()
        except PoolError:
            assert (p.free, p.holder) == before, "a refused request changed the books"
            if op < 0.4:
                assert n < 1 or n > free_n
        assert_pool_balanced(p)
        for i, held in model.items():
            assert set(p.held_by(i)) == held
        assert set(p.free) == set(range(total)) - set().union(*model.values())
        assert len(p.free) == len(set(p.free))


# -- daemon lifecycle --


def test_daemon_refuses_bad_sizes(sock_path):
    with pytest.raises(ValueError, match="smaller than one chunk"):
        Daemon(Backend(), "cpu", CS - 1, CS, sock_path)
    with pytest.raises(ValueError, match="granularity"):
        Daemon(Backend(), "cpu", 4 * CS, CS + 1, sock_path)
    assert not os.path.exists(sock_path)


def test_daemon_chunks_are_committed(live):
    d = live(chunks=4).daemon
    assert len(d.chunks) == 4
    for chunk in d.chunks:
        st = os.fstat(chunk.fd)
        assert st.st_size == CS
        assert st.st_blocks * 512 >= CS


def test_socket_is_private(live, sock_path):
    live()
    mode = os.stat(sock_path).st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600


def test_second_daemon_on_same_socket_refused(live, sock_path):
    first = live(chunks=2)
    second = Daemon(Backend(), "cpu", 2 * CS, CS, sock_path)
    try:
        with pytest.raises(RuntimeError, match="already listening"):
            second.listen()
    finally:
        for c in second.chunks:
            os.close(c.fd)
    # the first daemon keeps its socket and still answers
    assert os.path.exists(sock_path)
    assert first.status()["total_chunks"] == 2


def test_stale_socket_file_is_replaced(live, sock_path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.bind(sock_path)  # bound, never listening: what a dead daemon leaves
    s.close()
    assert os.path.exists(sock_path)
    d = live(chunks=3)
    assert d.status()["total_chunks"] == 3
    assert stat.S_IMODE(os.stat(sock_path).st_mode) == 0o600


def test_listen_does_not_delete_a_file_that_is_not_a_socket(sock_path):
    """A --socket that names an ordinary file must not cost the user the file.

    (connect() to a regular file fails too, like a stale socket.)
    """
    with open(sock_path, "w") as f:
        f.write("precious")
    d = Daemon(Backend(), "cpu", 2 * CS, CS, sock_path)
    try:
        try:
            d.listen()
        except (RuntimeError, OSError):
            pass
        else:
            d.shutdown()
    finally:
        for c in d.chunks:
            os.close(c.fd)
    assert os.path.isfile(sock_path), "listen() deleted an ordinary file"
    with open(sock_path) as f:
        assert f.read() == "precious"


def test_zero_chunk_size_refused(sock_path):
    """`vllm-mux daemon --chunk-size 0` gets a message, not a ZeroDivisionError."""
    with pytest.raises(ValueError):
        Daemon(Backend(), "cpu", 4 * CS, 0, sock_path)


def test_serve_forever_returns_after_shutdown(sock_path):
    """shutdown() from another thread ends serve_forever (on Linux, close()
    alone would not wake a thread blocked in accept())."""
    d = Daemon(Backend(), "cpu", 2 * CS, CS, sock_path)
    d.listen()
    t = threading.Thread(target=d.serve_forever, daemon=True)
    t.start()
    time.sleep(0.1)  # let it block in accept()
    spare = d._listener.dup()  # the same listening socket, to free the thread if need be
    d.shutdown()
    t.join(3)
    alive = t.is_alive()
    if alive:  # don't leave the thread behind
        spare.shutdown(socket.SHUT_RDWR)
        t.join(2)
    spare.close()
    for c in d.chunks:
        os.close(c.fd)
    assert not os.path.exists(sock_path)
    assert not alive, "serve_forever still blocked in accept() after shutdown()"


# -- the protocol over a live daemon --


def test_hello_as_instance(live):
    d = live(chunks=5)
    c = d.client()
    hello = c.hello("model-a")
    assert hello["ok"] is True
    assert isinstance(hello["instance"], int)
    assert hello["device"] == "cpu"
    assert hello["chunk_size"] == CS
    assert hello["total_chunks"] == 5
    other = d.client().hello("model-b")
    assert other["instance"] != hello["instance"]
    st = d.status()
    assert {i["model"] for i in st["instances"]} == {"model-a", "model-b"}
    assert all(i["state"] == "starting" and i["chunks"] == 0 for i in st["instances"])
    assert_balanced(st)


def test_hello_that_is_not_an_instance_registers_nothing(live):
    d = live()
    s = raw(d.path)
    reply, fds = call(s, {"op": "hello", "role": "status"})
    assert reply == {"ok": True} and fds == []
    reply, _ = call(s, {"op": "lease", "chunks": 1})  # not an instance: no lease
    assert reply["ok"] is False
    assert d.status()["instances"] == []
    s.close()


def test_hello_errors(live):
    d = live()
    s = raw(d.path)
    reply, _ = call(s, {"op": "hello", "role": "instance"})
    assert reply["ok"] is False and "model" in reply["error"]
    reply, _ = call(s, {"op": "hello", "role": "instance", "model": 7})
    assert reply["ok"] is False
    reply, _ = call(s, {"op": "hello", "role": "instance", "model": "m"})
    assert reply["ok"] is True
    reply, _ = call(s, {"op": "hello", "role": "instance", "model": "m"})
    assert reply["ok"] is False and "already" in reply["error"]
    assert len(d.status()["instances"]) == 1
    s.close()


def test_lease_returns_ids_and_fds_of_those_chunks(live):
    d = live(chunks=6)
    c = d.client()
    c.hello("m")
    ids, fds = c.lease(3)
    try:
        assert len(ids) == len(set(ids)) == 3 and len(fds) == 3
        assert all(0 <= i < 6 for i in ids)
        for i, fd in zip(ids, fds):
            mine, theirs = os.fstat(fd), os.fstat(d.daemon.chunks[i].fd)
            assert (mine.st_dev, mine.st_ino) == (theirs.st_dev, theirs.st_ino)
            assert mine.st_size == CS
        # the fd is the chunk's memory: a write through it is the daemon's chunk's
        os.pwrite(fds[1], b"hello", 0)
        assert os.pread(d.daemon.chunks[ids[1]].fd, 5, 0) == b"hello"
        st = d.status()
        (me,) = st["instances"]
        assert me["chunks"] == 3 and me["bytes"] == 3 * CS
        assert st["leased_chunks"] == 3 and st["free_chunks"] == 3
        assert_balanced(st)
        c.release(ids)
    finally:
        close_fds(fds)
    st = d.status()
    assert st["free_chunks"] == 6 and st["instances"][0]["chunks"] == 0
    assert_balanced(st)


def test_lease_of_more_than_250_chunks(live):
    """More fds than one message can carry arrive in batches, all of them."""
    total = 320
    d = live(chunks=total)
    c = d.client()
    c.hello("big")
    ids, fds = c.lease(300)
    try:
        assert len(ids) == 300 and len(set(ids)) == 300
        assert len(fds) == 300 and len(set(fds)) == 300
        for k in (0, 1, 249, 250, 251, 299):
            mine, theirs = os.fstat(fds[k]), os.fstat(d.daemon.chunks[ids[k]].fd)
            assert mine.st_ino == theirs.st_ino, k
        st = d.status()
        assert st["leased_chunks"] == 300 and st["free_chunks"] == 20
        assert_balanced(st)
        with pytest.raises(DaemonError, match="the pool has 320 and this instance holds 300"):
            c.lease(21)
        # the connection is still in step after the batched reply and the refusal
        more, more_fds = c.lease(20)
        close_fds(more_fds)
        assert d.status()["free_chunks"] == 0
        c.release(ids + more)
    finally:
        close_fds(fds)
    st = d.status()
    assert st["free_chunks"] == total
    assert_balanced(st)


def test_malformed_json_gets_an_error_and_the_connection_lives(live):
    d = live()
    s = raw(d.path)
    s.send(b"{this is not json")
    reply, fds = protocol.recv(s)
    assert reply["ok"] is False and "JSON" in reply["error"] and fds == []
    s.send(b"[1, 2, 3]")
    reply, _ = protocol.recv(s)
    assert reply["ok"] is False and "object" in reply["error"]
    s.send(b'"just a string"')
    reply, _ = protocol.recv(s)
    assert reply["ok"] is False
    reply, _ = call(s, {"op": "status"})
    assert reply["ok"] is True and reply["total_chunks"] == 8
    reply, _ = call(s, {"op": "hello", "role": "instance", "model": "m"})
    assert reply["ok"] is True
    reply, fds = call(s, {"op": "lease", "chunks": 2})
    assert reply["ok"] is True and len(fds) == 2
    close_fds(fds)
    reply, _ = call(s, {"op": "release", "ids": reply["ids"]})
    assert reply["ok"] is True
    s.close()
    assert_balanced(d.status())


def test_non_integer_nfds_gets_an_error_and_the_connection_lives(live):
    """A non-integer nfds is answered with an error; the connection lives on."""
    d = live()
    s = raw(d.path)
    try:
        s.send(b'{"op": "status", "nfds": "x"}')
        reply, _ = protocol.recv(s)
        assert reply is not None, "the daemon closed the connection"
        assert reply["ok"] is False
        reply, _ = call(s, {"op": "status"})
        assert reply["ok"] is True
    finally:
        s.close()


def test_fds_a_client_sends_are_closed(live):
    """Nothing a client sends carries fds; the daemon must not keep them."""
    d = live()
    s = raw(d.path)
    r, w = os.pipe()
    try:
        socket.send_fds(s, [b'{"op": "status"}'], [w])
        os.close(w)
        reply, fds = protocol.recv(s)
        assert reply["ok"] is True and fds == []
        os.set_blocking(r, False)
        assert os.read(r, 1) == b"", "the daemon still holds the pipe's write end"
    finally:
        os.close(r)
        s.close()


def test_concurrent_leases_never_share_a_chunk(live):
    total = 12
    d = live(chunks=total)
    holding: dict[int, int] = {}  # chunk id -> client number, as the clients see it
    guard = threading.Lock()
    errors: list[str] = []

    def work(k: int) -> None:
        c = Client(d.path, timeout=10)
        try:
            c.hello(f"m{k}")
            rng = random.Random(k)
            for _ in range(40):
                try:
                    ids, fds = c.lease(rng.randint(1, 4))
                except DaemonError as e:
                    if "free" not in str(e):
                        errors.append(str(e))
                    continue
                close_fds(fds)
                with guard:
                    for i in ids:
                        if i in holding:
                            errors.append(f"chunk {i} granted to {k} while {holding[i]} holds it")
                        holding[i] = k
                time.sleep(0.001)  # hold them a moment, as an instance would
                with guard:
                    for i in ids:
                        del holding[i]
                c.release(ids)
        except Exception as e:  # reported below
            errors.append(repr(e))
        finally:
            c.close()

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors[:5]
    st = wait_for(lambda: (s := d.status())["instances"] == [] and s)
    assert st and st["free_chunks"] == total
    assert_balanced(st)


def test_unknown_op(live):
    d = live()
    s = raw(d.path)
    reply, _ = call(s, {"op": "hello", "role": "instance", "model": "m"})
    assert reply["ok"] is True
    reply, _ = call(s, {"op": "frobnicate"})
    assert reply["ok"] is False and "frobnicate" in reply["error"]
    reply, _ = call(s, {"no_op": 1})
    assert reply["ok"] is False
    reply, _ = call(s, {"op": "status"})
    assert reply["ok"] is True
    s.close()


def test_lease_before_hello_refused(live):
    d = live()
    s = raw(d.path)
    reply, fds = call(s, {"op": "lease", "chunks": 1})
    assert reply["ok"] is False and "hello" in reply["error"] and fds == []
    reply, _ = call(s, {"op": "release", "ids": [0]})
    assert reply["ok"] is False and "hello" in reply["error"]
    reply, _ = call(s, {"op": "state", "state": "awake"})
    assert reply["ok"] is False
    st = d.status()
    assert st["free_chunks"] == 8 and st["instances"] == []
    assert_balanced(st)
    s.close()


@pytest.mark.parametrize("chunks", ["3", 1.5, True, None, [1], -1, 0, 9])
def test_lease_of_a_bad_number_refused(live, chunks):
    d = live(chunks=8)
    s = raw(d.path)
    call(s, {"op": "hello", "role": "instance", "model": "m"})
    reply, fds = call(s, {"op": "lease", "chunks": chunks})
    assert reply["ok"] is False and reply["error"] and fds == []
    # the connection still works
    reply, fds = call(s, {"op": "lease", "chunks": 1})
    assert reply["ok"] is True and len(fds) == 1
    close_fds(fds)
    call(s, {"op": "release", "ids": reply["ids"]})
    st = d.status()
    assert st["free_chunks"] == 8
    assert_balanced(st)
    s.close()


def test_lease_beyond_pool_message_names_pool_size(live):
    d = live(chunks=4)
    c = d.client()
    c.hello("m")
    with pytest.raises(DaemonError, match="whole pool is 4 chunks"):
        c.lease(5)
    assert_balanced(d.status())


def test_release_of_another_instances_chunks_refused(live):
    d = live(chunks=6)
    a, b = d.client(), d.client()
    a.hello("a")
    b.hello("b")
    a_ids, a_fds = a.lease(2)
    b_ids, b_fds = b.lease(2)
    close_fds(a_fds + b_fds)
    before = d.status()
    with pytest.raises(DaemonError, match="does not hold"):
        a.release([b_ids[0]])
    with pytest.raises(DaemonError, match="does not hold"):
        a.release(a_ids + [b_ids[1]])  # all or nothing
    with pytest.raises(DaemonError):
        a.release([a_ids[0], a_ids[0]])
    for bad in ("0", [True], ["1"], [1.0], None):
        with pytest.raises(DaemonError, match="list of chunk ids"):
            a.call("release", ids=bad)
    after = d.status()
    by_model = {i["model"]: i["chunks"] for i in after["instances"]}
    assert by_model == {"a": 2, "b": 2}
    assert after["free_chunks"] == before["free_chunks"] == 2
    assert sorted(d.daemon.pool.held_by(d.daemon.pool.holder[b_ids[0]])) == sorted(b_ids)
    assert_balanced(after)
    a.release(a_ids)
    b.release(b_ids)
    st = d.status()
    assert st["free_chunks"] == 6
    assert_balanced(st)


def test_state_asleep_while_holding_chunks_refused(live):
    d = live(chunks=4)
    c = d.client()
    c.hello("m")
    c.set_state("awake")
    ids, fds = c.lease(2)
    close_fds(fds)
    with pytest.raises(DaemonError, match="holds chunks"):
        c.set_state("asleep")
    with pytest.raises(DaemonError, match="state is one of"):
        c.set_state("comatose")
    (me,) = d.status()["instances"]
    assert me["state"] == "awake" and me["chunks"] == 2 and me["sleeps"] == 0
    c.set_state("sleeping")
    c.release(ids)
    c.set_state("asleep")
    (me,) = d.status()["instances"]
    assert me["state"] == "asleep" and me["chunks"] == 0 and me["sleeps"] == 1
    assert_balanced(d.status())


def test_status_shows_instances(live):
    d = live(chunks=10)
    a, b = d.client(), d.client()
    a.hello("alpha")
    b.hello("beta")
    a_ids, fds = a.lease(3)
    close_fds(fds)
    a.set_state("awake")
    b_ids, fds = b.lease(1)
    close_fds(fds)
    b.set_state("sleeping")
    b.release(b_ids)
    b.set_state("asleep")
    b.set_state("waking")
    b_ids, fds = b.lease(2)
    close_fds(fds)
    b.set_state("awake", wake={"seconds": 0.5, "bytes": 123})
    st = d.status()
    assert st["device"] == "cpu" and st["chunk_size"] == CS and st["total_chunks"] == 10
    assert st["leased_chunks"] == 5 and st["free_chunks"] == 5
    rows = {i["model"]: i for i in st["instances"]}
    assert rows["alpha"]["chunks"] == 3 and rows["alpha"]["bytes"] == 3 * CS
    assert rows["alpha"]["state"] == "awake" and rows["alpha"]["wakes"] == 0
    assert rows["beta"]["chunks"] == 2 and rows["beta"]["bytes"] == 2 * CS
    assert rows["beta"]["state"] == "awake"
    assert rows["beta"]["wakes"] == 1 and rows["beta"]["sleeps"] == 1
    assert rows["beta"]["last_wake"] == {"seconds": 0.5, "bytes": 123}
    for row in rows.values():
        assert row["pid"] == os.getpid()
        assert abs(row["last_active"] - time.time()) < 60
    assert_balanced(st)
    a.release(a_ids)
    b.release(b_ids)
    assert d.status()["free_chunks"] == 10
    assert_balanced(d.status())


def test_instance_that_leaves_holding_nothing_is_forgotten(live):
    d = live(chunks=4)
    c = Client(d.path, timeout=10)
    c.hello("m")
    ids, fds = c.lease(2)
    close_fds(fds)
    c.release(ids)
    c.close()
    assert wait_for(lambda: d.status()["instances"] == [])
    assert_balanced(d.status())


def test_client_cannot_reach_missing_daemon(sock_path):
    with pytest.raises(DaemonError, match="no vllm-mux daemon is listening"):
        Client(sock_path)


# -- instances in other processes --

CHILD = """
import json, os, sys
import ctypes
from vllm_mux.daemon.client import Client
from vllm_mux.memory.cpu import Backend
from vllm_mux.memory.arena import Arena

path, n = sys.argv[1], int(sys.argv[2])
c = Client(path, timeout=10)
# claim to be someone else: the daemon must believe the kernel, not us
hello = c.call("hello", role="instance", model="child", pid=1)[0]
size = hello["chunk_size"]
ids, fds = c.lease(n) if n else ([], [])
b = Backend()
a = Arena(b, max(n, 1) * size, size)
a.map([b.import_(fd, size) for fd in fds])
if n:
    ctypes.memset(a.base, 0x5A, a.mapped)  # the chunks are in use
c.set_state("awake")
print(json.dumps({"pid": os.getpid(), "ids": ids, "instance": hello["instance"]}), flush=True)
for line in sys.stdin:
    if line.strip() == "close":
        c.close()  # leave the daemon, keep the chunks mapped
        print("closed", flush=True)
import time
time.sleep(120)
"""


def start_child(path: str, n: int, children: list) -> tuple[subprocess.Popen, dict]:
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, path, str(n)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_child_env(),
    )
    children.append(proc)
    line = proc.stdout.readline()
    if not line:
        proc.kill()
        raise AssertionError(f"child failed: {proc.stderr.read()}")
    return proc, json.loads(line)


def test_peer_pid_comes_from_the_kernel(live, children):
    d = live(chunks=4)
    proc, info = start_child(d.path, 0, children)
    assert info["pid"] == proc.pid != os.getpid()
    (row,) = d.status()["instances"]
    assert row["pid"] == proc.pid  # SO_PEERCRED, not the pid=1 the child claimed
    assert row["model"] == "child" and row["id"] == info["instance"]
    proc.kill()
    proc.wait(10)
    assert wait_for(lambda: d.status()["instances"] == [])
    assert_balanced(d.status())


def test_disconnected_instance_keeps_chunks_until_it_dies(live, children):
    total, n = 8, 3
    d = live(chunks=total)
    proc, info = start_child(d.path, n, children)
    st = d.status()
    (row,) = st["instances"]
    assert row["chunks"] == n and row["state"] == "awake" and row["pid"] == proc.pid
    assert sorted(d.daemon.pool.held_by(row["id"])) == sorted(info["ids"])
    proc.stdin.write("close\n")
    proc.stdin.flush()
    assert proc.stdout.readline().strip() == "closed"

    def disconnected():
        rows = d.status()["instances"]
        return rows and rows[0]["state"] == "disconnected"

    assert wait_for(disconnected), d.status()
    time.sleep(0.3)  # give a wrong early take-back the chance to happen
    st = d.status()
    (row,) = st["instances"]
    assert row["chunks"] == n and row["pid"] == proc.pid
    assert st["free_chunks"] == total - n
    assert_balanced(st)
    # the chunks are still the child's: nobody else can lease them
    other = d.client()
    other.hello("other")
    with pytest.raises(DaemonError, match=f"only {total - n} of {total}"):
        other.lease(total - n + 1)
    assert proc.poll() is None  # it really is alive, chunks mapped
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)

    def returned():
        s = d.status()
        return s["free_chunks"] == total and [i["model"] for i in s["instances"]] == ["other"]

    assert wait_for(returned, timeout=3), d.status()
    assert_balanced(d.status())
    ids, fds = other.lease(total)  # the whole pool is leasable again
    close_fds(fds)
    other.release(ids)
    assert_balanced(d.status())


def test_killed_connected_instance_chunks_come_back(live, children):
    total, n = 6, 4
    d = live(chunks=total)
    proc, info = start_child(d.path, n, children)
    st = d.status()
    assert st["free_chunks"] == total - n and st["instances"][0]["chunks"] == n
    assert_balanced(st)
    proc.kill()  # no wait(): the daemon must not depend on the child being reaped

    def returned():
        s = d.status()
        return s["free_chunks"] == total and s["instances"] == []

    assert wait_for(returned, timeout=3), d.status()
    proc.wait(10)
    assert_balanced(d.status())


def test_two_child_instances_hold_disjoint_chunks(live, children):
    d = live(chunks=8)
    p1, i1 = start_child(d.path, 3, children)
    p2, i2 = start_child(d.path, 4, children)
    assert not set(i1["ids"]) & set(i2["ids"])
    rows = {r["pid"]: r for r in d.status()["instances"]}
    assert rows[p1.pid]["chunks"] == 3 and rows[p2.pid]["chunks"] == 4
    assert_balanced(d.status())
    p1.kill()
    assert wait_for(lambda: d.status()["free_chunks"] == 4)
    (row,) = d.status()["instances"]
    assert row["pid"] == p2.pid and row["chunks"] == 4
    p2.kill()
    assert wait_for(lambda: d.status()["free_chunks"] == 8)
    assert_balanced(d.status())


# -- the command line --


def run_cli(*args, timeout=30):
    return subprocess.run(
        [sys.executable, "-m", "vllm_mux.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_child_env(),
    )


def test_cli_status_table_and_json(live):
    d = live(chunks=8, chunk_size=MIB)
    c = d.client()
    c.hello("tiny-model")
    ids, fds = c.lease(3)
    close_fds(fds)
    c.set_state("awake")
    r = run_cli("status", "--socket", d.path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "device cpu: 0.01 GiB in 8 chunks of 1 MiB, 0.00 GiB free"
    assert lines[1].startswith("host: ") and lines[1].endswith("in 0 (shared by 0 instances)")
    assert "MODEL" in lines[2] and "CHUNKS" in lines[2] and "RESIDENT" in lines[2]
    (row,) = [line for line in lines if "tiny-model" in line]
    fields = row.split()
    assert fields[1] == str(os.getpid())
    assert fields[3] == "awake" and fields[4] == "3"

    r = run_cli("status", "--socket", d.path, "--json")
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert st["total_chunks"] == 8 and st["leased_chunks"] == 3 and st["free_chunks"] == 5
    (inst,) = st["instances"]
    assert inst["model"] == "tiny-model" and inst["chunks"] == 3 and inst["bytes"] == 3 * MIB
    assert inst["pid"] == os.getpid()
    assert_balanced(st)
    c.release(ids)
    assert_balanced(d.status())


def test_cli_status_without_daemon(sock_path):
    for extra in ([], ["--json"]):
        r = run_cli("status", "--socket", sock_path, *extra)
        assert r.returncode == 1
        assert "no daemon answers at" in r.stderr
        assert r.stdout == ""


def test_cli_daemon_serves_and_exits_on_sigterm(sock_path):
    """`vllm-mux daemon` answers, and SIGTERM makes it exit 0 and remove its socket.

    Fails while Daemon.shutdown does not wake serve_forever's accept() (see
    test_serve_forever_returns_after_shutdown).
    """
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vllm_mux.cli",
            "daemon",
            "--device-memory",
            "1MiB",
            "--chunk-size",
            "64KiB",
            "--socket",
            sock_path,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_child_env(),
    )
    try:
        assert wait_for(lambda: os.path.exists(sock_path) or proc.poll() is not None, 20)
        assert proc.poll() is None, proc.communicate()[1]
        assert stat.S_IMODE(os.stat(sock_path).st_mode) == 0o600
        r = run_cli("status", "--socket", sock_path, "--json")
        assert r.returncode == 0, r.stderr
        st = json.loads(r.stdout)
        assert st["total_chunks"] == 16 and st["chunk_size"] == 64 * KIB
        assert_balanced(st)
        # a second daemon on the same socket refuses to start
        r = run_cli(
            "daemon", "--device-memory", "1MiB", "--chunk-size", "64KiB", "--socket", sock_path
        )
        assert r.returncode != 0 and "already listening" in r.stderr
        assert os.path.exists(sock_path)
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(5)
        except subprocess.TimeoutExpired:
            rc = None
        assert not os.path.exists(sock_path)
        assert rc == 0, "the daemon did not exit on SIGTERM"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


@pytest.mark.parametrize(
    "text, size",
    [
        ("8GiB", 8 << 30),
        ("512MiB", 512 << 20),
        ("512M", 512 << 20),
        ("512mb", 512 << 20),
        ("1.5g", 3 << 29),
        ("4096", 4096),
        ("64KiB", 64 << 10),
        ("2T", 2 << 40),
        (" 8 GiB ", 8 << 30),
    ],
)
def test_parse_size(text, size):
    assert cli.parse_size(text) == size


@pytest.mark.parametrize("text", ["", "GiB", "8XB", "-1", "1e9", "8 GiB of memory", "8.G", "abc"])
def test_parse_size_rejects(text):
    with pytest.raises(argparse.ArgumentTypeError, match="not a size"):
        cli.parse_size(text)


def test_cli_rejects_bad_size_argument(sock_path):
    r = run_cli("daemon", "--device-memory", "lots", "--socket", sock_path)
    assert r.returncode == 2 and "not a size" in r.stderr
    assert not os.path.exists(sock_path)
