"""The cpu memory backend and the Arena: real mappings, real faults, real fd passing."""

import ctypes
import mmap
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import perms_at
from vllm_mux.memory import backend as make_backend
from vllm_mux.memory.arena import ALIGN, Arena
from vllm_mux.memory.cpu import Backend

PAGE = mmap.PAGESIZE
CS = 16 * PAGE  # a small chunk: 64 KiB on 4 KiB pages


@pytest.fixture
def be():
    return Backend()


@pytest.fixture
def arenas(be):
    """Arenas made through this are closed at teardown."""
    made = []

    def make(capacity, chunk_size=CS, prefault=True):
        a = Arena(be, capacity, chunk_size, prefault)
        made.append(a)
        return a

    yield make
    for a in made:
        a.close()


def _child_env():
    env = dict(os.environ)
    env.pop("PYTHONFAULTHANDLER", None)  # a fault must kill the child plainly
    return env


def _run_child(script: str, *args, timeout=60, **kw):
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_child_env(),
        **kw,
    )


# -- the backend --


def test_backend_factory():
    assert make_backend("cpu").name == "cpu"
    assert make_backend("cpu:0").device_type == "cpu"
    with pytest.raises(ValueError, match="unknown device"):
        make_backend("tpu")
    with pytest.raises(ValueError):
        make_backend("cpu:1")


@pytest.mark.parametrize("size", [PAGE, 4 << 20, (9 << 20) + PAGE])
def test_created_chunks_are_committed(be, size):
    """The daemon writes zeros into each chunk: its pages are really held."""
    chunk = be.create(size)
    try:
        st = os.fstat(chunk.fd)
        assert st.st_size == size
        assert st.st_blocks * 512 >= size
        assert os.pread(chunk.fd, 64, size - 64) == bytes(64)
    finally:
        be.destroy(chunk)
    with pytest.raises(OSError):
        os.fstat(chunk.fd)


def test_reserve_map_tensor_unmap_round_trip(be):
    size = 4 * CS
    base = be.reserve(size)
    chunk = be.create(CS)
    try:
        assert base % PAGE == 0
        be.map(chunk, base + CS)
        t = be.tensor(base + CS, CS)
        assert t.dtype == torch.uint8 and t.numel() == CS
        assert t.data_ptr() == base + CS
        assert int(t.sum()) == 0  # the daemon's zeros
        t[:4] = torch.tensor([1, 2, 3, 4], dtype=torch.uint8)
        t[-1] = 99
        # the writes went into the shared chunk, not a private copy
        assert os.pread(chunk.fd, 4, 0) == bytes([1, 2, 3, 4])
        assert os.pread(chunk.fd, 1, CS - 1) == bytes([99])
        # and writes through the fd show through the tensor
        os.pwrite(chunk.fd, b"\x07", 100)
        assert int(t[100]) == 7
        be.unmap(base + CS, CS)
        # map the same chunk again (a dup of its fd, as an importer would) at the same place
        again = be.import_(os.dup(chunk.fd), CS)
        be.map(again, base + CS, prefault=False)
        assert be.tensor(base + CS, 4).tolist() == [1, 2, 3, 4]
        be.unmap(base + CS, CS)
        be.release(again)
    finally:
        be.free(base, size)
        be.destroy(chunk)


def test_proc_maps_shows_reserved_mapped_unmapped(be, arenas):
    a = arenas(2 * CS)
    assert perms_at(a.base) == "---p"
    a.map([be.create(CS)])
    assert perms_at(a.base).startswith("rw") and perms_at(a.base)[3] == "s"
    assert perms_at(a.base + CS) == "---p"  # the rest stays reserved
    a.unmap()
    assert perms_at(a.base) == "---p"  # still reserved: nothing else can land there
    assert perms_at(a.base + CS - 1) == "---p"


def test_touching_unmapped_arena_faults():
    """Reading an arena's memory after unmap kills the process with SIGSEGV.

    The child reads with ctypes rather than through a torch tensor: the same
    load from the same address, without a torch import in a fresh interpreter
    (seconds on a loaded machine). Tensors over the arena are tested in-process.
    """
    script = """
        import ctypes
        from vllm_mux.memory.cpu import Backend
        from vllm_mux.memory.arena import Arena
        b = Backend()
        cs = 16 * b.granularity
        a = Arena(b, 2 * cs, cs)
        a.map([b.create(cs)])
        ctypes.memset(a.base, 7, 4096)
        assert ctypes.string_at(a.base, 4096) == bytes([7]) * 4096
        print("wrote", flush=True)
        a.unmap()
        print("unmapped", flush=True)
        print("read", ctypes.string_at(a.base, 1), flush=True)
    """
    r = _run_child(script)
    assert "wrote" in r.stdout and "unmapped" in r.stdout, r.stderr
    assert "read" not in r.stdout
    assert r.returncode == -signal.SIGSEGV, (r.returncode, r.stderr)


