"""Put a CPU worker's weights and KV cache in leased memory; sleep and wake.

Targets, on ``vllm.v1.worker.cpu_worker.CPUWorker`` (the shared methods are
in ``vllm_mux.worker``, installed here; this file keeps what differs on CPU):
- ``load_model`` (inherited from ``vllm.v1.worker.gpu_worker.Worker``): after
  upstream loads the model, its parameters and buffers move into the weights
  arena (``Instance.adopt_weights``). Upstream's weights context cannot load
  them there: torch has no pluggable CPU allocator.
- ``_maybe_get_memory_pool_context`` (from ``Worker``): upstream returns a null
  context on CPU; the "kv_cache" tag gets the instance's arena allocation
  context, so vLLM's one ``torch.zeros`` for the KV cache
  (``vllm.v1.worker.utils.allocate_kv_cache``) lands in leased memory.
- ``determine_available_memory``: upstream sizes the KV cache from the host's
  free memory and this process's RSS, which several instances starting at once
  mis-measure (vllm#10533, vllm-ascend#5917); here it comes from the pool
  (``vllm_mux.worker.kv_cache_budget``).
- ``sleep`` / ``wake_up``: upstream's are no-ops with a warning on CPU. Here
  they dispatch to vLLM's sleep-mode backend registry, as ``Worker.sleep``
  does on GPU, which resolves our "vllm_mux" backend. The engine core pauses
  scheduling and resets the prefix cache around these calls, as upstream does
  for every platform.
- the methods that touch the weights (``vllm_mux.worker.GUARDED``, from
  ``Worker``): refused while asleep, the host copy refreshed after an update;
  ``--enable-lora`` refused at load.
Upstream: once ``CPUWorker`` dispatches sleep to the backend registry (RFC
vllm#34303) and CPU model runners take an allocation context for weights,
this patch shrinks to the KV-cache size.
"""

from vllm_mux.patches.worker_targets import SHARED_TARGETS

# Upstream symbols this patch replaces or relies on -> sha256 of their source:
# those of the shared worker methods, and CPUWorker's own.
TARGETS = {
    **SHARED_TARGETS,
    "vllm.v1.worker.cpu_worker.CPUWorker.determine_available_memory": "6307aefccd79f744",
    "vllm.v1.worker.cpu_worker.CPUWorker.sleep": "3f7858b3950b54cf",
    "vllm.v1.worker.cpu_worker.CPUWorker.wake_up": "93125d50e3a6c717",
}


def apply() -> None:
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.v1.worker.cpu_worker import CPUWorker

    from vllm_mux import worker

    worker.install(CPUWorker)
    CPUWorker.determine_available_memory = worker.kv_cache_budget
