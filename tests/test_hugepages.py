"""Huge pages on the cpu backend: the decision, each kind's chunks, the fallbacks.

Kinds this host cannot give are skipped, never faked: what runs here depends
on ``nr_hugepages`` and ``shmem_enabled``. One test drives the THP code path
on a host without shmem THP by making the backend believe the setting allows
it; it claims only what that shows (the chunks work), not that pages are huge.
"""

import ctypes
import errno
import mmap
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import perms_at
from vllm_mux.memory import cpu
from vllm_mux.memory.arena import Arena
from vllm_mux.memory.cpu import HUGE_PAGE, PAGE_KINDS, Backend

CS = 2 * HUGE_PAGE  # a chunk of two huge pages


def _backend(kind: str) -> Backend:
    try:
        return Backend(pages=kind)
    except ValueError as e:
        pytest.skip(f"no {kind} here: {e}")


def _sysfs_choice(path: str) -> str:
    with open(path) as f:
        text = f.read()
    return text[text.index("[") + 1 : text.index("]")]


def _prot_none_bytes() -> int:
    """Bytes of this process's mappings with no access (reserved ranges)."""
    total = 0
    with open("/proc/self/maps") as f:
        for line in f:
            span, perms = line.split()[:2]
            if perms == "---p":
                lo, hi = (int(x, 16) for x in span.split("-"))
                total += hi - lo
    return total


# -- the decision --


def test_huge_pages_off_by_env(monkeypatch):
    monkeypatch.setenv(cpu.ENV, "0")
    be = Backend()
    assert be.pages == "4k"
    assert f"{cpu.ENV}=0" in be.pages_description
    chunk = be.create(CS)  # a size huge pages could take: they must not
    a = Arena(be, CS, CS)
    try:
        a.map([chunk])
        assert chunk.pages == "4k"
        assert cpu.huge_mapped_bytes(a.base, CS) == 0
    finally:
        a.close()


def test_the_decision_follows_the_host(monkeypatch):
    monkeypatch.delenv(cpu.ENV, raising=False)
    be = Backend()
    hugetlb, _ = cpu.hugetlb_works()
    thp, _ = cpu.shmem_thp()
    assert be.pages == ("hugetlb" if hugetlb else "thp" if thp else "4k")
    assert be.pages_description and "\n" not in be.pages_description
    assert Backend(pages="4k").pages == "4k"
    with pytest.raises(ValueError, match="unknown page kind"):
        Backend(pages="1g")


def test_without_huge_pages_the_description_says_why(monkeypatch):
    monkeypatch.delenv(cpu.ENV, raising=False)
    be = Backend()
    if be.pages != "4k":
        pytest.skip(f"this host has huge pages: {be.pages_description}")
    with open(f"{cpu._HUGETLB_SYSFS}/nr_hugepages") as f:
        nr = f.read().strip()
    shmem = _sysfs_choice(f"{cpu._THP_SYSFS}/shmem_enabled")
    assert be.pages_description.startswith(f"{mmap.PAGESIZE >> 10} KiB pages: no huge pages")
    assert f"nr_hugepages={nr}" in be.pages_description
    assert f"shmem_enabled={shmem}" in be.pages_description
    for kind in ("hugetlb", "thp"):
        with pytest.raises(ValueError, match="no "):
            Backend(pages=kind)


def test_shmem_thp_setting_is_read_with_its_2mib_override(tmp_path, monkeypatch):
    (tmp_path / "hugepages-2048kB").mkdir()
    top = tmp_path / "shmem_enabled"
    size = tmp_path / "hugepages-2048kB" / "shmem_enabled"
    monkeypatch.setattr(cpu, "_THP_SYSFS", str(tmp_path))
    cases = [
        ("always within_size advise [never] deny force", None, False),
        ("always within_size [advise] never deny force", None, True),
        ("always within_size [advise] never deny force", "always [inherit] advise never", True),
        ("always within_size [advise] never deny force", "always inherit advise [never]", False),
        ("always within_size advise [never] deny force", "[always] inherit advise never", True),
        ("always within_size advise never deny [force]", "always inherit advise [never]", True),
        ("always within_size advise never [deny] force", None, False),
    ]
    for top_text, size_text, usable in cases:
        top.write_text(top_text + "\n")
        if size_text is None:
            size.unlink(missing_ok=True)
        else:
            size.write_text(size_text + "\n")
        got, said = cpu.shmem_thp()
        assert got is usable, (top_text, size_text)
        assert said.startswith(f"shmem_enabled={_sysfs_choice(str(top))}")
    (tmp_path / "shmem_enabled").unlink()
    assert cpu.shmem_thp() == (False, "no transparent huge pages")


