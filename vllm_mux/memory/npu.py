"""Ascend NPU memory as chunks: CANN's virtual memory API through ctypes.

Written against CANN's documented API (``acl_rt.h``); never run on an NPU.
CI runs it against a simulated runtime (``tests/acl_sim``) that enforces the
rules below; nothing here has met real hardware.

A chunk is physical NPU memory from ``aclrtMallocPhysical`` (2 MiB huge
pages, ``ACL_HBM_MEM_HUGE``). Unlike CUDA's POSIX fds, CANN shares memory
between processes through a "shareable handle", a uint64 that is no
capability by itself: the exporting process names the processes allowed to
import it. So the daemon exports each chunk once, at creation
(``aclrtMemExportToShareableHandle``: once per allocation), and, on each
lease, adds the leasing instance to the chunk's whitelist
(``aclrtMemSetPidToShareableHandle``, by the bare tgid that
``aclrtDeviceGetBareTgid`` gives: the host's pid, which differs from
``os.getpid()`` inside a container) and sends the handle in the reply,
where the cpu and cuda backends send fds. The instance imports it
(``aclrtMemImportFromShareableHandle``) and frees its import when it lets
the chunk go (``aclrtFreePhysical``): CANN allows one import of a handle per
process at a time, and an instance sleeps (releasing every chunk) before it
imports the same chunk again on its next wake. The physical memory is freed
once every holder has freed it, so the daemon's books, pidfd liveness checks
and arbitration stay as they are: one mapper per chunk.

Not done on an NPU, and refused or slower rather than faked:
- ``share``: an imported handle cannot be exported again, so an instance
  cannot hand its chunks to a restarted daemon: it names them on hello and
  keeps mapping its own imports; the new daemon makes those chunks anew
  when it lets them go (its sleep), and the wake after copies in.
- ``pin``: host copies stay pageable (the instance logs it): CANN's
  host-registration call was not checked against the header.
- ``copy_in`` copies with ``aclrtMemcpy`` synchronously, piece by piece, so
  a wake's copies do not overlap its maps as they do on CUDA.

The whitelist: the export flag that skips it
(ACL_RT_VMM_EXPORT_FLAG_DISABLE_PID_VALIDATION, CANN 9.0) is not used, so
this works on CANN 8.0, which has no such flag, and only processes the
daemon leased a chunk to may import it. The API has no call to take a tgid
off a whitelist, so a process that once held a chunk could import it again
behind the books' back if it learns the handle (handles are small numbers,
not secrets); a later process reusing its pid could not, if the driver
behaves as its source reads (an entry older than the importer is refused;
not run). The tgid comes with each lease, not with hello as the issue had
it: the instance learns the device, and so which runtime to ask for its
tgid, from hello's reply.

The library: ``VLLM_MUX_ASCENDCL`` names the ``libascendcl.so`` to load
(tests point it at the simulated one). Otherwise the copy already loaded in
this process (torch_npu's, found in /proc/self/maps as vllm-ascend's camem
finds it), else ``$ASCEND_HOME_PATH/lib64/libascendcl.so``, else CANN's
default install path. Tensors over NPU memory (``tensor``, ``allocating``)
need torch_npu (never run: CI has none, and the simulated runtime's memory is
the host's); the daemon never makes any, and needs no torch.
"""

import ctypes
import logging
import os
import threading
from dataclasses import dataclass, field

from vllm_mux.memory import mempool
from vllm_mux.memory.mappings import Mappings

log = logging.getLogger("vllm_mux.memory.npu")

LIBRARY_ENV = "VLLM_MUX_ASCENDCL"
DEFAULT_HOME = "/usr/local/Ascend/ascend-toolkit/latest"

# acl_base.h / acl_rt.h (sources: tests/acl_sim/SOURCES.md)
ACL_SUCCESS = 0
ACL_ERROR_REPEAT_INITIALIZE = 100002  # aclInit after torch_npu's: not an error here
ACL_MEM_HANDLE_TYPE_NONE = 0
ACL_MEM_ALLOCATION_TYPE_PINNED = 0
ACL_HBM_MEM_HUGE = 4  # aclrtMemAttr: 2 MiB pages
ACL_MEM_LOCATION_TYPE_DEVICE = 1
ACL_RT_MEM_ALLOC_GRANULARITY_MINIMUM = 0
ACL_MEMCPY_HOST_TO_DEVICE = 1
ACL_MEMCPY_DEVICE_TO_HOST = 2

