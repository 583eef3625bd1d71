"""The daemon's server: one Unix socket, one thread per connected process.

It creates the pool once and never maps a chunk itself; it hands chunks out
as fds and keeps the books. A process that disconnects while holding chunks
may still have them mapped, so its chunks come back only once the process is
gone (watched through a pidfd), never earlier: a chunk is mapped by at most
one instance at a time, and the daemon always knows which.

An instance is two connections joined by a key: its worker, which leases
and maps chunks, and its controller in the API server, which knows the
requests and can put the instance to sleep. When a lease does not fit, the
daemon asks other instances' controllers to sleep — idle ones first, least
recently used first, never a pinned one — and grants leases in the order
they were asked for once enough chunks are free.

Nothing a peer does may stop the daemon or cost it for good: a connection
that says nothing is closed after HELLO_TIMEOUT, a controller that does not
answer is given up after ASK_TIMEOUT, and running out of fds or threads only
slows accept() down until connections close.
"""

import logging
import os
import resource
import select
import socket
import stat
import threading
import time
from dataclasses import dataclass, field

from vllm_mux.daemon import fallback_dir, make_fallback_dir, protocol
from vllm_mux.daemon.pool import Pool, PoolError

log = logging.getLogger("vllm_mux.daemon")

HELLO_TIMEOUT = 30.0  # seconds a new connection has to send its first message
ASK_TIMEOUT = 5.0  # seconds a controller has to answer one question
FD_MARGIN = 1024  # fds beyond one per chunk: connections, pidfds and the rest

STATES = ("starting", "awake", "sleeping", "asleep", "waking")
# Upper bounds (seconds) of the wake and sleep latency histograms kept per instance.
LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)


def _latency() -> dict:
    return {
        "le": list(LATENCY_BUCKETS),
        "counts": [0] * len(LATENCY_BUCKETS),
        "sum": 0.0,
        "count": 0,
    }


def _observe(histogram: dict, seconds: float) -> None:
    """Cumulative buckets, as Prometheus wants them."""
    histogram["sum"] += seconds
    histogram["count"] += 1
    for i, bound in enumerate(LATENCY_BUCKETS):
        histogram["counts"][i] += seconds <= bound


@dataclass
class Instance:
    """One connected vLLM instance, as the daemon knows it: a pid and a name."""

    id: int
    pid: int
    model: str
    pidfd: int
    key: str = ""
    controller: "Controller | None" = None
    state: str = "starting"
    connected: bool = True
    last_active: float = field(default_factory=time.time)
    wakes: int = 0
    sleeps: int = 0
    last_wake: dict = field(default_factory=dict)  # timings the instance measured
    private_bytes: int = 0  # device memory it needs outside the pool (its budget)
    wake_latency: dict = field(default_factory=_latency)
    sleep_latency: dict = field(default_factory=_latency)


class Controller:
    """The daemon's end of an instance's controller connection: the daemon asks,
    the controller answers at once (it never blocks on the engine to reply)."""

    def __init__(self, conn: socket.socket, pinned: bool, idle_ttl: float, timeout: float):
        self.conn, self.pinned, self.idle_ttl = conn, pinned, idle_ttl
        self.timeout = timeout
        self.lock = threading.Lock()
        self.seq = 0

    def ask(self, op: str) -> dict | None:
        """The controller's reply, or None if it is gone, mute or wrong. Each
        question carries a number: a late answer to an earlier one is skipped,
        not taken for this one's. The whole exchange has ``timeout`` seconds,
        however many answers come: callers wait on it, some holding up leases."""
        with self.lock:
            self.seq += 1
            deadline = time.monotonic() + self.timeout
            try:
                self.conn.settimeout(self.timeout)
                protocol.send(self.conn, {"op": op, "seq": self.seq})
                while True:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return None
                    self.conn.settimeout(left)
                    reply, fds = protocol.recv(self.conn)
                    protocol.close_fds(fds)  # an answer carries none
                    if reply is None or reply.get("seq") == self.seq:
                        break
            except (OSError, protocol.ProtocolError):
                return None
        return reply if reply and reply.get("ok") else None

    def close(self) -> None:
        with self.lock:  # never under a question in flight; later ones fail
            self.conn.close()


