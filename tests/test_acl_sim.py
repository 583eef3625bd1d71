"""The simulated ACL runtime (tests/acl_sim): each rule it enforces, with the exact aclError.

The parent's instances are fresh copies of the library (their own process-local
state); other processes are Remotes (multiprocessing spawn). The error codes and
why each rule returns the one it does are in tests/acl_sim/SOURCES.md.
"""

import ctypes
import os

import pytest
from acl_sim import (
    ACL_ERROR_INVALID_PARAM,
    ACL_ERROR_REPEAT_INITIALIZE,
    ACL_ERROR_RT_CONTEXT_NULL,
    ACL_ERROR_RT_DRV_INTERNAL_ERROR,
    ACL_ERROR_RT_FEATURE_NOT_SUPPORT,
    ACL_ERROR_RT_INVALID_DEVICEID,
    ACL_ERROR_RT_INVALID_HANDLE,
    ACL_ERROR_RT_MEMORY_ALLOCATION,
    ACL_ERROR_RT_NO_PERMISSION,
    ACL_ERROR_RT_PARAM_INVALID,
    ACL_ERROR_UNINITIALIZE,
    ACL_HBM_MEM_HUGE1G,
    ACL_MEMCPY_DEVICE_TO_HOST,
    ACL_RT_MEM_ALLOC_GRANULARITY_RECOMMENDED,
    ACL_RT_VMM_EXPORT_FLAG_DISABLE_PID_VALIDATION,
    Acl,
    PhysicalMemProp,
    Remote,
    build,
    device_prop,
    load_fresh,
)

MiB = 1 << 20
DEVICE = 64 * MiB
OK = 0
DRV = ACL_ERROR_RT_DRV_INTERNAL_ERROR


@pytest.fixture(scope="session")
def library(tmp_path_factory):
    return build(tmp_path_factory.mktemp("acl_sim"))


@pytest.fixture
def sim_dir(tmp_path, monkeypatch):
    directory = tmp_path / "device"
    monkeypatch.setenv("ACL_SIM_DIR", str(directory))
    monkeypatch.setenv("ACL_SIM_DEVICE_BYTES", str(DEVICE))
    monkeypatch.delenv("ACL_SIM_VERBOSE", raising=False)
    return directory


@pytest.fixture
def fresh(library, tmp_path, sim_dir):
    """A new, uninitialised instance of the library in this process."""
    return lambda: Acl(load_fresh(library, tmp_path / "libs"))


@pytest.fixture
def acl(fresh):
    acl = fresh()
    assert acl.init() == OK
    assert acl.set_device(0) == OK
    return acl


@pytest.fixture
def spawn(library, sim_dir):
    """Another process with the library loaded, aclInit and aclrtSetDevice done."""
    remotes = []

    def make():
        remote = Remote(library)
        remotes.append(remote)
        assert remote.init() == OK
        assert remote.set_device(0) == OK
        return remote

    yield make
    for remote in remotes:
        remote.close()


def used(acl):
    rc, free, total = acl.mem_info()
    assert rc == OK and total == DEVICE
    return total - free


def mapped(acl, size):
    """Reserve, allocate and map `size` bytes; returns (address, handle)."""
    rc, va = acl.reserve(size)
    assert rc == OK
    rc, handle = acl.malloc(size)
    assert rc == OK
    assert acl.map(va, size, handle) == OK
    return va, handle


def shared(exporter, size=4 * MiB, flags=0, whitelist=()):
    """The exporter allocates, maps, fills with 0x5A and exports; returns (va, handle, share)."""
    va, handle = mapped(exporter, size)
    if isinstance(exporter, Remote):
        exporter.write(va, b"\x5a" * 64)
    else:
        ctypes.memset(va, 0x5A, 64)
    rc, share = exporter.export(handle, flags)
    assert rc == OK
    if whitelist:
        assert exporter.set_pids(share, list(whitelist)) == OK
    return va, handle, share


# ---- the ABI ----


def test_struct_layout_is_the_headers():
    assert ctypes.sizeof(PhysicalMemProp) == 32
    assert PhysicalMemProp.memAttr.offset == 8
    assert PhysicalMemProp.location.offset == 12
    assert PhysicalMemProp.reserve.offset == 24


def test_matches_real_cann_header(tmp_path, cann_include):
    """Compiled against CANN's own acl.h (from the torch-npu wheel, see
    conftest.cann_include): signatures by the compiler, constants at run time."""
    lib = Acl.load(build(tmp_path, cann_include=str(cann_include)))
    assert lib.lib.acl_sim_header_mismatches() == 0


