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

# Upstream symbols this patch replaces or relies on -> sha256 of their source.
# initialize_from_config asks for the "kv_cache" context; allocate_kv_cache
# makes the cache with one torch.zeros inside it; EngineCore.sleep pauses the
# scheduler and resets the prefix cache before the worker sleeps; the sleep-mode
# backend is resolved through Worker.sleep_mode_backend and the factory.
TARGETS = {
    "vllm.v1.worker.gpu_worker.Worker.load_model": "350a4fb01458c532",
    "vllm.v1.worker.gpu_worker.Worker._maybe_get_memory_pool_context": "c6dca1b30ec89d3e",
    "vllm.v1.worker.gpu_worker.Worker.initialize_from_config": "71b1fbd048077170",
    "vllm.v1.worker.gpu_worker.Worker.reload_weights": "2a950f95ebd5d37b",
    "vllm.v1.worker.gpu_worker.Worker._start_weight_update": "84cf0a02567c0eb8",
    "vllm.v1.worker.gpu_worker.Worker.finish_weight_update": "817e2efd3c4b6797",
    "vllm.v1.worker.gpu_worker.Worker.update_weights": "a7103b1a7759efe5",
    "vllm.v1.worker.gpu_worker.Worker.reset_weights": "64bdb53418d9f1bb",
    "vllm.v1.worker.gpu_worker.Worker.compute_weight_checksums": "7872b35e1b34766c",
    "vllm.v1.worker.gpu_worker.Worker.save_sharded_state": "f4dd7adac12e64fd",
    "vllm.v1.worker.gpu_worker.Worker.save_tensorized_model": "4cfc3c36a706e6ad",
    "vllm.v1.worker.utils.allocate_kv_cache": "b1f3e24311485a09",
    "vllm.v1.worker.cpu_worker.CPUWorker.determine_available_memory": "6307aefccd79f744",
    "vllm.v1.worker.cpu_worker.CPUWorker.sleep": "3f7858b3950b54cf",
    "vllm.v1.worker.cpu_worker.CPUWorker.wake_up": "93125d50e3a6c717",
    "vllm.v1.engine.core.EngineCore.sleep": "f08683c8b249ae7b",
    "vllm.device_allocator.sleep_mode_backend.SleepModeBackendFactory": "8ce0e2b60c9eb67e",
}


def apply() -> None:
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.v1.worker.cpu_worker import CPUWorker

    from vllm_mux import worker

    worker.install(CPUWorker)
    CPUWorker.determine_available_memory = worker.kv_cache_budget
