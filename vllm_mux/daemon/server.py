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

Instances outlive the daemon. It writes its books to a file beside its socket
(``<socket>.books``, 0600, replaced whole at each change of who holds what):
the pool's shape and, for each instance process that holds chunks, its pid,
start time, key and chunk ids. A daemon started on the same socket reads them
and makes only the chunks that no live process of those holds. Each holder
is kept on the books, disconnected, until it reconnects and says hello with
the ids it still holds and one fd for each — the chunks themselves: a memfd
lives while a process holds it, a CUDA allocation while an imported handle
does — or until its process exits, when its chunks are made anew. Chosen over
a daemon that learns only from who reconnects: without the file it could not
tell a free chunk from one held by an instance that has not reconnected yet,
so it could create nothing, and grant nothing, before every instance was
back (or some time had passed, when a late one would find its ids given to
another). A holder that lives on without reconnecting keeps its chunks: it
may still map them (an instance stops by itself once it has tried to
reconnect for RECONNECT_S, see client.py).
"""

import contextlib
import dataclasses
import logging
import os
import resource
import select
import socket
import stat
import threading
import time
from dataclasses import dataclass, field

import msgspec

from vllm_mux.daemon import fallback_dir, make_fallback_dir, protocol
from vllm_mux.daemon import policy as policies
from vllm_mux.daemon.host import HostBooks, HostError, default_budget
from vllm_mux.daemon.pool import Pool, PoolError
from vllm_mux.daemon.protocol import shown
from vllm_mux.memory import host as host_memory

log = logging.getLogger("vllm_mux.daemon")

HELLO_TIMEOUT = 30.0  # seconds a new connection has to send its first message
ASK_TIMEOUT = 5.0  # seconds a controller has to answer one question
# Seconds a control by hand waits for the engine's own part of a transition:
# a wake's copy or cold reload once its memory is granted (minutes for a large
# model from disk), a sleep's drain of long streams and its offload. The wait
# for memory has its own bound, --wait-timeout.
SETTLE_S = 1800.0
FD_MARGIN = 1024  # fds beyond one per chunk: connections, pidfds and the rest

STATES = ("starting", "awake", "sleeping", "asleep", "waking")
# A user's controls over a model by name (vllm-mux sleep|wake|pin|unpin): like
# status, for any client of the daemon's user, no hello needed.
CONTROLS = ("sleep", "wake", "pin", "unpin")
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
    started: int = 0  # the process's start time (/proc/PID/stat): its pid may be reused
    generation: int = 0  # bumped when a new connection takes the record over
    wakes: int = 0
    sleeps: int = 0
    last_wake: dict = field(default_factory=dict)  # timings the instance measured
    private_bytes: int = 0  # device memory it needs outside the pool (its budget)
    wake_latency: dict = field(default_factory=_latency)
    sleep_latency: dict = field(default_factory=_latency)
    awake_since: float = 0.0  # when it last woke: its turn on the device began
    wait_since: float | None = None  # when the lease it waits for was asked
    refusal: "Refused | None" = None  # why its last lease was refused, if it was


class Refused(ValueError):
    """A user's control (or a lease) refused; ``code`` names why, for the
    reply (the router answers each with its own HTTP status)."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code


class _Hand:
    """A control by hand under way for one instance: others for it wait on it."""

    def __init__(self, op: str):
        self.op = op
        self.done = threading.Event()
        self.reply: dict | None = None
        self.refused: Refused | None = None

    def outcome(self) -> dict:
        """The leader's reply, or its refusal raised anew (for this thread)."""
        if self.refused is not None:
            raise Refused(str(self.refused), self.refused.code)
        return self.reply


