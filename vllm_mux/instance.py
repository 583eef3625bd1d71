"""One vLLM instance's standing with the daemon: leases, arenas, host copy.

An instance keeps two arenas of leased memory: one for the weights, one for
the KV cache. Their virtual addresses are reserved once and never change.
The weights are copied into the weights arena once, at load time, and a host
copy of that arena is kept; it never goes stale, because serving never writes
weights. So sleep copies nothing (unmap, hand the chunks back) and wake is
lease, map, one contiguous copy from the host.

This module knows torch and the daemon, not vLLM: the patches hand it the
model's tensors and run vLLM's KV-cache allocation inside ``allocations()``.
"""

import contextlib
import logging
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vllm_mux.daemon.client import Client
from vllm_mux.memory import backend as make_backend
from vllm_mux.memory.arena import Arena

log = logging.getLogger("vllm_mux.instance")


class Instance:
    def __init__(self, socket_path: str, model: str, key: str = ""):
        # No timeout: a lease may wait while the daemon asks others to sleep.
        self.client = Client(socket_path, timeout=None)
        hello = self.client.hello(model, key)
        self.id = hello["instance"]
        self.chunk_size = hello["chunk_size"]
        self.backend = make_backend(hello["device"])
        pool_bytes = hello["total_chunks"] * self.chunk_size
        self.weights = Arena(self.backend, pool_bytes, self.chunk_size)
        # The KV cache is written a block at a time after a wake: no need to
        # fill its page tables before the first request runs.
        self.kv_cache = Arena(self.backend, pool_bytes, self.chunk_size, prefault=False)
        self.leases: dict[int, list[int]] = {id(self.weights): [], id(self.kv_cache): []}
        self.host: torch.Tensor | None = None  # host copy of the weights arena
        self.asleep = False

    # -- placing memory --

    def _grow(self, arena: Arena, chunks: int) -> None:
        if chunks:
            self._map(arena, *self.client.lease(chunks))

    def _map(self, arena: Arena, ids: list[int], fds: list[int]) -> None:
        # Ours on the books from now on, mapped or not: _release_all returns them.
        self.leases[id(arena)] += ids
        arena.map([self.backend.import_(fd, self.chunk_size) for fd in fds])

    @torch.no_grad()
    def adopt_weights(self, tensors: list[torch.Tensor]) -> int:
        """Move these tensors (parameters and buffers) into the weights arena.

        Each tensor's ``.data`` is replaced by a view of leased memory with the
        same shape, dtype and strides; the memory they were loaded into is
        freed, and one host copy of the whole arena is kept for waking.
        """
        tensors = [t for t in _unique(tensors) if t.numel() > 0]
        spans = [_span(t) for t in tensors]
        total = sum(spans) + 256 * len(spans)
        self._grow(self.weights, self.weights.chunks_needed(total))
        for t, nbytes in zip(tensors, spans):
            dst = self.weights.alloc(nbytes).view(t.dtype).as_strided(t.shape, t.stride())
            dst.copy_(t)
            t.data = dst
        used = self.weights.view()
        pinned = self.backend.device_type != "cpu"  # page-locked for full-speed DMA
        self.host = torch.empty(used.numel(), dtype=torch.uint8, pin_memory=pinned)
        self.host.copy_(used)
        self.client.set_state("awake")
        log.info(
            "%d tensors, %d bytes of weights in leased memory", len(tensors), self.weights.used
        )
        return self.weights.used

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
        self.client.set_state("sleeping")
        self.asleep = True  # from the first unmap on: a wake must map again
        self._release_all()
        seconds = time.perf_counter() - start
        self.client.set_state("asleep", sleep={"seconds": seconds})
        return seconds

    def wake(self) -> float:
        """Lease chunks, map them at the old addresses, copy the weights in."""
        if not self.asleep:
            return 0.0
        start = time.perf_counter()
        self.client.set_state("waking")
        try:
            # One lease for both arenas: two could each hold half of what
            # two waking instances need and wait on each other.
            n = self.weights.size // self.chunk_size
            ids, fds = self.client.lease(n + self.kv_cache.size // self.chunk_size)
            self.leases[id(self.weights)] += ids[:n]  # ours on the books, mapped or not
            self.leases[id(self.kv_cache)] += ids[n:]
            chunks = [self.backend.import_(fd, self.chunk_size) for fd in fds]
            try:
                self.weights.map(chunks[:n])
            except BaseException:
                for chunk in chunks[n:]:
                    self.backend.release(chunk)
                raise
            self.kv_cache.map(chunks[n:])
            mapped = time.perf_counter()
            self.weights.view().copy_(self.host)
            self.backend.synchronize()
        except BaseException:
            with contextlib.suppress(Exception):  # the first error is the one to tell
                self._release_all()  # end asleep, holding nothing
                self.client.set_state("asleep")
            raise
        done = time.perf_counter()
        self.asleep = False
        facts = {
            "seconds": done - start,
            "map_seconds": mapped - start,
            "copy_seconds": done - mapped,
            "bytes": self.weights.used,
        }
        self.client.set_state("awake", wake=facts)
        return done - start

    def _release_all(self) -> None:
        """Unmap everything, then hand it all back in one message: the instance
        that waits for these chunks starts its wake only once we are done."""
        ids = []
        for arena in (self.weights, self.kv_cache):
            arena.unmap()
            ids += self.leases[id(arena)]
        if ids:
            self.client.release(ids)  # if this fails, the ids stay ours to release
        for arena in (self.weights, self.kv_cache):
            self.leases[id(arena)] = []


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


def _unique(tensors):
    seen = set()
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
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
