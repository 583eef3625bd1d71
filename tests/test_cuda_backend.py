"""The cuda memory backend does what the cpu backend does, on a GPU.

Reserve, map, tensor, unmap; a chunk passed as an fd to another process that
sees what was written into it; an arena whose addresses stay put across unmap
and re-map; chunk sizes in whole granules. Skipped without an NVIDIA GPU and
cuda-bindings; only the ImportError a machine without cuda-bindings must give
runs there.
"""

import importlib
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REASON = "needs an NVIDIA GPU and cuda-bindings"
ROOT = Path(__file__).resolve().parents[1]


def _has_bindings() -> bool:
    try:
        importlib.import_module("cuda.bindings.driver")
    except ImportError:
        return False
    return True


def _has_gpu() -> bool:
    if not _has_bindings():
        return False
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


needs_gpu = pytest.mark.skipif(not _has_gpu(), reason=REASON)


@pytest.mark.skipif(_has_bindings(), reason="cuda-bindings is installed")
def test_import_without_cuda_bindings_says_what_to_install():
    with pytest.raises(ImportError, match=r"pip install vllm-mux\[cuda\]"):
        importlib.import_module("vllm_mux.memory.cuda")
    from vllm_mux.memory import backend

    with pytest.raises(ImportError, match=r"pip install vllm-mux\[cuda\]"):
        backend("cuda:0")


@pytest.fixture(scope="module")
def cuda():
    from vllm_mux.memory import backend

    return backend("cuda:0")


def _pattern(nbytes: int, seed: int):
    import torch

    return ((torch.arange(nbytes, device="cuda:0") * 31 + seed) % 251).to(torch.uint8)


@needs_gpu
def test_granularity(cuda):
    from vllm_mux.memory import default_chunk_size

    assert (cuda.name, cuda.device_type) == ("cuda", "cuda")
    g = cuda.granularity
    assert g > 0 and g & (g - 1) == 0, f"granularity {g} is not a power of two"
    assert default_chunk_size("cuda:0") % g == 0
    with pytest.raises(ValueError, match="granularity"):
        cuda.create(g + 4096)
    with pytest.raises(ValueError, match="granularity"):
        cuda.reserve(g // 2)


@needs_gpu
def test_reserve_map_tensor_unmap_round_trip(cuda):
    import torch

    g = cuda.granularity
    chunks = [cuda.create(2 * g), cuda.create(2 * g)]
    addr = cuda.reserve(6 * g)
    try:
        cuda.map(chunks[0], addr)
        cuda.map(chunks[1], addr + 2 * g, prefault=False)  # prefault means nothing here
        whole = cuda.tensor(addr, 4 * g)
        assert whole.device == torch.device("cuda", 0) and whole.dtype == torch.uint8
        assert whole.data_ptr() == addr and whole.numel() == 4 * g
        whole.copy_(_pattern(4 * g, 1))
        inner = cuda.tensor(addr + g + 256, 2 * g)  # a view across the chunk boundary
        assert inner.data_ptr() == addr + g + 256
        assert torch.equal(inner, whole[g + 256 : 3 * g + 256])
        assert cuda.tensor(addr, 0).numel() == 0
        cuda.synchronize()

        with pytest.raises(ValueError, match="whole chunks"):
            cuda.unmap(addr + g, 2 * g)  # would cut both chunks
        cuda.unmap(addr, 6 * g)  # holes in the range are fine
        cuda.map(chunks[1], addr)  # same physical memory, swapped places
        cuda.map(chunks[0], addr + 2 * g)
        again = cuda.tensor(addr, 4 * g)
        expected = _pattern(4 * g, 1)
        assert torch.equal(again[: 2 * g], expected[2 * g :])
        assert torch.equal(again[2 * g :], expected[: 2 * g])
        cuda.synchronize()
        cuda.unmap(addr, 4 * g)
    finally:
        cuda.free(addr, 6 * g)
        for chunk in chunks:
            cuda.destroy(chunk)


@needs_gpu
def test_driver_errors_name_the_call(cuda):
    g = cuda.granularity
    chunk = cuda.create(g)
    addr = cuda.reserve(2 * g)
    try:
        with pytest.raises(RuntimeError, match=r"cuMemMap\(.*\) failed: CUDA_ERROR_"):
            cuda.map(chunk, addr + 4096)  # not aligned to the granularity
    finally:
        cuda.free(addr, 2 * g)
        cuda.destroy(chunk)


# The other process: receives a chunk's fd with SCM_RIGHTS, as an instance does
# from the daemon, checks what the first process wrote, writes its own pattern.
CHILD = r"""
import os, socket, sys
import torch
from vllm_mux.memory.cuda import Backend

sock = socket.socket(fileno=int(sys.argv[1]))
msg, fds, _, _ = socket.recv_fds(sock, 1024, 1)
size, seed, new_seed = map(int, msg.split())
cuda = Backend(0)
chunk = cuda.import_(fds[0], size)
addr = cuda.reserve(size)
cuda.map(chunk, addr)
t = cuda.tensor(addr, size)
n = torch.arange(size, device="cuda:0")
seen = torch.equal(t, ((n * 31 + seed) % 251).to(torch.uint8))
t.copy_(((n * 31 + new_seed) % 251).to(torch.uint8))
cuda.synchronize()
cuda.unmap(addr, size)
cuda.release(chunk)  # the fd goes with the handle: kept until then, for a restarted daemon
try:
    os.fstat(fds[0])
    closed = False
except OSError:
    closed = True
cuda.free(addr, size)
sock.send(f"closed={closed} seen={seen}".encode())
"""


def _in_other_process(fd: int, size: int, seed: int, new_seed: int, tmp_path) -> str:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.settimeout(120)
    stderr = open(tmp_path / f"child-{new_seed}.err", "w+")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    with ours, stderr:
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
            stderr=stderr,
            env=env,
            cwd=ROOT,
        )
        theirs.close()
        socket.send_fds(ours, [f"{size} {seed} {new_seed}".encode()], [fd])
        try:
            reply = ours.recv(1024).decode()
        finally:
            rc = child.wait(timeout=120)
        stderr.seek(0)
        assert rc == 0 and reply, f"child failed (rc {rc}):\n{stderr.read()}"
    return reply


