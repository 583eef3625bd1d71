"""Put a CUDA worker's weights and KV cache in leased memory; sleep and wake.

Targets, on ``vllm.v1.worker.gpu_worker.Worker`` (the shared methods are in
``vllm_mux.worker``, installed here; this file keeps what differs on CUDA):
- ``_maybe_get_memory_pool_context``: upstream returns vLLM's cumem pool when
  sleep mode is on. Ours: "weights" is a torch ``MemPool`` whose allocator
  hands out weights-arena memory (``Instance.loading``), so weights load
  straight into leased memory, never twice on the device; "kv_cache" is the
  KV arena; "workspace" and "runtime" stay private. The CUDA graph pool stays
  private too (``use_cumem_cudagraph_pool`` is off for any backend but cumem):
  graphs are captured once and stay valid, since addresses never change.
- ``load_model``: upstream loads inside the weights context; then the host
  copy of the arena is taken (page-locked), after any tensor made outside
  the context is moved in.
- ``request_memory`` (``vllm.v1.worker.utils``, imported into ``gpu_worker``):
  upstream demands ``--gpu-memory-utilization`` of the whole device free at
  start, which fails against a pool the daemon already holds, and races with
  other instances starting at once. Ours checks that the device has this
  instance's private budget free (``VLLM_MUX_PRIVATE_MEMORY``, default 4 GiB:
  the CUDA context, activations, sampler buffers, CUDA graphs) and stops with
  a clear error when it has not.
- ``determine_available_memory``: upstream profiles with device-wide free
  memory, which other instances loading or sleeping at the same moment
  change (and asserts it never grew). Ours runs upstream's profile pass (it
  warms up and compiles), sizes the KV cache from the pool
  (``vllm_mux.worker.kv_cache_budget``) and logs this instance's private peak
  against its budget.
- ``sleep`` / ``wake_up``: upstream's dispatch to the sleep-mode backend, then
  assert that the device's free memory grew. Ours dispatches the same way (to
  the "vllm_mux" backend) without the assertion: our chunks stay allocated in
  the daemon, so a sleep frees nothing device-wide, and another instance may
  allocate meanwhile. Level 2's buffer saving is not needed: buffers live in
  the weights arena and come back from the host copy.
- the methods that touch the weights (``vllm_mux.worker.GUARDED``:
  ``reload_weights``, ``reset_weights``, the weight-transfer session,
  checksums, saving): refused while asleep, the host copy refreshed after an
  update; ``sleep`` refused during a weight-transfer session; ``load_model``
  refuses ``--enable-lora`` (adapters loaded later would not survive a sleep).
Upstream: the registry (RFC vllm#34303) covers sleep and wake; a sleep-mode
backend hook for the weights/KV allocation context and for memory accounting
(instead of device-wide free memory) would let this file shrink to nothing.
"""

import logging
import os

from vllm_mux.patches.worker_targets import SHARED_TARGETS

log = logging.getLogger("vllm_mux.patches.gpu_worker")

DEFAULT_PRIVATE_MEMORY = 4 << 30

# Upstream symbols this patch replaces or relies on -> sha256 of their source:
# those of the shared worker methods, and the CUDA worker's own.
TARGETS = {
    **SHARED_TARGETS,
    "vllm.v1.worker.gpu_worker.Worker.init_device": "a45cd75063bc712f",
    "vllm.v1.worker.gpu_worker.Worker.determine_available_memory": "0fc4b7b2fa1ab9bf",
    "vllm.v1.worker.gpu_worker.Worker.compile_or_warm_up_model": "4cc9795229ca9497",
    "vllm.v1.worker.gpu_worker.Worker.sleep": "cd3cfcc4bb557629",
    "vllm.v1.worker.gpu_worker.Worker.wake_up": "1ce62bedec359f9e",
    "vllm.v1.worker.gpu_worker.Worker.sleep_mode_backend.fget": "6069ca4f1bfcb14e",
    "vllm.v1.worker.utils.request_memory": "e004ea68b5e96869",
    "vllm.v1.worker.gpu_model_runner.GPUModelRunner.initialize_kv_cache_tensors": "81dd948e771ce8a5",  # noqa: E501
    "vllm.v1.worker.gpu.attn_utils.init_kv_cache": "955e085944fa68e8",
    "vllm.device_allocator.sleep_mode_backend.SleepModeBackend": "ddd6cade32789d89",
    "vllm.v1.worker.gpu_model_runner.GPUModelRunner.load_model": "9508e8f41530563d",
    "vllm.compilation.cudagraph_pool.capture_pool": "0b9fdf1b348faa37",
    "vllm.config.vllm.VllmConfig.use_cumem_cudagraph_pool.fget": "b5f29831d73778f2",
}


def private_budget() -> int:
    """This instance's device memory outside the pool, from VLLM_MUX_PRIVATE_MEMORY."""
    from vllm_mux.cli import parse_size

    text = os.environ.get("VLLM_MUX_PRIVATE_MEMORY")
    if not text:
        return DEFAULT_PRIVATE_MEMORY
    try:
        return parse_size(text)
    except Exception:
        raise ValueError(
            f"vllm-mux: VLLM_MUX_PRIVATE_MEMORY={text!r} is not a size (try 4GiB)"
        ) from None


def request_memory(init_snapshot, cache_config, external_weight_memory: int = 0) -> int:
    """Check that the device holds this instance's private budget beside the
    pool; return the budget (upstream's ``requested_memory``)."""
    budget = private_budget()
    free = init_snapshot.free_memory
    if free < budget:
        raise ValueError(
            f"vllm-mux: {init_snapshot.device_} has {free / 2**30:.2f} GiB free beside the "
            f"daemon's pool and the other instances, and this instance needs "
            f"{budget / 2**30:.2f} GiB of private memory (VLLM_MUX_PRIVATE_MEMORY) for its "
            "CUDA context, activations, sampler buffers and CUDA graphs. Start the daemon "
            "with a smaller --device-memory (the pool is the device's memory minus every "
            "instance's private budget), or lower VLLM_MUX_PRIVATE_MEMORY"
        )
    return budget


def apply() -> None:
    from vllm.platforms import current_platform

    if not current_platform.is_cuda():
        return
    import torch
    from vllm.config import set_current_vllm_config
    from vllm.v1.worker import gpu_worker
    from vllm.v1.worker.gpu_worker import Worker

    from vllm_mux import worker

    worker.install(Worker)
    gpu_worker.request_memory = request_memory

    @torch.inference_mode()
    def determine_available_memory(self) -> int:
        mux = worker.instance(self)
        budget = worker.kv_cache_budget(self)
        torch.cuda.reset_peak_memory_stats(self.device)
        with set_current_vllm_config(self.vllm_config):
            self.model_runner.profile_run(randomize_inputs=self.randomize_dummy_inputs)
        # torch counts the weights' MemPool segments as its own; they are the pool's.
        private = torch.cuda.max_memory_reserved(self.device) - mux.heap.live_bytes
        (log.warning if private > self.requested_memory else log.info)(
            "vllm-mux: private device memory at the profile's peak %.2f GiB (torch's, "
            "without the CUDA context and graphs) of a %.2f GiB budget; KV cache %.2f GiB "
            "from the pool",
            private / 2**30,
            self.requested_memory / 2**30,
            budget / 2**30,
        )
        return gpu_worker.reserve_mm_ipc_gpu_memory(
            budget,
            self.model_config.multimodal_config,
            getattr(self.parallel_config, "_api_process_count", 1),
        )

    Worker.determine_available_memory = determine_available_memory
