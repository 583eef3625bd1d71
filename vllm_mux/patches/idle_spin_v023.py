"""``idle_spin`` on vLLM 0.23 (Ascend NPUs, with vllm-ascend 0.23.0.post1).

The same patch serves: ``SpinCondition.wait`` and ``record_read`` are
byte for byte those of vLLM 0.32 (same hashes), and only
``MessageQueue.acquire_read`` differs: 0.23 sets the read flag and calls
``record_read`` after the ``with`` block instead of in a ``finally``, which
changes nothing this patch relies on (``wait`` is still called only when no
message is ready, and ``record_read`` still sets the time the busy loop
counts from). This file only records the vLLM 0.23 hashes for
``tools/check_upstream.py --platform npu``; ``apply`` and ``park`` are
``idle_spin``'s (one ``_parked`` flag per process, which the NPU worker's
sleep and wake set).
"""

from vllm_mux.patches.idle_spin import apply, park  # noqa: F401

_SHM = "vllm.distributed.device_communicators.shm_broadcast"
TARGETS = {
    f"{_SHM}.SpinCondition.wait": "3c5dd220ba84735e",
    f"{_SHM}.SpinCondition.record_read": "3af743c903ce0135",
    f"{_SHM}.MessageQueue.acquire_read": "1c3e725e67d01604",
}
