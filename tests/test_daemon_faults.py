"""The daemon under faults (issue 8): big pools, squatters, fd floods, fd leaks,
big replies and controllers that answer wrongly. Each test failed on the code
before its fix."""

import os
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time

import msgspec
import pytest

from conftest import LiveDaemon, assert_books_balance
from vllm_mux import daemon as daemon_pkg
from vllm_mux.daemon import protocol
from vllm_mux.daemon.client import Client, DaemonError
from vllm_mux.daemon.server import Daemon
from vllm_mux.memory.cpu import Backend

PAGE = 4096  # the cpu backend's granularity: the smallest chunk, the cheapest big pool
CS = 64 << 10
NOBODY = 65534
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")


def wait_for(predicate, timeout=30.0):
    """Poll until ``predicate()`` is truthy; its last value. The timeout only
    bounds a failure: no test depends on how fast a busy machine is."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()) and time.monotonic() < deadline:
        time.sleep(0.02)
    return value


def short_dir() -> str:
    """A fresh 0700 directory with a path short enough for a socket."""
    return tempfile.mkdtemp(prefix="vmux")


@pytest.fixture
def path():
    return os.path.join(short_dir(), "d.sock")


@pytest.fixture
def live(path):
    started = []

    def start(chunks=8, chunk_size=CS, wait_timeout=0.5):
        d = LiveDaemon(path, chunks, chunk_size, wait_timeout=wait_timeout)
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop()
        for chunk in d.daemon.chunks:
            os.close(chunk.fd)


def raw(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(30)
    s.connect(path)
    return s


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def held_elsewhere(r: int) -> bool:
    """Whether someone still holds the write end of the pipe whose read end is
    ``r`` (our own write end already closed): no EOF yet."""
    os.set_blocking(r, False)
    try:
        return os.read(r, 1) != b""
    except BlockingIOError:
        return True


class FakeInstance:
    """A worker that leases in batches (closing the fds: the books are what
    counts) and a controller that answers like controller.py; on "sleep" it
    releases everything and says asleep."""

    def __init__(self, path: str, model: str):
        self.worker = Client(path, timeout=60)
        self.worker.hello(model, key=model)
        self.ids: list[int] = []
        self.asked = 0
        self.control = raw(path)
        hello = {"op": "hello", "role": "controller", "key": model, "idle_ttl": 0}
        protocol.send(self.control, hello)
        assert protocol.recv(self.control)[0]["ok"]
        self.answers = threading.Thread(target=self._answer, daemon=True)
        self.answers.start()

    def lease(self, n: int, batch: int = 500) -> None:
        while n > 0:
            ids, fds = self.worker.lease(min(n, batch))
            for fd in fds:
                os.close(fd)
            self.ids += ids
            n -= len(ids)
        self.worker.set_state("awake")

    def _sleep(self) -> None:
        self.worker.set_state("sleeping")
        self.worker.release(self.ids)
        self.ids = []
        self.worker.set_state("asleep")

    def _answer(self) -> None:
        while True:
            try:
                message, fds = protocol.recv(self.control)
            except OSError:
                return
            if message is None:
                return
            reply = {"ok": True, "state": "awake", "draining": False, "in_flight": 0}
            reply |= {"waiting": 0, "last_active": 0.0}
            if message["op"] == "sleep":
                self.asked += 1
                threading.Thread(target=self._sleep).start()
            protocol.send(self.control, {**reply, "seq": message["seq"]})

    def close(self) -> None:
        self.worker.close()
        self.control.close()


# -- 1. pools of thousands of chunks --

BIG = 4096  # chunks: every pidfd the daemon opens is numbered above 4095


def test_big_pool_lease_that_does_not_fit_asks_others_to_sleep(live):
    """select() refused fds above 1023: the lease failed at once, nobody asked."""
    d = live(chunks=BIG, chunk_size=PAGE, wait_timeout=60)
    holder = FakeInstance(d.path, "holder")
    holder.lease(BIG - 50)
    other = d.client()
    other.hello("other")
    ids, fds = other.lease(200)  # 50 free: the holder must sleep first
    for fd in fds:
        os.close(fd)
    assert holder.asked >= 1 and len(ids) == 200
    st = wait_for(lambda: (s := d.status())["instances"][0]["state"] == "asleep" and s)
    assert st["free_chunks"] == BIG - 200
    assert_books_balance(st)
    other.release(ids)
    holder.close()


CHILD = """
import sys, time
from vllm_mux.daemon.client import Client
c = Client(sys.argv[1], timeout=60)
c.hello("child")
for _ in range(int(sys.argv[2]) // 500):
    ids, fds = c.lease(500)
    for fd in fds:
        __import__("os").close(fd)
print("leased", flush=True)
time.sleep(600)
"""


def test_big_pool_dead_instance_chunks_come_back(live, children):
    """select() refused the dead instance's pidfd: its chunks never came back."""
    d = live(chunks=BIG, chunk_size=PAGE)
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, d.path, "4000"], stdout=subprocess.PIPE, text=True
    )
    children.append(child)
    assert child.stdout.readline() == "leased\n"
    assert d.status()["free_chunks"] == BIG - 4000
    child.kill()
    st = wait_for(lambda: (s := d.status())["free_chunks"] == BIG and s)
    assert st and st["instances"] == [], d.status()
    assert_books_balance(st)