# ---- initialisation ----


def test_init_and_set_device_required(fresh):
    acl = fresh()
    assert acl.malloc(2 * MiB)[0] == ACL_ERROR_UNINITIALIZE
    assert "aclInit" in acl.last_error()
    assert acl.last_error() is None  # aclGetRecentErrMsg gets and clears
    assert acl.init() == OK
    assert acl.init() == ACL_ERROR_REPEAT_INITIALIZE
    assert acl.mem_info()[0] == ACL_ERROR_RT_CONTEXT_NULL
    assert acl.reserve(2 * MiB)[0] == ACL_ERROR_RT_CONTEXT_NULL
    assert acl.set_device(1) == ACL_ERROR_RT_INVALID_DEVICEID
    assert acl.set_device(0) == OK
    assert acl.get_device() == (OK, 0)
    assert acl.synchronize() == OK
    assert acl.bare_tgid() == (OK, os.getpid())


def test_a_device_has_one_uuid_for_every_process(fresh, spawn):
    acl = fresh()
    assert acl.uuid()[0] == ACL_ERROR_UNINITIALIZE
    assert acl.init() == OK
    rc, mine = acl.uuid()
    assert rc == OK and len(mine) == 16 and mine != bytes(16)
    assert acl.uuid(1)[0] == ACL_ERROR_RT_INVALID_DEVICEID
    assert spawn().uuid() == (OK, mine)


def test_a_reservation_alignment_is_reserved(acl):
    assert acl.reserve(2 * MiB, alignment=2 * MiB)[0] == ACL_ERROR_INVALID_PARAM
    rc, va = acl.reserve(4 * MiB)
    assert rc == OK and va % (2 * MiB) == 0
    assert acl.release(va) == OK


def test_init_needs_sim_dir(fresh, monkeypatch):
    monkeypatch.delenv("ACL_SIM_DIR")
    acl = fresh()
    assert acl.init() == ACL_ERROR_RT_PARAM_INVALID
    assert "ACL_SIM_DIR" in acl.last_error()


def test_bare_tgid_needs_no_init(fresh):
    assert fresh().bare_tgid() == (OK, os.getpid())


# ---- physical memory ----


def test_granularity(acl):
    assert acl.granularity() == (OK, 2 * MiB)
    assert acl.granularity(option=ACL_RT_MEM_ALLOC_GRANULARITY_RECOMMENDED) == (OK, 2 * MiB)
    assert acl.granularity(option=7)[0] == ACL_ERROR_RT_PARAM_INVALID
    assert acl.granularity(device_prop(mem_attr=ACL_HBM_MEM_HUGE1G))[0] == (
        ACL_ERROR_RT_FEATURE_NOT_SUPPORT
    )
    assert acl.granularity(device_prop(device=1))[0] == ACL_ERROR_RT_INVALID_DEVICEID


def test_malloc_prop_and_size_rules(acl):
    assert acl.malloc(0)[0] == ACL_ERROR_INVALID_PARAM
    assert acl.malloc(2 * MiB, flags=1)[0] == ACL_ERROR_INVALID_PARAM
    assert acl.malloc(MiB)[0] == ACL_ERROR_RT_PARAM_INVALID
    pinned_per_a_fake_header = device_prop()
    pinned_per_a_fake_header.allocationType = 1
    assert acl.malloc(2 * MiB, pinned_per_a_fake_header)[0] == ACL_ERROR_INVALID_PARAM
    posix = device_prop()
    posix.handleType = 2
    assert acl.malloc(2 * MiB, posix)[0] == ACL_ERROR_INVALID_PARAM
    assert acl.malloc(2 * MiB, device_prop(device=1))[0] == ACL_ERROR_RT_INVALID_DEVICEID
    assert used(acl) == 0


def test_malloc_map_write_unmap_free(acl):
    va, handle = mapped(acl, 4 * MiB)
    assert used(acl) == 4 * MiB
    ctypes.memmove(va + 3 * MiB, b"hello npu", 9)
    out = ctypes.create_string_buffer(9)
    assert acl.memcpy(ctypes.addressof(out), 9, va + 3 * MiB, 9, ACL_MEMCPY_DEVICE_TO_HOST) == OK
    assert out.raw == b"hello npu"
    assert acl.unmap(va) == OK
    assert acl.free(handle) == OK
    assert used(acl) == 0
    assert acl.free(handle) == ACL_ERROR_RT_PARAM_INVALID  # freed twice
    assert acl.release(va) == OK