@needs_gpu
def test_another_process_imports_the_chunk_after_it_was_unmapped(cuda, tmp_path):
    import torch

    size = 2 * cuda.granularity
    chunk = cuda.create(size)
    addr = cuda.reserve(size)
    try:
        cuda.map(chunk, addr)
        cuda.tensor(addr, size).copy_(_pattern(size, 1))
        cuda.synchronize()
        cuda.unmap(addr, size)  # sleep: the chunk goes back, its memory stays

        # Two leases in turn, as the daemon makes them: the same exported fd each time.
        fd = cuda.export(chunk)
        assert _in_other_process(fd, size, 1, 2, tmp_path) == "closed=True seen=True"
        assert cuda.export(chunk) == fd
        assert _in_other_process(fd, size, 2, 3, tmp_path) == "closed=True seen=True"

        cuda.map(chunk, addr)
        assert torch.equal(cuda.tensor(addr, size), _pattern(size, 3))
        cuda.unmap(addr, size)
    finally:
        cuda.free(addr, size)
        cuda.destroy(chunk)
    assert chunk.fd == -1


@needs_gpu
def test_arena_addresses_unchanged_across_unmap_and_remap(cuda):
    import torch

    from vllm_mux.memory.arena import Arena

    chunk_size = cuda.granularity
    arena = Arena(cuda, 4 * chunk_size, chunk_size)
    base = arena.base
    try:
        arena.map([cuda.create(chunk_size) for _ in range(arena.chunks_needed(chunk_size + 1000))])
        a = arena.alloc(1000)
        b = arena.alloc(chunk_size)  # spans both chunks
        pointers = (a.data_ptr(), b.data_ptr())
        a.copy_(_pattern(1000, 5))
        b.copy_(_pattern(chunk_size, 6))
        host = arena.view().cpu()

        released = arena.unmap()  # releases the handles: the chunks are gone
        assert len(released) == 2 and arena.mapped == 0

        arena.map([cuda.create(chunk_size) for _ in range(arena.size // chunk_size)])
        assert arena.base == base
        assert (a.data_ptr(), b.data_ptr()) == pointers
        arena.view().copy_(host.to("cuda:0"))
        assert torch.equal(a, _pattern(1000, 5))
        assert torch.equal(b, _pattern(chunk_size, 6))
    finally:
        arena.close()


FAULT = r"""
from vllm_mux.memory.arena import Arena
from vllm_mux.memory.cuda import Backend

cuda = Backend(0)
g = cuda.granularity
a = Arena(cuda, 2 * g, g)
a.map([cuda.create(g)])
t = a.alloc(4096)
t.fill_(7)
assert int(t.sum()) == 7 * 4096
print("wrote", flush=True)
a.unmap()
print("unmapped", flush=True)
print("read", int(t.sum()), flush=True)
"""


@needs_gpu
def test_touching_an_unmapped_arena_faults():
    """A kernel reading an unmapped range fails (an illegal address), as a CPU read segfaults."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    r = subprocess.run(
        [sys.executable, "-c", FAULT], capture_output=True, text=True, timeout=120, env=env
    )
    assert "wrote" in r.stdout and "unmapped" in r.stdout, r.stderr
    assert "read" not in r.stdout
    assert r.returncode != 0 and "cuda" in r.stderr.lower(), (r.returncode, r.stderr)


@needs_gpu
def test_allocating_puts_new_tensors_in_the_heap(cuda):
    """The MemPool behind ``allocating``: tensors made inside land in the heap's
    arena, tensors made outside do not, and a malloc the heap refuses becomes
    torch's out-of-memory error with the heap's reason kept."""
    import torch

    from vllm_mux.memory.arena import Arena
    from vllm_mux.memory.heap import Heap

    g = cuda.granularity
    arena = Arena(cuda, 16 * g, g)
    heap = Heap(arena, lambda n: arena.map([cuda.create(g) for _ in range(n)]))
    allocating = cuda.allocating(heap)
    try:
        with allocating:
            small = torch.ones(1000, dtype=torch.uint8, device="cuda:0")
            large = torch.full((5 * g,), 3, dtype=torch.uint8, device="cuda:0")
        outside = torch.ones(1000, dtype=torch.uint8, device="cuda:0")
        for t in (small, large):
            assert arena.base <= t.data_ptr() < arena.base + arena.used
        assert not arena.base <= outside.data_ptr() < arena.base + arena.capacity
        assert heap.live_bytes >= small.numel() + large.numel()
        assert int(large.sum()) == 15 * g and int(small.sum()) == 1000
        with pytest.raises(torch.OutOfMemoryError):
            with allocating:
                torch.empty(32 * g, dtype=torch.uint8, device="cuda:0")
        assert "capacity" in str(allocating.error)
    finally:
        torch.cuda.synchronize()
        arena.close()  # unmaps and releases every chunk it mapped


@needs_gpu
def test_identity_is_the_uuid_nvidia_smi_shows(cuda):
    import shutil

    assert cuda.identity.startswith("GPU-") and len(cuda.identity) == 40
    if shutil.which("nvidia-smi"):
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout
        assert cuda.identity in listing, listing


@needs_gpu
def test_host_buffer_is_page_locked_and_exactly_its_size(cuda):
    import torch

    n = 3 * (1 << 20) + 5  # torch's pinned allocator would round this up to 4 MiB
    holder = cuda.host_buffer(n)
    host = holder.tensor
    assert host.numel() == n and host.is_pinned()
    host.fill_(7)
    device = torch.empty(n, dtype=torch.uint8, device="cuda:0")
    device.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    assert int(device.sum()) == 7 * n


@needs_gpu
def test_segments_freed_while_loading_go_back_to_the_heap(cuda):
    """A load that frees what it made (a dtype conversion): once the context
    exits, the pool's empty segments are the heap's again."""
    import torch

    from vllm_mux.memory.arena import Arena
    from vllm_mux.memory.heap import Heap

    g = cuda.granularity
    arena = Arena(cuda, 32 * g, g)
    heap = Heap(arena, lambda n: arena.map([cuda.create(g) for _ in range(n)]))
    allocating = cuda.allocating(heap)
    try:
        with allocating:
            keep = torch.ones(12 * g, dtype=torch.uint8, device="cuda:0")  # own segments:
            temporary = torch.ones(8 * g, dtype=torch.uint8, device="cuda:0")  # > 10 MiB
            del temporary
        assert heap.live_bytes == 12 * g, heap.live
        assert int(keep.sum()) == 12 * g
    finally:
        torch.cuda.synchronize()
        arena.close()


@needs_gpu
def test_a_sealed_host_copy_mapped_read_only_is_page_locked_and_copies_in(cuda):
    """The host tier on CUDA: the daemon's sealed memfd, mapped read-only by
    an instance, registered with the driver as read-only (a plain
    registration of a read-only mapping fails), copies to the device."""
    import torch

    from vllm_mux.memory import host

    size = 8 << 20
    fd = host.create(size)
    try:
        os.pwrite(fd, bytes(range(256)) * (size // 256), 0)
        host.seal(fd)
        mapping = host.Mapping(os.dup(fd), size, writable=False)
    finally:
        os.close(fd)
    cuda.pin(mapping.addr, size, read_only=True)
    try:
        assert mapping.tensor.is_pinned()  # the driver knows it as page-locked
        device = torch.empty(size, dtype=torch.uint8, device="cuda")
        device.copy_(mapping.tensor, non_blocking=True)
        torch.cuda.synchronize()
        assert torch.equal(device.cpu(), mapping.tensor)
    finally:
        cuda.unpin(mapping.addr)
        mapping.close()
