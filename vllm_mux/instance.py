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
instance still holds, one fd each (none where chunks travel as handles: an
NPU's, which a new daemon makes anew once they are let go), for the new
daemon's books (see daemon/server.py). Meanwhile an awake instance serves
on: computing needs no daemon. A sleep goes ahead (it unmaps and lets the chunks go; the next hello
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
from vllm_mux.memory import host as host_memory
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
        # The host copy of the weights arena: the daemon's, shared with every
        # instance whose arena holds the same bytes (named by their digest).
        # None while cold: a wake then reloads the weights with ``reload``.
        self.host: torch.Tensor | None = None
        self.digest = ""
        self._host: host_memory.Mapping | None = None
        self.updated = False  # the weights changed after loading: the files are stale
        self.reload = None  # set by the worker: vLLM's loader, in place (a cold wake)
        self._buffers: list = []  # (buffer, a host copy of it): what a reload does not load
        self.slept_on: list[int] = []  # the chunks it last slept on, weights' then KV's
        self.kv_intact = False  # the last wake got every KV-cache chunk back untouched
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
                ids, fds, _ = self._lease(chunks)
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
    def adopt_weights(self, tensors: list[torch.Tensor], buffers=()) -> int:
        """Make the weights arena hold these tensors (parameters and buffers),
        then keep one host copy of the arena for waking: the daemon's, shared
        with every instance whose arena holds the same bytes. ``buffers``,
        those of the tensors the model's files do not hold, are also kept in
        a private copy, for a cold wake to restore after reloading the files.

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
        # Zeros between the tensors moved in, not whatever the chunks held:
        # the arena's bytes name its host copy, shared by equal arenas.
        self.backend.tensor(
            self.weights.base + self.weights.used, self.weights.mapped - self.weights.used
        ).zero_()
        for t, nbytes in zip(outside, spans):
            dst = self.weights.alloc(nbytes).view(t.dtype).as_strided(t.shape, t.stride())
            dst.copy_(t)
            t.data = dst
        kept = {id(b) for b in buffers}
        self._buffers = [(t, t.to("cpu", copy=True)) for t in tensors if id(t) in kept]
        self._keep_host_copy()
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

    def refresh_weights(self, tensors: list[torch.Tensor], buffers=()) -> None:
        """After a weight update: the new bytes become what a wake restores,
        and the model's files no longer say what they are: never cold."""
        self.updated = True
        self.adopt_weights(tensors, buffers)

    # -- the host copy --

    @property
    def coldable(self) -> bool:
        """Whether the model's files can restore these weights: the daemon
        never drops the host copy of one that cannot be reloaded. Only on the
        CPU, where the arena holds nothing but the parameters and buffers
        moved into it: where weights load straight into the arena (CUDA), it
        also holds whatever else loading left alive there (tensors kept as
        plain attributes, freed blocks), which no reload restores."""
        cpu = self.backend.device_type == "cpu"
        return cpu and self.reload is not None and not self.updated

    def _keep_host_copy(self) -> None:
        """Hold the daemon's host copy of the arena's bytes as they are now,
        shared if another instance has the same bytes, else made and filled.
        Without one (the host budget is full of awake models' copies) the
        instance is cold: a wake after a sleep reloads from the files."""
        used = self.weights.view()
        digest = self._digest(used)
        if digest == self.digest and self._host is not None:
            return
        self._drop_host_copy()
        self.digest = digest
        try:
            self._take_host_copy(fill=True)
        except (DaemonError, OSError) as e:  # OSError: mapping it
            log.warning("vllm-mux: no host copy of the weights (%s): this model is cold", e)
        if self._host is None and not self.coldable:
            raise RuntimeError(
                "vllm-mux: these weights need a host copy (they were updated, or their loader "
                "cannot reload them from files), and the daemon has no room for one: start it "
                "with a larger --host-memory"
            )

    def _take_host_copy(self, fill: bool) -> bool:
        """Map the daemon's copy of ``self.digest``'s bytes, filling it first
        if it is new (``fill``). False if there is none (and not ``fill``).
        Whatever fails, the daemon's copy is released and nothing stays mapped."""
        used = self.weights.view()
        with self._lock:
            reply, fd = self.client.host_get(self.digest, used.numel(), fill, self.coldable)
        if fd is None:
            return False
        try:
            if reply.get("fill"):
                self._fill(host_memory.Mapping(fd, used.numel(), writable=True), used)
                fd = None  # the mapping owned it
                with self._lock:
                    fd = self.client.host_filled(self.digest)
            self._map_host_copy(fd, used.numel())
        except BaseException:
            self._release_host(self.digest)
            raise
        return True

    def _fill(self, filling: host_memory.Mapping, used: torch.Tensor) -> None:
        """Write the arena's bytes into a new copy, page-locked meanwhile, and
        unmap it: the daemon seals it only once nobody maps it writable."""
        try:
            pinned = self._pin(filling, read_only=False)
            try:
                filling.tensor.copy_(used)
                self.backend.synchronize()
            finally:
                if pinned:
                    self.backend.unpin(filling.addr)
        finally:
            filling.close()

    def _map_host_copy(self, fd: int, size: int) -> None:
        mapping = host_memory.Mapping(fd, size, writable=False)
        mapping.pinned = self._pin(mapping, read_only=True)
        self._host, self.host = mapping, mapping.tensor

    def _pin(self, mapping: host_memory.Mapping, read_only: bool) -> bool:
        """Page-lock a mapping for full-speed copies; where the driver refuses
        (a read-only registration it does not support), copies run slower
        from pageable memory, and the log says so."""
        try:
            self.backend.pin(mapping.addr, mapping.size, read_only=read_only)
        except RuntimeError as e:
            log.warning("vllm-mux: the host copy stays pageable (%s): wakes copy slower", e)
            return False
        return True

    def _drop_host_copy(self) -> None:
        """Unmap the host copy and tell the daemon, which frees it once no
        other instance maps it."""
        mapping, self._host, self.host = self._host, None, None
        if mapping is None:
            return
        if mapping.pinned:
            self.backend.unpin(mapping.addr)
        mapping.close()
        self._release_host(self.digest)

    def _release_host(self, digest: str) -> None:
        with self._lock:
            if self._up:
                try:
                    self.client.host_release(digest)
                except Disconnected:
                    self._hang_up()
                except DaemonError as e:
                    log.warning("vllm-mux: the daemon refused the host copy back: %s", e)

    def drop_host(self) -> bool:
        """Let the host copy go, asked by the daemon to make room: only while
        asleep (then the model is cold). False if awake or waking."""
        with self._lock:
            asleep = self.asleep and self.state == "asleep"
            if not asleep or self._host is None or not self.coldable:
                return False
            self._drop_host_copy()
        log.info("vllm-mux: the daemon took the host copy back; this model is cold")
        return True

    def _digest(self, used: torch.Tensor) -> str:
        """The digest of the arena's bytes (memory/host.py), read on several
        threads: straight from the arena on the CPU, through a small host
        buffer per thread from a device."""
        if used.device.type == "cpu":
            flat = used.numpy()
            return host_memory.digest(used.numel(), lambda i, k: memoryview(flat[i : i + k]))
        staging = threading.local()

        def piece_at(i: int, k: int):
            if not hasattr(staging, "holder"):
                staging.holder = self.backend.host_buffer(host_memory.PIECE)
            buffer = staging.holder.tensor[:k]
            buffer.copy_(used[i : i + k])  # a device-to-host copy waits for its bytes
            return memoryview(buffer.numpy())

        return host_memory.digest(used.numel(), piece_at)

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
        """Unmap everything and hand every chunk back, still holding our bytes
        (the warm tier): a wake gets back those nobody took. Returns seconds."""
        if self.asleep:
            return 0.0
        if self.digest and self._host is None and not self.coldable:
            raise RuntimeError(
                "vllm-mux: not sleeping: these weights have no host copy to wake from and their "
                "files cannot restore them"
            )
        start = time.perf_counter()
        self._set_state("sleeping")
        self.asleep = True  # from the first unmap on: a wake must map again
        self.kv_intact = False  # until a wake gets the KV cache back untouched
        self._release_all(keep=True)
        seconds = time.perf_counter() - start
        self._set_state("asleep", sleep={"seconds": seconds})
        return seconds

    def wake(self) -> float:
        """Lease chunks, asking for those we slept on; map them at the old
        addresses; copy in from the host copy the weights of the chunks that
        another instance took meanwhile, or, cold, reload them from the files."""
        if not self.asleep:
            return 0.0
        start = time.perf_counter()
        with self._lock:  # the watcher's hello names what is mapped: not half of it
            self._set_state("waking")
            try:
                # One lease for both arenas: two could each hold half of what
                # two waking instances need and wait on each other.
                n = self.weights.size // self.chunk_size
                total = n + self.kv_cache.size // self.chunk_size
                want = self.slept_on if len(self.slept_on) == total else []
                ids, fds, intact = self._lease(total, want)
                self.leases[id(self.weights)] += ids[:n]  # ours on the books, mapped or not
                self.leases[id(self.kv_cache)] += ids[n:]
                kept = [k < len(want) and i == want[k] and i in intact for k, i in enumerate(ids)]
                chunks = self._import(fds)
                map_seconds, copied = self._map_and_copy(chunks[:n], chunks[n:], kept[:n])
                self.kv_cache.map(chunks[n:])
                copying = time.perf_counter()
                self.backend.synchronize()
                copied_at = time.perf_counter()
                reloaded = None
                if self.host is None and not all(kept[:n]):
                    reloaded = self._reload(kept[:n])
            except BaseException:
                with contextlib.suppress(Exception):  # the first error is the one to tell
                    self._release_all()  # end asleep, holding nothing
                    self._set_state("asleep")
                raise
            done = time.perf_counter()
            self.asleep = False
            # Keys and values of other weights are no cache of these.
            self.kv_intact = all(kept[n:]) and (not reloaded or reloaded["same_bytes"])
            facts = {
                "seconds": done - start,
                "map_seconds": map_seconds,
                "copy_wait_seconds": copied_at - copying,
                "bytes": self.weights.used,
                "copied_bytes": copied,
                "chunks_kept": sum(kept),
                "chunks": total,
                "kv_intact": self.kv_intact,
                "tier": _tier(kept[:n], reloaded),
            }
            if reloaded:
                facts.update(reloaded)
            self.last_wake = facts
            self._set_state("awake", wake=facts)
        return done - start

    def _map_and_copy(self, chunks: list, rest: list, kept: list[bool]) -> tuple[float, int]:
        """Map the weights' chunks a piece at a time, starting each piece's copy
        from the host as soon as it is mapped (the backend copies on a side
        stream where it can): the bytes of every chunk not ``kept`` (another
        instance used it, or it is not the one we slept on). If a map or a
        copy fails, the chunks not yet mapped, and ``rest``, are released (the
        mapped ones are the arena's). Returns the seconds spent mapping and
        the bytes copied."""
        per = max(1, WAKE_PIECE // self.chunk_size)
        copied, mapping, size = 0, 0.0, self.chunk_size
        for i in range(0, len(chunks), per):
            try:
                started = time.perf_counter()
                self.weights.map(chunks[i : i + per])
                mapping += time.perf_counter() - started
                for lo, hi in _runs(kept, i, min(i + per, len(chunks))):
                    start, end = lo * size, min(hi * size, self.weights.used)
                    if end > start and self.host is not None:
                        self.backend.copy_in(self.weights.base + start, self.host[start:end])
                        copied += end - start
            except BaseException:
                for chunk in chunks[i + per :] + rest:
                    self.backend.release(chunk)
                raise
        return mapping, copied

    def _reload(self, kept: list[bool]) -> dict:
        """A cold wake: the chunks we lost get their weights from the model's
        files through vLLM's loader (``self.reload``), in place, and the
        buffers the files do not hold from their private copy. Then the host
        copy is made again, if the daemon has room."""
        if self.reload is None:
            raise RuntimeError(
                "vllm-mux: this model is cold (its weights are in no host copy) and nothing "
                "can reload them from its files"
            )
        started = time.perf_counter()
        size = self.chunk_size
        for lo, hi in _runs(kept, 0, len(kept)):  # zeros between tensors, as loaded
            start, end = lo * size, min(hi * size, self.weights.used)
            if end > start:
                self.backend.tensor(self.weights.base + start, end - start).zero_()
        self.reload()
        with torch.no_grad():
            for buffer, saved in self._buffers:
                buffer.copy_(saved)
        self.backend.synchronize()
        reload_seconds = time.perf_counter() - started
        before = self.digest
        self.digest = self._digest(self.weights.view())
        if self.digest != before:
            log.warning(
                "vllm-mux: the weights reloaded from the files differ from those loaded at "
                "start in some byte (padding left by the loader?): they get a host copy of "
                "their own"
            )
        try:
            self._take_host_copy(fill=True)
        except DaemonError as e:
            log.info("vllm-mux: still no host copy after a cold wake (%s)", e)
        return {"reload_seconds": reload_seconds, "same_bytes": self.digest == before}

    def _import(self, fds: list[int]) -> list:
        """Chunks for received fds (or handles, where the backend's transport
        is "handle"); if one fails, those imported are released and the fds
        not reached are closed."""
        chunks = []
        try:
            for fd in fds:
                chunks.append(self.backend.import_(fd, self.chunk_size))  # owns fd, even failing
        except BaseException:
            for chunk in chunks:
                self.backend.release(chunk)
            if self.backend.transport == "fd":
                for fd in fds[len(chunks) + 1 :]:
                    os.close(fd)
            raise
        return chunks

    def _release_all(self, keep: bool = False) -> None:
        """Unmap everything, then hand it all back in one message: the instance
        that waits for these chunks starts its wake only once we are done.
        ``keep``: the chunks keep our bytes (we sleep on them) for a wake to
        ask back; the weights' come first in the list, so that another
        instance takes the KV cache's first (see daemon/pool.py). While the
        daemon is away they go all the same: the hello that reconnects names
        only the chunks still held."""
        with self._lock:
            ids = []
            for arena in (self.weights, self.kv_cache):
                arena.unmap()
                ids += self.leases[id(arena)]
            self.slept_on = ids if keep else []
            if ids and self._up:
                try:
                    self.client.release(ids, keep)  # if refused, the ids stay ours to release
                except Disconnected:
                    self._hang_up()
            for arena in (self.weights, self.kv_cache):
                self.leases[id(arena)] = []

    # -- the daemon, which may go away and come back --

    def _lease(self, chunks: int, want: list[int] = ()) -> tuple[list[int], list[int], set]:
        """Ids and fds of ``chunks`` chunks, and which of ``want`` came back
        untouched. While the daemon is away, wait for it to come back, up to
        GAP_WAIT_S."""
        since = None
        with self._lock:
            while True:
                if self._up:
                    try:
                        return self.client.lease_back(chunks, want, self.backend.tgid)
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
                try:
                    fd = os.dup(client.sock.fileno())
                except OSError:  # its owner closed it just now (close() takes no lock)
                    return
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
        each where chunks travel as fds, and make it this instance's connection."""
        with self._lock:
            arenas = (self.weights, self.kv_cache)
            held = [(i, c) for a in arenas for i, c in zip(self.leases[id(a)], a.chunks)]
            fds = []
            try:  # chunks that travel as handles need nothing: the daemon knows them
                if self.backend.transport == "fd":
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
            self.slept_on = []  # this daemon does not know what our free chunks hold
            self.id = reply["instance"]
            self._hand_over_host_copy(client)
            if self._host is None and self.digest:  # let go while the daemon was away
                with contextlib.suppress(DaemonError):
                    client.host_release(self.digest)
            self.client, self._up = client, True
            self._changed.notify_all()
        log.warning(
            "reconnected to the vllm-mux daemon at %s, holding %d chunks",
            self.socket_path,
            len(held),
        )

    def _hand_over_host_copy(self, client: Client) -> None:
        """Our host copy goes on the new daemon's books (under the lock), or
        we map its copy of the same bytes instead. If it refuses ours (no
        room in its budget), or anything else fails, we let it go: cold."""
        if self._host is None:
            return
        try:
            theirs = client.host_adopt(self.digest, self._host.size, self._host.fd, self.coldable)
            if theirs is not None:  # theirs mapped first: never without a copy meanwhile
                mapping = self._host
                self._map_host_copy(theirs, mapping.size)
                if mapping.pinned:
                    self.backend.unpin(mapping.addr)
                mapping.close()
            return
        except Disconnected:
            raise
        except Exception as e:  # refused, or a driver error: never stop reconnecting
            log.warning("vllm-mux: our host copy is not on the daemon's books (%s): cold", e)
        mapping, self._host, self.host = self._host, None, None
        if mapping is not None:
            with contextlib.suppress(Exception):
                if mapping.pinned:
                    self.backend.unpin(mapping.addr)
                mapping.close()


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


def _tier(kept: list[bool], reloaded) -> str:
    """What a wake woke from: its chunks untouched (warm), some (partial) or
    none (host) of them, the rest copied from the host; or reloaded (cold)."""
    if reloaded:
        return "cold"
    return "warm" if all(kept) else "partial" if any(kept) else "host"


def _runs(kept: list[bool], lo: int, hi: int):
    """The runs [a, b) of positions in [lo, hi) that are not ``kept``."""
    start = None
    for k in range(lo, hi):
        if not kept[k] and start is None:
            start = k
        elif kept[k] and start is not None:
            yield start, k
            start = None
    if start is not None:
        yield start, hi


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
