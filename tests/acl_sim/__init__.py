"""A simulated Ascend ACL runtime for CI: build it, load it, call it.

``build(directory)`` compiles ``acl_sim.c`` into ``directory/libascendcl.so``: a
library with the symbols and C signatures of CANN's ``libascendcl`` for the
calls vllm-mux makes, backed by files in ``$ACL_SIM_DIR`` (see SOURCES.md for
every value and where it comes from). ``Acl`` is a thin ctypes wrapper over a
loaded copy, for tests; each method returns the aclError first.

Environment read by the library: ``ACL_SIM_DIR`` (required by aclInit: the
directory shared by the processes of one simulated device),
``ACL_SIM_DEVICE_BYTES`` (device size, default 1 GiB), ``ACL_SIM_VERBOSE=1``
(every error also printed to stderr).
"""

import ctypes
import hashlib
import multiprocessing
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("acl_sim.c")
FLAGS = ["-shared", "-fPIC", "-O1", "-Wall", "-Werror"]

# aclError values (acl_base_rt.h, error_codes/rt_error_codes.h).
ACL_SUCCESS = 0
ACL_ERROR_INVALID_PARAM = 100000
ACL_ERROR_UNINITIALIZE = 100001
ACL_ERROR_REPEAT_INITIALIZE = 100002
ACL_ERROR_REPEAT_FINALIZE = 100037
ACL_ERROR_RT_PARAM_INVALID = 107000
ACL_ERROR_RT_INVALID_DEVICEID = 107001
ACL_ERROR_RT_CONTEXT_NULL = 107002
ACL_ERROR_RT_INVALID_HANDLE = 107017
ACL_ERROR_RT_FEATURE_NOT_SUPPORT = 207000
ACL_ERROR_RT_MEMORY_ALLOCATION = 207001
ACL_ERROR_RT_NO_PERMISSION = 207006
ACL_ERROR_RT_DRV_INTERNAL_ERROR = 507899

# Enumerators and flags (acl_rt.h).
ACL_MEM_HANDLE_TYPE_NONE = 0
ACL_MEM_ALLOCATION_TYPE_PINNED = 0
ACL_MEM_LOCATION_TYPE_HOST = 0
ACL_MEM_LOCATION_TYPE_DEVICE = 1
ACL_HBM_MEM = 1
ACL_HBM_MEM_HUGE = 4
ACL_HBM_MEM_HUGE1G = 10
ACL_RT_MEM_ALLOC_GRANULARITY_MINIMUM = 0
ACL_RT_MEM_ALLOC_GRANULARITY_RECOMMENDED = 1
ACL_MEMCPY_HOST_TO_HOST = 0
ACL_MEMCPY_HOST_TO_DEVICE = 1
ACL_MEMCPY_DEVICE_TO_HOST = 2
ACL_MEMCPY_DEVICE_TO_DEVICE = 3
ACL_RT_VMM_EXPORT_FLAG_DEFAULT = 0x0
ACL_RT_VMM_EXPORT_FLAG_DISABLE_PID_VALIDATION = 0x1

GRANULARITY = 2 << 20  # the simulator's only page size (ACL_HBM_MEM_HUGE)


class MemLocation(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint32), ("type", ctypes.c_int)]


class PhysicalMemProp(ctypes.Structure):
    """aclrtPhysicalMemProp: 32 bytes; memAttr at 8, location at 12, reserve at 24."""

    _fields_ = [
        ("handleType", ctypes.c_int),
        ("allocationType", ctypes.c_int),
        ("memAttr", ctypes.c_int),
        ("location", MemLocation),
        ("reserve", ctypes.c_uint64),
    ]


def device_prop(device: int = 0, mem_attr: int = ACL_HBM_MEM_HUGE) -> PhysicalMemProp:
    """The prop vllm-ascend's allocator passes: pinned HBM huge pages on a device."""
    return PhysicalMemProp(
        ACL_MEM_HANDLE_TYPE_NONE,
        ACL_MEM_ALLOCATION_TYPE_PINNED,
        mem_attr,
        MemLocation(device, ACL_MEM_LOCATION_TYPE_DEVICE),
        0,
    )


def _compiler() -> str:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    raise RuntimeError(
        "no C compiler (cc, gcc or clang, or $CC) on PATH: the simulated ACL runtime "
        f"is built from {SOURCE} by the tests; install one (e.g. apt-get install gcc)"
    )


