"""A daemon that dies while instances hold chunks, and the daemon started after
it on the same socket, without vLLM: the instances serve on and reconnect, the
new daemon makes only the chunks nobody holds and takes the others back from
their holders (the same memory), and the books balance again.

The first daemon is a process of its own, SIGKILLed; the one after it runs in
this process, with a backend that counts the chunks it makes, so that its
chunks can be compared with the instances' (same memfd, same memory)."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pytest
import torch

from conftest import LiveDaemon, assert_books_balance
from vllm_mux import instance as instance_module
from vllm_mux.daemon import protocol
from vllm_mux.daemon.client import Client, DaemonError, reconnect
from vllm_mux.instance import Instance
from vllm_mux.launch import start_daemon
from vllm_mux.memory.cpu import Backend

CHUNK = 1 << 20
TOTAL = 8


def wait_for(predicate, timeout: float = 120.0):
    """``predicate()``'s first true value; the timeout only bounds a failure."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return value


class Counting(Backend):
    """The cpu backend, counting the chunks it creates."""

    def __init__(self):
        super().__init__()
        self.made = 0

    def create(self, size):
        self.made += 1
        return super().create(size)


@pytest.fixture
def restart(tmp_path):
    """``first()``: a daemon process of TOTAL chunks; ``kill()`` SIGKILLs it;
    ``second()``: the daemon after it, in this process, on the same socket.
    ``instance(model)``: an Instance, closed at the end."""
    path = os.path.join(tempfile.mkdtemp(prefix="vmux"), "d.sock")
    procs, lives, instances = [], [], []

    class Restart:
        socket = path

        def first(self):
            log = tmp_path / f"daemon{len(procs)}.log"
            procs.append(start_daemon(path, f"{TOTAL}MiB", log, args=["--chunk-size", f"{CHUNK}"]))
            return procs[-1]

        def kill(self):
            procs[-1].proc.kill()
            procs[-1].proc.wait()

        def second(self, chunks=TOTAL, host_memory=None):
            backend = Counting()
            lives.append(
                LiveDaemon(
                    path, chunks, CHUNK, wait_timeout=1, backend=backend, host_memory=host_memory
                )
            )
            return lives[-1], backend

        def instance(self, model: str) -> Instance:
            instances.append(Instance(path, model, key=model))
            return instances[-1]

    yield Restart()
    for inst in instances:
        inst.client.close()
    for p in procs:
        p.stop()
    for live in lives:
        live.stop()
        for chunk in live.daemon.chunks:
            if chunk is not None:
                os.close(chunk.fd)


