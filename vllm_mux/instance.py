"""One vLLM instance's standing with the daemon: leases, arenas, host copy.

An instance keeps two arenas of leased memory: one for the weights, one for
the KV cache. Their virtual addresses are reserved once and never change.
The weights land in the weights arena at load time: straight away where the
device has a pluggable allocator (``loading()``, CUDA), else moved in once
loaded (CPU). A host copy of that arena is kept (page-locked on a device);
it never goes stale, because serving never writes weights and a weight update
refreshes it (``refresh_weights``). So sleep copies nothing (unmap, hand the
chunks back) and wake is lease, map, copy from the host in large pieces, each
piece's copy running while the next one is mapped.

The instance outlives its daemon. A thread watches the connection; when it
breaks (the daemon crashed, or was stopped for an upgrade) it reconnects,
trying for RECONNECT_S (client.py), and says hello again with the chunks the
instance still holds, one fd each, for the new daemon's books (see
daemon/server.py). Meanwhile an awake instance serves on: computing needs no
daemon. A sleep goes ahead (it unmaps and lets the chunks go; the next hello
names only what is still held). Only a lease needs the daemon: it waits for
it up to GAP_WAIT_S, then fails, and the wake that needed it answers 503 with
Retry-After. An instance that cannot reconnect in RECONNECT_S fails every
lease from then on, and its controller stops the server.

This module knows torch and the daemon, not vLLM: the patches hand it the
model's tensors and run vLLM's KV-cache allocation inside ``allocations()``.
"""

import contextlib
import gc
import logging
import os
import select
import socket
import threading
import time
import uuid

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vllm_mux.daemon import protocol
from vllm_mux.daemon.client import (
    Client,
    DaemonError,
    Disconnected,
    reconnect,
    reconnect_seconds,
)
from vllm_mux.memory import backend as make_backend
from vllm_mux.memory.arena import Arena
from vllm_mux.memory.heap import Heap

log = logging.getLogger("vllm_mux.instance")

# Bytes of weights mapped before their copy starts on a wake: large enough that
# each copy runs at the host link's full speed, small enough that the first
# copy starts after a few map calls (8 of the default chunks).
WAKE_PIECE = 256 << 20

# Seconds a lease waits for a daemon that went away to come back: a restart
# takes seconds (serve's first backoff is 1 s); a wake that waited longer
# than this answers 503 with Retry-After, and the next request tries again.
GAP_WAIT_S = 60.0


