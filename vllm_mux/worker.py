"""A vLLM worker's side of vllm-mux, the same on every platform.

The per-platform patches (``patches/cpu_worker.py``, ``patches/gpu_worker.py``)
install these functions on their worker class and add only what differs. What
is shared:
- the instance (``vllm_mux.instance.Instance``): made on first use, it joins
  the daemon and holds the two arenas;
- ``_maybe_get_memory_pool_context``: upstream asks for a context per tag;
  "weights" loads into the weights arena (straight away where the backend has
  a pluggable allocator), "kv_cache" allocates the KV cache in its arena, any
  other tag ("workspace", "runtime") stays in private memory;
- ``load_model``: upstream loads, then every parameter and buffer is made to
  live in the weights arena and one host copy is kept;
- the KV cache's size, from the pool rather than the device's free memory;
- ``sleep`` / ``wake_up`` through vLLM's sleep-mode backend registry: the
  plugin registers ``SleepMode`` as "vllm_mux" and the instance selects it;
- weight updates and other touches of the weights: refused while asleep (the
  arenas are unmapped), the host copy refreshed after an update, so a wake
  never restores stale weights; no sleep in the middle of an update session.
"""

import contextlib
import logging
import os

from vllm.device_allocator.sleep_mode_backend import SleepModeBackend

log = logging.getLogger("vllm_mux.worker")

SLEEP_MODE_BACKEND = "vllm_mux"

_instance = None  # this process's Instance: one worker per process


def instance(worker):
    """The worker's standing with the daemon, made on first use."""
    global _instance
    from vllm_mux.instance import Instance

    if _instance is None:
        model = worker.vllm_config.model_config.served_model_name
        if isinstance(model, list):
            model = model[0]
        key = os.environ.get("VLLM_MUX_INSTANCE", "")
        device = getattr(worker, "device", None)
        index = device.index if getattr(device, "type", "cpu") != "cpu" else None
        # The private budget the GPU patch checked at start (its request_memory).
        private = getattr(worker, "requested_memory", 0) if index is not None else 0
        _instance = Instance(os.environ["VLLM_MUX_SOCKET"], str(model), key, index, private)
        # Worker.sleep_mode_backend resolves this name lazily, on the first sleep.
        worker.vllm_config.model_config.sleep_mode_backend = SLEEP_MODE_BACKEND
    return _instance


class SleepMode(SleepModeBackend):
    """vLLM's sleep-mode backend "vllm_mux": unmap both arenas and hand every
    chunk back to the daemon; wake maps chunks at the same addresses and
    copies the weights in from the host copy.

    Any level is served as level 1: the host copy exists anyway, and level 2's
    reload from disk would be slower than the copy. ``tags`` cannot wake the
    weights without the KV cache: one lease maps both (two leases could each
    hold half of what two waking instances need).
    """

    def suspend(self, level: int = 1) -> None:
        self._state = "SUSPENDED"
        _instance.sleep()

    def resume(self, tags: list[str] | None = None) -> None:
        self._state = "RESUMING"
        _instance.wake()
        self._state = "RUNNING"

    @classmethod
    def preserves_communicators(cls) -> bool:
        return True  # nothing but the two arenas is touched

    @classmethod
    def preserves_compiled_artifacts(cls) -> bool:
        return True  # addresses never change: graphs and compiled code stay valid


def register() -> None:
    """Make "vllm_mux" a sleep-mode backend vLLM can resolve (once per process)."""
    from vllm.device_allocator.sleep_mode_backend import SleepModeBackendFactory

    if SLEEP_MODE_BACKEND not in SleepModeBackendFactory._registry:
        SleepModeBackendFactory.register_backend(SLEEP_MODE_BACKEND, __name__, "SleepMode")


def model_tensors(worker) -> tuple[list, list]:
    """Every parameter and buffer of the model and of a draft model, if any;
    and the buffers alone (what a reload from the files does not restore)."""
    tensors, buffers = [], []
    for model in (worker.model_runner.get_model(), worker.get_draft_model()):
        if model is not None:
            tensors += [*model.parameters(), *model.buffers()]
            buffers += list(model.buffers())
    return tensors, buffers


def _reloadable(worker, dummy: bool) -> bool:
    """Whether vLLM's in-place reload can read this model's weights again
    (``reload_weights`` needs a loader with ``get_all_weights``: not the dummy
    one, not a tensorizer or sharded-state file)."""
    from vllm.model_executor.model_loader import get_model_loader

    loader = get_model_loader(worker.vllm_config.load_config)
    return not dummy and hasattr(loader, "get_all_weights") and worker.get_draft_model() is None


def reload_from_files(worker):
    """What a cold wake runs: vLLM's own in-place reload of the weights from
    the model's files (``model_runner.reload_weights``, the one behind
    ``/reload_weights``), into the tensors where they already live."""

    def reload() -> None:
        worker.model_runner.reload_weights()

    return reload