# -- each kind's chunks --


@pytest.mark.parametrize("kind", PAGE_KINDS)
def test_chunks_map_hold_unmap_remap(kind):
    be = _backend(kind)
    chunks = [be.create(CS) for _ in range(2)]
    a = Arena(be, 3 * CS, CS)
    try:
        assert a.base % HUGE_PAGE == 0
        if kind != "hugetlb":  # hugetlb may run out of pages and fall back
            assert [c.pages for c in chunks] == [kind, kind]
        a.map([be.import_(os.dup(c.fd), CS) for c in chunks])
        huge = cpu.huge_mapped_bytes(a.base, 2 * CS)
        hugetlb = sum(CS for c in chunks if c.pages == "hugetlb")
        if kind == "4k":
            assert huge == 0
        else:
            assert huge >= hugetlb  # THP is the kernel's to give; hugetlb is certain
        t = a.alloc(2 * CS)
        t[:CS].fill_(0x11)
        t[CS:].fill_(0x22)
        t[CS - 1] = 0x33
        assert perms_at(a.base) == "rw-s"
        a.unmap()
        assert perms_at(a.base) == "---p"
        assert perms_at(a.base + 2 * CS - 1) == "---p"
        a.map([be.import_(os.dup(c.fd), CS) for c in reversed(chunks)])  # swapped
        assert ctypes.string_at(a.base, 1) == b"\x22"
        assert ctypes.string_at(a.base + CS, 1) == b"\x11"
        assert ctypes.string_at(a.base + 2 * CS - 1, 1) == b"\x33"
        assert cpu.huge_mapped_bytes(a.base, 2 * CS) >= hugetlb
        # a third chunk after them, then all unmapped at once
        extra = be.create(CS)
        chunks.append(extra)
        a.map([be.import_(os.dup(extra.fd), CS)])
        assert ctypes.string_at(a.base + 2 * CS, 8) == bytes(8)  # created zeroed
    finally:
        a.close()
        for c in chunks:
            be.destroy(c)


@pytest.mark.parametrize("kind", ["hugetlb", "thp"])
def test_a_chunk_not_a_multiple_of_huge_pages_is_made_of_small_ones(kind):
    be = _backend(kind)
    size = 16 * mmap.PAGESIZE
    chunk = be.create(size)
    a = Arena(be, size, size)
    try:
        assert chunk.pages == "4k"
        a.map([chunk])
        a.alloc(size).fill_(5)
        assert ctypes.string_at(a.base + size - 1, 1) == b"\x05"
    finally:
        a.close()


def test_prefault_false_on_each_kind():
    for kind in PAGE_KINDS:
        try:
            be = Backend(pages=kind)
        except ValueError:
            continue
        chunk = be.create(CS)
        a = Arena(be, CS, CS, prefault=False)
        try:
            a.map([chunk])
            assert ctypes.string_at(a.base + CS - 4, 4) == bytes(4)
            a.alloc(CS)[-4:].fill_(9)
            assert ctypes.string_at(a.base + CS - 1, 1) == b"\x09"
        finally:
            a.close()


_CHILD = """
    import ctypes, os, sys
    from vllm_mux.memory.arena import Arena
    from vllm_mux.memory.cpu import Backend, huge_mapped_bytes
    size = int(sys.argv[1])
    fds = [int(x) for x in sys.argv[2:]]
    b = Backend()
    a = Arena(b, size * len(fds), size)
    a.map([b.import_(fd, size) for fd in fds])
    for i in range(len(fds)):
        assert ctypes.string_at(a.base + i * size + size - 1, 1) == bytes([0x40 + i])
        ctypes.memset(a.base + i * size, 0x50 + i, 1)
    print(b.pages, ",".join(c.pages for c in a.chunks), huge_mapped_bytes(a.base, a.mapped))
    a.close()
"""


