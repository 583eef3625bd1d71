"""A sleeping instance's worker stops spinning on its message queue.

Target: ``vllm.distributed.device_communicators.shm_broadcast.SpinCondition.wait``.
Why: a worker reads its next RPC from a shared-memory queue and, for one
second after each message (``busy_loop_s``), waits for the next one by
spinning with ``sched_yield`` rather than blocking. After the sleep RPC that
second is pure waste, and worse: every vLLM CPU instance binds its worker to
the same cores by default, so the worker that has just gone to sleep spins
on the core that the instance waking into its memory needs for its copy.
On the 2-core CI machine ``vllm-mux bench switch`` measured a switch between
two models at 1.24 s before this patch and 0.29 s after (docs/benchmarks.md);
a sleeping worker used 0.96 s of CPU in the second after its sleep without it
(tests/test_sleep_wake.py).
How: the worker's ``sleep`` parks this process (``park(True)``) and its
``wake_up`` unparks it. While parked, ``wait`` skips the busy loop and blocks
on the writer's notification socket at once, as upstream does anyway after a
second without messages; a wake RPC is delivered through that socket.
Upstream: the busy window is how vllm#19036 (100 % CPU when idle) was fixed;
the open vllm#52814 makes its length configurable (VLLM_SHM_BROADCAST_BUSY_LOOP_S),
which would not do here: an awake instance should keep spinning between
steps. This patch goes once a reader can be told to go idle at once, or once
the busy window ends by itself after a sleep RPC.
"""

# Upstream symbols this patch replaces or relies on -> sha256 of their source.
# acquire_read calls wait() only when no message is ready; record_read sets
# the time the busy loop counts from.
_SHM = "vllm.distributed.device_communicators.shm_broadcast"
TARGETS = {
    f"{_SHM}.SpinCondition.wait": "3c5dd220ba84735e",
    f"{_SHM}.SpinCondition.record_read": "3af743c903ce0135",
    f"{_SHM}.MessageQueue.acquire_read": "08048c325922bad9",
}

_parked = False


def park(parked: bool) -> None:
    """Make this process's message-queue readers block instead of spin."""
    global _parked
    _parked = parked


def apply() -> None:
    from vllm.distributed.device_communicators.shm_broadcast import SpinCondition

    upstream_wait = SpinCondition.wait

    def wait(self, timeout_ms: int | None = None) -> None:
        if _parked:
            self.last_read = float("-inf")  # the busy loop is over
        return upstream_wait(self, timeout_ms)

    SpinCondition.wait = wait