class Controller:
    """The daemon's end of an instance's controller connection: the daemon asks,
    the controller answers at once (it never blocks on the engine to reply)."""

    def __init__(
        self,
        conn: socket.socket,
        pinned: bool,
        idle_ttl: float,
        timeout: float,
        knobs: policies.Knobs | None = None,
    ):
        self.conn, self.pinned, self.idle_ttl = conn, pinned, idle_ttl
        self.knobs = knobs or policies.Knobs()  # the model's, for the policy
        self.timeout = timeout
        self.lock = threading.Lock()
        self.seq = 0

    def ask(self, op: str) -> dict | None:
        """The controller's reply if it says ok, else None."""
        reply = self.exchange(op)
        return reply if reply and reply.get("ok") else None

    def exchange(self, op: str) -> dict | None:
        """The controller's reply, ok or not, or None if it is gone, mute or
        wrong. Each question carries a number: a late answer to an earlier one
        is skipped, not taken for this one's. The whole exchange has
        ``timeout`` seconds, however many answers come: callers wait on it,
        some holding up leases."""
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
        return reply

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
        host_memory: int | None = None,
        policy: str = policies.DEFAULT,
    ):
        if policy not in policies.POLICIES:
            raise ValueError(f"unknown policy {policy!r}; known: {', '.join(policies.POLICIES)}")
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
        self.books_path = f"{socket_path}.books"
        # Made by listen(), once the socket is ours: an earlier daemon's books
        # may say that some exist already. None: held by an instance that has
        # not reconnected yet.
        self.chunks: list = []
        self.pool = Pool(n, chunk_size)
        # The host tier: one sealed copy per set of weights, a memfd each.
        on_host = n * chunk_size if backend.device_type == "cpu" else 0
        self.host = HostBooks(default_budget(on_host) if host_memory is None else host_memory)
        self.host_fds: dict[str, int] = {}  # digest -> the copy's memfd
        self.instances: dict[int, Instance] = {}
        self.wait_timeout = wait_timeout
        # Who sleeps for whom, and whose lease goes first (daemon/policy.py).
        self.policy = policies.POLICIES[policy]
        self.hello_timeout = HELLO_TIMEOUT
        self.ask_timeout = ASK_TIMEOUT
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)  # chunks freed, waiters moved
        self.waiters: list[int] = []  # instance ids waiting for a lease, first come first
        # The first waiter and its need, while protections hold it up (backfill).
        self.held_up: tuple[int, int] | None = None
        self._hands: dict[int, _Hand] = {}  # instance id -> the control by hand under way
        self._next_id = 1
        self._listener: socket.socket | None = None
        self._stopping = threading.Event()

    # -- lifecycle --

    def listen(self) -> None:
        """Bind the socket, 0600, in a directory no other user can write to
        (or a sticky one, like /tmp, where they cannot remove what is ours),
        never in place of another user's socket; then make the pool."""
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
                    raise RuntimeError(
                        f"a daemon is already listening at {path}: use it, stop it, or choose "
                        "another --socket"
                    )
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        old = os.umask(0o177)  # the socket is 0600 from the moment it exists
        try:
            sock.bind(path)
        except OSError as e:
            sock.close()
            raise RuntimeError(f"cannot listen at {path}: {e.strerror}") from None
        finally:
            os.umask(old)
        try:
            sock.listen(64)
            self._open_pool()
        except BaseException:
            sock.close()
            os.unlink(path)
            raise
        self._listener = sock

    def _open_pool(self) -> None:
        """Make every chunk but those that live instances of an earlier daemon
        hold (its books say which); those instances stay on the books,
        disconnected, until they reconnect or exit."""
        holders = self._recover()
        held = {i for _, ids in holders for i in ids}
        try:
            for i in range(self.pool.total):
                self.chunks.append(None if i in held else self.backend.create(self.pool.chunk_size))
            with self.lock:
                for me, ids in holders:
                    self.instances[me.id] = me
                    self.pool.hold(me.id, ids)
                if not self._save():
                    raise RuntimeError(f"cannot write the daemon's books at {self.books_path}")
        except BaseException:
            for chunk in self.chunks:
                if chunk is not None:
                    self.backend.destroy(chunk)
            self.chunks = []
            for me, _ in holders:
                os.close(me.pidfd)
            raise
        if holders:
            log.warning(
                "the books of the daemon before: %d live instances hold %d chunks; made the "
                "other %d",
                len(holders),
                len(held),
                self.pool.total - len(held),
            )
        for me, _ in holders:
            waiting = threading.Thread(target=self._disconnected, args=(me, 0), daemon=True)
            waiting.start()

    def _recover(self) -> list[tuple[Instance, list[int]]]:
        """The records of the live processes that hold chunks by the books of
        an earlier daemon on this socket, and the ids each holds. Refuses a
        pool of another shape while such processes live: their chunks would
        not fit it."""
        books = _read_books(self.books_path)
        if books is None:
            return []
        live = []
        try:
            for h in books.holders:
                try:
                    pidfd = os.pidfd_open(h.pid)
                except OSError:
                    continue  # gone, and the kernel freed its chunks with it
                if _start_time(h.pid) != h.started:
                    os.close(pidfd)  # its pid now names another process
                    continue
                live.append((h, pidfd))
            ours = (self.backend.identity, self.pool.chunk_size, self.pool.total)
            theirs = (books.device_identity, books.chunk_size, books.total_chunks)
            if live and ours != theirs:
                raise RuntimeError(
                    f"the books at {self.books_path} are of a pool of {theirs[2]} chunks of "
                    f"{theirs[1]} bytes on {theirs[0]}, and live instances (pids "
                    f"{', '.join(str(h.pid) for h, _ in live)}) still hold some of its chunks: "
                    "start the daemon with the same --device, --device-memory and "
                    "--chunk-size, or stop those instances first"
                )
        except BaseException:
            for _, pidfd in live:
                os.close(pidfd)
            raise
        records = []
        for h, pidfd in live:
            me = Instance(self._next_id, h.pid, h.model, pidfd, key=h.key, started=h.started)
            me.state, me.connected = "awake", False
            self._next_id += 1
            records.append((me, h.ids))
        return records

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
        """Stop listening. The books stay while instances hold chunks: a daemon
        started next on this socket takes them over (an upgrade)."""
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
            with self.lock:
                if not self.pool.leased:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self.books_path)

    # -- one connection --

    def _serve(self, conn: socket.socket) -> None:
        pid, uid = protocol.peer(conn)
        me: Instance | None = None
        generation = 0  # of ``me``, as this connection took it
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
                hello = message.get("op") == "hello"
                adopt = message.get("op") == "host_adopt" and me is not None
                if not (hello or adopt) or message.get("role") == "controller":
                    protocol.close_fds(fds)  # an instance's hello brings chunks, adopt a copy
                if hello and message.get("role") == "controller":
                    if self._attach_controller(conn, message):
                        conn = None  # it now belongs to the instance's record
                        return
                    continue
                out_fds = []
                try:
                    if hello:
                        reply, me, generation = self._hello(message, pid, me, fds)
                    elif adopt:
                        reply, out_fds = self._host_adopt(me, message, fds)
                    else:
                        reply, out_fds = self._handle(message, me)
                except (PoolError, ValueError, KeyError, TypeError) as e:
                    reply = {"ok": False, "error": str(e)}
                    if isinstance(e, Refused):
                        reply["code"] = e.code
                protocol.send(conn, reply, out_fds)
        except (OSError, protocol.ProtocolError) as e:  # ProtocolError: a reply too large
            log.info("connection of pid %d broke: %s", pid, e)
        finally:
            if conn is not None:
                conn.close()
            if me is not None:
                self._disconnected(me, generation)

    def _attach_controller(self, conn: socket.socket, message: dict) -> bool:
        key, ttl = message.get("key"), message.get("idle_ttl", 0)
        if not isinstance(ttl, int | float):
            protocol.send(conn, {"ok": False, "error": "bad idle_ttl"})
            return False
        try:
            knobs = message.get("knobs") or {}
            if not isinstance(knobs, dict):
                raise ValueError(f"knobs are a mapping, not {type(knobs).__name__}")
            knobs = policies.knobs_from(knobs)
        except (ValueError, TypeError) as e:
            protocol.send(conn, {"ok": False, "error": f"bad knobs: {e}"})
            return False
        if knobs.max_wait_s > self.wait_timeout / 2:
            # The bound is checked inside a lease, which gives up at
            # wait_timeout: past half of it, it would never act.
            log.warning(
                "max_wait_s %g of %s is more than half the daemon's --wait-timeout %g: using %g",
                knobs.max_wait_s, key, self.wait_timeout, self.wait_timeout / 2,
            )  # fmt: skip
            knobs = dataclasses.replace(knobs, max_wait_s=self.wait_timeout / 2)
        controller = Controller(
            conn, bool(message.get("pinned")), float(ttl), self.ask_timeout, knobs
        )
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

    def _hello(self, message: dict, pid: int, me: Instance | None, fds: list[int]):
        """An instance's worker registers, or registers again after its
        connection broke (this daemon's or an earlier one's): then it names
        the chunks it still holds, ``held``, and ``fds`` are those chunks.
        Returns the reply, the record and its generation. Every fd ends on the
        books or closed."""
        taken: list = []  # chunks made of ``fds``, until the books take them
        pidfd = -1
        try:
            if me is not None:
                raise ValueError("hello was already said on this connection")
            if message.get("role") != "instance":
                return self._ok(), None, 0
            handles = self.backend.transport == "handle"
            if handles and fds:
                raise ValueError(
                    f"a hello to a daemon of {self.backend.name} chunks brings no fds: they "
                    "travel as handles"
                )
            model, key, private, state, held = _hello_fields(message, None if handles else len(fds))
            taken = [None] * len(held) if handles else taken
            try:
                while fds:  # import_ owns the fd from here, whatever happens
                    taken.append(self.backend.import_(fds.pop(), self.pool.chunk_size))
            except (OSError, RuntimeError, ValueError) as e:
                raise ValueError(f"a chunk that came with hello is not one: {e}") from None
            taken.reverse()
            try:
                pidfd = os.pidfd_open(pid)
            except OSError as e:
                raise ValueError(f"cannot watch process {pid}: {e.strerror}") from None
            started = _start_time(pid)
            if started is None:
                raise ValueError(f"cannot watch process {pid}: it is gone")
            with self.lock:
                me = next(
                    (i for i in self.instances.values() if key and (i.pid, i.key) == (pid, key)),
                    None,
                )
                if me is None:
                    if held:
                        raise ValueError(
                            f"hello names chunks {held[:8]} but this daemon has no record of "
                            f"an instance of pid {pid} with that key holding any"
                        )
                    me = Instance(self._next_id, pid, model, pidfd, key=key, started=started)
                    me.private_bytes, me.state, pidfd = private, state, -1
                    self._next_id += 1
                    self.instances[me.id] = me
                    log.info("instance %d (pid %d) registered for model %s", me.id, pid, model)
                else:
                    self._adopt(me, held, taken, state, private)
                generation = me.generation
            return (
                self._ok(
                    instance=me.id,
                    device=self.device,
                    device_identity=self.backend.identity,
                    chunk_size=self.pool.chunk_size,
                    total_chunks=self.pool.total,
                ),
                me,
                generation,
            )
        finally:
            protocol.close_fds(fds)
            for chunk in taken:
                if chunk is not None:
                    self.backend.destroy(chunk)
            if pidfd >= 0:
                os.close(pidfd)

    def _adopt(self, me: Instance, held: list[int], taken: list, state: str, private: int):
        """Take back a disconnected instance that says hello again (under the
        lock). Of the chunks the books give it, it holds ``held`` (``taken``
        are those chunks): where this daemon has no chunk for such an id (it
        started after the instance leased it), the instance's becomes the
        daemon's, and ``taken`` loses it. The rest the instance no longer has
        (it unmapped them while the daemon was away, or a lease's reply never
        reached it): they are free again, made anew where need be."""
        if me.connected:
            raise ValueError(f"instance {me.id} (pid {me.pid}) is still connected; try again")
        mine = set(self.pool.held_by(me.id))
        strangers = [i for i in held if i not in mine]
        if strangers:
            raise ValueError(
                f"hello names chunks {strangers[:8]} that instance {me.id} (pid {me.pid}) "
                "does not hold on this daemon's books"
            )
        # Chunks that travel as handles cannot be handed to this daemon (CANN exports
        # an allocation only from the process that made it): where an earlier daemon
        # made them, the instance keeps mapping its own imports, the books keep the
        # ids as its, and they are made anew when it lets them go (the release op).
        unmade = sum(self.chunks[i] is None and chunk is None for i, chunk in zip(held, taken))
        gone = sorted(mine - set(held))
        fresh = self._create([i for i in gone if self.chunks[i] is None])
        adopted = 0
        for k, i in enumerate(held):
            if self.chunks[i] is None:
                self.chunks[i], taken[k] = taken[k], None
                adopted += 1
        for i, chunk in fresh.items():
            self.chunks[i] = chunk
        self.pool.release(me.id, gone)
        me.generation += 1
        me.connected, me.state, me.private_bytes = True, state, private
        me.last_active = time.time()
        self._save()
        self.changed.notify_all()
        log.warning(
            "instance %d (pid %d, %s) reconnected holding %d chunks (%d taken back from it); "
            "%d it no longer holds are free; %d an earlier daemon made stay its own, made "
            "anew when it lets them go",
            me.id,
            me.pid,
            me.model,
            len(held),
            adopted,
            len(gone),
            unmade,
        )

    def _create(self, ids: list[int]) -> dict:
        """New chunks for ``ids``, all or none."""
        made = {}
        try:
            for i in ids:
                made[i] = self.backend.create(self.pool.chunk_size)
        except (OSError, RuntimeError) as e:
            for chunk in made.values():
                self.backend.destroy(chunk)
            raise PoolError(f"cannot make chunks anew: {e}") from None
        return made

    def _handle(self, message: dict, me: Instance | None):
        op = message.get("op")
        if op == "status":
            return self.status(), []
        if op in CONTROLS:
            return self._control(op, message.get("model")), []
        if me is None:
            raise ValueError(f"op {op!r} needs a hello from an instance first")
        if op == "lease":
            n = message.get("chunks")
            if not isinstance(n, int) or isinstance(n, bool):
                raise ValueError("lease names a whole number of chunks")
            want = message.get("want", [])
            if not isinstance(want, list) or not all(type(i) is int for i in want):
                raise ValueError("want names a list of chunk ids")
            if self.backend.transport == "fd":
                ids, intact = self._lease(me, n, want)
                fds = [self.backend.export(self.chunks[i]) for i in ids]
                return self._ok(ids=ids, intact=intact), fds
            tgid = message.get("tgid")  # a handle lets in only the processes it names
            if type(tgid) is not int or not 0 < tgid < 2**31:
                raise ValueError(
                    f"a lease of {self.backend.name} chunks names the instance's bare tgid "
                    "(aclrtDeviceGetBareTgid), a positive 32-bit integer"
                )
            ids, intact = self._lease(me, n, want)
            try:
                handles = [self.backend.grant(self.chunks[i], tgid) for i in ids]
            except BaseException as e:  # the lease is not the instance's unless it hears of it
                with self.lock:  # those that came back untouched stay warm for it
                    self.pool.release(me.id, [i for i in ids if i not in intact])
                    self.pool.release(me.id, [i for i in ids if i in intact], keep=True)
                    self._save()
                    self.changed.notify_all()
                if isinstance(e, (RuntimeError, OSError)):  # the driver said no: an answer
                    raise PoolError(f"cannot let this instance import its chunks: {e}") from None
                raise
            return self._ok(ids=ids, intact=intact, handles=handles), []
        if op == "release":
            ids = message.get("ids")
            if not isinstance(ids, list) or not all(type(i) is int for i in ids):
                raise ValueError("release names a list of chunk ids")
            with self.lock:
                mine = set(self.pool.held_by(me.id))
                if len(set(ids)) != len(ids) or not mine.issuperset(ids):
                    self.pool.release(me.id, ids)  # refuses it, saying why, before anything
                # Held across a restart of this daemon without a chunk here (see
                # _adopt): made now, their bytes not the instance's.
                fresh = self._create([i for i in ids if i in mine and self.chunks[i] is None])
                for i, chunk in fresh.items():
                    self.chunks[i] = chunk
                keep = message.get("keep") is True
                self.pool.release(me.id, [i for i in ids if i not in fresh], keep=keep)
                self.pool.release(me.id, list(fresh))
                self._save()
                self.changed.notify_all()
            return self._ok(), []
        if op in ("host_get", "host_filled", "host_release"):
            return self._host_op(op, message, me)
        if op == "state":
            state = message.get("state")
            if state not in STATES:
                raise ValueError(f"state is one of {', '.join(STATES)}, not {state!r}")
            with self.lock:
                if state == "asleep" and self.pool.held_by(me.id):
                    raise ValueError("an instance that holds chunks is not asleep")
                me.wakes += state == "awake" and me.state == "waking"
                me.sleeps += state == "asleep"
                if state == "awake" and me.state != "awake":
                    me.awake_since = time.time()
                me.state = state
                me.last_active = time.time()
                self.changed.notify_all()  # a copy being dropped waits on its users' states
                facts = message.get("wake") or message.get("sleep")
                if isinstance(facts, dict) and isinstance(facts.get("seconds"), int | float):
                    if state == "awake":
                        me.last_wake = facts
                        _observe(me.wake_latency, facts["seconds"])
                    elif state == "asleep":
                        _observe(me.sleep_latency, facts["seconds"])
            return self._ok(), []
        raise ValueError(f"unknown op {op!r}")

    # -- a user's controls: vllm-mux sleep|wake|pin|unpin NAME --

    def _control(self, op: str, name) -> dict:
        """``{"op": "sleep"|"wake"|"pin"|"unpin", "model": NAME}`` from any
        client of this user. Replies: sleep and wake ``{"ok", "model",
        "state", "changed", "seconds"}`` once its controller has slept or woken
        (``changed`` false: it was already), and a sleep that requests woke
        straight back says so, ``woke_for``: how many it serves now; pin and
        unpin ``{"ok", "model", "pinned", "changed", "state"}`` at once, the
        state its controller's. A refusal is ``{"ok": false,
        "error", "code"}``, the code one of model_not_found, not_running,
        ambiguous, pinned, failed, timeout."""
        inst = self._running(name)
        if op in ("pin", "unpin"):
            return self._pin(inst, op == "pin")
        return self._transition(inst, op)

    def _running(self, name) -> Instance:
        """The live instance (connected, with a controller) that serves ``name``."""
        if not isinstance(name, str) or not name:
            raise ValueError("a control names a model")
        with self.lock:
            known = sorted({i.model for i in self.instances.values()})
            mine = [i for i in self.instances.values() if i.model == name]
            live = [i for i in mine if i.connected and i.controller and i.state != "starting"]
        if not mine:
            raise Refused(
                f"no model {name!r:.300} on this daemon; it knows "
                f"{', '.join(map(shown, known)) if known else 'none (no instance has registered)'}",
                "model_not_found",
            )
        if not live:
            why = "; ".join(f"pid {i.pid}: {_not_running(i)}" for i in mine)
            why = _not_running(mine[0]) if len(mine) == 1 else why
            raise Refused(
                f"{shown(name)} is not running ({why}); try again once it serves", "not_running"
            )
        if len(live) > 1:
            raise Refused(
                f"{len(live)} instances serve {shown(name)} (pids "
                f"{', '.join(str(i.pid) for i in live)}): give them names of their own",
                "ambiguous",
            )
        return live[0]

    def _pin(self, inst: Instance, pinned: bool) -> dict:
        """The controller's flag first (it refuses the daemon's "sleep", skips
        its idle sleep by it, and calls off a sleep the engine has not been
        told of), then the books'. The state stays as it is; the reply gives
        the controller's, which may be "sleeping": a pin that came too late."""
        op = "pin" if pinned else "unpin"
        reply = inst.controller.exchange(op)
        if reply is None:
            raise Refused(f"{inst.model}'s API server did not answer; try again", "not_running")
        if not reply.get("ok"):
            raise Refused(_other_version(inst.model, op), "not_running")
        with self.lock:
            changed = inst.controller.pinned != pinned
            inst.controller.pinned = pinned
            return self._ok(
                model=inst.model,
                pinned=pinned,
                changed=changed,
                state=reply.get("state", inst.state),
            )

    def _transition(self, inst: Instance, op: str) -> dict:
        """A sleep or wake by hand. One at a time per instance does the
        asking: another of the same op waits for its reply and gets it; one of
        the other op waits for its end, then goes (a sleep asked during a wake
        follows the wake)."""
        while True:
            with self.lock:
                hand = self._hands.get(inst.id)
                if hand is None:
                    hand = self._hands[inst.id] = _Hand(op)
                    break
            hand.done.wait()
            if hand.op == op:
                return hand.outcome()
        try:
            hand.reply = self._lead(inst, op)
            return hand.reply
        except Refused as e:
            hand.refused = e
            raise
        finally:
            with self.lock:
                del self._hands[inst.id]
            hand.done.set()

    def _lead(self, inst: Instance, op: str) -> dict:
        """Ask the instance's controller to sleep (its requests in flight
        finish first) or to wake (waiting, like a request's wake, for others
        to sleep), and wait until its report counts one more sleep or wake, or
        one more failure: counts, not states, which may come and go between
        two looks. Asked again only once its report shows the last ask done
        (``asked``) and it rests in the other state: it may have been waking
        or draining when asked, or a request woke it meanwhile.

        Each stretch of the wait has its bound: waiting for memory, or for
        the controller to act, ``wait_timeout`` and ``ask_timeout`` more; the
        engine's own work (a drain, an offload, a wake's copy or reload once
        it holds its memory) SETTLE_S."""
        goal, other, count, failures = {
            "sleep": ("asleep", "awake", "sleeps", "failed_sleeps"),
            "wake": ("awake", "asleep", "wakes", "failed_wakes"),
        }[op]
        name, start = shown(inst.model), time.monotonic()
        report = self._report(inst)
        if report["state"] == goal and not (op == "wake" and report["draining"]):
            return self._ok(model=name, state=goal, changed=False, seconds=0.0)
        done, failed = report[count], report[failures]
        stretch, since = None, start
        while True:
            seconds = time.monotonic() - start
            if report[count] > done:
                reply = self._ok(model=name, state=report["state"], changed=True, seconds=seconds)
                if op == "sleep" and report["state"] != "asleep":
                    reply["woke_for"] = report["waiting"] + report["in_flight"]
                return reply
            settled = not (report["draining"] or report["asked"])
            if op == "wake" and report["state"] == "awake" and settled:
                # Awake with no wake counted: the drain it woke from was called
                # off (a pin) or its sleep failed. Awake is what was asked.
                return self._ok(model=name, state="awake", changed=False, seconds=seconds)
            if report[failures] > failed:
                refusal = inst.refusal if op == "wake" else None
                if refusal is not None:  # its lease was refused: say why
                    raise Refused(f"{name} cannot wake: {refusal}", refusal.code)
                error = report["last_error"] or "see its server's log"
                raise Refused(f"{name} failed to {op}: {error}", "failed")
            under_way = report["draining"] or report["state"] == "sleeping"
            asked = op in report["asked"]
            if op == "sleep" and inst.controller.pinned and not (under_way or asked):
                raise Refused(f"{name} is pinned: `vllm-mux unpin {name}` first", "pinned")
            if not asked and report["state"] == other and not report["draining"]:
                answer = inst.controller.exchange(op)
                if answer is None:
                    raise Refused(f"{name}'s API server did not answer; try again", "not_running")
                if answer.get("code") == "pinned":
                    raise Refused(f"{name} is pinned: `vllm-mux unpin {name}` first", "pinned")
            with self.lock:
                holds = bool(self.pool.held_by(inst.id))
                now = (report["state"], under_way, holds)
                if now != stretch:
                    stretch, since = now, time.monotonic()
                engine = under_way or (report["state"] == "waking" and holds)
                bound = SETTLE_S if engine else self.wait_timeout + self.ask_timeout
                if time.monotonic() - since > bound:
                    raise Refused(
                        f"{name} is not {goal} after {seconds:.0f} s (it is {report['state']}); "
                        "it may still get there: see `vllm-mux status`",
                        "timeout",
                    )
                self.changed.wait(0.25)
            report = self._report(inst)

    def _report(self, inst: Instance) -> dict:
        report = inst.controller.ask("report")
        if report is None:
            raise Refused(
                f"{inst.model}'s API server does not answer; see `vllm-mux status`", "not_running"
            )
        if not isinstance(report.get("asked"), list):
            raise Refused(_other_version(inst.model, "report"), "not_running")
        return report

    # -- the host tier --

    def _host_op(self, op: str, message: dict, me: Instance) -> tuple[dict, list[int]]:
        digest = message.get("digest")
        try:
            if op == "host_get":
                return self._host_get(me, digest, message)
            if op == "host_filled":
                return self._host_filled(me, digest)
            with self.lock:
                if self.host.release(me.id, digest):
                    self._close_copy(digest)
                self.changed.notify_all()
            return self._ok(), []
        except HostError as e:
            raise ValueError(str(e)) from None

    def _host_get(self, me: Instance, digest, message: dict) -> tuple[dict, list[int]]:
        """The sealed copy of these bytes, shared; else, with ``fill``, a new
        one for this instance to fill (room made by making the least recently
        used sleeping models cold); else ``absent``."""
        size, fill = message.get("size"), message.get("fill") is True
        coldable = message.get("coldable", True) is not False
        if type(size) is not int or size <= 0:
            raise HostError(f"a host copy is a positive number of bytes, not {size!r:.40}")
        deadline = time.monotonic() + self.wait_timeout
        tried: set[str] = set()  # copies whose users would not let them go
        while True:
            victim = None
            with self.lock:
                copy = self.host.copies.get(digest)
                if copy is not None and copy.size != size:
                    raise HostError(f"the copy of these bytes is {copy.size} bytes, not {size}")
                if copy is not None and me.id in copy.users and not copy.sealed:
                    raise HostError("this instance is filling that copy already")
                if self.host.take(me.id, digest) is not None:
                    copy.coldable = copy.coldable and coldable
                    return self._ok(size=copy.size), [self.host_fds[digest]]
                if copy is None and not fill:
                    return self._ok(absent=True), []
                if copy is None:
                    try:
                        copy = self.host.make(me.id, digest, size)
                    except HostError as e:
                        if size > self.host.budget:
                            raise
                        victims = self.host.victims(size, self._droppable)
                        victims = [c for c in victims if c.digest not in tried]
                        if not victims:
                            raise HostError(
                                f"no room for this model's weights in host memory: {e}; the "
                                "copies there belong to awake models, or to models their "
                                "files cannot restore"
                            ) from None
                        victim = victims[0]
                    else:  # ours to fill, whatever the clock says
                        copy.coldable = coldable
                        break
                elif time.monotonic() > deadline:  # being filled or dropped by others
                    raise HostError("waited too long for a copy of these bytes to be filled")
                else:
                    self.changed.wait(0.25)
                    continue
            if not self._make_cold(victim):
                tried.add(victim.digest)
        return self._new_copy(me, digest, size)

    def _new_copy(self, me: Instance, digest: str, size: int) -> tuple[dict, list[int]]:
        """Make the memory of a copy the books now have (outside the lock: it
        commits ``size`` bytes) and hand it to its filler."""
        try:
            fd = host_memory.create(size)
        except OSError as e:
            with self.lock:
                self.host.release(me.id, digest)
                self.changed.notify_all()
            raise HostError(f"cannot make a host copy of {size} bytes: {e.strerror}") from None
        with self.lock:
            copy = self.host.copies.get(digest)
            if copy is not None and me.id in copy.users:
                self.host_fds[digest] = fd
                return self._ok(fill=True, size=size), [fd]
        os.close(fd)  # its filler exited meanwhile
        raise HostError("the instance is gone")

    def _host_filled(self, me: Instance, digest) -> tuple[dict, list[int]]:
        """Seal a copy its filler has written and unmapped, check its bytes
        are the ones named, and hand it back read-only: from now on it is
        shared by every instance with these bytes."""
        with self.lock:
            copy = self.host.copies.get(digest)
            if (
                copy is None
                or copy.sealed
                or me.id not in copy.users
                or digest not in self.host_fds
            ):
                raise HostError("no copy of these bytes is being filled by this instance")
            fd = self.host_fds[digest]
        try:
            host_memory.seal(fd)
        except OSError as e:
            raise HostError(f"cannot seal the copy ({e.strerror}): unmap it first") from None
        actual = host_memory.digest_fd(fd, copy.size)  # not under the lock: seconds per GB
        with self.lock:
            if actual != digest:
                if self.host.release(me.id, digest):
                    self._close_copy(digest)
                self.changed.notify_all()
                raise HostError(
                    f"the bytes filled have digest {actual}, not the {digest} they were named by"
                )
            self.host.seal(me.id, digest)
            self.changed.notify_all()
            log.info("a host copy of %s's weights (%d bytes) is sealed", me.model, copy.size)
            return self._ok(size=copy.size), [fd]

    def _host_adopt(self, me: Instance, message: dict, fds: list[int]):
        """An instance that reconnected (this daemon started after its copy
        was made) hands its host copy over, one sealed memfd: the books take
        it as it is, or join it to this daemon's copy of the same bytes; if
        that is another memfd, the reply brings it (``remap``), for the
        instance to map instead of its own. A copy that does not fit the
        budget is refused (the instance then lets it go and is cold).
        Returns the reply and its fds."""
        try:
            digest, size = message.get("digest"), message.get("size")
            coldable = message.get("coldable", True) is not False
            if len(fds) != 1:
                raise HostError(f"host_adopt brings one fd, not {len(fds)}")
            fd = fds[0]
            if not host_memory.sealed(fd) or os.fstat(fd).st_size != size:
                raise HostError(f"the copy handed over is not a sealed memfd of {size} bytes")
            if (joined := self._join(me, digest, size, fd, coldable)) is not None:
                return joined
            if host_memory.digest_fd(fd, size) != digest:  # not under the lock
                raise HostError("the copy handed over does not hold the bytes named")
            if (joined := self._join(me, digest, size, fd, coldable)) is not None:
                return joined  # another user handed it over meanwhile
            with self.lock:
                copy = self.host.make(me.id, digest, size)
                copy.sealed, copy.coldable = True, coldable
                self.host_fds[digest], fds[0] = fd, -1
                self.changed.notify_all()
            log.warning("instance %d (%s) handed over its host copy", me.id, me.model)
            return self._ok(), []
        except HostError as e:
            raise ValueError(str(e)) from None
        finally:
            protocol.close_fds([fd for fd in fds if fd >= 0])

    def _join(self, me: Instance, digest: str, size: int, fd: int, coldable: bool):
        """Make ``me`` a user of this daemon's copy of ``digest``, if there is
        one: the reply, with that copy's fd where it is not ``fd``'s memory."""
        with self.lock:
            copy = self.host.copies.get(digest)
            if copy is None or not copy.sealed or copy.dropping:
                return None
            if copy.size != size:
                raise HostError(f"the copy of these bytes is {copy.size} bytes, not {size}")
            self.host.take(me.id, digest)
            copy.coldable = copy.coldable and coldable
            ours = self.host_fds[digest]
            if _same_file(ours, fd):
                return self._ok(), []
            return self._ok(remap=True), [ours]

    def _make_cold(self, copy) -> bool:
        """Ask every user of ``copy`` (all asleep) to let it go, and wait until
        they have: its memory is then free and their model is cold. False if
        one wakes or does not answer in time: the copy stays."""
        with self.lock:
            copy.dropping = True
            users = [self.instances[u] for u in copy.users if u in self.instances]
        refused = False
        for user in users:  # each has a controller (_droppable)
            refused = refused or not (user.controller and user.controller.ask("drop_host"))
        deadline = time.monotonic() + 2 * self.ask_timeout
        with self.lock:
            while copy.users and time.monotonic() < deadline and not refused:
                if not all(map(self._asleep, copy.users)):
                    break
                self.changed.wait(0.25)
            if copy.users:
                copy.dropping = False
                return False
        log.warning(
            "host memory full: dropped the copy of %s's weights (%d bytes); that model is cold",
            ", ".join(sorted({u.model for u in users})),
            copy.size,
        )
        return True

    def _asleep(self, instance_id: int) -> bool:
        inst = self.instances.get(instance_id)
        return inst is not None and inst.connected and inst.state == "asleep"

    def _droppable(self, instance_id: int) -> bool:
        """Asleep, and with a controller to ask to let its host copy go."""
        inst = self.instances.get(instance_id)
        return self._asleep(instance_id) and inst.controller is not None

    def _close_copy(self, digest: str) -> None:
        """The books freed a copy: free its memory (under the lock)."""
        fd = self.host_fds.pop(digest, None)
        if fd is not None:
            os.close(fd)

    def _ok(self, **fields) -> dict:
        return {"ok": True, **fields}

    def _save(self) -> bool:
        """Write the books (under the lock, after each change of who holds
        what): what a daemon started next on this socket needs to know. False,
        and said in the log, if they cannot be written."""
        ids: dict[int, list[int]] = {}
        for chunk, holder in self.pool.holder.items():
            ids.setdefault(holder, []).append(chunk)
        holders = [
            _Holder(i.pid, i.started, i.key, i.model, sorted(ids[i.id]))
            for i in self.instances.values()
            if i.id in ids
        ]
        books = _Books(self.backend.identity, self.pool.chunk_size, self.pool.total, holders)
        try:
            _replace(self.books_path, msgspec.json.encode(books))
        except OSError as e:
            log.error("cannot write the books at %s: %s", self.books_path, e)
            return False
        return True

    # -- arbitration --

    def _lease(self, me: Instance, n: int, want: list[int] = ()) -> tuple[list[int], list[int]]:
        """Grant ``n`` chunks, asking other instances to sleep if they do not fit;
        ``want``: the chunks it slept on, given back where still untouched.
        Returns the ids and those of them that were given back untouched.

        Waits up to ``wait_timeout``; leases are granted in the order the
        policy says (``next_to_wake``: first come, first served under
        switch-per-request), with one exception: an instance that is still
        starting (it holds chunks but has no controller yet, so nobody can ask
        it to sleep) may take free chunks ahead of the queue, since the queue
        may be waiting for it.

        Refused at once (code pinned), and whenever a pin comes while it
        waits, if the chunks could not come free even were every instance
        that may be asked to sleep asleep: pinned ones hold the rest. Waiting
        would only hold up every lease behind it. A starting or disconnected
        instance counts as one that may give its chunks back.
        """
        deadline = time.monotonic() + self.wait_timeout
        with self.lock:
            me.refusal = None
            self.pool.check(n)
            mine = len(self.pool.held_by(me.id))
            if n > self.pool.total - mine:
                raise PoolError(
                    f"asks for {n} chunks; the pool has {self.pool.total} and this instance "
                    f"holds {mine} already: the pool is too small for it even with every other "
                    "instance asleep; start the daemon with a larger --device-memory or give "
                    "the model less memory"
                )
            self._refuse_if_pinned(me, n)
            self.waiters.append(me.id)
            me.wait_since = time.time()
        try:
            while True:
                with self.lock:
                    starting = me.controller is None and self.pool.held_by(me.id)
                    first_id = self._first_waiter()
                    first = first_id == me.id
                    backfill = self._may_backfill(me.id, first_id)
                    if (first or starting or backfill) and n <= len(self.pool.free):
                        intact = self.pool.intact(me.id, want)
                        ids = self.pool.lease(me.id, n, want)
                        if not self._save():  # a lease the books do not show could be lost
                            self.pool.release(me.id, ids)
                            raise PoolError(
                                f"cannot write the daemon's books at {self.books_path}; no "
                                "lease is granted until they can be written (see its log)"
                            )
                        me.last_active = time.time()
                        return ids, sorted(intact)
                    self._refuse_if_pinned(me, n)  # a pin may have come meanwhile
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
                me.wait_since = None
                if self.held_up and self.held_up[0] == me.id:
                    self.held_up = None
                self.changed.notify_all()

    def _refuse_if_pinned(self, me: Instance, n: int) -> None:
        """Refuse ``me``'s lease of ``n`` chunks if pinned instances hold so
        many that the rest could never give ``n`` (under the lock)."""
        pins = [  # a pinned one already sleeping, or gone, will give its chunks back
            (i.model, len(self.pool.held_by(i.id)))
            for i in self.instances.values()
            if i is not me
            and i.connected
            and i.state != "sleeping"
            and i.controller
            and i.controller.pinned
            and self.pool.held_by(i.id)
        ]
        mine = len(self.pool.held_by(me.id))
        if n <= self.pool.total - mine - sum(k for _, k in pins):
            return
        holders = ", ".join(f"{shown(model)} ({k})" for model, k in pins)
        me.refusal = Refused(
            f"{n} chunks cannot come free while pinned models hold them: {len(self.pool.free)} "
            f"of {self.pool.total} are free, and pinned {holders} hold the rest; unpin one "
            "(`vllm-mux unpin NAME`) and try again",
            "pinned",
        )
        raise me.refusal

    def _view(self, inst: Instance, report: dict | None = None) -> policies.View:
        """What the policy sees of an instance (under the lock): the books' facts,
        and its controller's ``report`` of its requests where asked for one."""
        report = report or {}
        return policies.View(
            id=inst.id,
            model=inst.model,
            state=inst.state if inst.controller else "starting",
            chunks=len(self.pool.held_by(inst.id)),
            pinned=bool(inst.controller and inst.controller.pinned),
            knobs=inst.controller.knobs if inst.controller else policies.Knobs(),
            draining=bool(report.get("draining")),
            in_flight=report.get("in_flight", 0),
            waiting=report.get("waiting", 0),
            oldest_wait=inst.wait_since,
            turn_began=inst.awake_since,
            last_active=max(inst.last_active, report.get("last_active", 0)),
        )

    def _may_backfill(self, me: int, first: int) -> bool:
        """Whether waiter ``me`` may take free chunks ahead of the first waiter
        (under the lock): only while the first is held up by protections
        (policy.Decision.held) and the free chunks are too few for it. A
        first waiter that changed asks anew before anyone backfills."""
        if self.held_up and self.held_up[0] != first:
            self.held_up = None
        return self.held_up is not None and me != first and len(self.pool.free) < self.held_up[1]

    def _first_waiter(self) -> int:
        """The waiter whose lease goes next, by the policy (under the lock)."""
        views = [self._view(self.instances[i]) for i in self.waiters]
        return self.policy.next_to_wake(views, time.time())

    def _ask_to_sleep(self, me: Instance, n: int) -> None:
        """Ask the instances the policy names to sleep, so that ``n`` chunks
        come free for ``me``: under switch-per-request idle ones before busy
        ones, least recently active first; under batched only those whose turn
        on the device is over (see policy.py).

        Called again every quarter second while the lease waits: asking twice
        is harmless (an instance already draining ignores it), an instance
        that was waking when first asked is asked again once it is awake, and
        a turn that was protected when first asked may have ended.
        """
        with self.lock:
            awake = [
                i
                for i in self.instances.values()
                if i is not me and i.state == "awake" and i.controller and i.connected
            ]
        # Their requests, asked outside the lock: a controller may take its time.
        reports = {i.id: i.controller.ask("report") for i in awake}
        with self.lock:
            # An awake one whose controller did not answer (or that woke since)
            # is no candidate: nobody knows its requests.
            views = [
                self._view(i, reports.get(i.id))
                for i in self.instances.values()
                if i.connected and (reports.get(i.id) or i.state != "awake")
            ]
            asker = self._view(me)
            free = len(self.pool.free)
        decision = self.policy.victims(asker, n, free, views, time.time())
        with self.lock:
            if decision.held and self._first_waiter() == me.id:
                self.held_up = (me.id, n)
            elif self.held_up and self.held_up[0] == me.id:
                self.held_up = None  # not held any more, or not first
            self.changed.notify_all()
        for victim in filter(None, map(self.instances.get, decision.sleep)):
            if victim.controller.ask("sleep") and not reports[victim.id].get("draining"):
                log.info("asked %d (%s) to sleep for %s", victim.id, victim.model, me.model)

    def _disconnected(self, me: Instance, generation: int) -> None:
        """Take the chunks back once the process is gone, not before, unless it
        says hello again first: then its new connection owns the record."""
        with self.lock:
            if me.generation != generation:
                return
            me.connected = False
            holds = bool(self.pool.held_by(me.id))
        if holds:
            log.warning(
                "instance %d (pid %d, %s) holds chunks and is not connected; keeping them for "
                "it until it reconnects or exits",
                me.id,
                me.pid,
                me.model,
            )
            if not self._wait_for_exit(me, generation):
                with self.lock:
                    if me.generation != generation:
                        return  # reconnected
                # The daemon stops: the books stay, for the next one.
        elif not self._forget(me, generation):
            return
        if me.controller:
            me.controller.close()
        os.close(me.pidfd)

    def _wait_for_exit(self, me: Instance, generation: int) -> bool:
        """Until the process has exited: then its chunks are free again (made
        anew where this daemon has none: the kernel freed the process's with
        it). False if it reconnects first, or the daemon stops (its books stay)."""
        while not _exited(me.pidfd, timeout=0.25):
            if self._stopping.is_set():
                return False
            with self.lock:
                if me.generation != generation:
                    return False
        return self._forget(me, generation)

    def _forget(self, me: Instance, generation: int) -> bool:
        """Take an instance off the books, its chunks back to the pool. False
        if a new connection took it over meanwhile."""
        while True:
            with self.lock:
                if me.generation != generation:
                    return False  # it said hello as it died: that connection ends it
                missing = [i for i in self.pool.held_by(me.id) if self.chunks[i] is None]
                try:
                    fresh = self._create(missing)
                except PoolError as e:
                    log.error("instance %d is gone, but %s; trying again in 5 s", me.id, e)
                else:
                    for i, chunk in fresh.items():
                        self.chunks[i] = chunk
                    returned = self.pool.release_all(me.id)
                    self.pool.forget(me.id)
                    for copy in self.host.release_all(me.id):
                        self._close_copy(copy.digest)
                    del self.instances[me.id]
                    self._save()
                    self.changed.notify_all()
                    break
            if self._stopping.wait(5):
                return True
        if returned:
            log.warning(
                "instance %d exited; %d chunks back (%d made anew)",
                me.id,
                len(returned),
                len(missing),
            )
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
                        "resident_chunks": self.pool.resident(inst.id),
                        "host_copy": [c.digest for c in self.host.held_by(inst.id)],
                        "last_active": max(inst.last_active, report.get("last_active", 0)),
                        "in_flight": report.get("in_flight", 0),
                        "waiting": report.get("waiting", 0),
                        "pinned": bool(inst.controller and inst.controller.pinned),
                        "idle_ttl": inst.controller.idle_ttl if inst.controller else None,
                        "knobs": (
                            dataclasses.asdict(inst.controller.knobs) if inst.controller else None
                        ),
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
                chunk_map=self.pool.chunk_map(),
                balanced=self.pool.balanced(),
                host_budget=self.host.budget,
                host_used=self.host.used,
                host_free=self.host.free,
                host_balanced=self.host.balanced(),
                host_memfds=len(self.host_fds),
                host_copies=[
                    {
                        "digest": c.digest,
                        "size": c.size,
                        "users": sorted(c.users),
                        "sealed": c.sealed,
                        "coldable": c.coldable,
                    }
                    for c in self.host.copies.values()
                ],
                instances=instances,
            )