def loaded(inst: Instance, mib: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights of ``mib`` MiB in the instance's arena, and a copy of them."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(int(mib * (1 << 18)), generator=g)
    expected = t.clone()
    inst.adopt_weights([t])
    return t, expected


def rows(status: dict) -> dict:
    return {i["model"]: i for i in status["instances"]}


def reconnected(daemon: LiveDaemon, *models: str) -> dict | None:
    """The status once every one of ``models`` is connected again."""
    status = daemon.status()
    states = {m: r["state"] for m, r in rows(status).items()}
    ok = all(states.get(m) not in (None, "disconnected") for m in models)
    return status if ok else None


def same_memory(daemon: LiveDaemon, inst: Instance) -> bool:
    """Each chunk the instance maps is the daemon's chunk of that id: one memfd."""
    pairs = [
        (i, c) for a in (inst.weights, inst.kv_cache) for i, c in zip(inst.leases[id(a)], a.chunks)
    ]
    return bool(pairs) and all(
        os.fstat(daemon.daemon.chunks[i].fd).st_ino == os.fstat(c.fd).st_ino for i, c in pairs
    )


def test_a_restarted_daemon_makes_only_the_free_chunks_and_takes_back_the_rest(restart):
    restart.first()
    a, b = restart.instance("a"), restart.instance("b")
    ta, ea = loaded(a, 2.5, seed=1)  # 3 chunks
    tb, eb = loaded(b, 1.5, seed=2)  # 2 chunks
    restart.kill()

    # Both keep their memory: the bytes are still there, at the same place.
    assert torch.equal(ta, ea) and torch.equal(tb, eb)
    daemon, backend = restart.second()
    assert backend.made == TOTAL - 5  # only the chunks nobody holds
    status = wait_for(lambda: reconnected(daemon, "a", "b"))
    assert status, daemon.status()
    assert_books_balance(status)
    assert {m: r["chunks"] for m, r in rows(status).items()} == {"a": 3, "b": 2}
    assert (status["leased_chunks"], status["free_chunks"]) == (5, 3)
    assert backend.made == TOTAL - 5  # taken back, not made anew
    assert same_memory(daemon, a) and same_memory(daemon, b)
    assert torch.equal(ta, ea) and torch.equal(tb, eb)

    # No chunk goes to two: a newcomer gets the three free ones, and no more.
    c = restart.instance("c")
    c.alloc(c.weights, 3 * CHUNK)
    held = [set(i.leases[id(i.weights)]) for i in (a, b, c)]
    assert sum(map(len, held)) == TOTAL and len(set().union(*held)) == TOTAL
    d = restart.instance("d")
    with pytest.raises(DaemonError, match="waited 1 s"):
        d.alloc(d.weights, CHUNK)
    assert_books_balance(daemon.status())

    # Sleep and wake go on as before, with the same bytes.
    c.sleep()
    a.sleep()
    assert rows(daemon.status())["a"]["chunks"] == 0
    a.wake()
    assert torch.equal(ta, ea) and same_memory(daemon, a)
    status = daemon.status()
    assert_books_balance(status)
    assert {m: r["chunks"] for m, r in rows(status).items()} == {"a": 3, "b": 2, "c": 0, "d": 0}


def test_an_instance_that_sleeps_while_the_daemon_is_away(restart):
    restart.first()
    a = restart.instance("a")
    ta, ea = loaded(a, 2.5, seed=3)
    restart.kill()
    a.sleep()  # no daemon to tell: it unmaps and lets its chunks go
    assert a.asleep and a.weights.mapped == 0
    daemon, backend = restart.second()
    assert backend.made == TOTAL - 3  # the books still gave a its 3
    status = wait_for(lambda: reconnected(daemon, "a"))
    assert status, daemon.status()
    assert rows(status)["a"]["state"] == "asleep" and rows(status)["a"]["chunks"] == 0
    assert status["free_chunks"] == TOTAL and backend.made == TOTAL  # made anew
    assert_books_balance(status)
    a.wake()
    assert torch.equal(ta, ea)
    assert_books_balance(daemon.status())
    assert rows(daemon.status())["a"]["chunks"] == 3


def test_a_wake_while_the_daemon_is_away_waits_for_it(restart):
    restart.first()
    a = restart.instance("a")
    ta, ea = loaded(a, 2.5, seed=4)
    a.sleep()
    restart.kill()
    errors = []

    def wake():
        try:
            a.wake()
        except Exception as e:
            errors.append(e)

    waking = threading.Thread(target=wake)
    waking.start()
    waking.join(1.0)
    assert waking.is_alive() and a.asleep  # it cannot wake without a daemon
    daemon, _ = restart.second()
    waking.join(120)
    assert not waking.is_alive() and errors == []
    assert not a.asleep and torch.equal(ta, ea)
    status = daemon.status()
    assert_books_balance(status)
    assert rows(status)["a"]["state"] == "awake" and rows(status)["a"]["chunks"] == 3


def test_a_wake_fails_when_the_daemon_stays_away(restart, monkeypatch):
    restart.first()
    a = restart.instance("a")
    ta, ea = loaded(a, 2.5, seed=5)
    a.sleep()
    restart.kill()
    monkeypatch.setattr(instance_module, "GAP_WAIT_S", 0.5)
    with pytest.raises(DaemonError, match="has not come back in 0.5 s"):
        a.wake()
    assert a.asleep and a.weights.mapped == 0  # the 503 path: asleep, holding nothing
    daemon, _ = restart.second()
    assert wait_for(lambda: reconnected(daemon, "a"))
    a.wake()  # the next request's wake goes through
    assert torch.equal(ta, ea)
    assert_books_balance(daemon.status())


def test_an_instance_gives_up_after_its_reconnect_time(restart, monkeypatch):
    monkeypatch.setenv("VLLM_MUX_RECONNECT_S", "0.5")
    restart.first()
    a = restart.instance("a")
    loaded(a, 1, seed=6)
    a.sleep()
    restart.kill()
    assert wait_for(lambda: a.lost)
    assert "did not come back in 0.5 s" in a.lost
    with pytest.raises(DaemonError, match="did not come back"):
        a.wake()


HOLDER = """
import json, sys, time
from vllm_mux.daemon.client import Client
from vllm_mux.memory.arena import Arena
from vllm_mux.memory.cpu import Backend

# A worker that holds mapped chunks and never reconnects.
c = Client(sys.argv[1])
size = c.hello("holder", key=sys.argv[2])["chunk_size"]
ids, fds = c.lease(int(sys.argv[3]))
b = Backend()
a = Arena(b, len(ids) * size, size)
a.map([b.import_(fd, size) for fd in fds])
print(json.dumps(ids), flush=True)
time.sleep(600)
"""


def holder(path: str, key: str, n: int) -> tuple[subprocess.Popen, list[int]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, path, key, str(n)], stdout=subprocess.PIPE, text=True
    )
    return proc, json.loads(proc.stdout.readline())


