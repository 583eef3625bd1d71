"""``vllm-mux bench``: one module per measurement, each with its peer in the same run.

- ``switch``: sleep, wake and time-to-first-token of a real vLLM instance.
- ``gpu``: the GPU proof kit (``scripts/gpu_check.sh``): the cuda backend, the
  daemon, weights loaded straight into leased memory, 50 sleep/wake cycles
  with a captured graph, and a large wake against a plain copy. No vLLM needed.
- ``soak``: three models through ``vllm-mux serve`` under random faults (daemon
  and instance kills, sleeps, wakes); the books, leaks and every answer checked.
- ``pages``: a wake on each kind of page the cpu backend can get (huge or not).
- ``tiers``: warm, partial, host and cold wakes against a restart of vLLM.
"""

import os
import time


def take(socket_path: str, n: int) -> None:
    """Lease ``n`` chunks and hand them back, as another instance would: a
    sleeper's bytes in them count as lost, so its next wake copies them (a
    lease takes chunks that hold nobody's bytes first)."""
    from vllm_mux.daemon.client import Client

    thief = Client(socket_path)
    try:
        thief.hello("bench-thief", key=f"bench-thief-{os.getpid()}-{time.monotonic()}")
        ids, fds = thief.lease(n)
        for fd in fds:
            os.close(fd)
        thief.release(ids)
    finally:
        thief.close()
