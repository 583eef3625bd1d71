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

Huge pages. Mapping a chunk of 4 KiB pages fills one page-table entry per
4 KiB, which is most of what a wake costs beyond its copy; a 2 MiB page needs
one entry. ``Backend()`` decides once, in this order, and says what it got in
``pages`` ("hugetlb", "thp" or "4k") and ``pages_description`` (one line for
the daemon's log):

1. ``hugetlb``: memfds of 2 MiB hugetlbfs pages (``MFD_HUGETLB``), when a
   test page can be created and faulted (``vm.nr_hugepages`` or the
   overcommit pool has pages). Their pages are committed with ``fallocate``.
   A chunk whose size is not a multiple of 2 MiB, or one the pool has no
   pages left for, is made as the next kind instead, and works the same.
2. ``thp``: shmem memfds with transparent huge pages, when
   ``/sys/kernel/mm/transparent_hugepage/shmem_enabled`` (or its
   ``hugepages-2048kB`` override) is advise, always, within_size or force.
   The daemon commits a chunk by mapping it with ``MADV_HUGEPAGE`` and
   populating it for writing, so its page cache holds 2 MiB folios.
3. ``4k``: plain memfds, zeros written into them (on a THP host, through a
   mapping with ``MADV_NOHUGEPAGE``, see below).

Every process maps the chunks it receives whatever kind the daemon made: a
hugetlbfs memfd is known by its file system (``fstatfs``), and a shmem
mapping gets ``MADV_HUGEPAGE`` whenever this host's shmem THP setting allows
it (harmless on a chunk of small pages; the kernel also maps a chunk's huge
folios with 2 MiB entries without it). Huge pages get page-table entries of
2 MiB only at 2 MiB-aligned addresses (hugetlb maps nowhere else), so
``reserve`` returns 2 MiB-aligned ranges, and ``unmap`` and ``free`` of whole
chunks of an arena stay on 2 MiB boundaries when chunks are huge-page sized.

``VLLM_MUX_HUGE_PAGES=0`` in the environment turns huge pages off: the
backend makes and maps 4 KiB-page chunks only (with ``MADV_NOHUGEPAGE`` where
shmem THP is on, which ``always`` would otherwise apply to every memfd). It is
the escape hatch, and the peer that ``vllm_mux.bench.pages`` compares with. A
process that sets it still maps the hugetlbfs chunks of a daemon that does
not: those pages are huge whoever maps them.
"""

import contextlib
import ctypes
import errno
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
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.fstatfs.argtypes = [ctypes.c_int, ctypes.c_void_p]
_MAP_FAILED = ctypes.c_void_p(-1).value
_MAP_NORESERVE = 0x4000
_MAP_POPULATE = 0x8000
_PROT_NONE = 0
_PROT_RW = mmap.PROT_READ | mmap.PROT_WRITE
_MAP_FIXED = 0x10
_RESERVED = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE
_MADV_HUGEPAGE = 14
_MADV_NOHUGEPAGE = 15
_MADV_POPULATE_READ = 22  # Linux 5.14
_MADV_POPULATE_WRITE = 23  # Linux 5.14

HUGE_PAGE = 2 << 20  # the huge page size used: x86-64's and arm64's (4 KiB base) PMD size
_MFD_HUGE_2MB = 21 << 26  # log2(2 MiB) << MFD_HUGE_SHIFT
_HUGETLBFS_MAGIC = 0x958458F6  # statfs.f_type of hugetlbfs
_HUGETLB_SYSFS = "/sys/kernel/mm/hugepages/hugepages-2048kB"
_THP_SYSFS = "/sys/kernel/mm/transparent_hugepage"
_SHMEM_THP_ON = ("advise", "always", "within_size", "force")
ENV = "VLLM_MUX_HUGE_PAGES"
PAGE_KINDS = ("hugetlb", "thp", "4k")  # in the order Backend() tries them


def _mmap(addr: int | None, size: int, prot: int, flags: int, fd: int = -1) -> int:
    result = _libc.mmap(addr, size, prot, flags, fd, 0)
    if result == _MAP_FAILED or result is None:
        err = ctypes.get_errno()
        raise OSError(err, f"mmap failed: {os.strerror(err)}")
    return result


def _munmap(addr: int, size: int) -> None:
    if _libc.munmap(addr, size) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"munmap failed: {os.strerror(err)}")


def _madvise(addr: int, size: int, advice: int) -> None:
    if _libc.madvise(addr, size, advice) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"madvise({advice}) failed: {os.strerror(err)}")


def is_hugetlb(fd: int) -> bool:
    """Whether ``fd`` is a hugetlbfs file (a memfd made with MFD_HUGETLB).
    Not its block size: shmem reports 2 MiB there too when its THP is on."""
    buf = ctypes.create_string_buffer(256)  # struct statfs; f_type comes first
    if _libc.fstatfs(fd, buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"fstatfs failed: {os.strerror(err)}")
    return ctypes.c_ulong.from_buffer(buf).value & 0xFFFFFFFF == _HUGETLBFS_MAGIC


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _selected(path: str) -> str | None:
    """The bracketed choice of a sysfs setting like ``always [advise] never``."""
    text = _read(path)
    if text is None:
        return None
    for word in text.split():
        if word.startswith("["):
            return word.strip("[]")
    return text  # a file with a single value


def shmem_thp() -> tuple[bool, str]:
    """Whether shmem (so a memfd) may get 2 MiB transparent huge pages on this
    host, and the setting that says so, e.g. ``shmem_enabled=advise``."""
    top = _selected(f"{_THP_SYSFS}/shmem_enabled")
    if top is None:
        return False, "no transparent huge pages"
    said = f"shmem_enabled={top}"
    size = _selected(f"{_THP_SYSFS}/hugepages-2048kB/shmem_enabled")
    if size is not None and size != "inherit":  # the 2 MiB size overrides the top
        said += f", hugepages-2048kB/shmem_enabled={size}"
        top = "force" if top == "force" else size
    return top in _SHMEM_THP_ON, said


def hugetlb_pool() -> str:
    """The 2 MiB hugetlb pool in a few words, e.g. ``nr_hugepages=0``."""
    nr = _read(f"{_HUGETLB_SYSFS}/nr_hugepages")
    if nr is None:
        return "no 2 MiB hugetlb pages"
    said = f"nr_hugepages={nr}"
    free = _read(f"{_HUGETLB_SYSFS}/free_hugepages")
    if nr != "0" and free is not None:
        said += f", {free} free"
    over = _read(f"{_HUGETLB_SYSFS}/nr_overcommit_hugepages")
    if over not in (None, "0"):
        said += f", nr_overcommit_hugepages={over}"
    return said


def _hugetlb_memfd(size: int) -> int:
    """A hugetlbfs memfd of ``size`` bytes, its pages allocated and zeroed."""
    fd = os.memfd_create("vllm-mux-chunk", os.MFD_CLOEXEC | os.MFD_HUGETLB | _MFD_HUGE_2MB)
    try:
        os.ftruncate(fd, size)
        os.posix_fallocate(fd, 0, size)  # hugetlbfs allocates and zeroes; ENOSPC: none left
    except BaseException:
        os.close(fd)
        raise
    return fd


def hugetlb_works() -> tuple[bool, str]:
    """Whether a 2 MiB hugetlbfs memfd can be created, committed, mapped and
    written here, and the pool in a few words (with why not, when not)."""
    pool = hugetlb_pool()  # before the test page is taken
    try:
        fd = _hugetlb_memfd(HUGE_PAGE)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.ENOMEM):  # an empty pool
            return False, pool
        return False, f"{pool}: a hugetlbfs memfd failed: {e.strerror}"
    try:
        addr = _mmap(None, HUGE_PAGE, _PROT_RW, mmap.MAP_SHARED, fd)
        try:
            ctypes.memset(addr + HUGE_PAGE - 1, 1, 1)
        finally:
            _munmap(addr, HUGE_PAGE)
    except OSError as e:
        return False, f"{pool}: mapping a hugetlbfs memfd failed: {e.strerror}"
    finally:
        os.close(fd)
    return True, pool


def choose_pages(wanted: str | None = None) -> tuple[str, str]:
    """The page kind a backend gets here, and a line saying which and why:
    the first of hugetlb, thp and 4k this host has, or ``wanted`` (for a
    bench or a test: ValueError, saying why, when the host lacks it)."""
    if wanted not in (None, *PAGE_KINDS):
        raise ValueError(f"unknown page kind {wanted!r}; known: {', '.join(PAGE_KINDS)}")
    page = f"{mmap.PAGESIZE >> 10} KiB pages"
    if wanted == "4k":
        return "4k", f"{page} (asked for)"
    if wanted is None and os.environ.get(ENV, "").strip() == "0":
        return "4k", f"{page}: huge pages turned off ({ENV}=0)"
    hugetlb, pool = (False, "") if wanted == "thp" else hugetlb_works()
    if hugetlb:
        return "hugetlb", f"2 MiB hugetlbfs pages ({pool})"
    if wanted == "hugetlb":
        raise ValueError(f"no 2 MiB hugetlbfs pages here ({pool})")
    thp, setting = shmem_thp()
    if thp:
        return "thp", f"transparent huge pages ({setting})"
    if wanted == "thp":
        raise ValueError(f"no transparent huge pages for shmem here ({setting})")
    return "4k", f"{page}: no huge pages on this host ({pool}, {setting})"


def huge_mapped_bytes(addr: int, size: int) -> int:
    """Bytes of ``[addr, addr + size)`` that this process maps with huge pages
    (hugetlb or PMD-mapped THP), from /proc/self/smaps: for tests and benches."""
    total = 0
    inside = False
    keys = ("ShmemPmdMapped:", "FilePmdMapped:", "Shared_Hugetlb:", "Private_Hugetlb:")
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(None, 1)[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo < addr + size and addr < hi
                share = (min(hi, addr + size) - max(lo, addr)) / (hi - lo) if inside else 0
            elif inside and head in keys:
                total += int(int(line.split()[1]) * 1024 * share)
    return total


@dataclass
class Chunk:
    """A physical chunk: a memfd of ``size`` bytes, of ``pages``: "hugetlb"
    for a hugetlbfs memfd, else "thp" or "4k" (shmem; an imported shmem chunk
    is "4k" whatever its folios: the exporter knows, not the fd)."""

    fd: int
    size: int
    pages: str = "4k"


class Backend:
    name = "cpu"
    device_type = "cpu"  # torch device type of tensors over this memory
    transport = "fd"  # a lease carries the chunks' memfds
    tgid = None  # nobody to whitelist: an fd is its own permission
    granularity = mmap.PAGESIZE
    identity = "cpu"  # what the daemon and an instance compare to agree on the device

    def __init__(self, index: int = 0, pages: str | None = None):
        """``pages`` asks for one kind of ``PAGE_KINDS`` (ValueError if the
        host lacks it); by default the first this host has, see above."""
        if index != 0:
            raise ValueError("the cpu device has one index: 0")
        self.pages, self.pages_description = choose_pages(pages)
        # How shmem chunks are committed and mapped: where this host gives
        # shmem THP, with MADV_HUGEPAGE (chunks from a daemon that chose THP
        # then map with 2 MiB entries; harmless on chunks of small pages), or
        # with MADV_NOHUGEPAGE when 4 KiB pages were asked for (otherwise
        # shmem_enabled=always would give huge ones anyway); else no advice.
        self._advice = None
        if shmem_thp()[0]:
            self._advice = _MADV_NOHUGEPAGE if self.pages == "4k" else _MADV_HUGEPAGE

    # daemon side
    def create(self, size: int) -> Chunk:
        if self.pages == "hugetlb" and size % HUGE_PAGE == 0:
            try:
                return Chunk(_hugetlb_memfd(size), size, "hugetlb")
            except OSError as e:
                if e.errno not in (errno.ENOSPC, errno.ENOMEM):
                    raise
                # the pool ran out: this chunk is made of the next kind
        fd = os.memfd_create("vllm-mux-chunk", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            if self._advice is not None:
                self._commit_mapped(fd, size)
            else:
                zeros = bytes(min(size, 4 << 20))
                for offset in range(0, size, len(zeros)):
                    os.pwrite(fd, zeros[: size - offset], offset)
        except BaseException:
            os.close(fd)
            raise
        huge = self._advice == _MADV_HUGEPAGE and size % HUGE_PAGE == 0
        return Chunk(fd, size, "thp" if huge else "4k")

    def _commit_mapped(self, fd: int, size: int) -> None:
        """Commit a shmem memfd's pages through a mapping with this backend's
        advice, at a 2 MiB-aligned address: under MADV_HUGEPAGE the kernel
        puts huge folios into the page cache (``pwrite`` gets them only under
        ``always``), under MADV_NOHUGEPAGE small ones."""
        base = self.reserve(size)
        try:
            _mmap(base, size, _PROT_RW, mmap.MAP_SHARED | _MAP_FIXED, fd)
            _madvise(base, size, self._advice)
            try:
                _madvise(base, size, _MADV_POPULATE_WRITE)  # zero-filled by the kernel
            except OSError as e:
                if e.errno != errno.EINVAL:  # EINVAL: a kernel older than 5.14
                    raise
                ctypes.memset(base, 0, size)
        finally:
            _munmap(base, size)

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
            pages = "hugetlb" if is_hugetlb(fd) else "4k"
        except BaseException:
            os.close(fd)
            raise
        return Chunk(fd, size, pages)

    def share(self, chunk: Chunk) -> int:
        """A new descriptor of an imported chunk, which the caller closes: how
        an instance hands its chunks to a daemon that restarted. The memfd is
        the memory itself, alive while any process holds or maps it."""
        return os.dup(chunk.fd)

    def release(self, chunk: Chunk) -> None:
        """Drop this process's handle to an imported chunk (after unmapping)."""
        os.close(chunk.fd)

    def reserve(self, size: int) -> int:
        """A PROT_NONE range of ``size`` bytes at a 2 MiB-aligned address, so
        that huge pages mapped into it get 2 MiB page-table entries (hugetlb
        cannot be mapped otherwise): reserved 2 MiB larger, then trimmed."""
        span = size + HUGE_PAGE
        addr = _mmap(None, span, _PROT_NONE, _RESERVED)
        base = -(-addr // HUGE_PAGE) * HUGE_PAGE
        if base > addr:
            _munmap(addr, base - addr)
        if addr + span > base + size:
            _munmap(base + size, addr + span - base - size)
        return base

    def free(self, addr: int, size: int) -> None:
        _munmap(addr, size)

    def map(self, chunk: Chunk, addr: int, prefault: bool = True) -> None:
        """Map at ``addr``; ``prefault`` fills the page tables now (MAP_POPULATE),
        cheaper than one page fault per page when the memory is used at once."""
        if chunk.pages == "hugetlb" and addr % HUGE_PAGE:
            raise ValueError(f"a hugetlb chunk maps at 2 MiB-aligned addresses, not {addr:#x}")
        flags = mmap.MAP_SHARED | _MAP_FIXED
        advice = None if chunk.pages == "hugetlb" else self._advice
        populate = _MAP_POPULATE if prefault else 0
        got = _mmap(
            addr, chunk.size, _PROT_RW, flags | (populate if advice is None else 0), chunk.fd
        )
        assert got == addr, f"MAP_FIXED returned {got:#x} for {addr:#x}"
        if advice is None:
            return
        _madvise(addr, chunk.size, advice)  # before the first fault
        if prefault:
            # read faults, as MAP_POPULATE makes on a shared mapping: they map
            # shmem pages writable, and around each fault up to 16 small pages
            # at once (write faults take one at a time: 2-4x slower here)
            try:
                _madvise(addr, chunk.size, _MADV_POPULATE_READ)
            except OSError as e:
                if e.errno != errno.EINVAL:  # EINVAL: a kernel older than 5.14
                    raise
                _mmap(addr, chunk.size, _PROT_RW, flags | populate, chunk.fd)
                _madvise(addr, chunk.size, advice)  # for the mapping's later faults

    def unmap(self, addr: int, size: int) -> None:
        """Map PROT_NONE over the range: it stays reserved. Hugetlb chunks
        need the range 2 MiB-aligned, which whole chunks of an arena are."""
        _mmap(addr, size, _PROT_NONE, _RESERVED | _MAP_FIXED)

    def synchronize(self) -> None:
        """Host memory needs no synchronization."""

    def pin(self, addr: int, nbytes: int, read_only: bool = False) -> None:
        """Page-lock host memory for fast device copies: nothing to do on CPU."""

    def unpin(self, addr: int) -> None:
        """Undo pin(): nothing to do on CPU."""

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
