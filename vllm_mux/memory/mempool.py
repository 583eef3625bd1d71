"""Route a thread's new device tensors to a Heap: a torch MemPool over a
pluggable allocator whose malloc and free are the heap's, behind ctypes
callbacks. One implementation for every device whose torch extension has
pluggable pools (CUDA in torch, Ascend NPUs in torch_npu); each backend
describes its extension in a ``Device``.

Chosen over a C shim built at install (the pluggable allocators want a
shared library): no compiler, no build step, a pure-Python wheel; torch does
the same in ``torch.cuda.memory._use_uvm``; and the caching allocator calls
it once per segment, not per tensor (a few hundred times while loading an 8B
model), so entering Python costs nothing that shows. Tensors freed inside go
back to the pool's free lists; the heap sees a free only for a whole segment.
"""

import ctypes
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("vllm_mux.memory.mempool")

# The malloc both extensions call: void* malloc(size, int device, stream).
MALLOC = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int, ctypes.c_void_p)


@dataclass(frozen=True)
class Device:
    """What a device's torch extension offers for pluggable memory pools."""

    name: str  # for messages: "CUDA", "NPU"
    free: type  # the ctypes type of its free callback
    custom_allocator: Callable  # (malloc address, free address) -> its allocator object
    mem_pool: Callable  # allocator -> a MemPool
    use_mem_pool: Callable  # (pool, device index) -> a context routing allocations to it
    synchronize: Callable  # device index -> None
    alloc_conf: str  # the environment variable of its caching allocator's settings


class Allocating:
    """``Backend.allocating``'s context: a MemPool whose segments come from a Heap.

    Each entry makes a new pool, and its exit gives the heap every segment of
    that pool left with nothing allocated (what a load freed: a checkpoint
    converted to another dtype, weights repacked). torch never releases a live
    pool's free segments itself (pytorch#145168), so without this they would
    stay leased and be copied on every wake. A trimmed pool is never allocated
    from again, since torch still counts those segments as its own; the pools
    stay alive for the tensors they hold. Keep this object as long as the
    tensors live: it owns the pools and the callbacks.
    """

    def __init__(self, heap, index: int, device: Device):
        self.heap, self.index, self.device = heap, index, device
        self.error: BaseException | None = None  # why the last malloc said no
        self._callbacks = (MALLOC(self._malloc), device.free(self._free))  # kept alive
        malloc, free = (ctypes.cast(c, ctypes.c_void_p).value for c in self._callbacks)
        self._allocator = device.custom_allocator(malloc, free)
        self.pools: list = []
        self.segment_free_bytes = 0  # free space inside segments still in use
        self._using = None

    def _malloc(self, size: int, device: int, stream) -> int:
        # Must not raise into torch's allocator, nor call into torch.
        try:
            if device != self.index:
                raise RuntimeError(f"asked for memory on device {device}, not {self.index}")
            return self.heap.malloc(size)
        except BaseException as e:
            self.error = e
            log.error("leased memory for a %d-byte segment: %s", size, e)
            return 0  # NULL: torch raises its out-of-memory error

    def _free(self, ptr: int, size: int, *device_and_stream) -> None:
        try:
            self.heap.free(ptr)
        except BaseException as e:
            log.error("freeing the segment at %#x: %s", ptr or 0, e)

    def __enter__(self):
        conf = os.environ.get(self.device.alloc_conf, "").lower().replace(" ", "")
        if "expandable_segments:true" in conf:
            raise RuntimeError(
                f"vllm-mux: {self.device.alloc_conf} has expandable_segments:True, which "
                "torch's pools over a pluggable allocator do not support "
                f"(pytorch#147851); unset it"
            )
        self.error = None
        self.pools.append(self.device.mem_pool(self._allocator))
        self._using = self.device.use_mem_pool(self.pools[-1], self.index)
        self._using.__enter__()
        return self

    def __exit__(self, *exc):
        using, self._using = self._using, None
        try:
            return using.__exit__(*exc)
        finally:
            self._trim(self.pools[-1])

    def _trim(self, pool) -> None:
        self.device.synchronize(self.index)  # nothing in flight reads a freed block
        self.segment_free_bytes = 0
        if not hasattr(pool, "snapshot"):  # torch_npu 2.10's MemPool has none
            log.info("vllm-mux: a %s pool lists no segments: none trimmed", self.device.name)
            return
        for segment in pool.snapshot():
            if segment["allocated_size"] == 0:
                self.heap.free(segment["address"])
            else:
                self.segment_free_bytes += segment["total_size"] - segment["allocated_size"]