def build(directory, *, cann_include=None, defines=()) -> Path:
    """Compile the simulator into ``directory/libascendcl.so`` and return its path.

    Rebuilt only when the source or flags change. With ``cann_include`` (a CANN
    include directory holding ``acl/acl.h``), it is compiled against the real
    header instead: the compiler checks every signature, and the library's
    ``acl_sim_header_mismatches()`` compares the constants (0 when all agree).
    ``defines``: macros for the compiler; ``ACL_SIM_NO_UUID`` leaves out
    ``aclrtDeviceGetUuid``, as a runtime older than CANN 9.0 does.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    out = directory / "libascendcl.so"
    flags = list(FLAGS)
    if cann_include is not None:
        flags += ["-DACL_SIM_REAL_HEADERS", f"-I{cann_include}"]
    flags += [f"-D{d}" for d in defines]  # e.g. ACL_SIM_NO_UUID: a CANN before 9.0
    digest = hashlib.sha256(SOURCE.read_bytes() + "\0".join(flags).encode()).hexdigest()
    stamp = directory / "libascendcl.so.sha256"
    if out.exists() and stamp.exists() and stamp.read_text() == digest:
        return out
    cc = _compiler()
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".so")
    os.close(fd)
    try:
        result = subprocess.run(
            [cc, *flags, "-o", tmp, str(SOURCE), "-lpthread"], capture_output=True, text=True
        )
        if result.returncode != 0:
            raise RuntimeError(f"building {SOURCE} failed:\n{result.stderr}")
        os.replace(tmp, out)  # atomic: concurrent builds never see half a library
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    stamp.write_text(digest)
    return out


def load_fresh(library, directory) -> ctypes.CDLL:
    """A new instance of the library (its own process-local state) from a copy.

    dlopen returns the same instance for the same path, so a test that wants a
    process that has not called aclInit yet loads a copy under a new name.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    fd, copy = tempfile.mkstemp(dir=directory, prefix="libascendcl-", suffix=".so")
    os.close(fd)
    shutil.copyfile(library, copy)
    return ctypes.CDLL(copy, mode=ctypes.RTLD_LOCAL)


_c = ctypes
_SIGNATURES = {
    "aclInit": [_c.c_char_p],
    "aclFinalize": [],
    "aclrtSetDevice": [_c.c_int32],
    "aclrtResetDevice": [_c.c_int32],
    "aclrtGetDevice": [_c.POINTER(_c.c_int32)],
    "aclrtSynchronizeDevice": [],
    "aclrtGetMemInfo": [_c.c_int, _c.POINTER(_c.c_size_t), _c.POINTER(_c.c_size_t)],
    "aclrtMemGetAllocationGranularity": [
        _c.POINTER(PhysicalMemProp),
        _c.c_int,
        _c.POINTER(_c.c_size_t),
    ],
    "aclrtMallocPhysical": [
        _c.POINTER(_c.c_void_p),
        _c.c_size_t,
        _c.POINTER(PhysicalMemProp),
        _c.c_uint64,
    ],
    "aclrtFreePhysical": [_c.c_void_p],
    "aclrtReserveMemAddress": [
        _c.POINTER(_c.c_void_p),
        _c.c_size_t,
        _c.c_size_t,
        _c.c_void_p,
        _c.c_uint64,
    ],
    "aclrtReleaseMemAddress": [_c.c_void_p],
    "aclrtMapMem": [_c.c_void_p, _c.c_size_t, _c.c_size_t, _c.c_void_p, _c.c_uint64],
    "aclrtUnmapMem": [_c.c_void_p],
    "aclrtMemExportToShareableHandle": [
        _c.c_void_p,
        _c.c_int,
        _c.c_uint64,
        _c.POINTER(_c.c_uint64),
    ],
    "aclrtMemSetPidToShareableHandle": [_c.c_uint64, _c.POINTER(_c.c_int32), _c.c_size_t],
    "aclrtMemImportFromShareableHandle": [_c.c_uint64, _c.c_int32, _c.POINTER(_c.c_void_p)],
    "aclrtDeviceGetBareTgid": [_c.POINTER(_c.c_int32)],
    "aclrtDeviceGetUuid": [_c.c_int32, _c.c_void_p],
    "aclrtMemcpy": [_c.c_void_p, _c.c_size_t, _c.c_void_p, _c.c_size_t, _c.c_int],
}