def _not_running(inst: Instance) -> str:
    """Why an instance takes no control."""
    if not inst.connected:
        return "its instance is disconnected"
    if inst.state == "starting":
        return "its instance is starting"
    return "its API server has not joined the daemon yet"


def _other_version(model: str, op: str) -> str:
    return (
        f"{shown(model)}'s API server does not know {op!r} as this daemon does: it runs "
        "another version of vllm-mux; restart it (`vllm-mux serve` restarts a server that "
        "exits) or run the daemon of its version"
    )


def _same_file(a: int, b: int) -> bool:
    sa, sb = os.fstat(a), os.fstat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _exited(pidfd: int, timeout: float = 0.0) -> bool:
    """A pidfd is readable once its process has exited. poll(), not select():
    select() refuses fds from 1024 on, and a daemon that holds a pool of
    thousands of chunks (an fd each) opens every pidfd above those."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(timeout * 1000))


def _hello_fields(message: dict, nfds: int | None) -> tuple[str, str, int, str, list[int]]:
    """An instance's hello: its model, key, private bytes, state, and the
    chunks it says it holds (one fd each came with it; ``nfds`` None: chunks
    that travel as handles, which bring nothing), checked."""
    model = message.get("model")
    if not isinstance(model, str) or not model:
        raise ValueError("hello from an instance names its model")
    key = message.get("key", "")
    if not isinstance(key, str):
        raise ValueError("an instance's key is a string")
    for what, text in (("a model's name", model), ("an instance's key", key)):
        if len(text) > protocol.MAX_NAME:
            raise ValueError(f"{what} is at most {protocol.MAX_NAME} characters, not {len(text)}")
    private = message.get("private_bytes", 0)
    if type(private) is not int or private < 0:
        raise ValueError("private_bytes is a non-negative integer")
    state = message.get("state", "starting")
    if not isinstance(state, str) or state not in STATES:
        raise ValueError(f"state is one of {', '.join(STATES)}, not {state!r:.80}")
    held = message.get("held", [])
    if not isinstance(held, list) or not all(type(i) is int for i in held):
        raise ValueError("held names a list of chunk ids")
    if len(set(held)) != len(held):
        raise ValueError("held names a chunk twice")
    if nfds is not None and len(held) != nfds:
        raise ValueError(f"hello names {len(held)} held chunks but brings {nfds} fds: one each")
    if held and state == "asleep":
        raise ValueError("an instance that holds chunks is not asleep")
    return model, key, private, state, held


def _start_time(pid: int) -> int | None:
    """When the process started (the 22nd field of /proc/PID/stat), None if it
    is gone: with its pid, this names one process, even once the pid is reused."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            line = f.read()
    except OSError:
        return None
    return int(line.rsplit(b")", 1)[1].split()[19])


