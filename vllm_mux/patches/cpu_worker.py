"""Put a CPU worker's weights and KV cache in leased memory; sleep and wake.

Targets, all on ``vllm.v1.worker.cpu_worker.CPUWorker``:
- ``load_model`` (inherited from ``vllm.v1.worker.gpu_worker.Worker``): after
  upstream loads the model, its parameters and buffers move into the weights
  arena (``vllm_mux.instance.Instance.adopt_weights``). Upstream's
  ``_maybe_get_memory_pool_context("weights")`` cannot do this on CPU: torch
  has no pluggable CPU allocator, and loading makes temporaries that must not
  land in leased memory.
- ``_maybe_get_memory_pool_context`` (from ``Worker``): upstream returns a null
  context on CPU; for the "kv_cache" tag we return the instance's arena
  allocation context, so vLLM's one ``torch.zeros`` for the KV cache
  (``vllm.v1.worker.utils.allocate_kv_cache``) lands in leased memory.
- ``determine_available_memory``: upstream sizes the KV cache from the host's
  free memory and this process's RSS, which several instances starting at once
  mis-measure (vllm#10533, vllm-ascend#5917). Here the figure comes from the
  pool: an explicit ``--kv-cache-memory-bytes`` / ``VLLM_CPU_KVCACHE_SPACE``
  as upstream, else ``--gpu-memory-utilization`` of the daemon's pool minus
  this instance's weights.
- ``sleep`` / ``wake_up``: upstream's are no-ops with a warning on CPU.
  Sleep (any level) unmaps both arenas and returns every chunk; level 2 is
  served like level 1 because the host copy of the weights exists anyway.
  Wake leases chunks, maps them at the same addresses and copies the weights
  in. The engine core pauses scheduling and resets the prefix cache around
  these calls, as upstream does for every platform. Sleep also parks this
  process's message-queue readers (``idle_spin``).
Upstream: vLLM's sleep-mode backend registry (RFC vllm#34303,
``vllm.device_allocator.sleep_mode_backend``) is only reached from
``Worker.sleep``, which ``CPUWorker`` overrides; once CPU workers dispatch to
it and CPU model runners take an allocation context for weights, this patch
becomes a registered backend.
"""

import os

# Upstream symbols this patch replaces or relies on -> sha256 of their source.
# initialize_from_config asks for the "kv_cache" context; allocate_kv_cache
# makes the cache with one torch.zeros inside it; EngineCore.sleep pauses the
# scheduler and resets the prefix cache before the worker sleeps.
TARGETS = {
    "vllm.v1.worker.gpu_worker.Worker.load_model": "350a4fb01458c532",
    "vllm.v1.worker.gpu_worker.Worker._maybe_get_memory_pool_context": "c6dca1b30ec89d3e",
    "vllm.v1.worker.gpu_worker.Worker.initialize_from_config": "71b1fbd048077170",
    "vllm.v1.worker.utils.allocate_kv_cache": "b1f3e24311485a09",
    "vllm.v1.worker.cpu_worker.CPUWorker.determine_available_memory": "6307aefccd79f744",
    "vllm.v1.worker.cpu_worker.CPUWorker.sleep": "3f7858b3950b54cf",
    "vllm.v1.worker.cpu_worker.CPUWorker.wake_up": "93125d50e3a6c717",
    "vllm.v1.engine.core.EngineCore.sleep": "f08683c8b249ae7b",
}


def _instance(worker):
    """The worker's standing with the daemon, made on first use."""
    from vllm_mux.instance import Instance

    if getattr(worker, "_mux", None) is None:
        model = worker.vllm_config.model_config.served_model_name
        if isinstance(model, list):
            model = model[0]
        key = os.environ.get("VLLM_MUX_INSTANCE", "")
        worker._mux = Instance(os.environ["VLLM_MUX_SOCKET"], str(model), key)
    return worker._mux


def apply() -> None:
    from contextlib import nullcontext

    from vllm.v1.worker.cpu_worker import CPUWorker

    from vllm_mux.patches import idle_spin

    upstream_load_model = CPUWorker.load_model

    def load_model(self, *, load_dummy_weights: bool = False) -> None:
        upstream_load_model(self, load_dummy_weights=load_dummy_weights)
        model = self.model_runner.get_model()
        tensors = [*model.parameters(), *model.buffers()]
        _instance(self).adopt_weights(tensors)

    def _maybe_get_memory_pool_context(self, tag: str):
        if tag == "kv_cache":
            return _instance(self).allocations()
        return nullcontext()

    def determine_available_memory(self) -> int:
        mux = _instance(self)
        explicit = self.cache_config.kv_cache_memory_bytes
        if explicit is not None:
            return explicit
        pool = mux.weights.capacity
        budget = int(self.cache_config.gpu_memory_utilization * pool) - mux.weights.mapped
        if budget <= 0:
            raise ValueError(
                f"vllm-mux: the daemon's pool ({pool / 2**30:.2f} GiB) leaves no room for a "
                f"KV cache after this model's weights ({mux.weights.mapped / 2**30:.2f} GiB) "
                f"at --gpu-memory-utilization {self.cache_config.gpu_memory_utilization}; "
                "start the daemon with a larger --device-memory"
            )
        return budget

    def sleep(self, level: int = 1) -> None:
        _instance(self).sleep()
        idle_spin.park(True)  # see idle_spin: stop spinning on the shared core

    def wake_up(self, tags: list[str] | None = None) -> None:
        idle_spin.park(False)
        _instance(self).wake()

    def mux_tensor_addresses(self) -> dict:
        """Addresses of every weight and KV-cache tensor, for
        ``/collective_rpc`` (dev mode): they must never change across sleeps."""
        model = self.model_runner.get_model()
        named = [*model.named_parameters(), *model.named_buffers()]
        return {
            "weights": {name: t.data_ptr() for name, t in named if t.numel()},
            "kv_cache": [t.data_ptr() for t in self.model_runner.kv_caches],
            "arenas": {
                "weights": [self._mux.weights.base, self._mux.weights.capacity],
                "kv_cache": [self._mux.kv_cache.base, self._mux.kv_cache.capacity],
            },
        }

    def mux_plain_copy(self) -> float:
        """A plain copy of the weights' bytes from the same host buffer, for
        ``vllm-mux bench`` to set beside the wake it just measured."""
        return _instance(self).plain_copy()

    CPUWorker.mux_tensor_addresses = mux_tensor_addresses
    CPUWorker.mux_plain_copy = mux_plain_copy
    CPUWorker.load_model = load_model
    CPUWorker._maybe_get_memory_pool_context = _maybe_get_memory_pool_context
    CPUWorker.determine_available_memory = determine_available_memory
    CPUWorker.sleep = sleep
    CPUWorker.wake_up = wake_up