LIMITS = """
import resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]), int(sys.argv[2])))
from vllm_mux.daemon.server import Daemon
from vllm_mux.memory.cpu import Backend
try:
    Daemon(Backend(), "cpu", int(sys.argv[3]) * 4096, 4096, sys.argv[4])
except ValueError as e:
    print(e)
    sys.exit(3)
print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
"""


def run_with_limits(soft: int, hard: int, chunks: int, path: str):
    argv = [sys.executable, "-c", LIMITS, str(soft), str(hard), str(chunks), path]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


def test_soft_fd_limit_is_raised_to_what_the_pool_needs(path):
    """2,048 chunks under a soft limit of 1,024: EMFILE while creating the pool."""
    r = run_with_limits(1024, 8192, 2048, path)
    assert r.returncode == 0, r.stderr
    assert 2048 < int(r.stdout) <= 8192


def test_hard_fd_limit_too_low_is_refused_with_a_message(path):
    r = run_with_limits(1024, 1024, 2048, path)
    assert r.returncode == 3, r.stderr  # not an OSError traceback
    assert "2048 chunks" in r.stdout and "1024" in r.stdout and "--chunk-size" in r.stdout


# -- 2. who listens, and where --


def test_default_socket_is_in_the_users_runtime_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("VLLM_MUX_SOCKET", raising=False)
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    assert daemon_pkg.default_socket() == str(runtime / "vllm-mux.sock")


@pytest.mark.parametrize("xdg", [None, "", "relative", "open", "missing"])
def test_default_socket_falls_back_to_a_private_dir_of_the_user(monkeypatch, tmp_path, xdg):
    monkeypatch.delenv("VLLM_MUX_SOCKET", raising=False)
    (tmp_path / "open").mkdir(mode=0o755)  # others may read it: not private
    values = {None: None, "": "", "relative": "run/user"}
    value = values.get(xdg, str(tmp_path / str(xdg)))
    if value is None:
        monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    else:
        monkeypatch.setenv("XDG_RUNTIME_DIR", value)
    expected = f"/tmp/vllm-mux-{os.geteuid()}/vllm-mux.sock"
    assert daemon_pkg.default_socket() == expected


def test_vllm_mux_socket_wins(monkeypatch):
    monkeypatch.setenv("VLLM_MUX_SOCKET", "/somewhere/else.sock")
    assert daemon_pkg.default_socket() == "/somewhere/else.sock"


def fallback(monkeypatch) -> str:
    """Point the fallback directory into a fresh sticky, world-writable
    directory, like /tmp; its path."""
    base = short_dir()
    os.chmod(base, 0o1777)
    monkeypatch.setattr(daemon_pkg, "TMP", base)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.delenv("VLLM_MUX_SOCKET", raising=False)
    return os.path.join(base, f"vllm-mux-{os.geteuid()}")