_handle = ctypes.c_void_p  # aclrtDrvMemHandle
# The free torch_npu's pluggable allocator calls (NPUPluggableAllocator.h in the
# torch-npu 2.10.0.post4 wheel): free(ptr, size, int device, aclrtStream).
_FREE = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p)
_error = ctypes.c_int  # aclError


class _Location(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint32), ("type", ctypes.c_int)]


class _Uuid(ctypes.Structure):
    _fields_ = [("bytes", ctypes.c_char * 16)]


class _PhysicalMemProp(ctypes.Structure):
    _fields_ = [
        ("handleType", ctypes.c_int),
        ("allocationType", ctypes.c_int),
        ("memAttr", ctypes.c_int),
        ("location", _Location),
        ("reserve", ctypes.c_uint64),
    ]


_P = ctypes.POINTER
_SIGNATURES = {
    "aclInit": [ctypes.c_char_p],
    "aclrtSetDevice": [ctypes.c_int32],
    "aclrtMemGetAllocationGranularity": [_P(_PhysicalMemProp), ctypes.c_int, _P(ctypes.c_size_t)],
    "aclrtMallocPhysical": [_P(_handle), ctypes.c_size_t, _P(_PhysicalMemProp), ctypes.c_uint64],
    "aclrtFreePhysical": [_handle],
    "aclrtReserveMemAddress": [
        _P(ctypes.c_void_p),
        ctypes.c_size_t,
        ctypes.c_size_t,
        ctypes.c_void_p,
        ctypes.c_uint64,
    ],
    "aclrtReleaseMemAddress": [ctypes.c_void_p],
    "aclrtMapMem": [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, _handle, ctypes.c_uint64],
    "aclrtUnmapMem": [ctypes.c_void_p],
    "aclrtMemExportToShareableHandle": [
        _handle,
        ctypes.c_int,
        ctypes.c_uint64,
        _P(ctypes.c_uint64),
    ],
    "aclrtMemSetPidToShareableHandle": [ctypes.c_uint64, _P(ctypes.c_int32), ctypes.c_size_t],
    "aclrtMemImportFromShareableHandle": [ctypes.c_uint64, ctypes.c_int32, _P(_handle)],
    "aclrtDeviceGetBareTgid": [_P(ctypes.c_int32)],
    "aclrtMemcpy": [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
    ],
    "aclrtSynchronizeDevice": [],
}
# Calls a runtime may lack: aclrtDeviceGetUuid is new in CANN 9.0.
_OPTIONAL = {"aclrtDeviceGetUuid": [ctypes.c_int32, _P(_Uuid)]}


def library_path() -> str:
    """Which libascendcl.so to load (see the module's docstring)."""
    path = os.environ.get(LIBRARY_ENV)
    if path:
        return path
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                if line.rstrip().endswith("/libascendcl.so"):
                    return line.split(None, 5)[-1].strip()
    except OSError:
        pass
    home = os.environ.get("ASCEND_HOME_PATH") or DEFAULT_HOME
    return os.path.join(home, "lib64", "libascendcl.so")


_lib = None
_lib_lock = threading.Lock()


def _load():
    global _lib
    with _lib_lock:
        if _lib is None:
            path = library_path()
            try:
                lib = ctypes.CDLL(path)
            except OSError as e:
                raise RuntimeError(
                    f"the npu memory backend needs CANN's libascendcl.so ({e}); install the "
                    f"CANN toolkit and source its set_env.sh, or set {LIBRARY_ENV}"
                ) from None
            missing = [name for name in _SIGNATURES if not hasattr(lib, name)]
            if missing:
                raise RuntimeError(
                    f"{path} lacks {', '.join(missing)}: the npu memory backend needs CANN's "
                    "virtual memory API with shareable handles (CANN 8.0 or later)"
                )
            for name, argtypes in (_SIGNATURES | _OPTIONAL).items():
                if hasattr(lib, name):
                    call = getattr(lib, name)
                    call.argtypes, call.restype = argtypes, _error
            lib.aclGetRecentErrMsg.argtypes, lib.aclGetRecentErrMsg.restype = [], ctypes.c_char_p
            _lib = lib
        return _lib


