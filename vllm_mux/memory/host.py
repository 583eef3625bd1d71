"""Host copies of weights: memfds the daemon makes, an instance fills once,
the daemon seals, and every instance with the same weights maps read-only.

Host memory is host memory whatever the device: this is shared by every
backend; a device backend only page-locks a mapping (``Backend.pin``) so that
copies to the device run at the host link's full speed.

Sealing (``F_SEAL_WRITE``) is what makes sharing safe: once sealed, nobody,
the filler included, can change the bytes (a writable mapping, ``write()``
or a hole punched all fail), so the digest the daemon took of them names
them for as long as the copy lives.
"""

import ctypes
import fcntl
import hashlib
import mmap
import os
from concurrent.futures import ThreadPoolExecutor

from vllm_mux.memory.cpu import _mmap, _munmap

_MAP_POPULATE = 0x8000
SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
PIECE = 64 << 20  # bytes hashed at a time


def create(size: int) -> int:
    """A memfd of ``size`` bytes, its pages committed now (the budget is
    real memory, not a promise), open to sealing."""
    fd = os.memfd_create("vllm-mux-host-copy", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        os.posix_fallocate(fd, 0, size)
    except OSError:
        os.close(fd)
        raise
    return fd


def seal(fd: int) -> None:
    """Forbid every change of the bytes and size from now on. EBUSY
    (OSError) while anyone still maps it writable."""
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)


def sealed(fd: int) -> bool:
    try:
        return fcntl.fcntl(fd, fcntl.F_GET_SEALS) & SEALS == SEALS
    except OSError:  # not a memfd
        return False


def digest_fd(fd: int, size: int) -> str:
    """The digest of the first ``size`` bytes of ``fd``: what names a copy."""
    with mmap.mmap(fd, size, prot=mmap.PROT_READ) as view:
        whole = memoryview(view)
        try:
            return digest(size, lambda offset, n: whole[offset : offset + n])
        finally:
            whole.release()


def digest(size: int, piece_at, workers: int | None = None) -> str:
    """What names ``size`` bytes: the sha256 of their length and of the sha256
    of each PIECE of them, in order. ``piece_at(offset, n)`` returns a buffer
    of those bytes; it is called on several threads at once (hashlib lets go
    of the GIL while it hashes a large buffer), so that a copy of tens of GB
    is named in seconds, not a minute: one sha256 runs at about 1 GB/s."""
    workers = workers or min(16, os.cpu_count() or 1)

    def one(offset: int) -> bytes:
        return hashlib.sha256(piece_at(offset, min(PIECE, size - offset))).digest()

    with ThreadPoolExecutor(workers, thread_name_prefix="vllm-mux-digest") as pool:
        pieces = list(pool.map(one, range(0, size, PIECE)))
    return hashlib.sha256(size.to_bytes(8, "little") + b"".join(pieces)).hexdigest()


class Mapping:
    """``size`` bytes of a host copy's memfd mapped into this process:
    writable to fill it, else read-only. ``tensor`` is a uint8 tensor over it
    (no copy). The mapping and ``fd`` (owned from here on, kept to hand the
    copy to a daemon that restarts) hold the memory until ``close()``."""

    def __init__(self, fd: int, size: int, writable: bool):
        self.size = size
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        try:
            addr = _mmap(None, size, prot, mmap.MAP_SHARED | _MAP_POPULATE, fd)
        except BaseException:
            os.close(fd)
            raise
        self.addr, self.fd = addr, fd
        self.pinned = False  # page-locked by a device backend (the caller's to undo)
        import torch

        buffer = (ctypes.c_uint8 * size).from_address(addr)
        self.tensor = torch.frombuffer(buffer, dtype=torch.uint8)

    def close(self) -> None:
        if self.addr is None:
            return
        self.tensor = None
        os.close(self.fd)
        _munmap(self.addr, self.size)
        self.addr = None