class Daemon:
    def __init__(
        self,
        backend,
        device: str,
        device_memory: int,
        chunk_size: int,
        socket_path: str,
        wait_timeout: float = 120.0,
    ):
        if chunk_size <= 0:
            raise ValueError(f"the chunk size must be positive, not {chunk_size}")
        n = device_memory // chunk_size
        if n < 1:
            raise ValueError(
                f"--device-memory {device_memory} is smaller than one chunk ({chunk_size})"
            )
        if chunk_size % backend.granularity:
            raise ValueError(
                f"chunk size {chunk_size} is not a multiple of the device's granularity "
                f"{backend.granularity}"
            )
        _raise_fd_limit(n)
        self.backend = backend
        self.device = device
        self.socket_path = socket_path
        self.chunks = [backend.create(chunk_size) for _ in range(n)]
        self.pool = Pool(n, chunk_size)
        self.instances: dict[int, Instance] = {}
        self.wait_timeout = wait_timeout
        self.hello_timeout = HELLO_TIMEOUT
        self.ask_timeout = ASK_TIMEOUT
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)  # chunks freed, waiters moved
        self.waiters: list[int] = []  # instance ids waiting for a lease, first come first
        self._next_id = 1
        self._listener: socket.socket | None = None
        self._stopping = threading.Event()

    # -- lifecycle --

    def listen(self) -> None:
        """Bind the socket, 0600, in a directory no other user can write to
        (or a sticky one, like /tmp, where they cannot remove what is ours),
        never in place of another user's socket."""
        path = self.socket_path
        _check_directory(os.path.dirname(os.path.abspath(path)))
        if os.path.lexists(path):
            st = os.lstat(path)
            if not stat.S_ISSOCK(st.st_mode):
                raise RuntimeError(f"{path} exists and is not a socket")
            if st.st_uid != os.geteuid():
                raise RuntimeError(
                    f"{path} is a socket of uid {st.st_uid}, not of this user (uid "
                    f"{os.geteuid()}): another user's daemon listens there or left it "
                    "behind; choose another --socket"
                )
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as probe:
                try:
                    probe.connect(path)
                except OSError:
                    os.unlink(path)  # left behind by a daemon that died
                else:
                    raise RuntimeError(f"a daemon is already listening at {path}")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        old = os.umask(0o177)  # the socket is 0600 from the moment it exists
        try:
            sock.bind(path)
        except OSError as e:
            sock.close()
            raise RuntimeError(f"cannot listen at {path}: {e.strerror}") from None
        finally:
            os.umask(old)
        sock.listen(64)
        self._listener = sock

    def serve_forever(self) -> None:
        """Accept connections until shutdown(). Running out of fds or threads
        is no reason to stop: wait a little longer each time and try again, as
        connections close (idle ones do after ``hello_timeout``)."""
        if self._listener is None:
            self.listen()
        listener = self._listener  # shutdown() sets the attribute to None
        delay = 0.0
        while not self._stopping.is_set():
            try:
                conn, _ = listener.accept()
            except OSError as e:  # EMFILE, ENFILE, ENOMEM; EINVAL once shut down
                delay = self._back_off(delay, e)
                continue
            try:
                threading.Thread(target=self._serve, args=(conn,), daemon=True).start()
            except RuntimeError as e:  # can't start new thread
                conn.close()
                delay = self._back_off(delay, e)
                continue
            delay = 0.0

    def _back_off(self, delay: float, error: Exception) -> float:
        if self._stopping.is_set():
            return delay
        if not delay:
            log.warning("cannot take a connection (%s); trying again as others close", error)
        delay = min(max(2 * delay, 0.05), 1.0)
        self._stopping.wait(delay)
        return delay

    def shutdown(self) -> None:
        self._stopping.set()
        if self._listener is not None:
            try:  # wakes a thread blocked in accept(); close() alone does not
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
            self._listener = None
            if os.path.exists(self.socket_path):
                os.unlink(self.socket_path)

    # -- one connection --

    def _serve(self, conn: socket.socket) -> None:
        pid, uid = protocol.peer(conn)
        me: Instance | None = None
        try:
            if uid not in (os.geteuid(), 0):
                protocol.send(conn, {"ok": False, "error": f"uid {uid} may not use this daemon"})
                return
            conn.settimeout(self.hello_timeout)  # until its first message
            while True:
                try:
                    message, fds = protocol.recv(conn)
                except protocol.ProtocolError as e:
                    protocol.send(conn, {"ok": False, "error": str(e)})
                    continue
                if message is None:
                    return
                conn.settimeout(None)
                protocol.close_fds(fds)  # nothing a client sends us carries fds
                if message.get("op") == "hello" and message.get("role") == "controller":
                    if self._attach_controller(conn, message):
                        conn = None  # it now belongs to the instance's record
                        return
                    continue
                try:
                    reply, out_fds, me = self._handle(message, pid, me)
                except (PoolError, ValueError, KeyError, TypeError) as e:
                    reply, out_fds = {"ok": False, "error": str(e)}, []
                protocol.send(conn, reply, out_fds)
        except (OSError, protocol.ProtocolError) as e:  # ProtocolError: a reply too large
            log.info("connection of pid %d broke: %s", pid, e)
        finally:
            if conn is not None:
                conn.close()
            if me is not None:
                self._disconnected(me)

    def _attach_controller(self, conn: socket.socket, message: dict) -> bool:
        key, ttl = message.get("key"), message.get("idle_ttl", 0)
        if not isinstance(ttl, int | float):
            protocol.send(conn, {"ok": False, "error": "bad idle_ttl"})
            return False
        controller = Controller(conn, bool(message.get("pinned")), float(ttl), self.ask_timeout)
        with controller.lock:  # no question goes out before the answer to hello
            with self.lock:
                found = next((i for i in self.instances.values() if key and i.key == key), None)
                if found:  # a controller that connects again replaces the old
                    old, found.controller = found.controller, controller
            if not found:
                error = f"no instance registered with key {key!r:.300}"
                protocol.send(conn, {"ok": False, "error": error})
                return False
            protocol.send(conn, self._ok(instance=found.id))
        if old:
            old.close()  # not under the lock: it may wait for a question in flight
        return True

    def _handle(self, message: dict, pid: int, me: Instance | None):
        op = message.get("op")
        if op == "hello":
            if me is not None:
                raise ValueError("hello was already said on this connection")
            if message.get("role") != "instance":
                return self._ok(), [], None
            model = message.get("model")
            if not isinstance(model, str) or not model:
                raise ValueError("hello from an instance names its model")
            key = message.get("key", "")
            if not isinstance(key, str):
                raise ValueError("an instance's key is a string")
            for what, text in (("a model's name", model), ("an instance's key", key)):
                if len(text) > protocol.MAX_NAME:
                    raise ValueError(
                        f"{what} is at most {protocol.MAX_NAME} characters, not {len(text)}"
                    )
            private = message.get("private_bytes", 0)
            if type(private) is not int or private < 0:
                raise ValueError("private_bytes is a non-negative integer")
            try:
                pidfd = os.pidfd_open(pid)
            except OSError as e:
                raise ValueError(f"cannot watch process {pid}: {e.strerror}") from None
            with self.lock:
                me = Instance(self._next_id, pid, model, pidfd, key=key, private_bytes=private)
                self._next_id += 1
                self.instances[me.id] = me
            log.info("instance %d (pid %d) registered for model %s", me.id, pid, model)
            return (
                self._ok(
                    instance=me.id,
                    device=self.device,
                    device_identity=self.backend.identity,
                    chunk_size=self.pool.chunk_size,
                    total_chunks=self.pool.total,
                ),
                [],
                me,
            )
        if op == "status":
            return self.status(), [], me
        if me is None:
            raise ValueError(f"op {op!r} needs a hello from an instance first")
        if op == "lease":
            n = message.get("chunks")
            if not isinstance(n, int) or isinstance(n, bool):
                raise ValueError("lease names a whole number of chunks")
            ids = self._lease(me, n)
            return self._ok(ids=ids), [self.backend.export(self.chunks[i]) for i in ids], me
        if op == "release":
            ids = message.get("ids")
            if not isinstance(ids, list) or not all(type(i) is int for i in ids):
                raise ValueError("release names a list of chunk ids")
            with self.lock:
                self.pool.release(me.id, ids)
                self.changed.notify_all()
            return self._ok(), [], me
        if op == "state":
            state = message.get("state")
            if state not in STATES:
                raise ValueError(f"state is one of {', '.join(STATES)}, not {state!r}")
            with self.lock:
                if state == "asleep" and self.pool.held_by(me.id):
                    raise ValueError("an instance that holds chunks is not asleep")
                me.wakes += state == "awake" and me.state == "waking"
                me.sleeps += state == "asleep"
                me.state = state
                me.last_active = time.time()
                facts = message.get("wake") or message.get("sleep")
                if isinstance(facts, dict) and isinstance(facts.get("seconds"), int | float):
                    if state == "awake":
                        me.last_wake = facts
                        _observe(me.wake_latency, facts["seconds"])
                    elif state == "asleep":
                        _observe(me.sleep_latency, facts["seconds"])
            return self._ok(), [], me
        raise ValueError(f"unknown op {op!r}")

    def _ok(self, **fields) -> dict:
        return {"ok": True, **fields}

    # -- arbitration --

    def _lease(self, me: Instance, n: int) -> list[int]:
        """Grant ``n`` chunks, asking other instances to sleep if they do not fit.

        Waits up to ``wait_timeout``; leases are granted first come, first served,
        with one exception: an instance that is still starting (it holds chunks
        but has no controller yet, so nobody can ask it to sleep) may take free
        chunks ahead of the queue, since the queue may be waiting for it.
        """
        deadline = time.monotonic() + self.wait_timeout
        with self.lock:
            self.pool.check(n)
            mine = len(self.pool.held_by(me.id))
            if n > self.pool.total - mine:
                raise PoolError(
                    f"asks for {n} chunks; the pool has {self.pool.total} and this instance "
                    f"holds {mine} already: the pool is too small for it even with every other "
                    "instance asleep; start the daemon with a larger --device-memory or give "
                    "the model less memory"
                )
            self.waiters.append(me.id)
        try:
            while True:
                with self.lock:
                    starting = me.controller is None and self.pool.held_by(me.id)
                    if (self.waiters[0] == me.id or starting) and n <= len(self.pool.free):
                        ids = self.pool.lease(me.id, n)
                        me.last_active = time.time()
                        return ids
                    first = self.waiters[0] == me.id
                    if _exited(me.pidfd):  # killed mid-wake: stop holding up the queue
                        raise PoolError("the instance exited while waiting for its lease")
                    if time.monotonic() > deadline:
                        raise PoolError(
                            f"waited {self.wait_timeout:g} s for {n} chunks; only "
                            f"{len(self.pool.free)} of {self.pool.total} are free and every "
                            "holder is busy or pinned"
                        )
                if first:
                    self._ask_to_sleep(me, n)
                with self.lock:
                    self.changed.wait(max(0.0, min(0.25, deadline - time.monotonic())))
        finally:
            with self.lock:
                self.waiters.remove(me.id)
                self.changed.notify_all()

    def _ask_to_sleep(self, me: Instance, n: int) -> None:
        """Ask enough other instances to sleep that ``n`` chunks come free:
        idle ones before busy ones, least recently active first.

        Called again every quarter second while the lease waits: asking twice
        is harmless (an instance already draining ignores it), and an instance
        that was waking when first asked is asked again once it is awake.
        """
        with self.lock:
            coming = sum(
                len(self.pool.held_by(i.id))
                for i in self.instances.values()
                if i.state == "sleeping"
            )
            needed = n - len(self.pool.free) - coming
            candidates = [
                i
                for i in self.instances.values()
                if i is not me
                and i.state == "awake"
                and i.controller
                and not i.controller.pinned
                and self.pool.held_by(i.id)
            ]
        if needed <= 0 or not candidates:
            return
        reports = {i.id: i.controller.ask("report") for i in candidates}
        live = [i for i in candidates if reports[i.id]]

        def order(i: Instance):
            r = reports[i.id]
            return (r["in_flight"] + r["waiting"] > 0, r["last_active"])

        for victim in sorted(live, key=order):
            if needed <= 0:
                break
            with self.lock:
                holds = len(self.pool.held_by(victim.id))  # before it can release them
            if victim.controller.ask("sleep"):
                needed -= holds
                if not reports[victim.id].get("draining"):
                    log.info("asked %d (%s) to sleep for %s", victim.id, victim.model, me.model)

    def _disconnected(self, me: Instance) -> None:
        """Take the chunks back once the process is gone, not before."""
        with self.lock:
            me.connected = False
            holds = bool(self.pool.held_by(me.id))
        if holds:
            log.warning(
                "instance %d (pid %d) left holding chunks; waiting for it to exit", me.id, me.pid
            )
        gone = not holds or self._wait_for_exit(me.pidfd)
        if gone:
            with self.lock:
                returned = self.pool.release_all(me.id)
                del self.instances[me.id]
                self.changed.notify_all()
            if returned:
                log.warning("instance %d exited; %d chunks back", me.id, len(returned))
        if me.controller:
            me.controller.close()
        os.close(me.pidfd)

    def _wait_for_exit(self, pidfd: int) -> bool:
        """True once the process has exited; False if the daemon stops first
        (its books end with it)."""
        while not _exited(pidfd, timeout=0.25):
            if self._stopping.is_set():
                return False
        return True

    # -- the books, for `vllm-mux status` and tests --

    def status(self) -> dict:
        with self.lock:
            controllers = [(i.id, i.controller) for i in self.instances.values() if i.controller]
        reports = {id_: c.ask("report") or {} for id_, c in controllers}
        with self.lock:
            size = self.pool.chunk_size
            instances = []
            for inst in self.instances.values():
                report = reports.get(inst.id, {})
                held = len(self.pool.held_by(inst.id))
                instances.append(
                    {
                        "id": inst.id,
                        "pid": inst.pid,
                        "model": inst.model,
                        "state": inst.state if inst.connected else "disconnected",
                        "chunks": held,
                        "bytes": held * size,
                        "last_active": max(inst.last_active, report.get("last_active", 0)),
                        "in_flight": report.get("in_flight", 0),
                        "waiting": report.get("waiting", 0),
                        "pinned": bool(inst.controller and inst.controller.pinned),
                        "idle_ttl": inst.controller.idle_ttl if inst.controller else None,
                        "wakes": inst.wakes,
                        "sleeps": inst.sleeps,
                        "last_wake": inst.last_wake,
                        "private_bytes": inst.private_bytes,
                        "wake_latency": inst.wake_latency,
                        "sleep_latency": inst.sleep_latency,
                    }
                )
            return self._ok(
                device=self.device,
                device_identity=self.backend.identity,
                chunk_size=size,
                total_chunks=self.pool.total,
                free_chunks=len(self.pool.free),
                leased_chunks=self.pool.leased,
                balanced=self.pool.balanced(),
                instances=instances,
            )