def _check(code: int, call: str) -> None:
    if code != ACL_SUCCESS:
        message = (_lib.aclGetRecentErrMsg() or b"").decode(errors="replace").strip()
        raise RuntimeError(f"{call} failed: aclError {code}" + (f" ({message})" if message else ""))


@dataclass
class Chunk:
    """A physical chunk: ``handle`` is this process's aclrtDrvMemHandle;
    ``shared`` the shareable handle (the daemon's export, or the one it was
    imported from); ``tgids`` the processes the daemon has whitelisted."""

    handle: int
    size: int
    shared: int = 0
    tgids: set = field(default_factory=set)


class Backend:
    name = "npu"
    device_type = "npu"  # torch device type of tensors over this memory
    transport = "handle"  # a lease carries shareable handles, not fds

    def __init__(self, index: int = 0):
        self._lib = _load()
        init = self._lib.aclInit(None)
        if init not in (ACL_SUCCESS, ACL_ERROR_REPEAT_INITIALIZE):
            _check(init, "aclInit")
        self.index = index
        self._local = threading.local()
        self._device()
        self._prop = _PhysicalMemProp(
            ACL_MEM_HANDLE_TYPE_NONE,
            ACL_MEM_ALLOCATION_TYPE_PINNED,
            ACL_HBM_MEM_HUGE,
            _Location(index, ACL_MEM_LOCATION_TYPE_DEVICE),
            0,
        )
        granularity = ctypes.c_size_t()
        _check(
            self._lib.aclrtMemGetAllocationGranularity(
                ctypes.byref(self._prop),
                ACL_RT_MEM_ALLOC_GRANULARITY_MINIMUM,
                ctypes.byref(granularity),
            ),
            "aclrtMemGetAllocationGranularity",
        )
        self.granularity = granularity.value
        tgid = ctypes.c_int32()
        _check(self._lib.aclrtDeviceGetBareTgid(ctypes.byref(tgid)), "aclrtDeviceGetBareTgid")
        self.tgid = tgid.value  # this process, as the whitelists name it
        self.identity = self._identity()
        self._mapped = Mappings("CANN")

    def _identity(self) -> str:
        """How the daemon and an instance agree on the NPU, whose index differs
        in another container or under another ASCEND_RT_VISIBLE_DEVICES: its
        UUID (CANN 9.0+, as torch_npu asks it: where the runtime lacks the
        call or the driver refuses it, its number among the host's visible
        devices, which two containers given different cards as their device 0
        cannot tell apart)."""
        if hasattr(self._lib, "aclrtDeviceGetUuid"):
            uuid = _Uuid()
            self._device()
            if self._lib.aclrtDeviceGetUuid(self.index, ctypes.byref(uuid)) == ACL_SUCCESS:
                return "NPU-" + ctypes.string_at(ctypes.addressof(uuid), 16).hex()
            self._lib.aclGetRecentErrMsg()  # the refusal's message, not the next error's
        visible = os.environ.get("ASCEND_RT_VISIBLE_DEVICES", "").split(",")
        physical = visible[self.index].strip() if self.index < len(visible) and visible[0] else ""
        return f"NPU-{physical or self.index}"

    def _device(self) -> None:
        """CANN binds a device to each thread: bind this one once."""
        if not getattr(self._local, "bound", False):
            _check(self._lib.aclrtSetDevice(self.index), f"aclrtSetDevice({self.index})")
            self._local.bound = True

    def _call(self, name: str, *args, what: str = "") -> None:
        self._device()
        _check(getattr(self._lib, name)(*args), what or name)

    def _whole(self, size: int, what: str) -> None:
        if size <= 0 or size % self.granularity:
            raise ValueError(
                f"{what} of {size} bytes is not a positive multiple of the granularity "
                f"{self.granularity} of NPU {self.index}"
            )

    # daemon side
    def create(self, size: int) -> Chunk:
        """A chunk, exported at once: CANN exports an allocation only once,
        and a failure belongs to the daemon's start, not to a lease."""
        self._whole(size, "a chunk")
        handle = _handle()
        self._call(
            "aclrtMallocPhysical",
            ctypes.byref(handle),
            size,
            ctypes.byref(self._prop),
            0,
            what=f"aclrtMallocPhysical({size})",
        )
        chunk = Chunk(handle.value, size)
        try:
            shared = ctypes.c_uint64()
            self._call(
                "aclrtMemExportToShareableHandle",
                _handle(chunk.handle),
                ACL_MEM_HANDLE_TYPE_NONE,
                0,
                ctypes.byref(shared),
            )
            chunk.shared = shared.value
        except BaseException:
            self._call("aclrtFreePhysical", _handle(chunk.handle))
            raise
        return chunk

    def destroy(self, chunk: Chunk) -> None:
        self._call("aclrtFreePhysical", _handle(chunk.handle))

    def grant(self, chunk: Chunk, tgid: int) -> int:
        """Let the process ``tgid`` import the chunk; its shareable handle, to
        send. Whitelisted on every lease: CANN's docs do not say whether an
        entry outlives the import it let in. Where one was set before, a
        refusal is taken for "already there" (nor do they say whether a pid
        may be set twice)."""
        pids = (ctypes.c_int32 * 1)(tgid)
        try:
            self._call(
                "aclrtMemSetPidToShareableHandle",
                ctypes.c_uint64(chunk.shared),
                pids,
                1,
                what=f"aclrtMemSetPidToShareableHandle(tgid {tgid})",
            )
        except RuntimeError as e:
            if tgid not in chunk.tgids:
                raise
            log.debug("tgid %d is on the whitelist of %#x already: %s", tgid, chunk.shared, e)
        chunk.tgids.add(tgid)
        return chunk.shared

    # instance side
    def import_(self, shared: int, size: int) -> Chunk:
        handle = _handle()
        self._call(
            "aclrtMemImportFromShareableHandle",
            ctypes.c_uint64(shared),
            self.index,
            ctypes.byref(handle),
        )
        return Chunk(handle.value, size, shared)

    def release(self, chunk: Chunk) -> None:
        """Free this process's import (after unmapping): the next import of
        the same handle needs it gone."""
        self._call("aclrtFreePhysical", _handle(chunk.handle))

    def reserve(self, size: int) -> int:
        self._whole(size, "a reservation")
        addr = ctypes.c_void_p()
        self._call(  # alignment 0: "reserved" in CANN's docs, and what vllm-ascend passes
            "aclrtReserveMemAddress",
            ctypes.byref(addr),
            size,
            0,
            None,
            0,
            what=f"aclrtReserveMemAddress({size})",
        )
        return addr.value

    def free(self, addr: int, size: int) -> None:
        """Give the range back, unmapping whatever is still mapped in it."""
        self.unmap(addr, size)
        self._call("aclrtReleaseMemAddress", ctypes.c_void_p(addr))

    def map(self, chunk: Chunk, addr: int, prefault: bool = True) -> None:
        """Map the whole chunk at ``addr``: CANN maps an allocation whole, from
        offset 0, read-write. ``prefault`` means nothing: no lazy faults."""
        with self._mapped.lock:
            self._call(
                "aclrtMapMem",
                ctypes.c_void_p(addr),
                chunk.size,
                0,
                _handle(chunk.handle),
                0,
                what=f"aclrtMapMem({addr:#x}, {chunk.size})",
            )
            self._mapped.add(addr, chunk.size)

    def unmap(self, addr: int, size: int) -> None:
        """Unmap every chunk mapped in ``[addr, addr + size)``; the range stays
        reserved. ``aclrtUnmapMem`` takes an address only, so the range must
        not cut a chunk's mapping."""
        with self._mapped.lock:
            for start, _ in self._mapped.inside(addr, size):
                self._call(
                    "aclrtUnmapMem", ctypes.c_void_p(start), what=f"aclrtUnmapMem({start:#x})"
                )
                self._mapped.remove(start)

    def synchronize(self) -> None:
        self._call("aclrtSynchronizeDevice")

    def copy_in(self, addr: int, host) -> None:
        """Copy the host tensor ``host`` to ``addr`` (synchronous: see the
        module's docstring)."""
        n = host.numel() * host.element_size()
        self._call(
            "aclrtMemcpy",
            ctypes.c_void_p(addr),
            n,
            ctypes.c_void_p(host.data_ptr()),
            n,
            ACL_MEMCPY_HOST_TO_DEVICE,
            what=f"aclrtMemcpy(to {addr:#x}, {n})",
        )

    def copy_out(self, host, addr: int) -> None:
        """Copy from ``addr`` into the host tensor ``host``."""
        n = host.numel() * host.element_size()
        self._call(
            "aclrtMemcpy",
            ctypes.c_void_p(host.data_ptr()),
            n,
            ctypes.c_void_p(addr),
            n,
            ACL_MEMCPY_DEVICE_TO_HOST,
            what=f"aclrtMemcpy(from {addr:#x}, {n})",
        )

    def allocating(self, heap):
        """A context routing this thread's new NPU tensors to ``heap``
        (``mempool.Allocating``): torch_npu's ``MemPool`` over a pluggable
        allocator (``torch_npu._C._npu_customAllocator``, what
        ``NPUPluggableAllocator`` wraps and vllm-ascend's camem uses).
        torch_npu's pools list no segments, so what a load frees stays in the
        arena (``mempool.Allocating._trim``)."""
        import torch_npu
        from torch_npu.npu import memory

        device = mempool.Device(
            name="NPU",
            free=_FREE,
            custom_allocator=torch_npu._C._npu_customAllocator,
            mem_pool=memory.MemPool,
            use_mem_pool=lambda pool, index: memory.use_mem_pool(pool, device=index),
            synchronize=torch_npu.npu.synchronize,
            alloc_conf="PYTORCH_NPU_ALLOC_CONF",
        )
        return mempool.Allocating(heap, self.index, device)

    def tensor(self, addr: int, nbytes: int):
        """A uint8 tensor over ``nbytes`` mapped at ``addr`` (no copy).

        torch_npu's own means, the pair its NPU graph trees rebuild tensors
        over a pool's memory with (torch_npu/npu/_graph_tree.py): a storage
        from a data pointer, which has no deleter (it never frees the
        address nor hands it to the caching allocator), and a tensor over it
        from metadata. Safe because the memory outlives the tensor's use: it
        is mapped at this address while the instance is awake, and an arena
        never moves; touching it asleep faults, as on CUDA.
        """
        import torch
        import torch_npu

        device = torch.device("npu", self.index)
        if nbytes == 0:
            return torch.empty(0, dtype=torch.uint8, device=device)
        storage = torch_npu._C._construct_storage_from_data_pointer(addr, device, nbytes)
        metadata = {"nbytes": nbytes, "data_ptr": addr, "size": (nbytes,), "stride": (1,),
                    "dtype": torch.uint8, "device": device, "storage_offset": 0}  # fmt: skip
        return torch_npu._C._construct_NPU_Tensor_From_Storage_And_Metadata(metadata, storage)

    def host_buffer(self, nbytes: int):
        """``nbytes`` of host memory, pageable (see ``pin``)."""
        return _HostBuffer(nbytes)

    def pin(self, addr: int, nbytes: int, read_only: bool = False) -> None:
        raise RuntimeError("page-locking host memory is not done on an NPU yet")

    def unpin(self, addr: int) -> None:
        raise RuntimeError("page-locking host memory is not done on an NPU yet")


class _HostBuffer:
    """``nbytes`` of anonymous host memory; ``.tensor`` is a uint8 view of it."""

    def __init__(self, nbytes: int):
        import mmap

        import torch

        self._map = mmap.mmap(-1, nbytes)
        self.tensor = torch.frombuffer(self._map, dtype=torch.uint8)