@pytest.mark.parametrize("kind", PAGE_KINDS)
@pytest.mark.parametrize("child_env", ["default", "off"])
def test_another_process_maps_whatever_was_made(kind, child_env, monkeypatch):
    """An instance does not know what the daemon chose: it maps the fds it gets."""
    monkeypatch.delenv(cpu.ENV, raising=False)
    be = _backend(kind)
    chunks = [be.create(CS) for _ in range(2)]
    try:
        for i, c in enumerate(chunks):
            view = mmap.mmap(c.fd, CS)  # the daemon never maps; this test looks
            view[CS - 1] = 0x40 + i
            view.close()
        env = dict(os.environ)
        if child_env == "off":
            env[cpu.ENV] = "0"
        else:
            env.pop(cpu.ENV, None)
        fds = [c.fd for c in chunks]
        for fd in fds:
            os.set_inheritable(fd, True)
        done = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(_CHILD), str(CS), *map(str, fds)],
            pass_fds=fds,
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        assert done.returncode == 0, done.stderr
        child_pages, imported, huge = done.stdout.split()
        assert child_pages == ("4k" if child_env == "off" else Backend().pages)
        made = ["hugetlb" if c.pages == "hugetlb" else "4k" for c in chunks]
        assert imported.split(",") == made  # hugetlbfs known by its fd
        assert int(huge) >= CS * made.count("hugetlb")
        for i, c in enumerate(chunks):
            view = mmap.mmap(c.fd, CS)
            assert view[0] == 0x50 + i  # the child's writes are in the chunk
            view.close()
    finally:
        for c in chunks:
            be.destroy(c)


# -- hugetlb: fallbacks and alignment --


def test_import_knows_a_hugetlbfs_memfd():
    """memfd_create(MFD_HUGETLB) works even with an empty pool; pages need not be taken."""
    try:
        fd = os.memfd_create("t", os.MFD_CLOEXEC | os.MFD_HUGETLB | cpu._MFD_HUGE_2MB)
    except OSError as e:
        pytest.skip(f"no hugetlbfs memfds here: {e}")
    os.ftruncate(fd, CS)
    shmem = os.memfd_create("t", os.MFD_CLOEXEC)
    os.ftruncate(shmem, CS)
    be = Backend(pages="4k")
    assert cpu.is_hugetlb(fd) and not cpu.is_hugetlb(shmem)
    hugetlb_chunk, shmem_chunk = be.import_(fd, CS), be.import_(shmem, CS)
    assert (hugetlb_chunk.pages, shmem_chunk.pages) == ("hugetlb", "4k")
    base = be.reserve(2 * CS)
    try:
        with pytest.raises(ValueError, match="2 MiB-aligned"):
            be.map(hugetlb_chunk, base + mmap.PAGESIZE)
    finally:
        be.free(base, 2 * CS)
        be.release(hugetlb_chunk)
        be.release(shmem_chunk)


def test_hugetlb_pool_empty_falls_back_per_chunk(monkeypatch):
    """The backend decided on hugetlb, then the pool has no pages for a chunk:
    that chunk is made of the next kind and works. Here the pool is really
    empty, so the decision is simulated and the kernel's refusal is real."""
    try:
        os.close(cpu._hugetlb_memfd(HUGE_PAGE))
        pytest.skip("this host's hugetlb pool has pages (see the exhausting test)")
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.ENOMEM):
            pytest.skip(f"no hugetlbfs memfds here: {e}")
    be = Backend()
    monkeypatch.setattr(be, "pages", "hugetlb")
    tried = []

    def spy(size):
        try:
            return real(size)
        except OSError as e:
            tried.append(e.errno)
            raise

    real = cpu._hugetlb_memfd
    monkeypatch.setattr(cpu, "_hugetlb_memfd", spy)
    chunk = be.create(CS)
    assert tried and tried[0] in (errno.ENOSPC, errno.ENOMEM)  # the kernel said no
    assert chunk.pages == ("thp" if be._advice == cpu._MADV_HUGEPAGE else "4k")
    a = Arena(be, CS, CS)
    try:
        a.map([chunk])
        a.alloc(CS).fill_(3)
        assert os.pread(chunk.fd, 2, CS - 2) == b"\x03\x03"
    finally:
        a.close()