def _exited(pidfd: int, timeout: float = 0.0) -> bool:
    """A pidfd is readable once its process has exited. poll(), not select():
    select() refuses fds from 1024 on, and a daemon that holds a pool of
    thousands of chunks (an fd each) opens every pidfd above those."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(timeout * 1000))


def _raise_fd_limit(chunks: int) -> None:
    """The daemon keeps one fd per chunk for its whole life (the cpu backend's
    memfd, the cuda backend's exported handle), and more for connections:
    raise the soft limit to that, or refuse now rather than fail later."""
    need = chunks + FD_MARGIN
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < need:
        raise ValueError(
            f"a pool of {chunks} chunks needs {need} file descriptors (one per chunk and "
            f"{FD_MARGIN} for connections) but this process may open at most {hard} (the "
            "hard limit, `ulimit -Hn`): raise that limit, or use a larger --chunk-size"
        )
    if soft != resource.RLIM_INFINITY and soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


def _check_directory(directory: str) -> None:
    """Refuse a directory where other users could replace the socket with
    theirs: one they can write to (anyone, or a group not the user's own)
    without the sticky bit, which keeps them from removing our files."""
    if directory == fallback_dir():
        make_fallback_dir()
    try:
        st = os.stat(directory)
    except FileNotFoundError:
        raise RuntimeError(f"{directory}, the socket's directory, does not exist") from None
    others = st.st_mode & stat.S_IWOTH or (st.st_mode & stat.S_IWGRP and st.st_gid != os.getegid())
    if others and not st.st_mode & stat.S_ISVTX:
        raise RuntimeError(
            f"other users can write to {directory} (mode {stat.S_IMODE(st.st_mode):o}) and "
            "could replace the socket: choose a --socket in a directory only you can write"
        )