def test_free_while_mapped_is_deferred_to_the_unmap(acl):
    va, handle = mapped(acl, 2 * MiB)
    assert acl.free(handle) == OK
    ctypes.memmove(va, b"still here", 10)  # the mapping keeps the memory
    assert ctypes.string_at(va, 10) == b"still here"
    assert used(acl) == 2 * MiB
    assert acl.map(va, 2 * MiB, handle) == ACL_ERROR_RT_PARAM_INVALID  # the handle is gone
    assert acl.unmap(va) == OK
    assert used(acl) == 0


def test_device_out_of_memory(acl, spawn):
    rc, whole = acl.malloc(DEVICE)
    assert rc == OK
    assert acl.malloc(2 * MiB)[0] == ACL_ERROR_RT_MEMORY_ALLOCATION
    other = spawn()
    assert other.malloc(2 * MiB)[0] == ACL_ERROR_RT_MEMORY_ALLOCATION
    assert acl.free(whole) == OK
    assert other.malloc(2 * MiB)[0] == OK


def test_mem_info_counts_every_process(acl, spawn):
    other = spawn()
    rc, handle = other.malloc(8 * MiB)
    assert rc == OK
    assert used(acl) == 8 * MiB
    assert other.free(handle) == OK
    assert used(acl) == 0


# ---- virtual ranges and mappings ----


def test_map_size_must_equal_the_allocation(acl):
    rc, va = acl.reserve(16 * MiB)
    rc, handle = acl.malloc(4 * MiB)
    assert acl.map(va, 2 * MiB, handle) == DRV
    assert acl.last_error().startswith("aclrtMapMem: size 2097152 is not the allocation's size")
    assert acl.map(va, 8 * MiB, handle) == DRV
    assert acl.map(va, 4 * MiB, handle) == OK


def test_map_at_an_unaligned_address(acl):
    rc, va = acl.reserve(8 * MiB)
    rc, handle = acl.malloc(2 * MiB)
    assert acl.map(va + 4096, 2 * MiB, handle) == DRV


def test_map_offset_must_be_zero(acl):
    rc, va = acl.reserve(8 * MiB)
    rc, handle = acl.malloc(2 * MiB)
    assert acl.map(va, 2 * MiB, handle, offset=2 * MiB) == ACL_ERROR_RT_PARAM_INVALID
    assert acl.map(va, 2 * MiB, handle, flags=1) == ACL_ERROR_INVALID_PARAM


def test_map_inside_one_reservation_not_over_a_mapping(acl):
    rc, va = acl.reserve(4 * MiB)
    rc, handle = acl.malloc(2 * MiB)
    rc, big = acl.malloc(4 * MiB)
    assert acl.map(va + 2 * MiB, 4 * MiB, big) == DRV  # runs past the reservation
    assert acl.map(va, 2 * MiB, handle) == OK
    assert acl.map(va, 4 * MiB, big) == DRV  # over the mapping


def test_unmap_needs_the_start_of_a_mapping(acl):
    va, handle = mapped(acl, 4 * MiB)
    assert acl.unmap(va + 2 * MiB) == DRV
    assert acl.unmap(va) == OK
    assert acl.unmap(va) == DRV  # no longer mapped


def test_release_needs_a_reservation_start_and_no_mapping(acl):
    va, handle = mapped(acl, 2 * MiB)
    assert acl.release(va + 2 * MiB) == ACL_ERROR_RT_PARAM_INVALID
    assert acl.release(va) == DRV
    assert acl.unmap(va) == OK
    assert acl.release(va) == OK


# ---- sharing ----


def test_export_once(acl):
    va, handle, share = shared(acl)
    assert acl.export(handle)[0] == DRV
    assert acl.export(handle, flags=2)[0] == ACL_ERROR_RT_PARAM_INVALID
    rc, other = acl.malloc(2 * MiB)
    assert acl.export(other, handle_type=2)[0] == ACL_ERROR_INVALID_PARAM


def test_import_in_the_exporter(acl):
    va, handle, share = shared(acl, whitelist=[os.getpid()])
    assert acl.import_(share)[0] == DRV


def test_import_without_whitelist(acl, spawn):
    va, handle, share = shared(acl)
    other = spawn()
    assert other.import_(share)[0] == DRV
    assert acl.set_pids(share, [os.getpid() + 1]) == OK  # somebody else
    assert other.import_(share)[0] == DRV