class Instance:
    def __init__(
        self, socket_path: str, model: str, key: str = "", device_index=None, private_bytes=0
    ):
        """``device_index``: the device this process computes on, in its own
        numbering (CUDA_VISIBLE_DEVICES may differ from the daemon's); it must
        be the daemon's device. None: the daemon's index. ``private_bytes``:
        its device memory outside the pool, shown by ``vllm-mux status``.
        ``key`` joins it to its controller and names it when it reconnects
        (one is made up if none is given)."""
        self.socket_path, self.model, self.private_bytes = socket_path, model, private_bytes
        self.key = key or uuid.uuid4().hex
        self.reconnect_s = reconnect_seconds()
        # No timeout: a lease may wait while the daemon asks others to sleep.
        self.client = Client(socket_path, timeout=None)
        hello = self.client.hello(model, self.key, private_bytes)
        self.id = hello["instance"]
        self.chunk_size = hello["chunk_size"]
        kind, _, index = hello["device"].partition(":")
        self.backend = make_backend(f"{kind}:{index if device_index is None else device_index}")
        theirs = hello.get("device_identity")
        if theirs and theirs != self.backend.identity:
            self.client.close()
            raise RuntimeError(
                f"vllm-mux: the daemon's pool is on {hello['device']} ({theirs}) but this "
                f"process computes on {self.backend.identity}: run the instance on the "
                "daemon's device (CUDA_VISIBLE_DEVICES), or start a daemon for this one"
            )
        pool_bytes = hello["total_chunks"] * self.chunk_size
        self.weights = Arena(self.backend, pool_bytes, self.chunk_size)
        # The KV cache is written a block at a time after a wake: no need to
        # fill its page tables before the first request runs.
        self.kv_cache = Arena(self.backend, pool_bytes, self.chunk_size, prefault=False)
        self.leases: dict[int, list[int]] = {id(self.weights): [], id(self.kv_cache): []}
        self.host: torch.Tensor | None = None  # host copy of the weights arena
        self.asleep = False
        self.heap: Heap | None = None  # the weights arena's allocator while loading
        self._allocating = None  # the device's allocation context: owns its pool
        self.loaded: dict = {}  # what loading left behind, for the proof kit
        self.last_wake: dict = {}
        self.state = "starting"  # as told to the daemon, or to tell it on reconnecting
        self.lost = ""  # why the daemon is gone for good, once it is
        self._up = True  # connected and registered
        # The client, the arenas and the leases: calls and the watcher take turns.
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        threading.Thread(target=self._watch, name="vllm-mux-daemon", daemon=True).start()

    # -- placing memory --

    def _grow(self, arena: Arena, chunks: int) -> None:
        if chunks:
            with self._lock:
                ids, fds = self._lease(chunks)
                # Ours on the books from now on, mapped or not: _release_all returns them.
                self.leases[id(arena)] += ids
                arena.map(self._import(fds))

    @contextlib.contextmanager
    def loading(self):
        """Serve the device's new tensors from the weights arena while loading.

        Where the backend has a pluggable allocator (CUDA), weights land in
        leased memory as they are made: no second copy of the model outside
        the pool. Temporaries freed meanwhile go back to the allocator's free
        lists, or to the heap's holes when a whole segment goes. On CPU this
        routes nothing, and ``adopt_weights`` moves the tensors afterwards.
        """
        if self.heap is None:
            self.heap = Heap(self.weights, lambda n: self._grow(self.weights, n))
            self._allocating = self.backend.allocating(self.heap)
        # No garbage collection inside torch's allocator while it calls our
        # malloc (which may wait on the daemon): a collection that frees a
        # device tensor there would enter the allocator again.
        collecting = gc.isenabled()
        gc.disable()
        try:
            with self._allocating:
                yield
        except torch.OutOfMemoryError as e:
            error = getattr(self._allocating, "error", None)
            if error is None:
                raise
            raise RuntimeError(f"vllm-mux: no leased memory for the weights: {error}") from e
        finally:
            if collecting:
                gc.enable()

    @torch.no_grad()
    def adopt_weights(self, tensors: list[torch.Tensor]) -> int:
        """Make the weights arena hold these tensors (parameters and buffers),
        then keep one host copy of the arena for waking.

        A tensor already in the arena (loaded inside ``loading()``) stays; any
        other on this device has its ``.data`` replaced by a view of leased
        memory with the same shape, dtype and strides, and the memory it was
        loaded into is freed. Tensors on another device (host buffers, weights
        offloaded to the CPU) stay where they are. Returns the bytes of the
        arena in use.
        """
        if self.asleep:
            raise RuntimeError("vllm-mux: weights cannot change while asleep; wake first")
        here = self.backend.device_type
        tensors = [t for t in _unique(tensors) if t.numel() > 0 and t.device.type == here]
        outside = [t for t in tensors if not self._in_weights(t)]
        spans = [_span(t) for t in outside]
        total = sum(spans) + 256 * len(spans)
        self._grow(self.weights, self.weights.chunks_needed(total))
        for t, nbytes in zip(outside, spans):
            dst = self.weights.alloc(nbytes).view(t.dtype).as_strided(t.shape, t.stride())
            dst.copy_(t)
            t.data = dst
        used = self.weights.view()
        if self.host is None or self.host.numel() != used.numel():
            self.host = None  # the old buffer goes before the new one is made
            self._host_buffer = self.backend.host_buffer(used.numel())  # page-locked on a GPU
            self.host = self._host_buffer.tensor
        self.host.copy_(used)
        tensor_bytes = sum(t.untyped_storage().nbytes() for t in _unique_storages(tensors))
        self.loaded = {
            "tensors": len(tensors),
            "moved": len(outside),
            "tensor_bytes": tensor_bytes,
            "arena_bytes": self.weights.used,
            "heap_hole_bytes": self.heap.hole_bytes if self.heap else 0,
            "segment_free_bytes": getattr(self._allocating, "segment_free_bytes", 0),
        }
        self._set_state("awake")
        log.info(
            "%d tensors (%d moved in), %d bytes of weights in %d bytes of leased memory",
            len(tensors),
            len(outside),
            tensor_bytes,
            self.weights.used,
        )
        return self.weights.used

    def refresh_weights(self, tensors: list[torch.Tensor]) -> None:
        """After a weight update: the new bytes become what a wake restores."""
        self.adopt_weights(tensors)

    def _in_weights(self, t: torch.Tensor) -> bool:
        start, base = t.untyped_storage().data_ptr(), self.weights.base
        return base <= start < base + self.weights.used

    def plain_copy(self) -> float:
        """Seconds to copy the host copy into ordinary device memory: the peer
        a wake is measured against (same bytes, same host buffer)."""
        scratch = torch.zeros(self.host.numel(), dtype=torch.uint8, device=self.backend.device_type)
        self.backend.synchronize()
        start = time.perf_counter()
        scratch.copy_(self.host)
        self.backend.synchronize()
        return time.perf_counter() - start

    @contextlib.contextmanager
    def allocations(self):
        """Serve every tensor created inside from the KV-cache arena.

        vLLM allocates its KV cache as one ``torch.zeros`` inside a context it
        lets the worker choose; this is that context.
        """
        with _ArenaAllocations(self, self.kv_cache):
            yield

    def alloc(self, arena: Arena, nbytes: int) -> torch.Tensor:
        self._grow(arena, arena.chunks_needed(nbytes))
        return arena.alloc(nbytes)

    # -- sleep and wake --

    def sleep(self) -> float:
        """Unmap everything and hand every chunk back. Returns seconds taken."""
        if self.asleep:
            return 0.0
        start = time.perf_counter()
        self._set_state("sleeping")
        self.asleep = True  # from the first unmap on: a wake must map again
        self._release_all()
        seconds = time.perf_counter() - start
        self._set_state("asleep", sleep={"seconds": seconds})
        return seconds

    def wake(self) -> float:
        """Lease chunks, map them at the old addresses, copy the weights in."""
        if not self.asleep:
            return 0.0
        start = time.perf_counter()
        with self._lock:  # the watcher's hello names what is mapped: not half of it
            self._set_state("waking")
            try:
                # One lease for both arenas: two could each hold half of what
                # two waking instances need and wait on each other.
                n = self.weights.size // self.chunk_size
                ids, fds = self._lease(n + self.kv_cache.size // self.chunk_size)
                self.leases[id(self.weights)] += ids[:n]  # ours on the books, mapped or not
                self.leases[id(self.kv_cache)] += ids[n:]
                chunks = self._import(fds)
                map_seconds = self._map_and_copy(chunks[:n], chunks[n:])
                self.kv_cache.map(chunks[n:])
                copying = time.perf_counter()
                self.backend.synchronize()
            except BaseException:
                with contextlib.suppress(Exception):  # the first error is the one to tell
                    self._release_all()  # end asleep, holding nothing
                    self._set_state("asleep")
                raise
            done = time.perf_counter()
            self.asleep = False
            facts = {
                "seconds": done - start,
                "map_seconds": map_seconds,
                "copy_wait_seconds": done - copying,
                "bytes": self.weights.used,
            }
            self.last_wake = facts
            self._set_state("awake", wake=facts)
        return done - start

    def _map_and_copy(self, chunks: list, rest: list) -> float:
        """Map the weights' chunks a piece at a time, starting each piece's copy
        from the host as soon as it is mapped (the backend copies on a side
        stream where it can). If a map or a copy fails, the chunks not yet
        mapped, and ``rest``, are released (the mapped ones are the arena's).
        Returns the seconds spent mapping."""
        per = max(1, WAKE_PIECE // self.chunk_size)
        copied, mapping = 0, 0.0
        for i in range(0, len(chunks), per):
            try:
                started = time.perf_counter()
                self.weights.map(chunks[i : i + per])
                mapping += time.perf_counter() - started
                end = min(self.weights.mapped, self.weights.used)
                if end > copied:
                    self.backend.copy_in(self.weights.base + copied, self.host[copied:end])
                    copied = end
            except BaseException:
                for chunk in chunks[i + per :] + rest:
                    self.backend.release(chunk)
                raise
        return mapping

    def _import(self, fds: list[int]) -> list:
        """Chunks for received fds; if one fails, those imported are released
        and the fds not reached are closed."""
        chunks = []
        try:
            for fd in fds:
                chunks.append(self.backend.import_(fd, self.chunk_size))  # owns fd, even failing
        except BaseException:
            for chunk in chunks:
                self.backend.release(chunk)
            for fd in fds[len(chunks) + 1 :]:
                os.close(fd)
            raise
        return chunks

    def _release_all(self) -> None:
        """Unmap everything, then hand it all back in one message: the instance
        that waits for these chunks starts its wake only once we are done.
        While the daemon is away they go all the same: the hello that
        reconnects names only the chunks still held."""
        with self._lock:
            ids = []
            for arena in (self.weights, self.kv_cache):
                arena.unmap()
                ids += self.leases[id(arena)]
            if ids and self._up:
                try:
                    self.client.release(ids)  # if refused, the ids stay ours to release
                except Disconnected:
                    self._hang_up()
            for arena in (self.weights, self.kv_cache):
                self.leases[id(arena)] = []

    # -- the daemon, which may go away and come back --

    def _lease(self, chunks: int) -> tuple[list[int], list[int]]:
        """Ids and fds of ``chunks`` new chunks. While the daemon is away, wait
        for it to come back, up to GAP_WAIT_S."""
        since = None
        with self._lock:
            while True:
                if self._up:
                    try:
                        return self.client.lease(chunks)
                    except Disconnected:
                        self._hang_up()
                if self.lost:
                    raise DaemonError(self.lost)
                since = time.monotonic() if since is None else since
                left = since + GAP_WAIT_S - time.monotonic()
                if left <= 0:
                    raise DaemonError(
                        f"vllm-mux: the daemon at {self.socket_path} went away and has not "
                        f"come back in {GAP_WAIT_S:g} s; try again later"
                    )
                self._changed.wait(left)

    def _set_state(self, state: str, **facts) -> None:
        """Tell the daemon; while it is away, the hello that reconnects does."""
        with self._lock:
            self.state = state
            if self._up:
                try:
                    self.client.set_state(state, **facts)
                except Disconnected:
                    self._hang_up()

    def _hang_up(self) -> None:
        """A call found the connection broken: shut it down, which wakes the
        watcher, which reconnects. Closing it is the watcher's."""
        self._up = False
        with contextlib.suppress(OSError):
            self.client.sock.shutdown(socket.SHUT_RDWR)

    def _watch(self) -> None:
        """Reconnect whenever the connection breaks, until its owner closes it
        (``self.client.close()``) or the daemon has been away RECONNECT_S."""
        while True:
            with self._lock:
                client = self.client
                if client.closed:
                    return
                # A descriptor of our own: nobody can close it, or reuse its number.
                fd = os.dup(client.sock.fileno())
            try:
                _wait_for_hangup(fd)
            finally:
                os.close(fd)
            with self._lock:
                if client.closed:
                    return  # closed by its owner, not lost
                self._up = False
            client.close()
            log.warning(
                "lost the vllm-mux daemon at %s; serving on and reconnecting", self.socket_path
            )
            try:
                reconnect(self.socket_path, self._rejoin, self.reconnect_s)
            except DaemonError as e:
                with self._lock:
                    self.lost = f"vllm-mux: {e}"
                    self._changed.notify_all()
                log.critical("%s: leases fail from now on", self.lost)
                return

    def _rejoin(self, client: Client) -> None:
        """Say hello on a new connection with the chunks still held (those
        mapped; any others were let go while the daemon was away), one fd
        each, and make it this instance's connection."""
        with self._lock:
            arenas = (self.weights, self.kv_cache)
            held = [(i, c) for a in arenas for i, c in zip(self.leases[id(a)], a.chunks)]
            fds = []
            try:
                for _, chunk in held:
                    fds.append(self.backend.share(chunk))
            except (OSError, RuntimeError) as e:  # out of fds; a driver error on cuda
                protocol.close_fds(fds)
                raise DaemonError(f"cannot hand our chunks to the daemon: {e}") from None
            try:
                ids = [i for i, _ in held]
                reply = client.hello(self.model, self.key, self.private_bytes, self.state, ids, fds)
            finally:
                protocol.close_fds(fds)
            theirs = (reply["chunk_size"], reply.get("device_identity"))
            if theirs != (self.chunk_size, self.backend.identity):
                raise DaemonError(
                    f"the daemon now at {self.socket_path} has chunks of {theirs[0]} bytes on "
                    f"{theirs[1]}; this instance uses {self.chunk_size} on "
                    f"{self.backend.identity}: it cannot join that pool"
                )
            for a in arenas:
                self.leases[id(a)] = self.leases[id(a)][: len(a.chunks)]
            self.id = reply["instance"]
            self.client, self._up = client, True
            self._changed.notify_all()
        log.warning(
            "reconnected to the vllm-mux daemon at %s, holding %d chunks",
            self.socket_path,
            len(held),
        )


class _ArenaAllocations(TorchDispatchMode):
    """Route tensor factories (``zeros``, ``empty``) to an arena."""

    _FACTORIES = {torch.ops.aten.zeros.default, torch.ops.aten.empty.memory_format}

    def __init__(self, instance: Instance, arena: Arena):
        super().__init__()
        self.instance, self.arena = instance, arena

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = torch.device(kwargs.get("device") or "cpu")
        if func not in self._FACTORIES or device.type != self.instance.backend.device_type:
            return func(*args, **kwargs)
        shape = list(args[0])
        dtype = kwargs.get("dtype") or torch.get_default_dtype()
        nbytes = _numel(shape) * dtype.itemsize
        tensor = self.instance.alloc(self.arena, nbytes).view(dtype).view(shape)
        if func is torch.ops.aten.zeros.default:
            tensor.zero_()
        return tensor


def _wait_for_hangup(fd: int) -> None:
    """Until the connection on ``fd`` hangs up: the daemon's end closed, or
    ours was shut down. A reply to a call does not wake it (no POLLIN)."""
    poller = select.poll()
    poller.register(fd, select.POLLRDHUP)
    poller.poll()


def _unique(tensors):
    seen = set()
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            yield t


def _unique_storages(tensors):
    seen = set()
    for t in tensors:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            yield t


def _span(t: torch.Tensor) -> int:
    """Bytes a tensor's elements reach, from its first one."""
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return (last + 1) * t.element_size()


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