def test_the_chunks_of_a_holder_that_dies_are_made_anew(restart):
    restart.first()
    early, _ = holder(restart.socket, "early", 2)
    late, late_ids = holder(restart.socket, "late", 3)
    try:
        restart.kill()
        early.kill()  # dies while there is no daemon: the kernel frees its chunks
        early.wait()
        daemon, backend = restart.second()
        assert backend.made == TOTAL - 3  # the live holder's chunks are not made
        status = daemon.status()
        (row,) = status["instances"]  # the dead one is not on the books
        assert (row["pid"], row["state"], row["chunks"]) == (late.pid, "disconnected", 3)
        assert_books_balance(status)
        assert sorted(daemon.daemon.pool.held_by(row["id"])) == sorted(late_ids)
        late.kill()  # dies without reconnecting: its chunks come back, made anew
        late.wait()
        status = wait_for(lambda: (s := daemon.status())["instances"] == [] and s)
        assert status and status["free_chunks"] == TOTAL and backend.made == TOTAL
        assert_books_balance(status)
        assert all(chunk is not None for chunk in daemon.daemon.chunks)
    finally:
        for p in (early, late):
            p.kill()
            p.wait()
            p.stdout.close()


def books_file(path: str, holders: list[dict], total: int = 4) -> None:
    books = {"device_identity": "cpu", "chunk_size": CHUNK, "total_chunks": total}
    fd = os.open(f"{path}.books", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({**books, "holders": holders}, f)


def me(ids: list[int], started: int | None = None) -> dict:
    """This process as a holder, by its real start time unless told another."""
    with open(f"/proc/{os.getpid()}/stat", "rb") as f:
        real = int(f.read().rsplit(b")", 1)[1].split()[19])
    return {"pid": os.getpid(), "started": real if started is None else started, "key": "k",
            "model": "m", "ids": ids}  # fmt: skip


def test_a_pid_that_now_names_another_process_holds_nothing(restart):
    books_file(restart.socket, [me([0, 1], started=1)])  # not when we started
    daemon, backend = restart.second(chunks=4)
    assert backend.made == 4
    status = daemon.status()
    assert status["instances"] == [] and status["free_chunks"] == 4


def test_books_that_do_not_fit_this_pool_are_refused(restart):
    books_file(restart.socket, [me([0, 1])], total=6)  # a live holder, another pool
    with pytest.raises(RuntimeError, match="start the daemon with the same"):
        restart.second(chunks=4)
    assert not os.path.exists(restart.socket)
    assert os.path.exists(f"{restart.socket}.books")  # nothing lost


@pytest.mark.parametrize("text", ["{not json", '{"holders": 3}'])
def test_books_that_do_not_read_are_refused(restart, text):
    with open(f"{restart.socket}.books", "w") as f:
        f.write(text)
    os.chmod(f"{restart.socket}.books", 0o600)
    with pytest.raises(RuntimeError, match="do not read.*remove the file"):
        restart.second(chunks=4)
    with open(f"{restart.socket}.books") as f:
        assert f.read() == text  # nothing lost


def test_books_another_user_could_write_are_refused(restart):
    books_file(restart.socket, [])
    os.chmod(f"{restart.socket}.books", 0o644)
    with pytest.raises(RuntimeError, match="not a private file of this user"):
        restart.second(chunks=4)


def test_a_daemon_keeps_its_books_beside_its_socket(restart):
    daemon, _ = restart.second(chunks=4)
    c = Client(restart.socket)
    c.hello("m", key="k")
    ids, fds = c.lease(2)
    with open(f"{restart.socket}.books") as f:
        books = json.load(f)
    (row,) = books["holders"]
    assert (row["pid"], row["key"], sorted(row["ids"])) == (os.getpid(), "k", sorted(ids))
    assert os.stat(f"{restart.socket}.books").st_mode & 0o777 == 0o600
    c.release(ids)
    protocol.close_fds(fds)
    with open(f"{restart.socket}.books") as f:
        assert json.load(f)["holders"] == []
    c.close()


def test_chunks_claimed_without_a_record_are_refused_and_closed(restart):
    daemon, _ = restart.second(chunks=4)
    c = Client(restart.socket)
    memfd = Backend().create(CHUNK).fd
    r, w = os.pipe()
    for fd, error in ((memfd, "no record"), (w, "is not one")):
        with pytest.raises(DaemonError, match=error):
            c.hello("m", key="k", state="awake", held=[0], fds=[fd])
    os.close(w)
    assert os.read(r, 1) == b""  # the daemon kept no copy of the write end
    os.close(r)
    with pytest.raises(DaemonError, match="brings 0 fds"):
        c.hello("m", key="k", held=[0])
    status = daemon.status()
    assert status["instances"] == [] and status["free_chunks"] == 4
    os.close(memfd)
    c.close()


def test_serve_starts_its_daemon_again(tmp_path):
    """``vllm-mux serve``'s keeper of the daemon: SIGKILL it, and a new one
    listens on the same socket, where the instance's chunks are taken back."""
    from vllm_mux.config import Config
    from vllm_mux.serve import DaemonKeeper

    path = os.path.join(tempfile.mkdtemp(prefix="vmux"), "d.sock")
    config = Config(models=[], device_memory=f"{TOTAL}MiB", chunk_size=f"{CHUNK}")
    stopping, lock = threading.Event(), threading.Lock()
    keeper = DaemonKeeper(config, path, tmp_path, stopping, lock)
    assert keeper.start()
    threading.Thread(target=keeper.watch, daemon=True).start()
    a = None
    try:
        a = Instance(path, "a", key="a")
        ta, ea = loaded(a, 2.5, seed=8)
        first = keeper.process.pid
        os.kill(first, signal.SIGKILL)

        def back() -> dict | None:
            if keeper.process.pid == first or not keeper.process.alive():
                return None
            try:
                c = Client(path)
            except DaemonError:
                return None
            try:
                status = c.status()
            finally:
                c.close()
            row = rows(status).get("a")
            return status if row and row["state"] != "disconnected" else None

        status = wait_for(back)
        assert status, keeper.process.log()
        assert_books_balance(status)
        assert rows(status)["a"]["chunks"] == 3 and status["free_chunks"] == TOTAL - 3
        assert keeper.starts == 2 and (tmp_path / "daemon.1.log").exists()
        a.sleep()
        a.wake()
        assert torch.equal(ta, ea)
    finally:
        if a is not None:
            a.client.close()
        with lock:
            stopping.set()
        keeper.process.stop()


def test_the_daemon_command_refuses_books_it_cannot_read_in_one_line(restart):
    with open(f"{restart.socket}.books", "w") as f:
        f.write("{not json")
    os.chmod(f"{restart.socket}.books", 0o600)
    done = subprocess.run(
        [sys.executable, "-m", "vllm_mux.cli", "daemon", "--device-memory", "4MiB"]
        + ["--chunk-size", "1MiB", "--socket", restart.socket],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    (line,) = done.stderr.splitlines()
    assert line.startswith("vllm-mux daemon: the daemon's books at") and "remove the file" in line
    assert not os.path.exists(restart.socket)


def _cuda() -> bool:
    try:
        import cuda.bindings.driver  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def status_of(path: str) -> dict | None:
    try:
        c = Client(path)
    except DaemonError:
        return None
    try:
        return c.status()
    finally:
        c.close()


@pytest.mark.skipif(not _cuda(), reason="needs an NVIDIA GPU and cuda-bindings")
def test_on_cuda_held_chunks_live_through_the_instances_handles(tmp_path):
    """The same restart on a GPU: the instance's imported handles keep its
    chunks alive when the daemon dies; it re-exports them to the next daemon,
    which makes only the free ones."""
    chunk = 64 << 20
    path = os.path.join(tempfile.mkdtemp(prefix="vmux"), "d.sock")
    pool, args = str(4 * chunk), ["--chunk-size", str(chunk)]
    procs = [start_daemon(path, pool, tmp_path / "first.log", device="cuda", args=args)]
    instances = []
    try:
        a = Instance(path, "a", key="a")
        instances.append(a)
        w = torch.randn(3 * chunk // 8, device="cuda")  # 1.5 chunks of float32: 2 chunks
        expected = w.cpu()
        a.adopt_weights([w])
        procs[0].proc.kill()
        procs[0].proc.wait()
        assert torch.equal(w.cpu(), expected)  # alive through our handles alone
        procs.append(start_daemon(path, pool, tmp_path / "second.log", device="cuda", args=args))

        def back():
            status = status_of(path)
            row = rows(status).get("a") if status else None
            return status if row and row["state"] != "disconnected" else None

        status = wait_for(back, timeout=60)
        assert status, procs[1].log()
        assert_books_balance(status)
        assert rows(status)["a"]["chunks"] == 2 and status["free_chunks"] == 2
        assert "1 live instances hold 2 chunks; made the other 2" in procs[1].log()
        b = Instance(path, "b", key="b")
        instances.append(b)
        b.alloc(b.weights, 2 * chunk).fill_(255)  # the two others: not a's
        torch.cuda.synchronize()
        assert torch.equal(w.cpu(), expected)
        b.sleep()
        a.sleep()
        a.wake()
        assert torch.equal(w.cpu(), expected)
        assert_books_balance(status_of(path))
    finally:
        for inst in instances:
            inst.client.close()
        for p in procs:
            p.stop()


@pytest.mark.parametrize("budget", [None, CHUNK], ids=["room", "no room"])
def test_a_restarted_daemon_takes_the_host_copies_over_or_the_model_goes_cold(restart, budget):
    """Two instances share one host copy the first daemon made; the daemon
    after it puts that copy (the same memfd) on its books with both users, or,
    with no room in its budget, both let it go: the asleep one wakes cold."""
    restart.first()
    a, b = restart.instance("a"), restart.instance("b")
    ta, expected = loaded(a, 2.5, seed=1)
    loaded(b, 2.5, seed=1)
    a.sleep()
    inode = os.fstat(a._host.fd).st_ino
    restart.kill()
    daemon, _ = restart.second(host_memory=budget)

    def handed_over() -> dict | None:  # each says hello, then hands its copy over
        status = reconnected(daemon, "a", "b")
        if not status:
            return None
        if budget is None:
            copies = status["host_copies"]
            return status if len(copies) == 1 and len(copies[0]["users"]) == 2 else None
        return status if a.host is None and b.host is None else None

    status = wait_for(handed_over)
    assert status, daemon.status()
    assert_books_balance(status)
    if budget is None:
        (copy,) = status["host_copies"]
        assert sorted(copy["users"]) == sorted([a.id, b.id]) and copy["sealed"]
        assert os.fstat(daemon.daemon.host_fds[copy["digest"]]).st_ino == inode
    else:
        assert status["host_copies"] == [] and a.host is None and b.host is None
        a.reload = lambda: ta.copy_(expected)
    client = Client(restart.socket)
    client.hello("thief", key="thief")
    ids, fds = client.lease(TOTAL - len(b.leases[id(b.weights)]))  # every chunk a slept on
    protocol.close_fds(fds)
    client.release(ids)
    client.close()
    a.wake()  # from the copy handed over, or from the "files"
    assert a.last_wake["tier"] == ("host" if budget is None else "cold")
    assert torch.equal(ta, expected)
    assert_books_balance(daemon.status())


def test_a_copy_handed_over_after_another_of_the_same_bytes_is_swapped_for_it(restart):
    """An instance with the same weights starts on the new daemon before the
    old holder reconnects: the holder maps the new daemon's copy instead of
    keeping its own, so the bytes are in host memory once (review finding:
    twice, one of them off the books)."""
    restart.first()
    a = restart.instance("a")
    ta, expected = loaded(a, 2.5, seed=1)
    gate, rejoin = threading.Event(), a._rejoin
    a._rejoin = lambda client: gate.wait() and rejoin(client)
    restart.kill()
    daemon, _ = restart.second()
    c = restart.instance("c")
    loaded(c, 2.5, seed=1)  # the same bytes: a copy of this daemon's
    gate.set()

    def swapped() -> dict | None:
        status = reconnected(daemon, "a", "c")
        copies = status["host_copies"] if status else []
        return status if len(copies) == 1 and len(copies[0]["users"]) == 2 else None

    status = wait_for(swapped)
    assert status, daemon.status()
    assert_books_balance(status)
    with a._lock:  # its hand-over, under this lock, is done: the daemon's books said so first
        pass
    ours = os.fstat(daemon.daemon.host_fds[a.digest]).st_ino
    assert os.fstat(a._host.fd).st_ino == os.fstat(c._host.fd).st_ino == ours
    a.sleep()
    client = Client(restart.socket)
    client.hello("thief", key="thief")
    ids, fds = client.lease(TOTAL - len(c.leases[id(c.weights)]))
    protocol.close_fds(fds)
    client.release(ids)
    client.close()
    a.wake()
    assert a.last_wake["tier"] == "host" and torch.equal(ta, expected)


def test_a_daemon_that_answers_and_refuses_is_not_said_to_be_gone(tmp_path):
    daemon = LiveDaemon(str(tmp_path / "r.sock"), 4, CHUNK)

    def refused(client):
        raise DaemonError("hello names chunks [3] that instance 1 does not hold")

    try:
        with pytest.raises(DaemonError, match="refused to take us back for 0.3 s .*chunks"):
            reconnect(daemon.path, refused, 0.3)
    finally:
        daemon.stop()
