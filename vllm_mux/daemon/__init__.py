"""The daemon: owns a device's memory pool and leases chunks to instances."""

import os


def default_socket() -> str:
    """Where the daemon listens unless told otherwise."""
    if path := os.environ.get("VLLM_MUX_SOCKET"):
        return path
    runtime = os.environ.get("XDG_RUNTIME_DIR") or "/tmp"
    return os.path.join(runtime, f"vllm-mux-{os.getuid()}.sock")
