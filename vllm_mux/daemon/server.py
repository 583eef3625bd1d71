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
"""

import logging
import os
import select
import socket
import stat
import struct
import threading
import time
from dataclasses import dataclass, field

from vllm_mux.daemon import protocol
from vllm_mux.daemon.pool import Pool, PoolError

log = logging.getLogger("vllm_mux.daemon")

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
    wake_latency: dict = field(default_factory=_latency)
    sleep_latency: dict = field(default_factory=_latency)


class Controller:
    """The daemon's end of an instance's controller connection: the daemon asks,
    the controller answers at once (it never blocks on the engine to reply)."""

    def __init__(self, conn: socket.socket, pinned: bool, idle_ttl: float):
        self.conn, self.pinned, self.idle_ttl = conn, pinned, idle_ttl
        self.lock = threading.Lock()
        self.seq = 0
        conn.settimeout(5)

    def ask(self, op: str) -> dict | None:
        """The controller's reply, or None if it is gone or mute. Each question
        carries a number: a late answer to an earlier one is skipped, not taken
        for this one's."""
        with self.lock:
            self.seq += 1
            try:
                protocol.send(self.conn, {"op": op, "seq": self.seq})
                while True:
                    reply, _ = protocol.recv(self.conn)
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
        self.backend = backend
        self.device = device
        self.socket_path = socket_path
        self.chunks = [backend.create(chunk_size) for _ in range(n)]
        self.pool = Pool(n, chunk_size)
        self.instances: dict[int, Instance] = {}
        self.wait_timeout = wait_timeout
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)  # chunks freed, waiters moved
        self.waiters: list[int] = []  # instance ids waiting for a lease, first come first
        self._next_id = 1
        self._listener: socket.socket | None = None

    # -- lifecycle --

    def listen(self) -> None:
        if os.path.lexists(self.socket_path):
            if not stat.S_ISSOCK(os.lstat(self.socket_path).st_mode):
                raise RuntimeError(f"{self.socket_path} exists and is not a socket")
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as probe:
                try:
                    probe.connect(self.socket_path)
                except OSError:
                    os.unlink(self.socket_path)  # left behind by a daemon that died
                else:
                    raise RuntimeError(f"a daemon is already listening at {self.socket_path}")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        old = os.umask(0o177)  # the socket is 0600 from the moment it exists
        try:
            sock.bind(self.socket_path)
        finally:
            os.umask(old)
        sock.listen(64)
        self._listener = sock

    def serve_forever(self) -> None:
        if self._listener is None:
            self.listen()
        listener = self._listener  # shutdown() sets the attribute to None
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # closed by shutdown()
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def shutdown(self) -> None:
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
        pid, uid, _ = struct.unpack(
            "3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        )
        if uid not in (os.geteuid(), 0):
            protocol.send(conn, {"ok": False, "error": f"uid {uid} may not use this daemon"})
            conn.close()
            return
        me: Instance | None = None
        try:
            while True:
                try:
                    message, fds = protocol.recv(conn)
                except protocol.ProtocolError as e:
                    protocol.send(conn, {"ok": False, "error": str(e)})
                    continue
                if message is None:
                    return
                for fd in fds:  # nothing a client sends us carries fds
                    os.close(fd)
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
        except OSError as e:
            log.info("connection of pid %d broke: %s", pid, e)
        finally:
            if conn is not None:
                conn.close()
            if me is not None:
                self._disconnected(me)

    def _attach_controller(self, conn: socket.socket, message: dict) -> bool:
        key, ttl = message.get("key"), message.get("idle_ttl", 0)
        with self.lock:
            found = [i for i in self.instances.values() if key and i.key == key]
            if not found or not isinstance(ttl, int | float):
                error = f"no instance registered with key {key!r}" if not found else "bad idle_ttl"
                protocol.send(conn, {"ok": False, "error": error})
                return False
            if found[0].controller:  # a controller that connects again replaces the old
                found[0].controller.close()
            found[0].controller = Controller(conn, bool(message.get("pinned")), float(ttl))
        protocol.send(conn, self._ok(instance=found[0].id))
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
            with self.lock:
                me = Instance(self._next_id, pid, model, os.pidfd_open(pid), key=key)
                self._next_id += 1
                self.instances[me.id] = me
            log.info("instance %d (pid %d) registered for model %s", me.id, pid, model)
            return (
                self._ok(
                    instance=me.id,
                    device=self.device,
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
                    self.changed.wait(0.25)
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
            select.select([me.pidfd], [], [])  # readable once the process has exited
        with self.lock:
            returned = self.pool.release_all(me.id)
            del self.instances[me.id]
            self.changed.notify_all()
        if me.controller:
            me.controller.close()
        os.close(me.pidfd)
        if returned:
            log.warning("instance %d exited; %d chunks back in the pool", me.id, len(returned))

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
                        "wake_latency": inst.wake_latency,
                        "sleep_latency": inst.sleep_latency,
                    }
                )
            return self._ok(
                device=self.device,
                chunk_size=size,
                total_chunks=self.pool.total,
                free_chunks=len(self.pool.free),
                leased_chunks=self.pool.leased,
                balanced=self.pool.balanced(),
                instances=instances,
            )


def _exited(pidfd: int) -> bool:
    """A pidfd is readable once its process has exited."""
    return bool(select.select([pidfd], [], [], 0)[0])
