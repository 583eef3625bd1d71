"""GPU memory as chunks: CUDA virtual memory management through cuda-bindings.

A chunk is physical GPU memory made by ``cuMemCreate`` with a POSIX
file-descriptor handle type, so the daemon can hand it to an instance: it
exports the chunk once with ``cuMemExportToShareableHandle`` and sends that fd
with ``SCM_RIGHTS``; the instance turns it into its own handle with
``cuMemImportFromShareableHandle`` and keeps the fd until it releases the
chunk (an fd left open after that would pin the memory). A
virtual range is reserved with ``cuMemAddressReserve``; a chunk is mapped into
it with ``cuMemMap`` and made usable with ``cuMemSetAccess`` (a new mapping has
no access at all), and unmapped with ``cuMemUnmap``, which turns the range back
into a reservation: addresses never move, and touching an unmapped range
faults, as on the cpu backend. ``cuMemCreate`` commits the physical memory
itself, so the pool is really held from the daemon's start, with no zeroing.

When the daemon dies, an allocation lives on while an instance's imported
handle does. The instance hands it to the daemon started next with ``share``:
an imported handle cannot be exported again (CUDA_ERROR_INVALID_VALUE), so an
instance keeps each chunk's fd, as the cpu backend keeps its memfd, until it
releases the chunk, and ``share`` dups it; the daemon keeps the fd it imports
an adopted chunk from, and sends it when it leases the chunk again.

The trap: ``cuMemMap`` maps a whole allocation, from offset 0, and
``cuMemUnmap`` cannot unmap part of a mapping. So the chunk is the unit: every
chunk is mapped on its own, this backend remembers each mapping, and
``unmap(addr, size)`` undoes the whole mappings inside the range one by one,
refusing a range that would cut one in two.

This module needs NVIDIA's ``cuda-bindings`` (``pip install vllm-mux[cuda]``);
the cpu backend never imports it.
"""

import ctypes
import logging
import os
import uuid
from contextlib import contextmanager
from dataclasses import dataclass

from vllm_mux.memory import mempool
from vllm_mux.memory.mappings import Mappings

try:
    from cuda.bindings import driver
except ImportError as e:  # cuda-bindings missing, or cuda-python older than 12.8
    raise ImportError(
        "the cuda memory backend needs NVIDIA's cuda-bindings >= 12.8 "
        f"(from cuda.bindings import driver failed: {e}); pip install vllm-mux[cuda]"
    ) from e

log = logging.getLogger("vllm_mux.memory.cuda")

# The free torch's pluggable allocator calls (c10/cuda/CUDAPluggableAllocator.h):
# free(ptr, size, device, stream).
_FREE = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p)

_POSIX_FD = driver.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
# cuda.h: #define CU_MEMHOSTREGISTER_READ_ONLY 0x08 (CUDA 11.1+)
_HOST_READ_ONLY = getattr(driver, "CU_MEMHOSTREGISTER_READ_ONLY", 0x08)


def _error(err) -> str:
    """``CUDA_ERROR_NAME (description)`` for a CUresult."""
    got, name = driver.cuGetErrorName(err)
    name = name.decode() if got == driver.CUresult.CUDA_SUCCESS and name else repr(err)
    got, text = driver.cuGetErrorString(err)
    text = text.decode() if got == driver.CUresult.CUDA_SUCCESS and text else ""
    return f"{name} ({text})" if text else name


def _check(result, call: str):
    """The values a driver call returned after its CUresult, or a RuntimeError."""
    err, *values = result
    if err != driver.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"{call} failed: {_error(err)}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


@dataclass
class Chunk:
    """A physical chunk: a CUDA allocation handle of ``size`` bytes.

    ``fd`` is the chunk's exported descriptor once ``export`` has made it (the
    daemon's chunks: it is exported at creation), else -1.
    """

    handle: int
    size: int
    fd: int = -1


