"""``vllm-mux bench pages``: a wake on each kind of page the cpu backend can get here.

For each page kind this host offers the cpu backend ("4k" always; "thp" and
"hugetlb" when obtainable, see ``vllm_mux.memory.cpu``), in one run and one
process: a wake-like operation (reserve an arena, import the chunks, map them
with prefault, copy a host buffer of ``size_bytes`` into them) against its
peer, a plain copy of the same bytes from the same host buffer into
ordinary, already-faulted memory (a torch tensor ``copy_``), the peer the
instance's wake is measured against. ratio = plain copy seconds / wake
seconds, best of 5 each (higher is better; the goal is 0.85), the kinds
measured in turn within each round. No vLLM needed::

    python -m vllm_mux.bench.pages [--size-bytes N] [--chunk-size N] [--rounds N]

The "4k" kind is the backend with huge pages off (``VLLM_MUX_HUGE_PAGES=0``).
``map_ms`` is the wake's reserve + import + map part: page-table work.
"""

import contextlib
import json
import os
import time
from collections import Counter

ROUNDS = 5
GOAL = 0.85


def host_facts() -> dict:
    """The host's huge page settings, as the kernel reports them."""
    from vllm_mux.memory import cpu

    thp, setting = cpu.shmem_thp()
    return {
        "transparent_hugepage": cpu._selected(f"{cpu._THP_SYSFS}/enabled"),
        "shmem_thp": setting,
        "shmem_thp_usable": thp,
        "hugetlb_pool": cpu.hugetlb_pool(),
        cpu.ENV: os.environ.get(cpu.ENV),
        "cpus": os.cpu_count(),
    }


def available() -> dict:
    """Each page kind's backend, or why the host cannot give it."""
    from vllm_mux.memory.cpu import PAGE_KINDS, Backend

    kinds = {}
    for kind in reversed(PAGE_KINDS):  # 4k first: the reference
        try:
            kinds[kind] = Backend(pages=kind)
        except ValueError as e:
            kinds[kind] = str(e)
    return kinds


def _plain_copy(host) -> float:
    import torch

    scratch = torch.zeros(host.numel(), dtype=torch.uint8)  # ordinary, faulted memory
    start = time.perf_counter()
    scratch.copy_(host)
    return time.perf_counter() - start


def _wake(backend, fds: list, chunk_size: int, host) -> tuple[float, float, int]:
    """Seconds for the whole wake and for its map part, and the bytes mapped
    with huge pages. Takes ownership of ``fds``."""
    from vllm_mux.memory.arena import Arena
    from vllm_mux.memory.cpu import huge_mapped_bytes

    start = time.perf_counter()
    arena = Arena(backend, len(fds) * chunk_size, chunk_size, prefault=True)
    try:
        arena.map([backend.import_(fd, chunk_size) for fd in fds])
        mapped = time.perf_counter()
        arena.alloc(host.numel()).copy_(host)
        done = time.perf_counter()
        huge = huge_mapped_bytes(arena.base, arena.mapped)
    finally:
        arena.close()
    return done - start, mapped - start, huge


def _summary(backend, chunks: list, samples: dict, nbytes: int, chunk_size: int) -> dict:
    wake, plain = min(samples["wake"]), min(samples["plain"])
    return {
        "pages": backend.pages,
        "description": backend.pages_description,
        "chunks_made": dict(Counter(c.pages for c in chunks)),
        "huge_mapped_fraction": round(samples["huge"] / (len(chunks) * chunk_size), 3),
        "wake_ms": round(wake * 1e3, 2),
        "map_ms": round(min(samples["map"]) * 1e3, 2),
        "plain_copy_ms": round(plain * 1e3, 2),
        "wake_gbps": round(nbytes / wake / 1e9, 2),
        "plain_copy_gbps": round(nbytes / plain / 1e9, 2),
        "ratio": round(plain / wake, 3),
        "goal_met": plain / wake >= GOAL,
    }


def run(size_bytes: int = 512 << 20, chunk_size: int = 32 << 20, rounds: int = ROUNDS) -> dict:
    """Measure every page kind obtainable here; see the module docstring.
    Each round measures every kind, a plain copy then a wake, so a load that
    comes and goes on the host falls on all of them alike."""
    import torch

    host = torch.randint(0, 256, (size_bytes,), dtype=torch.uint8)  # faulted, not zeros
    result = {
        "size_bytes": size_bytes,
        "chunk_size": chunk_size,
        "rounds": rounds,
        "goal": GOAL,
        "host": host_facts(),
        "kinds": {},
        "unavailable": {},
    }
    backends = {}
    for kind, backend in available().items():
        if isinstance(backend, str):
            result["unavailable"][kind] = backend
        else:
            backends[kind] = backend
    n = -(-size_bytes // chunk_size)
    chunks = {kind: [] for kind in backends}
    try:
        for kind, backend in backends.items():
            for _ in range(n):
                chunks[kind].append(backend.create(chunk_size))
        samples = {kind: {"wake": [], "map": [], "plain": [], "huge": 0} for kind in backends}
        for _ in range(rounds):
            for kind, backend in backends.items():
                s = samples[kind]
                s["plain"].append(_plain_copy(host))
                fds = [os.dup(c.fd) for c in chunks[kind]]
                wake, map_s, s["huge"] = _wake(backend, fds, chunk_size, host)
                s["wake"].append(wake)
                s["map"].append(map_s)
        for kind, backend in backends.items():
            result["kinds"][kind] = _summary(
                backend, chunks[kind], samples[kind], size_bytes, chunk_size
            )
    finally:
        for kind, made in chunks.items():
            for c in made:
                backends[kind].destroy(c)
    return result


def add_arguments(p) -> None:
    p.add_argument("--size-bytes", type=int, default=512 << 20)
    p.add_argument("--chunk-size", type=int, default=32 << 20)
    p.add_argument("--rounds", type=int, default=ROUNDS)


def cli(args) -> int:
    with contextlib.suppress(BrokenPipeError):
        print(json.dumps(run(args.size_bytes, args.chunk_size, args.rounds), indent=2))
    return 0


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p)
    return cli(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