# -- the arena --


def test_chunk_size_not_multiple_of_granularity(be):
    with pytest.raises(ValueError, match="granularity"):
        Arena(be, 4 * CS, CS + 1)
    with pytest.raises(ValueError, match="granularity"):
        Arena(be, 4 * CS, PAGE // 2)


def test_capacity_rounds_up_to_whole_chunks(arenas):
    a = arenas(CS + 1)
    assert a.capacity == 2 * CS
    assert a.base % PAGE == 0
    assert a.mapped == 0 and a.used == 0 and a.size == 0


def test_alloc_is_aligned_and_bumps(be, arenas):
    a = arenas(4 * CS)
    a.map([be.create(CS)])
    t1 = a.alloc(1)
    t2 = a.alloc(10)
    t3 = a.alloc(ALIGN)
    t4 = a.alloc(3)
    assert ALIGN == 256
    assert [t.data_ptr() - a.base for t in (t1, t2, t3, t4)] == [0, 256, 512, 768]
    assert all(t.data_ptr() % ALIGN == 0 for t in (t1, t2, t3, t4))
    assert [t.numel() for t in (t1, t2, t3, t4)] == [1, 10, 256, 3]
    assert a.used == 771
    # the tensors do not overlap: each keeps what was written to it
    for i, t in enumerate((t1, t2, t3, t4)):
        t.fill_(i + 1)
    assert [int(t.min()) for t in (t1, t2, t3, t4)] == [1, 2, 3, 4]
    assert [int(t.max()) for t in (t1, t2, t3, t4)] == [1, 2, 3, 4]
    assert a.view(4 * ALIGN).numel() == 4 * ALIGN
    assert a.view().numel() == 771


def test_chunks_needed(be, arenas):
    a = arenas(8 * CS)
    assert a.chunks_needed(0) == 0
    assert a.chunks_needed(1) == 1
    assert a.chunks_needed(CS) == 1
    assert a.chunks_needed(CS + 1) == 2
    assert a.chunks_needed(3 * CS) == 3
    a.map([be.create(CS)])
    assert a.chunks_needed(CS) == 0
    assert a.chunks_needed(CS + 1) == 1
    a.alloc(100)  # used 100; the next alloc starts at 256
    assert a.chunks_needed(CS - 256) == 0
    assert a.chunks_needed(CS - 255) == 1
    assert a.chunks_needed(2 * CS) == 2
    # chunks_needed is what makes alloc succeed
    n = 2 * CS
    a.map([be.create(CS) for _ in range(a.chunks_needed(n))])
    assert a.chunks_needed(n) == 0
    assert a.alloc(n).numel() == n


def test_alloc_beyond_mapped_is_memory_error(be, arenas):
    a = arenas(4 * CS)
    with pytest.raises(MemoryError):
        a.alloc(1)  # nothing mapped
    a.map([be.create(CS)])
    a.alloc(CS - 256)
    used = a.used
    with pytest.raises(MemoryError):
        a.alloc(257)  # starts at CS - 256
    assert a.used == used  # a refused alloc hands out nothing
    assert a.alloc(256).data_ptr() == a.base + CS - 256


def test_capacity_exceeded(be, arenas):
    """A refused map maps nothing and releases the chunks it was given (map
    takes them over: nothing leaks when a wake fails half way)."""
    a = arenas(2 * CS)
    chunks = [be.create(CS) for _ in range(3)]
    with pytest.raises(ValueError, match="capacity"):
        a.map(chunks)
    assert a.chunks == [] and a.mapped == 0  # refused before mapping any
    for chunk in chunks:
        with pytest.raises(OSError):
            os.fstat(chunk.fd)  # released
    chunks = [be.create(CS) for _ in range(3)]
    a.map(chunks[:2])
    with pytest.raises(ValueError, match="capacity"):
        a.map(chunks[2:])
    assert a.mapped == 2 * CS


def test_addresses_survive_unmap_and_remap_of_other_chunks(be, arenas):
    """Tensors made before a sleep see the new chunks' memory after a wake."""
    a = arenas(4 * CS)
    first = [be.create(CS) for _ in range(2)]
    a.map(first)
    base = a.base
    t = a.alloc(2 * CS - 256)
    t.fill_(0xAB)
    ptr = t.data_ptr()
    returned = a.unmap()
    assert returned == first
    assert a.base == base and a.chunks == [] and a.mapped == 0
    assert a.size == 2 * CS and a.used == 2 * CS - 256  # what a wake must restore
    # the arena released its handles to the chunks
    for c in first:
        with pytest.raises(OSError):
            os.fstat(c.fd)
    # map two different chunks, filled elsewhere
    second = [be.create(CS) for _ in range(2)]
    for i, c in enumerate(second):
        os.pwrite(c.fd, bytes([0x10 + i]) * CS, 0)
    a.map(second)
    assert a.base == base and t.data_ptr() == ptr
    assert int(t[0]) == 0x10 and int(t[CS]) == 0x11  # the old tensor sees the new memory
    assert a.view().data_ptr() == base
    t.fill_(0x22)  # and writes reach the new chunks
    assert os.pread(second[1].fd, 1, 5) == b"\x22"


def test_arena_unmap_with_nothing_mapped(arenas):
    a = arenas(CS)
    assert a.unmap() == []
    assert perms_at(a.base) == "---p"


def test_alloc_zero_bytes(be, arenas):
    """torch.empty(0) and friends happen; a zero-byte alloc is an empty tensor.

    (torch.frombuffer refuses a zero-length buffer; the backend must not.)
    """
    a = arenas(2 * CS)
    a.map([be.create(CS)])
    assert a.alloc(0).numel() == 0
    assert arenas(CS).view().numel() == 0


# -- two processes, one chunk --


def test_two_processes_share_a_chunk_by_fd(be, arenas):
    """A chunk passed with SCM_RIGHTS is the same memory in both processes."""
    child_script = """
        import ctypes, socket, sys
        from vllm_mux.memory.cpu import Backend
        from vllm_mux.memory.arena import Arena
        s = socket.socket(fileno=int(sys.argv[1]))
        msg, fds, _, _ = socket.recv_fds(s, 1024, 4)
        size = int(msg)
        assert len(fds) == 1
        b = Backend()
        a = Arena(b, size, size)
        a.map([b.import_(fds[0], size)])
        seen = ctypes.string_at(a.base, 8)
        ctypes.memmove(a.base + size - 8, b"fromkid!", 8)
        s.send(seen)
        s.recv(16)  # the parent has looked; see what it wrote since
        s.send(ctypes.string_at(a.base + 100, 5))
        a.close()
    """
    parent, kid = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    parent.settimeout(30)
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(child_script), str(kid.fileno())],
        pass_fds=[kid.fileno()],
        env=_child_env(),
        stderr=subprocess.PIPE,
    )
    kid.close()
    try:
        a = arenas(CS)
        chunk = be.create(CS)
        a.map([be.import_(os.dup(chunk.fd), CS)])
        t = a.alloc(CS)
        t[:8] = torch.frombuffer(bytearray(b"fromdad!"), dtype=torch.uint8)
        socket.send_fds(parent, [str(CS).encode()], [be.export(chunk)])
        assert parent.recv(64) == b"fromdad!"  # the child saw the parent's write
        assert bytes(t[-8:].tolist()) == b"fromkid!"  # the parent sees the child's
        t[100:105] = torch.frombuffer(bytearray(b"again"), dtype=torch.uint8)
        parent.send(b"go")
        assert parent.recv(64) == b"again"
        assert proc.wait(30) == 0, proc.stderr.read()
        be.destroy(chunk)
    finally:
        parent.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def test_prefault_false_maps_lazily_but_correctly(be, arenas):
    a = arenas(2 * CS, prefault=False)
    chunk = be.create(CS)
    os.pwrite(chunk.fd, b"lazy", 0)
    a.map([chunk])
    assert ctypes.string_at(a.base, 4) == b"lazy"
    assert bytes(a.alloc(4).tolist()) == b"lazy"


def test_whole_chunk_mappings_are_unmapped_whole_or_not_at_all():
    from vllm_mux.memory.mappings import Mappings

    m = Mappings("CANN")
    for k in range(4):
        m.add(0x200000 * (k + 1), 0x200000)
    assert m.inside(0x400000, 0x400000) == [(0x400000, 0x200000), (0x600000, 0x200000)]
    assert m.inside(0x1000000, 0x200000) == []  # nothing mapped there
    with pytest.raises(ValueError, match="would cut the chunk mapped at .*CANN unmaps whole"):
        m.inside(0x300000, 0x200000)
    m.remove(0x400000)
    assert m.inside(0, 0x1000000) == [(a, 0x200000) for a in (0x200000, 0x600000, 0x800000)]
