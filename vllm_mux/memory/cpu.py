"""Host memory as a device: chunks are memfds, mapped with mmap.

This is where all of vllm-mux is tested. A chunk is a memfd whose pages the
daemon commits at creation by writing zeros into it, the way a GPU driver
commits ``cuMemCreate``'s physical memory: the pool is really held once, and
mapping a leased chunk costs page-table work, not page allocation and zeroing
(``posix_fallocate`` alone would leave the zeroing to the first mapper). A virtual range is
reserved with ``mmap(PROT_NONE)``; a chunk is mapped into it with
``MAP_FIXED|MAP_SHARED`` and unmapped by mapping ``PROT_NONE`` over it again,
so the range stays reserved and addresses never move. Touching an unmapped
range faults, as it would on a device.
"""

import contextlib
import ctypes
import mmap
import os
from dataclasses import dataclass

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value
_MAP_NORESERVE = 0x4000
_MAP_POPULATE = 0x8000
_PROT_NONE = 0
_MAP_FIXED = 0x10
_RESERVED = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE


def _mmap(addr: int | None, size: int, prot: int, flags: int, fd: int = -1) -> int:
    result = _libc.mmap(addr, size, prot, flags, fd, 0)
    if result == _MAP_FAILED or result is None:
        err = ctypes.get_errno()
        raise OSError(err, f"mmap failed: {os.strerror(err)}")
    return result


@dataclass
class Chunk:
    """A physical chunk: a memfd of ``size`` bytes."""

    fd: int
    size: int


class Backend:
    name = "cpu"
    device_type = "cpu"  # torch device type of tensors over this memory
    granularity = mmap.PAGESIZE
    identity = "cpu"  # what the daemon and an instance compare to agree on the device

    def __init__(self, index: int = 0):
        if index != 0:
            raise ValueError("the cpu device has one index: 0")

    # daemon side
    def create(self, size: int) -> Chunk:
        fd = os.memfd_create("vllm-mux-chunk", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            zeros = bytes(min(size, 4 << 20))
            for offset in range(0, size, len(zeros)):
                os.pwrite(fd, zeros[: size - offset], offset)
        except OSError:
            os.close(fd)
            raise
        return Chunk(fd, size)

    def destroy(self, chunk: Chunk) -> None:
        os.close(chunk.fd)

    def export(self, chunk: Chunk) -> int:
        """A file descriptor to send to another process (SCM_RIGHTS dups it)."""
        return chunk.fd

    # instance side
    def import_(self, fd: int, size: int) -> Chunk:
        """Take ownership of a received descriptor: a memfd of ``size`` bytes
        (mapping past the end of a shorter file would fault its reader)."""
        try:
            actual = os.fstat(fd).st_size
            if actual != size:
                raise ValueError(f"a chunk of {actual} bytes, not {size}")
        except BaseException:
            os.close(fd)
            raise
        return Chunk(fd, size)

    def share(self, chunk: Chunk) -> int:
        """A new descriptor of an imported chunk, which the caller closes: how
        an instance hands its chunks to a daemon that restarted. The memfd is
        the memory itself, alive while any process holds or maps it."""
        return os.dup(chunk.fd)

    def release(self, chunk: Chunk) -> None:
        """Drop this process's handle to an imported chunk (after unmapping)."""
        os.close(chunk.fd)

    def reserve(self, size: int) -> int:
        return _mmap(None, size, _PROT_NONE, _RESERVED)

    def free(self, addr: int, size: int) -> None:
        if _libc.munmap(addr, size) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"munmap failed: {os.strerror(err)}")

    def map(self, chunk: Chunk, addr: int, prefault: bool = True) -> None:
        """Map at ``addr``; ``prefault`` fills the page tables now (MAP_POPULATE),
        cheaper than one page fault per page when the memory is used at once."""
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        flags = mmap.MAP_SHARED | _MAP_FIXED | (_MAP_POPULATE if prefault else 0)
        got = _mmap(addr, chunk.size, prot, flags, chunk.fd)
        assert got == addr, f"MAP_FIXED returned {got:#x} for {addr:#x}"

    def unmap(self, addr: int, size: int) -> None:
        _mmap(addr, size, _PROT_NONE, _RESERVED | _MAP_FIXED)

    def synchronize(self) -> None:
        """Host memory needs no synchronization."""

    def allocating(self, heap):
        """Route this thread's new tensors to ``heap``: not possible on CPU.

        torch has no pluggable CPU allocator, so an instance loads its weights
        into ordinary memory and moves them into the arena afterwards
        (``Instance.adopt_weights``)."""
        return contextlib.nullcontext()

    def host_buffer(self, nbytes: int):
        """A host tensor of ``nbytes`` to keep a copy of the weights in."""
        import torch

        return _HostBuffer(torch.empty(nbytes, dtype=torch.uint8))

    def copy_in(self, addr: int, host) -> None:
        """Copy the host tensor ``host`` to ``addr`` (synchronous on CPU)."""
        self.tensor(addr, host.numel()).copy_(host)

    def tensor(self, addr: int, nbytes: int):
        """A uint8 tensor over ``nbytes`` mapped at ``addr`` (no copy)."""
        import torch

        if nbytes == 0:  # frombuffer refuses an empty buffer
            return torch.empty(0, dtype=torch.uint8)
        return torch.frombuffer((ctypes.c_uint8 * nbytes).from_address(addr), dtype=torch.uint8)


@dataclass
class _HostBuffer:
    """What ``host_buffer`` returns on every backend: a holder with ``.tensor``."""

    tensor: object