def test_daemon_makes_the_private_fallback_dir(monkeypatch):
    private = fallback(monkeypatch)
    path = daemon_pkg.default_socket()
    assert os.path.dirname(path) == private
    d = LiveDaemon(path, 2, CS)
    try:
        st = os.lstat(private)
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700
        assert st.st_uid == os.geteuid()
        assert d.status()["total_chunks"] == 2
    finally:
        d.stop()


@pytest.mark.parametrize("kind", ["symlink", "open", "file"])
def test_daemon_refuses_a_fallback_dir_that_is_not_private(monkeypatch, kind):
    private = fallback(monkeypatch)
    if kind == "symlink":  # someone else's directory behind our name
        os.symlink(short_dir(), private)
    elif kind == "open":
        os.mkdir(private)
        os.chmod(private, 0o777)
    else:
        open(private, "w").close()
    d = Daemon(Backend(), "cpu", 2 * CS, CS, daemon_pkg.default_socket())
    with pytest.raises(RuntimeError, match="not a private directory"):
        d.listen()
    assert not os.path.exists(os.path.join(private, "vllm-mux.sock"))


def test_daemon_refuses_a_dir_others_can_write_without_the_sticky_bit():
    directory = short_dir()
    os.chmod(directory, 0o777)
    d = Daemon(Backend(), "cpu", 2 * CS, CS, os.path.join(directory, "d.sock"))
    with pytest.raises(RuntimeError, match="other users can write"):
        d.listen()
    assert os.listdir(directory) == []


def test_daemon_accepts_a_sticky_world_writable_dir():
    """/tmp/vllm-mux.sock is allowed: others cannot remove or replace our socket."""
    directory = short_dir()
    os.chmod(directory, 0o1777)
    d = LiveDaemon(os.path.join(directory, "d.sock"), 2, CS)
    try:
        assert d.status()["total_chunks"] == 2
    finally:
        d.stop()


LISTENER = """
import os, socket, sys
os.setgid(65534)
os.setuid(65534)
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.bind(sys.argv[1])
s.listen(8)
print("listening", flush=True)
while True:
    c, _ = s.accept()
    print("got", c.recv(4096), flush=True)
"""


@root_only
def test_client_refuses_a_listener_of_another_user(children):
    """Another user who binds the path first got the instance's name and key."""
    directory = short_dir()
    os.chmod(directory, 0o1777)
    path = os.path.join(directory, "d.sock")
    squatter = subprocess.Popen(
        [sys.executable, "-c", LISTENER, path], stdout=subprocess.PIPE, text=True
    )
    children.append(squatter)
    assert squatter.stdout.readline() == "listening\n"
    with pytest.raises(DaemonError, match=f"uid {NOBODY}"):
        Client(path).hello("secret-model", key="secret-key")
    assert squatter.stdout.readline() == "got b''\n"  # it heard nothing


def test_client_refuses_a_listener_whose_uid_is_not_ours(live, monkeypatch):
    """The same check without root: the kernel's answer, as a stranger's."""
    d = live(chunks=2)
    real = protocol.peer

    def stranger(sock):
        pid, uid = real(sock)
        return pid, uid + 1

    monkeypatch.setattr(protocol, "peer", stranger)
    with pytest.raises(DaemonError, match=f"uid {os.geteuid() + 1}"):
        Client(d.path)


@root_only
def test_stale_socket_of_another_user_is_a_clear_error(path):
    """(As root the old code silently removed another user's socket.)"""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.bind(path)
    s.close()
    os.chown(path, NOBODY, NOBODY)
    d = Daemon(Backend(), "cpu", 2 * CS, CS, path)
    with pytest.raises(RuntimeError, match=f"uid {NOBODY}"):
        d.listen()
    assert os.lstat(path).st_uid == NOBODY  # left alone


AS_NOBODY = """
import os, sys
from vllm_mux.daemon.server import Daemon
from vllm_mux.memory.cpu import Backend
os.setgid(65534)  # after the imports: nobody may not read root's Python
os.setuid(65534)
try:
    Daemon(Backend(), "cpu", 4096, 4096, sys.argv[1]).listen()
except RuntimeError as e:
    print(e)
    sys.exit(3)
"""