class _DeviceRange:
    """``nbytes`` at ``addr`` as a CUDA array, for ``torch.as_tensor``."""

    def __init__(self, addr: int, nbytes: int):
        self.__cuda_array_interface__ = {
            "shape": (nbytes,),
            "typestr": "|u1",
            "data": (addr, False),
            "strides": None,
            "version": 3,
        }


class Backend:
    name = "cuda"
    device_type = "cuda"  # torch device type of tensors over this memory
    transport = "fd"  # a lease carries the chunks' exported POSIX fds
    tgid = None  # nobody to whitelist: an fd is its own permission

    def __init__(self, index: int = 0):
        _check(driver.cuInit(0), "cuInit")
        count = _check(driver.cuDeviceGetCount(), "cuDeviceGetCount")
        if not 0 <= index < count:
            raise ValueError(f"no CUDA device {index}: this process sees {count}")
        self.index = index
        self._device = _check(driver.cuDeviceGet(index), f"cuDeviceGet({index})")
        attributes = driver.CUdevice_attribute
        for attribute in (
            attributes.CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED,
            attributes.CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED,
        ):
            call = f"cuDeviceGetAttribute({attribute.name})"
            if not _check(driver.cuDeviceGetAttribute(attribute, self._device), call):
                raise RuntimeError(f"CUDA device {index} cannot serve this backend: {call} is 0")
        # The primary context is the one torch's runtime uses: retained here and
        # made current on this thread, it is shared with torch, not a rival.
        self._context = _check(
            driver.cuDevicePrimaryCtxRetain(self._device), "cuDevicePrimaryCtxRetain"
        )
        _check(driver.cuCtxSetCurrent(self._context), "cuCtxSetCurrent")

        self._prop = driver.CUmemAllocationProp()
        self._prop.type = driver.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        self._prop.location.type = driver.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        self._prop.location.id = index
        self._prop.requestedHandleTypes = _POSIX_FD
        self._access = driver.CUmemAccessDesc()
        self._access.location.type = driver.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        self._access.location.id = index
        self._access.flags = driver.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        self.granularity = int(
            _check(
                driver.cuMemGetAllocationGranularity(
                    self._prop,
                    driver.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM,
                ),
                "cuMemGetAllocationGranularity",
            )
        )
        raw = _check(driver.cuDeviceGetUuid(self._device), "cuDeviceGetUuid").bytes
        raw = raw if isinstance(raw, bytes) else bytes(b & 0xFF for b in raw)
        # The same GPU has a different index in processes with different
        # CUDA_VISIBLE_DEVICES: its UUID (as nvidia-smi -L writes it) is how the
        # daemon and an instance agree on it.
        self.identity = f"GPU-{uuid.UUID(bytes=raw)}"
        self._mapped = Mappings("CUDA")
        self._stream = None  # copy_in's side stream, made on first use

    @contextmanager
    def _current(self):
        """Run driver calls with this device's primary context current.

        A thread with no context gets it for good (as the runtime would do); a
        thread working in another context gets it back afterwards.
        """
        current = _check(driver.cuCtxGetCurrent(), "cuCtxGetCurrent")
        if int(current) == int(self._context):
            yield
        elif not int(current):
            _check(driver.cuCtxSetCurrent(self._context), "cuCtxSetCurrent")
            yield
        else:
            _check(driver.cuCtxPushCurrent(self._context), "cuCtxPushCurrent")
            try:
                yield
            finally:
                _check(driver.cuCtxPopCurrent(), "cuCtxPopCurrent")

    def _whole(self, size: int, what: str) -> None:
        if size <= 0 or size % self.granularity:
            raise ValueError(
                f"{what} of {size} bytes is not a positive multiple of the granularity "
                f"{self.granularity} of CUDA device {self.index}"
            )

    # daemon side
    def create(self, size: int) -> Chunk:
        self._whole(size, "a chunk")
        with self._current():
            handle = _check(driver.cuMemCreate(size, self._prop, 0), f"cuMemCreate({size})")
            chunk = Chunk(int(handle), size)
            try:
                self.export(chunk)  # fail at creation, not at the first lease
            except BaseException:
                _check(driver.cuMemRelease(chunk.handle), "cuMemRelease")
                raise
        return chunk

    def destroy(self, chunk: Chunk) -> None:
        self._drop(chunk)

    def export(self, chunk: Chunk) -> int:
        """A file descriptor to send to another process (SCM_RIGHTS dups it).

        Exported once and kept in the chunk, like the cpu backend's memfd: each
        export would make a new fd, and callers do not close what they send.
        """
        if chunk.fd < 0:
            with self._current():
                fd = int(
                    _check(
                        driver.cuMemExportToShareableHandle(chunk.handle, _POSIX_FD, 0),
                        "cuMemExportToShareableHandle",
                    )
                )
            os.set_inheritable(fd, False)  # like MFD_CLOEXEC: not for vLLM's children
            chunk.fd = fd
        return chunk.fd

    # instance side
    def import_(self, fd: int, size: int) -> Chunk:
        """Take ownership of a received descriptor: import it, and keep it in
        the chunk until ``release`` (an imported handle does not export
        again: CUDA_ERROR_INVALID_VALUE on an H200, so ``share`` dups this)."""
        try:
            with self._current():
                handle = _check(
                    driver.cuMemImportFromShareableHandle(fd, _POSIX_FD),
                    "cuMemImportFromShareableHandle",
                )
        except BaseException:
            os.close(fd)
            raise
        return Chunk(int(handle), size, fd)

    def share(self, chunk: Chunk) -> int:
        """A new descriptor of an imported chunk, which the caller closes: how
        an instance hands its chunks to a daemon that restarted. Its handle
        kept the allocation alive when the daemon that made it died."""
        return os.dup(chunk.fd)

    def release(self, chunk: Chunk) -> None:
        """Drop this process's handle to an imported chunk (after unmapping)."""
        self._drop(chunk)

    def _drop(self, chunk: Chunk) -> None:
        if chunk.fd >= 0:
            os.close(chunk.fd)
            chunk.fd = -1
        with self._current():
            _check(driver.cuMemRelease(chunk.handle), "cuMemRelease")

    def reserve(self, size: int) -> int:
        self._whole(size, "a reservation")
        with self._current():
            addr = _check(
                driver.cuMemAddressReserve(size, self.granularity, 0, 0),
                f"cuMemAddressReserve({size})",
            )
        return int(addr)

    def free(self, addr: int, size: int) -> None:
        """Give the range back, unmapping whatever is still mapped in it (as munmap)."""
        self.unmap(addr, size)
        with self._current():
            _check(driver.cuMemAddressFree(addr, size), "cuMemAddressFree")

    def map(self, chunk: Chunk, addr: int, prefault: bool = True) -> None:
        """Map the whole chunk at ``addr`` and give this device read-write access.

        ``prefault`` means nothing here: cuMemMap and cuMemSetAccess build the
        GPU page tables for the whole chunk at once; there are no lazy faults.
        """
        with self._mapped.lock, self._current():
            _check(
                driver.cuMemMap(addr, chunk.size, 0, chunk.handle, 0),
                f"cuMemMap({addr:#x}, {chunk.size})",
            )
            try:
                _check(
                    driver.cuMemSetAccess(addr, chunk.size, [self._access], 1),
                    f"cuMemSetAccess({addr:#x}, {chunk.size})",
                )
            except BaseException:
                _check(driver.cuMemUnmap(addr, chunk.size), "cuMemUnmap")
                raise
            self._mapped.add(addr, chunk.size)

    def unmap(self, addr: int, size: int) -> None:
        """Unmap every chunk mapped in ``[addr, addr + size)``; the range stays reserved.

        The range must not cut a chunk's mapping: CUDA cannot unmap part of one.
        """
        with self._mapped.lock, self._current():
            for start, length in self._mapped.inside(addr, size):
                _check(driver.cuMemUnmap(start, length), f"cuMemUnmap({start:#x}, {length})")
                self._mapped.remove(start)

    def synchronize(self) -> None:
        """Wait for all work on the device's primary context (torch's streams too)."""
        with self._current():
            _check(driver.cuCtxSynchronize(), "cuCtxSynchronize")

    def copy_in(self, addr: int, host) -> None:
        """Start copying the host tensor ``host`` to ``addr`` on a side stream.

        Asynchronous: the caller maps the next chunks while the copy engine
        works, and ``synchronize()`` waits for it. ``host`` should be
        page-locked (a pageable one is copied at a fraction of the speed).
        """
        import torch

        if self._stream is None:
            self._stream = torch.cuda.Stream(self.index)
        with torch.cuda.stream(self._stream):
            self.tensor(addr, host.numel()).copy_(host, non_blocking=True)

    def host_buffer(self, nbytes: int):
        """A page-locked host tensor of exactly ``nbytes`` (torch's pinned
        allocator rounds up to a power of two: 32 GiB for a 17 GiB model).
        Anonymous memory registered with the driver; unregistered when the
        returned holder goes."""
        return _PinnedHost(nbytes, self)

    def pin(self, addr: int, nbytes: int, read_only: bool = False) -> None:
        """Page-lock a host mapping (a host copy of weights) so that copies to
        the device run at the host link's full speed: ``read_only`` for a
        sealed copy mapped without write permission, which the driver would
        otherwise refuse (CU_MEMHOSTREGISTER_READ_ONLY, CUDA 11.1+)."""
        flags = _HOST_READ_ONLY if read_only else 0
        with self._current():
            _check(driver.cuMemHostRegister(addr, nbytes, int(flags)), "cuMemHostRegister")

    def unpin(self, addr: int) -> None:
        """Undo pin() before the mapping goes."""
        with self._current():
            _check(driver.cuMemHostUnregister(addr), "cuMemHostUnregister")

    def allocating(self, heap):
        """A context routing this thread's new CUDA tensors to ``heap``
        (``mempool.Allocating``): a ``torch.cuda.MemPool`` over a pluggable
        allocator, given to ``torch._C._cuda_customAllocator``."""
        import torch

        device = mempool.Device(
            name="CUDA",
            free=_FREE,
            custom_allocator=torch._C._cuda_customAllocator,
            mem_pool=lambda allocator: torch.cuda.MemPool(allocator=allocator),
            use_mem_pool=lambda pool, index: torch.cuda.use_mem_pool(pool, device=index),
            synchronize=torch.cuda.synchronize,
            alloc_conf="PYTORCH_CUDA_ALLOC_CONF",
        )
        return mempool.Allocating(heap, self.index, device)

    def tensor(self, addr: int, nbytes: int):
        """A uint8 tensor over ``nbytes`` mapped at ``addr`` (no copy)."""
        import torch

        device = torch.device("cuda", self.index)
        if nbytes == 0:  # nothing to view, and an unmapped address has no device
            return torch.empty(0, dtype=torch.uint8, device=device)
        tensor = torch.as_tensor(_DeviceRange(addr, nbytes), device=device)
        if tensor.data_ptr() != addr:  # as_tensor copied: addr is not memory of this device
            raise RuntimeError(
                f"{addr:#x} is not mapped memory of CUDA device {self.index}: "
                f"torch made a copy on {tensor.device}"
            )
        return tensor


class _PinnedHost:
    """``nbytes`` of page-locked host memory; ``.tensor`` is a uint8 view of it."""

    def __init__(self, nbytes: int, backend: "Backend"):
        import mmap

        import torch

        self._map = mmap.mmap(-1, nbytes)
        self.tensor = torch.frombuffer(self._map, dtype=torch.uint8)
        self._ptr = self.tensor.data_ptr()
        with backend._current():
            _check(driver.cuMemHostRegister(self._ptr, nbytes, 0), "cuMemHostRegister")
        self._backend = backend

    def __del__(self):
        if getattr(self, "_backend", None) is not None:
            with self._backend._current():
                driver.cuMemHostUnregister(self._ptr)
