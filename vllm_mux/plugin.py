"""The ``vllm.general_plugins`` entry point, run in every vLLM process.

Inert unless ``VLLM_MUX_SOCKET`` names a daemon: an instance started without
it behaves exactly like upstream vLLM. With it, the daemon must be reachable
now — an instance that would silently run outside the pool is worse than one
that refuses to start.
"""

import os


def register() -> None:
    socket_path = os.environ.get("VLLM_MUX_SOCKET")
    if not socket_path:
        return
    from vllm_mux.daemon.client import Client
    from vllm_mux.patches import apply

    Client(socket_path).close()  # raises with a clear message if nobody listens
    apply()
    from vllm_mux.patches import on_npu

    if on_npu():  # vLLM 0.23 has no sleep-mode registry: npu_worker patches sleep and wake
        return
    from vllm_mux.worker import register as register_sleep_mode

    register_sleep_mode()  # vLLM's extension point: the "vllm_mux" sleep-mode backend