class _Holder(msgspec.Struct):
    """One instance process that holds chunks, in the books' file."""

    pid: int
    started: int
    key: str
    model: str
    ids: list[int]


class _Books(msgspec.Struct):
    """The books' file: the pool's shape and who holds which chunk."""

    device_identity: str
    chunk_size: int
    total_chunks: int
    holders: list[_Holder]


def _read_books(path: str) -> _Books | None:
    """The books an earlier daemon left at ``path``; None if there are none.
    Refuses a file that is not this user's private one, or is not books: if
    no instance of that daemon still runs, removing it loses nothing."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise RuntimeError(f"cannot read the daemon's books at {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise RuntimeError(
                f"{path} is not a private file of this user (uid {os.geteuid()}, mode 0600): "
                "it is not this daemon's books; remove it, or choose another --socket"
            )
        pieces = []
        while piece := os.read(fd, 1 << 20):
            pieces.append(piece)
    finally:
        os.close(fd)
    try:
        books = msgspec.json.decode(b"".join(pieces), type=_Books)
        ids = [i for h in books.holders for i in h.ids]
        if len(set(ids)) != len(ids) or not all(0 <= i < books.total_chunks for i in ids):
            raise ValueError("a chunk held twice, or out of the pool")
    except (msgspec.DecodeError, ValueError) as e:
        raise RuntimeError(
            f"the daemon's books at {path} do not read ({e}); if no instance of the daemon "
            "that wrote them still runs, remove the file"
        ) from None
    return books


def _replace(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` whole or not at all: into a new private file
    beside it, renamed over it, so that whoever reads it next (a daemon that
    starts after this one died writing) finds the old books or the new."""
    new = f"{path}.new"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(new)  # left by a daemon that died writing
    fd = os.open(new, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    except BaseException:
        os.close(fd)
        os.unlink(new)
        raise
    os.close(fd)
    os.replace(new, path)


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