def test_hugetlb_pool_exhausted_mid_pool():
    be = _backend("hugetlb")
    with open(f"{cpu._HUGETLB_SYSFS}/free_hugepages") as f:
        free = int(f.read())
    if free * HUGE_PAGE > (256 << 20):
        pytest.skip(f"{free} free huge pages: too many to exhaust in a unit test")
    n = free * HUGE_PAGE // CS + 1
    chunks = [be.create(CS) for _ in range(n)]
    a = Arena(be, n * CS, CS)
    try:
        kinds = [c.pages for c in chunks]
        assert kinds[0] == "hugetlb" and kinds[-1] != "hugetlb"
        a.map([be.import_(os.dup(c.fd), CS) for c in chunks])
        t = a.alloc(n * CS)
        t.fill_(7)
        assert int(t.sum()) == 7 * n * CS
    finally:
        a.close()
        for c in chunks:
            be.destroy(c)


def test_reserve_is_2mib_aligned_and_exact():
    be = Backend(pages="4k")
    for size in (mmap.PAGESIZE, 3 * mmap.PAGESIZE, HUGE_PAGE, 5 * HUGE_PAGE + mmap.PAGESIZE):
        before = _prot_none_bytes()
        base = be.reserve(size)
        try:
            assert base % HUGE_PAGE == 0
            assert _prot_none_bytes() - before == size  # the extra was trimmed
            assert perms_at(base) == "---p" and perms_at(base + size - 1) == "---p"
        finally:
            be.free(base, size)
        assert _prot_none_bytes() == before


# -- thp's code path where the kernel has no shmem THP --


def test_thp_path_works_where_the_kernel_gives_small_pages(monkeypatch):
    """Chunks committed and mapped the THP way (MADV_HUGEPAGE, populate) hold
    bytes whatever pages the kernel gives: what a daemon does when its THP
    setting is on but huge pages cannot be had (fragmented memory)."""
    if cpu.shmem_thp()[0]:
        pytest.skip("this host has shmem THP: the real thing is tested above")
    monkeypatch.setattr(cpu, "shmem_thp", lambda: (True, "shmem_enabled=advise (simulated)"))
    monkeypatch.setattr(cpu, "hugetlb_works", lambda: (False, "nr_hugepages=0 (simulated)"))
    be = Backend()
    assert be.pages == "thp" and be._advice == cpu._MADV_HUGEPAGE
    chunks = [be.create(CS) for _ in range(2)]
    a = Arena(be, 2 * CS, CS)
    try:
        assert [c.pages for c in chunks] == ["thp", "thp"]
        assert all(os.fstat(c.fd).st_blocks * 512 >= CS for c in chunks)  # committed
        a.map([be.import_(os.dup(c.fd), CS) for c in chunks])
        a.alloc(2 * CS)[CS:].fill_(6)
        a.unmap()
        a.map([be.import_(os.dup(c.fd), CS) for c in reversed(chunks)])
        assert ctypes.string_at(a.base, 1) == b"\x06"
        assert ctypes.string_at(a.base + CS, 1) == b"\x00"
    finally:
        a.close()
        for c in chunks:
            be.destroy(c)


def test_pin_and_unpin_do_nothing_on_cpu():
    be = Backend(pages="4k")
    base = be.reserve(HUGE_PAGE)
    try:
        assert be.pin(base, HUGE_PAGE) is None
        assert be.pin(base, HUGE_PAGE, read_only=True) is None
        assert be.unpin(base) is None
    finally:
        be.free(base, HUGE_PAGE)


def test_pages_bench_runs_small(monkeypatch):
    """``vllm_mux.bench.pages`` on a few MiB: every kind here measured, 4k always."""
    from vllm_mux.bench import pages

    monkeypatch.delenv(cpu.ENV, raising=False)
    r = pages.run(size_bytes=3 * HUGE_PAGE, chunk_size=CS)
    assert set(r["kinds"]) | set(r["unavailable"]) == set(PAGE_KINDS)
    assert "4k" in r["kinds"]
    for kind, m in r["kinds"].items():
        assert m["pages"] == kind
        assert m["wake_ms"] > 0 and m["plain_copy_ms"] > 0 and m["ratio"] > 0
        assert sum(m["chunks_made"].values()) == 2  # 6 MiB in chunks of 4 MiB
    assert r["kinds"]["4k"]["huge_mapped_fraction"] == 0