def test_import_with_whitelist(acl, spawn):
    other = spawn()
    va, handle, share = shared(acl, whitelist=[0, other.bare_tgid()[1]])
    rc, theirs = other.import_(share)
    assert rc == OK
    rc, their_va = other.reserve(4 * MiB)
    assert other.map(their_va, 4 * MiB, theirs) == OK
    assert other.read(their_va, 64) == b"\x5a" * 64
    other.write(their_va + 64, b"from the importer")
    assert ctypes.string_at(va + 64, 17) == b"from the importer"
    assert used(acl) == 4 * MiB  # one allocation, two holders


def test_import_of_an_unknown_handle(acl):
    assert acl.import_(12345)[0] == ACL_ERROR_RT_INVALID_HANDLE
    assert acl.import_(12345, device=1)[0] == ACL_ERROR_RT_INVALID_DEVICEID


def test_set_pid_only_in_the_exporter(acl, spawn):
    other = spawn()
    va, handle, share = shared(other, whitelist=[os.getpid()])
    assert acl.set_pids(share, [os.getpid()]) == DRV
    assert acl.set_pids(share, []) == ACL_ERROR_INVALID_PARAM
    assert acl.set_pids(99999, [os.getpid()]) == ACL_ERROR_RT_INVALID_HANDLE
    assert other.set_pids(share, [0]) == DRV  # pid 0 is skipped: nothing to set


def test_export_of_an_imported_handle(acl, spawn):
    other = spawn()
    va, handle, share = shared(other, whitelist=[os.getpid()])
    rc, mine = acl.import_(share)
    assert rc == OK
    assert acl.export(mine)[0] == DRV


def test_disable_pid_validation(acl, spawn):
    va, handle, share = shared(acl, flags=ACL_RT_VMM_EXPORT_FLAG_DISABLE_PID_VALIDATION)
    assert acl.set_pids(share, [12345]) == ACL_ERROR_RT_NO_PERMISSION
    other = spawn()
    assert other.import_(share)[0] == OK


def test_one_import_per_process(acl, spawn):
    other = spawn()
    va, handle, share = shared(acl, whitelist=[other.bare_tgid()[1]])
    rc, first = other.import_(share)
    assert rc == OK
    assert other.import_(share)[0] == ACL_ERROR_RT_INVALID_HANDLE
    assert other.free(first) == OK
    rc, again = other.import_(share)  # after the free, as on each wake
    assert rc == OK
    assert other.free(again) == OK


def test_memory_outlives_the_exporters_free(acl, spawn):
    other = spawn()
    va, handle, share = shared(acl, whitelist=[other.bare_tgid()[1]])
    rc, theirs = other.import_(share)
    rc, their_va = other.reserve(4 * MiB)
    assert other.map(their_va, 4 * MiB, theirs) == OK
    assert acl.unmap(va) == OK
    assert acl.free(handle) == OK
    assert used(acl) == 4 * MiB  # the importer still holds it
    assert other.read(their_va, 64) == b"\x5a" * 64
    other.write(their_va, b"after the exporter")
    assert other.read(their_va, 18) == b"after the exporter"
    third = spawn()
    assert third.import_(share)[0] == ACL_ERROR_RT_INVALID_HANDLE  # dead for new imports
    assert other.unmap(their_va) == OK
    assert other.free(theirs) == OK
    assert used(acl) == 0


def test_killed_importer_releases_its_hold(acl, spawn):
    other = spawn()
    va, handle, share = shared(acl, whitelist=[other.bare_tgid()[1]])
    rc, theirs = other.import_(share)
    rc, their_va = other.reserve(4 * MiB)
    assert other.map(their_va, 4 * MiB, theirs) == OK
    assert acl.unmap(va) == OK
    assert acl.free(handle) == OK
    assert used(acl) == 4 * MiB
    other.kill()
    assert used(acl) == 0


def test_killed_exporter_kills_its_handle(acl, spawn):
    other = spawn()
    va, handle, share = shared(other, whitelist=[os.getpid()])
    other.kill()
    assert acl.import_(share)[0] == ACL_ERROR_RT_INVALID_HANDLE
    assert used(acl) == 0


# ---- copies ----


def test_memcpy_rules(acl):
    src = ctypes.create_string_buffer(b"abcd")
    dst = ctypes.create_string_buffer(4)
    a, b = ctypes.addressof(dst), ctypes.addressof(src)
    assert acl.memcpy(a, 2, b, 4) == ACL_ERROR_RT_PARAM_INVALID
    assert acl.memcpy(a, 4, b, 4, 6) == ACL_ERROR_INVALID_PARAM
    assert acl.memcpy(a, 4, b, 0) == OK
    assert acl.memcpy(a, 4, b, 4) == OK
    assert dst.raw == b"abcd"
