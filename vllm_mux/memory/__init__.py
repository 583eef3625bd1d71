"""The only code that touches a device's memory API.

A backend creates physical chunks (daemon side), passes them between processes
as file descriptors, reserves virtual ranges, maps a chunk at an address,
unmaps it, and makes a tensor over a mapped range. It knows nothing of vLLM.
Adding a device is adding one module here and one line to ``BACKENDS``.
"""

import importlib

BACKENDS = {
    "cpu": "vllm_mux.memory.cpu",
    "cuda": "vllm_mux.memory.cuda",
    "npu": "vllm_mux.memory.npu",
}

# One chunk is the unit of sharing: neither CUDA (cuMemMap at offset 0, no
# partial cuMemUnmap) nor CANN can map part of a physical allocation. Each
# chunk costs driver calls on every map and unmap; an instance loses at most
# one partly used chunk per arena to rounding. It must be a multiple of the
# device's granularity (2 MiB on CUDA, the page size on CPU). Defaults, by device:
# - cuda, 128 MiB: on an H200 (docs/benchmarks.md) a map costs ~60 us and an
#   unmap ~45 us per chunk whatever its size, so sleeping 16.4 GB took 22 ms
#   with 32 MiB chunks, 8.3 ms with 64, 4.2 ms with 128 (goal: 10 ms), and the
#   wake ran at 0.95, 0.98 and 0.99 of a plain copy; rounding costs at most
#   256 MiB an instance (1.5 % of an 8B model).
# - npu, 128 MiB: as cuda, since CANN maps and unmaps a chunk per driver call
#   as CUDA does; not measured on an NPU.
# - cpu, 32 MiB: a map is page-table work proportional to the bytes, so the
#   size matters little; small chunks let small test pools hold several models.
CHUNK_SIZES = {"cpu": 32 << 20, "cuda": 128 << 20, "npu": 128 << 20}


def default_chunk_size(device: str) -> int:
    """The daemon's chunk size for ``device`` ("cpu", "cuda:N", "npu:N")."""
    return CHUNK_SIZES[device.partition(":")[0]]


def backend(device: str):
    """The backend for ``device`` ("cpu", "cuda:N", "npu:N")."""
    kind, _, index = device.partition(":")
    if kind not in BACKENDS:
        raise ValueError(f"unknown device {device!r}; known: {', '.join(BACKENDS)}")
    module = importlib.import_module(BACKENDS[kind])
    return module.Backend(int(index or 0))
