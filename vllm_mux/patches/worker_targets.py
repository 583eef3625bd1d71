"""The upstream symbols ``vllm_mux.worker``'s shared methods wrap or rely on,
for every platform's worker patch to check (``tools/check_upstream.py``).

``initialize_from_config`` asks for the "kv_cache" context; ``allocate_kv_cache``
makes the cache with one ``torch.zeros`` inside it; ``EngineCore.sleep``
pauses the scheduler and resets the prefix cache before the worker sleeps; the
sleep-mode backend is resolved through the factory; a cold wake reloads the
weights in place with the model runner's ``reload_weights`` (upstream's
``reload.inplace.reload_weights``), and only where ``get_model_loader`` gives a
loader that can read them again; the rest are the methods the shared code
wraps (``vllm_mux.worker.install`` and ``GUARDED``). Not a patch itself: it
patches nothing.
"""

SHARED_TARGETS = {
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
    "vllm.v1.engine.core.EngineCore.sleep": "f08683c8b249ae7b",
    "vllm.device_allocator.sleep_mode_backend.SleepModeBackendFactory": "8ce0e2b60c9eb67e",
    "vllm.v1.worker.gpu_model_runner.GPUModelRunner.reload_weights": "7e23f006519c4f4c",
    "vllm.model_executor.model_loader.reload.inplace.reload_weights": "0beb9dbe9b2580c0",
    "vllm.model_executor.model_loader.get_model_loader": "4647727e736016e9",
}
