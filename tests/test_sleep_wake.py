"""A real vLLM instance on the bundled model sleeps and wakes through the daemon."""

import time

import psutil
import pytest

from conftest import (
    PROMPTS,
    assert_books_balance,
    greedy,
    mapped_ranges,
    process_tree,
    shmem_rss,
    worker_pid,
)

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def mux(module_daemon_factory, module_server_factory, model_dir):
    daemon = module_daemon_factory("2GiB")
    server = module_server_factory(
        model_dir, socket_path=daemon.socket, args=["--enable-sleep-mode"]
    )
    return daemon, server


def arena_mappings(pid: int, arena: list[int]) -> list[tuple[int, int, str, str]]:
    base, capacity = arena
    return [m for m in mapped_ranges(pid) if m[0] < base + capacity and m[1] > base]


def assert_unmapped(pid: int, arena: list[int]) -> None:
    """Nothing of the arena is accessible: touching it would fault."""
    maps = arena_mappings(pid, arena)
    assert maps, "the arena's range should stay reserved"
    for start, end, perms, path in maps:
        assert perms == "---p" and "memfd" not in path, (hex(start), hex(end), perms, path)


def test_answers_addresses_and_books_across_five_cycles(mux):
    daemon, server = mux
    before = [greedy(server, p) for p in PROMPTS]
    assert "Paris" in before[0]
    addresses = server.worker_rpc("mux_tensor_addresses")
    pid = worker_pid(server, daemon)

    # Every weight and KV-cache tensor lives in its leased arena.
    for arena, pointers in (
        ("weights", addresses["weights"].values()),
        ("kv_cache", addresses["kv_cache"]),
    ):
        base, capacity = addresses["arenas"][arena]
        assert pointers and all(base <= p < base + capacity for p in pointers)
    awake_maps = arena_mappings(pid, addresses["arenas"]["weights"])
    assert any(perms == "rw-s" and "memfd" in path for _, _, perms, path in awake_maps)

    status = daemon.status()
    assert_books_balance(status)
    held = daemon.instance("smol")["chunks"]
    assert daemon.instance("smol")["state"] == "awake" and held > 0

    for cycle in range(5):
        server.sleep()
        status = daemon.status()
        assert_books_balance(status)
        me = daemon.instance("smol")
        assert (me["state"], me["chunks"]) == ("asleep", 0)
        assert status["free_chunks"] == status["total_chunks"]
        assert_unmapped(pid, addresses["arenas"]["weights"])
        assert_unmapped(pid, addresses["arenas"]["kv_cache"])
        # Leased memory is gone from the process: no chunk is mapped, and the
        # shared memory it still maps is the host copy (read-only) it wakes from.
        maps = mapped_ranges(pid)
        assert not [m for m in maps if "vllm-mux-chunk" in m[3]]
        copies = [m for m in maps if "vllm-mux-host-copy" in m[3]]
        assert [m[2] for m in copies] == ["r--s"]
        assert shmem_rss(pid) < sum(end - start for start, end, _, _ in copies) + (16 << 20)

        server.wake_up()
        status = daemon.status()
        assert_books_balance(status)
        me = daemon.instance("smol")
        assert (me["state"], me["chunks"]) == ("awake", held)
        assert me["wakes"] == cycle + 1 and me["sleeps"] == cycle + 1
        assert [greedy(server, p) for p in PROMPTS] == before, f"after cycle {cycle + 1}"

    assert server.worker_rpc("mux_tensor_addresses") == addresses


def _rss(pids: list[int]) -> int:
    return sum(psutil.Process(p).memory_info().rss for p in pids)


def test_fifty_cycles_do_not_drift(mux):
    daemon, server = mux
    pids = process_tree(server.pid)
    answer = greedy(server, PROMPTS[0])

    def cycle():
        server.sleep()
        assert_books_balance(daemon.status())
        server.wake_up()

    cycle()
    rss_after_1 = _rss(pids)
    daemon_rss_after_1 = _rss([daemon.process.pid])
    books_after_1 = daemon.status()
    for _ in range(49):
        cycle()
    books_after_50 = daemon.status()
    rss_after_50 = _rss(pids)
    daemon_rss_after_50 = _rss([daemon.process.pid])

    assert abs(rss_after_50 - rss_after_1) / rss_after_1 < 0.01, (rss_after_1, rss_after_50)
    assert abs(daemon_rss_after_50 - daemon_rss_after_1) / daemon_rss_after_1 < 0.01
    for key in ("free_chunks", "leased_chunks", "total_chunks"):
        assert books_after_50[key] == books_after_1[key]
    assert books_after_50["instances"][0]["chunks"] == books_after_1["instances"][0]["chunks"]
    assert books_after_50["instances"][0]["wakes"] == books_after_1["instances"][0]["wakes"] + 49
    assert_books_balance(books_after_50)
    assert greedy(server, PROMPTS[0]) == answer


def test_a_sleeping_worker_does_not_spin(mux):
    """Upstream's worker spins on its message queue for a second after every
    message; after the sleep it must block instead, or it takes the core that
    another instance, waking into its memory, copies on (patches/idle_spin.py)."""
    daemon, server = mux
    greedy(server, PROMPTS[0])
    worker = psutil.Process(worker_pid(server, daemon))
    server.sleep()
    before = worker.cpu_times()
    time.sleep(1.0)
    after = worker.cpu_times()
    server.wake_up()
    busy = (after.user + after.system) - (before.user + before.system)
    assert busy < 0.2, f"the sleeping worker used {busy:.2f} s of CPU in 1 s"
    assert greedy(server, PROMPTS[0])
    assert_books_balance(daemon.status())