def kv_cache_budget(worker) -> int:
    """Bytes for the KV cache: an explicit ``--kv-cache-memory-bytes`` as
    upstream, else ``--gpu-memory-utilization`` of the daemon's pool minus this
    instance's weights. The pool, not the device's free memory, which several
    instances starting at once mis-measure (vllm#10533, vllm-ascend#7308)."""
    mux = instance(worker)
    explicit = worker.cache_config.kv_cache_memory_bytes
    if explicit is not None:
        return explicit
    pool = mux.weights.capacity
    util = worker.cache_config.gpu_memory_utilization
    budget = int(util * pool) - mux.weights.mapped
    if budget <= 0:
        raise ValueError(
            f"vllm-mux: the daemon's pool ({pool / 2**30:.2f} GiB) leaves no room for a "
            f"KV cache after this model's weights ({mux.weights.mapped / 2**30:.2f} GiB) "
            f"at --gpu-memory-utilization {util}; start the daemon with a larger "
            "--device-memory"
        )
    return budget


# Worker methods that read or write the weights (or other device memory):
# refused while asleep, when nothing is mapped (on CUDA a touch kills the
# context), and, where they change the weights, followed by a refresh of the
# host copy so that a wake never restores stale bytes.
GUARDED = {
    "reload_weights": True,
    "reset_weights": True,  # /weight_checker action=reset zeroes them
    "_start_weight_update": False,
    "update_weights": False,
    "finish_weight_update": True,
    "compute_weight_checksums": False,
    "save_sharded_state": False,
    "save_tensorized_model": False,
}


def install(cls) -> None:
    """Install the shared methods on ``cls`` (CPUWorker, or Worker on CUDA),
    wrapping the upstream methods it has now."""
    upstream = {name: getattr(cls, name) for name in ("load_model", *GUARDED)}

    def load_model(self, *, load_dummy_weights: bool = False) -> None:
        if self.lora_config is not None:
            raise ValueError(
                "vllm-mux: --enable-lora is not supported yet: LoRA slots live beside the "
                "weights in leased memory, and adapters loaded after start would not "
                "survive a sleep; run this model without the daemon (unset VLLM_MUX_SOCKET)"
            )
        upstream["load_model"](self, load_dummy_weights=load_dummy_weights)
        mux = instance(self)
        mux.reload = reload_from_files(self) if _reloadable(self, load_dummy_weights) else None
        mux.adopt_weights(*model_tensors(self))

    def _maybe_get_memory_pool_context(self, tag: str):
        if tag == "weights":
            return instance(self).loading()
        if tag == "kv_cache":
            return instance(self).allocations()
        return contextlib.nullcontext()

    def sleep(self, level: int = 1) -> None:
        from vllm_mux.patches import idle_spin

        instance(self)
        if self._weight_update_active:
            raise RuntimeError(
                "vllm-mux: not sleeping in the middle of a weight update "
                "(start_weight_update ... finish_weight_update): finish it first"
            )
        self.sleep_mode_backend.suspend(level)
        idle_spin.park(True)  # see idle_spin: stop spinning while asleep

    def wake_up(self, tags: list[str] | None = None) -> None:
        from vllm_mux.patches import idle_spin

        instance(self)
        idle_spin.park(False)
        self.sleep_mode_backend.resume(tags)

    def guarded(name: str, refresh: bool):
        def method(self, *args, **kwargs):
            _refuse_while_asleep(self, name.lstrip("_"))
            try:
                return upstream[name](self, *args, **kwargs)
            finally:  # even one that failed half way may have written some weights
                if refresh:
                    instance(self).refresh_weights(*model_tensors(self))

        method.__name__ = name
        return method

    def mux_tensor_addresses(self) -> dict:
        """Addresses of every weight and KV-cache tensor, for
        ``/collective_rpc`` (dev mode): they must never change across sleeps."""
        mux = instance(self)
        model = self.model_runner.get_model()
        named = [*model.named_parameters(), *model.named_buffers()]
        return {
            "weights": {name: t.data_ptr() for name, t in named if t.numel()},
            "kv_cache": [t.data_ptr() for t in getattr(self.model_runner, "kv_caches", [])],
            "arenas": {
                "weights": [mux.weights.base, mux.weights.capacity],
                "kv_cache": [mux.kv_cache.base, mux.kv_cache.capacity],
            },
        }

    def mux_kv_intact(self) -> bool:
        """Whether the last wake got every KV-cache chunk back untouched:
        then the prefix cache survived the sleep (patches/engine_core.py)."""
        return _instance is not None and _instance.kv_intact

    def mux_drop_host(self) -> bool:
        """The daemon needs the host copy's memory: let it go if asleep."""
        return _instance is not None and _instance.drop_host()

    def mux_plain_copy(self) -> float:
        """A plain copy of the weights' bytes from the same host buffer, for
        ``vllm-mux bench`` to set beside the wake it just measured. Its scratch
        memory goes back at once: this is reachable through dev mode."""
        import torch

        seconds = instance(self).plain_copy()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return seconds

    methods = [load_model, _maybe_get_memory_pool_context, sleep, wake_up]
    methods += [guarded(name, refresh) for name, refresh in GUARDED.items()]
    for fn in (*methods, mux_tensor_addresses, mux_kv_intact, mux_drop_host, mux_plain_copy):
        setattr(cls, fn.__name__, fn)


def _refuse_while_asleep(worker, what: str) -> None:
    if instance(worker).asleep:
        raise RuntimeError(
            f"vllm-mux: {what} refused: this instance is asleep and its weights are not "
            "mapped; send it a request (or POST /wake_up) first"
        )
