"""Property-based tests of the daemon's protocol and books (issue 8).

Random sequences of what clients do — connect, hello, lease, release, state
changes, malformed frames, fds attached where none belong, disconnects and
deaths — from several client processes. A model says what the daemon must
answer. After every step the daemon's books equal the model's (leased + free
= total, no chunk held twice, a chunk held by whoever leased it until it is
released or its process is gone), and no fd or thread is left over.

A client is a connection whose peer is a child process: the child connects,
so SO_PEERCRED names it, and leaves the connection to the test; killing the
child is the instance's death. Disconnects are seen by the daemon a moment
later, so the checks wait for the state the model names (and fail if it never
comes); nothing depends on timing.
"""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from conftest import LiveDaemon
from vllm_mux.daemon import protocol
from vllm_mux.daemon.client import Client
from vllm_mux.daemon.server import STATES

TOTAL = 8
CS = 64 << 10
MAX_PEERS = 5

CHILD = (
    "import socket, sys; socket.socket(fileno=int(sys.argv[2])).connect(sys.argv[1]); "
    "print(flush=True); sys.stdin.read()"
)

# Frames no client of ours sends, each a list of (datagram, how many fds ride on it).
MALFORMED = [
    [(b"{not json", 0)],
    [(b"{not json", 2)],
    [(b"[1, 2]", 1)],
    [(b'"a string"', 0)],
    [(b"[" * 50_000, 1)],  # deeper than the decoder goes
    [(b'{"op": "status", "nfds": -1}', 1)],
    [(b'{"op": "status", "nfds": "x"}', 0)],
    [(b"", 2)],  # an empty message with fds
    [(b"x" * (protocol.PART + 1), 1)],  # a datagram too long
    [(b'{"op": "status"}', 253)],  # more fds than a datagram may carry
    [(b'{"op": "status", "nfds": 3}', 1), (b'{"op": "status"}', 1)],  # follow-on not {}
    [(b"+{", 0), (b"nonsense", 1)],  # a message in pieces that is not JSON
    [(b'{"op": "nonsense"}', 0)],
    [(b'{"op": "hello", "role": "controller", "key": "nobody has it"}', 0)],
]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def wait_for(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not (value := predicate()) and time.monotonic() < deadline:
        time.sleep(0.01)
    return value


class Peer:
    """One connection to the daemon, made by a child process, and what the
    model says the daemon knows of it."""

    def __init__(self, path: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", CHILD, path, str(self.sock.fileno())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            pass_fds=[self.sock.fileno()],
        )
        assert self.proc.stdout.readline() == b"\n", "the child did not connect"
        self.proc.stdout.close()
        self.sock.settimeout(60)
        self.open, self.alive = True, True
        self.instance: int | None = None
        self.model = ""
        self.state = "starting"
        self.held: set[int] = set()

    def call(self, message: dict) -> dict:
        protocol.send(self.sock, message)
        reply, fds = protocol.recv(self.sock)
        protocol.close_fds(fds)
        assert reply is not None, "the daemon closed the connection"
        return reply

    @property
    def known(self) -> bool:
        """Whether the daemon keeps a record of this instance: while connected,
        and after that while its process lives on holding chunks."""
        return self.instance is not None and (self.open or bool(self.held) and self.alive)

    def close(self) -> None:
        if self.open:
            self.sock.close()
            self.open = False

    def kill(self) -> None:
        if self.alive:
            self.proc.kill()
            self.proc.wait()
            self.proc.stdin.close()
            self.alive = False


INNER = "VLLM_MUX_PROPERTIES_INNER"  # set in the process that runs the machine


class DaemonMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.base_fds, self.base_threads = open_fds(), threading.active_count()
        self.dir = tempfile.mkdtemp(prefix="vmux")
        self.live = LiveDaemon(os.path.join(self.dir, "d.sock"), TOTAL, CS, wait_timeout=0.01)
        self.daemon = self.live.daemon
        self.daemon.hello_timeout = 600  # idle connections are not what this is about
        self.peers: list[Peer] = []

    # -- what clients do --

    def _pick(self, data, **want) -> Peer:
        return data.draw(
            st.sampled_from(
                [p for p in self.peers if all(getattr(p, k) == v for k, v in want.items())]
            )
        )

    def _any(self, **want) -> bool:
        return any(all(getattr(p, k) == v for k, v in want.items()) for p in self.peers)

    @precondition(lambda self: len(self.peers) < MAX_PEERS)
    @rule()
    def connect(self):
        self.peers.append(Peer(self.live.path))

    @precondition(lambda self: self._any(open=True))
    @rule(
        data=st.data(),
        model=st.one_of(st.text(max_size=6), st.just("m" * (protocol.MAX_NAME + 1))),
        long_key=st.booleans(),
    )
    def hello(self, data, model, long_key):
        peer = self._pick(data, open=True)
        key = "k" * (protocol.MAX_NAME + 1) if long_key else ""
        reply = peer.call({"op": "hello", "role": "instance", "model": model, "key": key})
        valid = peer.instance is None and 0 < len(model) <= protocol.MAX_NAME and not long_key
        valid = valid and peer.alive  # the daemon cannot watch a process that is gone
        assert reply["ok"] is valid, reply
        if valid:
            peer.instance, peer.model = reply["instance"], model
            assert reply["total_chunks"] == TOTAL

    @precondition(lambda self: self._any(open=True))
    @rule(data=st.data(), n=st.integers(-1, TOTAL + 1))
    def lease(self, data, n):
        peer = self._pick(data, open=True)
        protocol.send(peer.sock, {"op": "lease", "chunks": n})
        reply, fds = protocol.recv(peer.sock)
        protocol.close_fds(fds)  # the books are what counts here
        free = TOTAL - sum(len(p.held) for p in self.peers if p.known)
        fits = peer.instance is not None and 0 < n <= free
        assert reply["ok"] is fits, (reply, n, free)
        if fits:
            ids = set(reply["ids"])
            assert len(ids) == n == len(fds)
            assert not ids & {c for p in self.peers for c in p.held}, "a chunk held twice"
            peer.held |= ids

    @precondition(lambda self: self._any(open=True))
    @rule(data=st.data(), stranger=st.sampled_from([None, -1, 0, 3, TOTAL]), twice=st.booleans())
    def release(self, data, stranger, twice):
        peer = self._pick(data, open=True)
        ids = (
            data.draw(st.lists(st.sampled_from(sorted(peer.held)), unique=True))
            if peer.held
            else []
        )
        if twice and ids:
            ids.append(ids[0])
        if stranger is not None:
            ids.append(stranger)
        reply = peer.call({"op": "release", "ids": ids})
        valid = peer.instance is not None and len(set(ids)) == len(ids) and set(ids) <= peer.held
        assert reply["ok"] is valid, (reply, ids, peer.held)
        if valid:
            peer.held -= set(ids)

    @precondition(lambda self: self._any(open=True))
    @rule(data=st.data(), state=st.sampled_from([*STATES, "dreaming"]))
    def set_state(self, data, state):
        peer = self._pick(data, open=True)
        reply = peer.call({"op": "state", "state": state})
        valid = peer.instance is not None and state in STATES
        valid = valid and not (state == "asleep" and peer.held)
        assert reply["ok"] is valid, reply
        if valid:
            peer.state = state

    @precondition(lambda self: self._any(open=True))
    @rule(data=st.data(), which=st.integers(0, len(MALFORMED) - 1))
    def malformed(self, data, which):
        """Answered with an error, the connection lives on, and every fd that
        came with the frame is closed by the time the answer comes."""
        peer = self._pick(data, open=True)
        r, w = os.pipe()
        for datagram, nfds in MALFORMED[which]:
            socket.send_fds(peer.sock, [datagram], [w] * nfds)
        os.close(w)
        reply, fds = protocol.recv(peer.sock)
        assert reply is not None and fds == []
        assert reply["ok"] is False, reply
        os.set_blocking(r, False)
        assert os.read(r, 1) == b"", "the daemon kept an fd that came with the frame"
        os.close(r)

    @precondition(lambda self: self._any(open=True))
    @rule(data=st.data(), nfds=st.integers(1, 300))
    def fds_where_none_belong(self, data, nfds):
        """A status request carrying fds is answered; the fds are closed."""
        peer = self._pick(data, open=True)
        r, w = os.pipe()
        protocol.send(peer.sock, {"op": "status"}, [w] * nfds)
        os.close(w)
        reply, fds = protocol.recv(peer.sock)
        assert reply["ok"] and fds == []
        os.set_blocking(r, False)
        assert os.read(r, 1) == b""
        os.close(r)

    @rule()
    def status(self):
        client = Client(self.live.path, timeout=60)
        try:
            st_ = client.status()
        finally:
            client.close()
        rows = {i["id"]: i for i in st_["instances"]}
        # a disconnect the daemon has not seen yet: the row may still be there
        known = {p.instance: p for p in self.peers if p.known}
        assert set(known) <= set(rows), (known, rows)
        for id_, peer in known.items():
            row = rows[id_]
            assert (row["model"], row["chunks"]) == (peer.model, len(peer.held))
            assert row["pid"] == peer.proc.pid
            if peer.open:
                assert row["state"] == peer.state
        assert st_["leased_chunks"] + st_["free_chunks"] == TOTAL and st_["balanced"]

    @precondition(lambda self: self._any(open=True))
    @rule(data=st.data())
    def disconnect(self, data):
        peer = self._pick(data, open=True)
        peer.close()
        if not peer.known:
            peer.held = set()  # back in the pool once the daemon sees it

    @precondition(lambda self: self._any(alive=True))
    @rule(data=st.data())
    def die(self, data):
        peer = self._pick(data, alive=True)
        peer.kill()
        if not peer.known:
            peer.held = set()

    # -- after every step --

    def _books(self) -> tuple:
        with self.daemon.lock:
            pool = self.daemon.pool
            return dict(pool.holder), list(pool.free), set(self.daemon.instances)

    def _expected_books(self) -> tuple:
        holder = {c: p.instance for p in self.peers if p.known for c in p.held}
        free = set(range(TOTAL)) - set(holder)
        return holder, free, {p.instance for p in self.peers if p.known}

    @invariant()
    def books_balance_and_match_the_model(self):
        expected = self._expected_books()

        def match():
            holder, free, instances = self._books()
            return (holder, set(free), instances) == expected and len(free) == len(set(free))

        assert wait_for(match), (self._books(), expected)
        holder, free, _ = self._books()
        assert len(holder) + len(free) == TOTAL
        assert not set(free) & set(holder)

    def _threads(self) -> int:
        """The server's thread and one per connection or instance the daemon keeps."""
        return self.base_threads + 1 + sum(p.open or p.known for p in self.peers)

    def _fds(self) -> int:
        per_peer = sum(
            2 * p.open  # ours and the daemon's end of the connection
            + p.known  # the daemon's pidfd
            + p.alive  # the child's stdin
            for p in self.peers
        )
        return self.base_fds + TOTAL + 1 + per_peer  # chunks, the listener

    @invariant()
    def no_fd_or_thread_left_over(self):
        assert wait_for(lambda: threading.active_count() == self._threads()), (
            threading.active_count(),
            self._threads(),
        )
        assert wait_for(lambda: open_fds() == self._fds()), (open_fds(), self._fds())

    def teardown(self):
        for peer in self.peers:
            peer.close()
            peer.kill()
        self.live.stop()
        threads_back = wait_for(lambda: threading.active_count() == self.base_threads)
        for chunk in self.daemon.chunks:
            os.close(chunk.fd)
        shutil.rmtree(self.dir)
        assert threads_back, threading.enumerate()
        assert wait_for(lambda: open_fds() == self.base_fds), (open_fds(), self.base_fds)


DaemonMachine.TestCase.settings = settings(
    max_examples=40,
    stateful_step_count=15,
    deadline=None,  # a busy machine is slow, not wrong
    database=None,  # nothing written into the repository
    suppress_health_check=[HealthCheck.too_slow],
)
pytestmark = pytest.mark.timeout(900)

if os.environ.get(INNER):
    test_daemon_protocol_and_books = DaemonMachine.TestCase
else:

    def test_daemon_protocol_and_books_in_a_process_of_its_own():
        """The machine counts this process's fds and threads: run beside other
        tests, their leftovers (a watcher ending, an fd closing) would blur
        the count. So it runs in a pytest process of its own."""
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
            env={**os.environ, INNER: "1"},
            capture_output=True,
            text=True,
            timeout=840,
        )
        assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
        assert " passed" in done.stdout.splitlines()[-1], done.stdout[-2000:]
