"""The only code that touches a device's memory API.

A backend creates physical chunks (daemon side), passes them between processes
as file descriptors, reserves virtual ranges, maps a chunk at an address,
unmaps it, and makes a tensor over a mapped range. It knows nothing of vLLM.
Adding a device is adding one module here and one line to ``BACKENDS``.
"""

import importlib

BACKENDS = {"cpu": "vllm_mux.memory.cpu", "cuda": "vllm_mux.memory.cuda"}

# One chunk is the unit of sharing: neither CUDA (cuMemMap at offset 0, no
# partial cuMemUnmap) nor CANN can map part of a physical allocation. 32 MiB
# means 32 map calls per GiB (a few ms of driver calls per GiB on CUDA) while an
# instance loses at most one partly used chunk per arena to rounding (< 0.5 % of
# an 8B model's 16 GB). Smaller chunks waste less but cost more calls and
# longer fd lists; larger ones the opposite. It must be a multiple of the
# device's granularity (2 MiB on CUDA, the page size on CPU).
DEFAULT_CHUNK_SIZE = 32 << 20


def backend(device: str):
    """The backend for ``device`` ("cpu", "cuda" or "cuda:N")."""
    kind, _, index = device.partition(":")
    if kind not in BACKENDS:
        raise ValueError(f"unknown device {device!r}; known: {', '.join(BACKENDS)}")
    module = importlib.import_module(BACKENDS[kind])
    return module.Backend(int(index or 0))