class Acl:
    """ctypes over one loaded instance; methods return (aclError, outputs...)."""

    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib
        for name, argtypes in _SIGNATURES.items():
            if not hasattr(lib, name):  # aclrtDeviceGetUuid, built without it
                continue
            fn = getattr(lib, name)
            fn.argtypes = argtypes
            fn.restype = ctypes.c_int
        lib.aclGetRecentErrMsg.argtypes = []
        lib.aclGetRecentErrMsg.restype = ctypes.c_char_p
        lib.acl_sim_header_mismatches.restype = ctypes.c_int

    @classmethod
    def load(cls, path) -> "Acl":
        return cls(ctypes.CDLL(str(path)))

    def last_error(self):
        msg = self.lib.aclGetRecentErrMsg()
        return None if msg is None else msg.decode()

    def init(self, config=None):
        return self.lib.aclInit(config)

    def finalize(self):
        return self.lib.aclFinalize()

    def set_device(self, device=0):
        return self.lib.aclrtSetDevice(device)

    def reset_device(self, device=0):
        return self.lib.aclrtResetDevice(device)

    def get_device(self):
        out = ctypes.c_int32(-1)
        return self.lib.aclrtGetDevice(ctypes.byref(out)), out.value

    def synchronize(self):
        return self.lib.aclrtSynchronizeDevice()

    def mem_info(self, attr=ACL_HBM_MEM):
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        rc = self.lib.aclrtGetMemInfo(attr, ctypes.byref(free), ctypes.byref(total))
        return rc, free.value, total.value

    def granularity(self, prop=None, option=ACL_RT_MEM_ALLOC_GRANULARITY_MINIMUM):
        out = ctypes.c_size_t()
        prop = device_prop() if prop is None else prop
        rc = self.lib.aclrtMemGetAllocationGranularity(
            ctypes.byref(prop), option, ctypes.byref(out)
        )
        return rc, out.value

    def malloc(self, size, prop=None, flags=0):
        handle = ctypes.c_void_p()
        prop = device_prop() if prop is None else prop
        rc = self.lib.aclrtMallocPhysical(ctypes.byref(handle), size, ctypes.byref(prop), flags)
        return rc, handle.value

    def free(self, handle):
        return self.lib.aclrtFreePhysical(handle)

    def reserve(self, size, alignment=0, expect=None, flags=0):
        ptr = ctypes.c_void_p()
        rc = self.lib.aclrtReserveMemAddress(ctypes.byref(ptr), size, alignment, expect, flags)
        return rc, ptr.value

    def release(self, ptr):
        return self.lib.aclrtReleaseMemAddress(ptr)

    def map(self, ptr, size, handle, offset=0, flags=0):
        return self.lib.aclrtMapMem(ptr, size, offset, handle, flags)

    def unmap(self, ptr):
        return self.lib.aclrtUnmapMem(ptr)

    def export(self, handle, flags=0, handle_type=ACL_MEM_HANDLE_TYPE_NONE):
        out = ctypes.c_uint64()
        rc = self.lib.aclrtMemExportToShareableHandle(handle, handle_type, flags, ctypes.byref(out))
        return rc, out.value

    def set_pids(self, share, pids):
        array = (ctypes.c_int32 * len(pids))(*pids)
        return self.lib.aclrtMemSetPidToShareableHandle(share, array, len(pids))

    def import_(self, share, device=0):
        handle = ctypes.c_void_p()
        rc = self.lib.aclrtMemImportFromShareableHandle(share, device, ctypes.byref(handle))
        return rc, handle.value

    def bare_tgid(self):
        out = ctypes.c_int32()
        return self.lib.aclrtDeviceGetBareTgid(ctypes.byref(out)), out.value

    def uuid(self, device=0):
        out = (ctypes.c_char * 16)()
        return self.lib.aclrtDeviceGetUuid(device, out), bytes(bytearray(out))

    def memcpy(self, dst, dest_max, src, count, kind=ACL_MEMCPY_DEVICE_TO_DEVICE):
        return self.lib.aclrtMemcpy(dst, dest_max, src, count, kind)


def _serve(library, conn):
    """The loop of a Remote's process: one Acl call per message."""
    acl = Acl.load(library)
    while True:
        message = conn.recv()
        if message is None:
            return
        name, args = message
        try:
            if name == "pid":
                result = os.getpid()
            elif name == "write":  # (address, bytes)
                ctypes.memmove(args[0], args[1], len(args[1]))
                result = None
            elif name == "read":  # (address, count)
                result = ctypes.string_at(args[0], args[1])
            else:
                result = getattr(acl, name)(*args)
        except Exception as e:  # sent back and raised in the caller
            result = e
        conn.send(result)


class Remote:
    """An Acl in another process (multiprocessing spawn), driven call by call.

    ``remote.malloc(size)`` runs ``Acl.malloc`` there and returns its result;
    ``write(address, data)``, ``read(address, count)`` and ``pid()`` touch that
    process's memory. The process inherits the environment (ACL_SIM_DIR) as it
    is when the Remote is made.
    """

    def __init__(self, library):
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(str(library), child), daemon=True)
        self.process.start()
        child.close()

    def call(self, name, *args):
        self._conn.send((name, args))
        result = self._conn.recv()
        if isinstance(result, Exception):
            raise result
        return result

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return lambda *args: self.call(name, *args)

    def kill(self):
        self.process.kill()
        self.process.join()

    def close(self):
        if self.process.is_alive():
            try:
                self._conn.send(None)
            except OSError:
                pass
            self.process.join(10)
        if self.process.is_alive():
            self.kill()
        self._conn.close()