@root_only
def test_stale_socket_of_another_user_in_tmp_is_a_clear_error_not_a_traceback():
    """A user's daemon met root's stale socket in a sticky directory: it could
    neither connect nor remove it, and died of PermissionError."""
    directory = short_dir()
    os.chmod(directory, 0o1777)
    path = os.path.join(directory, "d.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.bind(path)
    s.close()
    r = subprocess.run(
        [sys.executable, "-c", AS_NOBODY, path], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 3, r.stderr
    assert "uid 0" in r.stdout and "--socket" in r.stdout


# -- 3. running out of fds --

FLOODED = """
import logging, resource, sys
from vllm_mux.daemon.server import Daemon
from vllm_mux.memory.cpu import Backend
logging.basicConfig(level=logging.INFO)
d = Daemon(Backend(), "cpu", 16 * 65536, 65536, sys.argv[1])
d.hello_timeout = 1.0
d.listen()
# About 40 fds left for connections: a few hundred idle ones exhaust them.
resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
print("serving", flush=True)
d.serve_forever()
print("serve_forever returned", flush=True)
"""


def test_daemon_survives_running_out_of_fds(path, children, tmp_path):
    """EMFILE in accept() ended serve_forever (and the CLI exited 0); idle
    connections were never timed out."""
    log = open(tmp_path / "daemon.log", "w+")
    daemon = subprocess.Popen(
        [sys.executable, "-c", FLOODED, path], stdout=subprocess.PIPE, stderr=log, text=True
    )
    children.append(daemon)
    assert daemon.stdout.readline() == "serving\n"
    idle = []
    for _ in range(300):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.setblocking(False)  # a full backlog refuses at once
        try:
            s.connect(path)
        except OSError:
            s.close()
            continue
        idle.append(s)
    assert len(idle) > 64  # more than the daemon can hold at once

    def served():
        try:
            c = Client(path, timeout=5)
        except DaemonError:
            return None
        try:
            return c.status()
        except DaemonError:
            return None
        finally:
            c.close()

    st = wait_for(lambda: daemon.poll() is not None or served(), timeout=120)
    for s in idle:
        s.close()
    alive = daemon.poll() is None
    daemon.kill()
    out = daemon.communicate()[0]
    log.seek(0)
    err = log.read()
    log.close()
    assert alive, out + err
    assert st and st["total_chunks"] == 16, err
    assert "Too many open files" in err  # it did run out, and said so


# -- 4. every fd received is kept or closed --


def test_empty_message_with_fds(live):
    """Taken for the end of the connection: the fds stayed open in the daemon."""
    d = live()
    s = raw(d.path)
    r, w = os.pipe()
    socket.send_fds(s, [b""], [w])
    os.close(w)
    reply, _ = protocol.recv(s)
    assert reply is not None and reply["ok"] is False and "empty" in reply["error"]
    assert not held_elsewhere(r)
    protocol.send(s, {"op": "status"})
    assert protocol.recv(s)[0]["ok"]  # the connection lives on
    os.close(r)
    s.close()


def test_follow_on_fd_message_cut_short(live):
    """A follow-on with too many fds for one message: the fds that came with
    the first message stayed open."""
    d = live()
    s = raw(d.path)
    r, w = os.pipe()
    socket.send_fds(s, [b'{"op": "status", "nfds": 300}'], [w])
    socket.send_fds(s, [b"{}"], [w] * 253)  # the kernel's most; the daemon takes 250
    os.close(w)
    reply, _ = protocol.recv(s)
    assert reply["ok"] is False
    assert not held_elsewhere(r)
    os.close(r)
    s.close()


def test_fds_sent_with_a_controllers_answer(live):
    d = live()
    c = d.client()
    c.hello("m", key="k")
    control = raw(d.path)
    protocol.send(control, {"op": "hello", "role": "controller", "key": "k", "idle_ttl": 0})
    assert protocol.recv(control)[0]["ok"]
    r, w = os.pipe()

    def answer():
        message, _ = protocol.recv(control)
        reply = {"ok": True, "in_flight": 0, "waiting": 0, "last_active": 0.0}
        protocol.send(control, {**reply, "seq": message["seq"]}, [w, w])

    t = threading.Thread(target=answer)
    t.start()
    assert d.status()["instances"][0]["model"] == "m"
    t.join(30)
    os.close(w)
    assert not held_elsewhere(r)
    os.close(r)
    control.close()


def test_deeply_nested_json(live):
    """A RecursionError escaped the decoder: the connection's thread died with
    the message's fds open."""
    d = live()
    s = raw(d.path)
    protocol.send(s, {"op": "status"})
    assert protocol.recv(s)[0]["ok"]  # the daemon has its end of the connection open
    before = open_fds()
    r, w = os.pipe()
    socket.send_fds(s, [b"[" * 50_000], [w])
    os.close(w)
    reply, _ = protocol.recv(s)
    assert reply is not None and reply["ok"] is False and "JSON" in reply["error"]
    assert not held_elsewhere(r)
    os.close(r)
    assert open_fds() == before
    protocol.send(s, {"op": "status"})
    assert protocol.recv(s)[0]["ok"]
    s.close()


# -- 5. replies larger than a socket's send buffer --


def test_status_larger_than_the_send_buffer(live):
    d = live(chunks=4)
    clients = []
    for i in range(400):
        c = Client(d.path, timeout=30)
        c.hello(f"{i:03d}" + "m" * 200)
        clients.append(c)
    st = d.status()
    sndbuf = clients[0].sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    assert len(msgspec.json.encode(st)) > sndbuf  # the premise of the test
    assert len(st["instances"]) == 400
    assert {i["model"][:3] for i in st["instances"]} == {f"{i:03d}" for i in range(400)}
    for c in clients:
        c.close()


def test_model_name_too_long_is_refused(live):
    d = live(chunks=4)
    c = d.client()
    with pytest.raises(DaemonError, match=f"at most {protocol.MAX_NAME}"):
        c.hello("m" * (protocol.MAX_NAME + 1))
    with pytest.raises(DaemonError, match=f"at most {protocol.MAX_NAME}"):
        c.hello("m", key="k" * (protocol.MAX_NAME + 1))
    assert d.status()["instances"] == []
    c.hello("m" * protocol.MAX_NAME)  # the connection lives on


def test_a_very_large_message_and_its_fds_go_through():
    """A lease of 200,000 chunks: ids far beyond one message, 600 fds."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    b.settimeout(30)
    r, w = os.pipe()
    message = {"ok": True, "ids": list(range(200_000))}
    sender = threading.Thread(target=protocol.send, args=(a, message, [w] * 600))
    sender.start()
    got, fds = protocol.recv(b)
    sender.join(30)
    assert got == message and len(fds) == 600
    for fd in fds:
        os.close(fd)
    os.close(w)
    assert not held_elsewhere(r)
    os.close(r)
    a.close()
    b.close()


# -- 8. a controller that answers every question with the wrong number --


def test_controller_answering_with_wrong_numbers_does_not_hang_the_daemon(live):
    d = live()
    d.daemon.ask_timeout = 0.5
    c = d.client()
    c.hello("m", key="k")
    control = raw(d.path)
    protocol.send(control, {"op": "hello", "role": "controller", "key": "k", "idle_ttl": 0})
    assert protocol.recv(control)[0]["ok"]
    stop = threading.Event()

    def flood():
        protocol.recv(control)
        while not stop.is_set():
            try:
                protocol.send(control, {"ok": True, "seq": -1})
            except OSError:
                return

    flooding = threading.Thread(target=flood, daemon=True)
    flooding.start()
    result = []
    asking = threading.Thread(target=lambda: result.append(d.status()), daemon=True)
    asking.start()
    asking.join(60)
    try:
        assert result and result[0]["instances"][0]["in_flight"] == 0
        # the global lock is free: a new controller for the instance attaches
        again = raw(d.path)
        protocol.send(again, {"op": "hello", "role": "controller", "key": "k", "idle_ttl": 0})
        assert protocol.recv(again)[0]["ok"]
        again.close()
    finally:
        stop.set()
        control.shutdown(socket.SHUT_RDWR)  # wakes a send blocked on a full queue
        control.close()
        flooding.join(30)
