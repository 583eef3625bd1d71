"""Put an Ascend NPU worker's weights and KV cache in leased memory; sleep and wake.

Written against vllm-ascend 0.23.0.post1 on vLLM 0.23.0 (torch 2.10.0,
torch-npu 2.10.0.post4, CANN 9.1) from their sources; never run on an NPU.
Only ``apply`` touches vllm-ascend, and only on the NPU platform: elsewhere
this module imports neither vllm_ascend nor torch_npu.

Targets, on ``vllm_ascend.worker.worker.NPUWorker`` (a ``WorkerBase``, not
vLLM's ``gpu_worker.Worker``: ``vllm_mux.worker``'s shared methods do not
fit it, and that module needs vLLM 0.32's sleep-mode backend registry,
``vllm.device_allocator.sleep_mode_backend``, which vLLM 0.23 does not have;
what this file shares with it is ``Instance`` and the budget arithmetic):
- ``load_model``: upstream loads inside ``CaMemAllocator.use_memory_pool
  ("weights")`` under sleep mode (its own pluggable allocator, one instance
  per process, a CPU backup at sleep). Ours loads inside
  ``Instance.loading()`` instead, as on CUDA: torch_npu has the same
  pluggable allocator and ``MemPool`` as torch.cuda, so the weights land in
  leased memory as they are made, never twice on the card (an NPU has no
  room for a second copy beside the pool). Then ``Instance.adopt_weights``
  moves in whatever was made outside the pool (and, if the memory backend
  cannot route allocations, everything) and takes the host copy. Before
  that, weights in a private NPU format are refused (see NZ below).
- ``_init_device``: upstream raises when the card's free memory is below
  ``total x --gpu-memory-utilization``, which fails against a pool the
  daemon already holds and races with other instances starting at once
  (vllm-ascend#7308, #5917). Ours runs upstream's with that one check
  disarmed (the utilization shadowed by a tiny value for the call, restored
  after), then checks that the card has this instance's private budget free
  (``VLLM_MUX_PRIVATE_MEMORY``, default 4 GiB: the ACL context, HCCL
  buffers, activations, ACL graphs) and keeps it as ``requested_memory``.
- ``determine_available_memory``: upstream profiles against device-wide free
  memory, which other instances loading or sleeping change (#5917: two
  instances on one card get zero or negative KV memory), and asserts it
  never grew. Ours runs upstream's ``profile_run`` (it compiles and warms
  up, as upstream's own ``--kv-cache-memory`` path does) and sizes the KV
  cache from the pool (``kv_cache_budget``). It sets no
  ``peak_activation_memory``, so ``compile_or_warm_up_model`` skips its
  device-wide suggestion.
- ``initialize_from_config``: upstream opens ``CaMemAllocator.use_memory_pool
  ("kv_cache")`` around the whole ``initialize_kv_cache`` (attention
  builders' buffers and the input batch included). Ours runs the same steps
  without it, and ``NPUModelRunner._allocate_kv_cache_tensors`` (the
  ``torch.zeros`` of each raw KV tensor) runs inside
  ``Instance.allocations()``: the KV cache, and only it, lands in the KV
  arena, as vLLM 0.32's ``kv_cache_allocation_context`` does on CUDA.
- ``sleep`` / ``wake_up``: upstream's go through ``CaMemAllocator`` (acl
  memcpy of the weights to the host, unmap; refused in weight NZ mode) and
  assert that the card's free memory grew. Ours: ``Instance.sleep`` (unmap,
  every chunk back to the daemon, no copy) and ``Instance.wake`` (lease, map
  at the same addresses, copy in from the host copy); no assertion (our
  chunks stay allocated in the daemon). Any level is served as level 1.
  Upstream's wake re-transposes unquantized MoE ``w2``/``w13`` parameters,
  for weights reloaded in checkpoint layout after a level-2 sleep; ours
  restores the same bytes under the same tensors, so it does not apply.
  ``enable_sleep_mode_extra_cleanup`` (graph recapture) is not run: graphs
  stay valid since addresses never change.
- ``start_weight_update`` / ``update_weights`` / ``finish_weight_update``:
  refused while asleep; the host copy refreshed after ``finish``; no sleep
  in the middle of an update. ``--enable-lora`` is refused at load, as on
  CUDA.
NZ: vllm-ascend casts weights to ``ACL_FORMAT_FRACTAL_NZ``
(``torch_npu.npu_format_cast(w, 29)``) in ``maybe_trans_nz`` when
``weight_nz_mode`` (``--additional-config weight_nz_mode``, else
``VLLM_ASCEND_ENABLE_NZ``, default 1) says so: mode 2 for BF16/FP16, mode
1 or 2 for quantized weights, always on 310P; MLA and some quantization
methods cast unconditionally. An NZ tensor's storage is tiled and padded,
not its elements in order: a byte copy into a plain (ND) view of leased
memory, which is what ``adopt_weights`` does, would break it, and nothing
here has checked NZ tensors across a sleep. So ``load_model`` refuses a
configuration that asks for NZ weights before loading, and after loading
any weight whose ``torch_npu.get_npu_format`` is not a base format
(``refuse_formats``), with a message saying how to turn NZ off.
Upstream: vllm-ascend#7308 and #5917 (KV memory from device-wide free
memory); an allocation-context hook for weights and KV (as vLLM's
``_maybe_get_memory_pool_context``) and memory accounting from the
allocator rather than the card in ``NPUWorker``, plus vLLM's sleep-mode
backend registry (RFC vllm#34303) in a vllm-ascend release, would shrink
this file to the NZ check.
"""

import contextlib
import logging
import os

from vllm_mux.patches.gpu_worker import private_budget

log = logging.getLogger("vllm_mux.patches.npu_worker")

_W = "vllm_ascend.worker.worker.NPUWorker"
_R = "vllm_ascend.worker.model_runner_v1.NPUModelRunner"
# Upstream symbols this patch replaces or relies on -> sha256 of their source
# in vllm-ascend 0.23.0.post1 and vLLM 0.23.0 (read from their sources by
# tools/check_upstream.py --platform npu: vllm_ascend cannot be imported
# without an NPU).
TARGETS = {
    f"{_W}.load_model": "1ce28f3899d4d58c",
    f"{_W}._init_device": "2c08e979f1e4bac1",
    f"{_W}.init_device": "bf0237b41c5854a4",
    f"{_W}.determine_available_memory": "8bf3fefc5f168587",
    f"{_W}.compile_or_warm_up_model": "2700863c78719db3",
    f"{_W}.initialize_from_config": "3aab6b2b527daf1b",
    f"{_W}.sleep": "a667a1b81187eb0f",
    f"{_W}.wake_up": "806a0b5bb0fe4398",
    f"{_W}.start_weight_update": "1a153281f18b4730",
    f"{_W}.update_weights": "22babd05b4e8fc18",
    f"{_W}.finish_weight_update": "51fc702e1d519f50",
    f"{_R}.load_model": "4e0666c1af9365d4",
    f"{_R}.get_model": "2fee359721f7398a",
    f"{_R}.initialize_kv_cache": "099b6fb78a9c0876",
    f"{_R}.initialize_kv_cache_tensors": "90daef4389e70eab",
    f"{_R}._allocate_kv_cache_tensors": "0bd60f178ec26ae7",
    "vllm_ascend.utils._should_trans_nz": "b680e7de7006f1b4",
    "vllm_ascend.utils.maybe_trans_nz": "d1d159752b7acbf0",
    "vllm_ascend.platform.NPUPlatform.is_sleep_mode_available": "f6b422380b7c7b6a",
    "vllm.v1.engine.core.EngineCore.sleep": "4a9d9c07cb53dde2",
}

# torch_npu.npu._format.Format: the base formats, whose storage holds the
# tensor's elements in order (what a byte copy and a plain view preserve).
BASE_FORMATS = {0: "NCHW", 1: "NHWC", 2: "ND", 30: "NCDHW"}
# FRACTAL_NZ (ACL_FORMAT_FRACTAL_NZ) and its C0 variants.
NZ_FORMATS = {29, 50, 51, 52, 53, 54}

NZ_ADVICE = (
    "turn vllm-ascend's weight NZ mode off with --additional-config "
    "'{\"weight_nz_mode\": 0}' (or VLLM_ASCEND_ENABLE_NZ=0), or run this model without "
    "the daemon (unset VLLM_MUX_SOCKET)"
)

_instance = None  # this process's Instance: one worker per process


def nz_config_refusal(weight_nz_mode: int, quantized: bool, is_310p: bool) -> str | None:
    """Why vllm-ascend would cast this model's weights to FRACTAL_NZ at load
    (``vllm_ascend.utils._should_trans_nz``), or None if its config does not
    ask for it. Layers that cast unconditionally are caught after loading
    (``refuse_formats``)."""
    if is_310p:
        why = "vllm-ascend casts weights to FRACTAL_NZ on Atlas 300I (310P) whatever the mode"
        return f"vllm-mux: {why}; vllm-mux cannot hold NZ weights in leased memory"
    if weight_nz_mode == 2:
        why = "weight_nz_mode=2 casts BF16/FP16 and quantized weights to FRACTAL_NZ"
    elif weight_nz_mode and quantized:
        why = (
            f"weight_nz_mode={weight_nz_mode} (the default is 1) casts quantized weights "
            "to FRACTAL_NZ"
        )
    else:
        return None
    return (
        f"vllm-mux: {why}, whose storage is tiled and padded rather than the elements in "
        f"order: a byte copy into a plain view of leased memory would break them. To run "
        f"this model under vllm-mux, {NZ_ADVICE}"
    )


def refuse_formats(formats: dict[str, int]) -> None:
    """Raise if any weight (name -> its ``torch_npu.get_npu_format``) is not
    in a base format; NZ ones are named as such."""
    odd = {name: f for name, f in formats.items() if int(f) not in BASE_FORMATS}
    if not odd:
        return
    nz = [name for name, f in odd.items() if int(f) in NZ_FORMATS]
    shown = ", ".join(f"{name} (format {int(odd[name])})" for name in list(odd)[:5])
    more = f" and {len(odd) - 5} more" if len(odd) > 5 else ""
    what = "in FRACTAL_NZ format" if len(nz) == len(odd) else "in a private NPU format"
    raise ValueError(
        f"vllm-mux: {len(odd)} weights are {what}: {shown}{more}. Their storage is not "
        f"their elements in order, so a byte copy into a plain view of leased memory would "
        f"break them; to run this model under vllm-mux, {NZ_ADVICE}"
    )


def kv_cache_budget(
    pool_bytes: int, weights_bytes: int, utilization: float, explicit: int | None = None
) -> int:
    """Bytes for the KV cache: an explicit ``--kv-cache-memory-bytes`` as
    upstream, else ``--gpu-memory-utilization`` of the daemon's pool minus
    this instance's weights: the pool, not the card's free memory, which
    other instances change (vllm-ascend#7308, #5917). The same arithmetic as
    ``vllm_mux.worker.kv_cache_budget``."""
    if explicit is not None:
        return explicit
    budget = int(utilization * pool_bytes) - weights_bytes
    if budget <= 0:
        raise ValueError(
            f"vllm-mux: the daemon's pool ({pool_bytes / 2**30:.2f} GiB) leaves no room for a "
            f"KV cache after this model's weights ({weights_bytes / 2**30:.2f} GiB) at "
            f"--gpu-memory-utilization {utilization}; start the daemon with a larger "
            "--device-memory"
        )
    return budget


def check_private(free: int, budget: int, device: str) -> int:
    """The card must have this instance's private budget free beside the pool."""
    if free < budget:
        raise ValueError(
            f"vllm-mux: {device} has {free / 2**30:.2f} GiB free beside the daemon's pool "
            f"and the other instances, and this instance needs {budget / 2**30:.2f} GiB of "
            "private memory (VLLM_MUX_PRIVATE_MEMORY) for its ACL context, HCCL buffers, "
            "activations and ACL graphs. Start the daemon with a smaller --device-memory, "
            "or lower VLLM_MUX_PRIVATE_MEMORY"
        )
    return budget


def instance(worker):
    """The worker's standing with the daemon, made on first use."""
    global _instance
    from vllm_mux.instance import Instance

    if _instance is None:
        model = worker.vllm_config.model_config.served_model_name
        if isinstance(model, list):
            model = model[0]
        key = os.environ.get("VLLM_MUX_INSTANCE", "")
        private = int(getattr(worker, "requested_memory", 0))
        _instance = Instance(
            os.environ["VLLM_MUX_SOCKET"], str(model), key, worker.device.index, private
        )
    return _instance


def _models(worker) -> list:
    """The model, and the drafter's model if it has one of its own."""
    import torch

    runner = worker.model_runner
    models = [runner.get_model()]
    draft = getattr(getattr(runner, "drafter", None), "model", None)
    if isinstance(draft, torch.nn.Module) and draft is not models[0]:
        models.append(draft)
    return models


def model_tensors(worker) -> tuple[list, list, dict]:
    """Every parameter and buffer, the buffers alone, and every NPU
    tensor's name -> the tensor (for the format check)."""
    tensors, buffers, named = [], [], {}
    for i, model in enumerate(_models(worker)):
        tensors += [*model.parameters(), *model.buffers()]
        buffers += list(model.buffers())
        prefix = "" if i == 0 else "drafter."
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if t.device.type == "npu" and t.numel():
                named[prefix + name] = t
    return tensors, buffers, named


def _refuse_while_asleep(worker, what: str) -> None:
    if instance(worker).asleep:
        raise RuntimeError(
            f"vllm-mux: {what} refused: this instance is asleep and its weights are not "
            "mapped; send it a request (or POST /wake_up) first"
        )


def apply() -> None:
    from vllm.platforms import current_platform

    if current_platform.device_type != "npu":
        return  # never import vllm_ascend (it needs an NPU) elsewhere
    import torch
    import torch_npu
    from vllm.config import set_current_vllm_config
    from vllm.distributed.kv_transfer import ensure_kv_transfer_initialized
    from vllm_ascend.ascend_config import get_ascend_config
    from vllm_ascend.utils import is_310p
    from vllm_ascend.worker.model_runner_v1 import NPUModelRunner
    from vllm_ascend.worker.worker import NPUWorker

    from vllm_mux.patches import idle_spin

    upstream_init_device = NPUWorker._init_device
    upstream_allocate_kv = NPUModelRunner._allocate_kv_cache_tensors

    def _init_device(self):
        cache = self.cache_config
        utilization = cache.gpu_memory_utilization
        # Upstream's check wants utilization x the whole card free: disarmed.
        cache.gpu_memory_utilization = 1e-12
        try:
            device = upstream_init_device(self)
        finally:
            cache.gpu_memory_utilization = utilization
        self.requested_memory = check_private(
            self.init_snapshot.free_memory, private_budget(), str(device)
        )
        return device

    def load_model(self) -> None:
        if self.lora_config is not None:
            raise ValueError(
                "vllm-mux: --enable-lora is not supported yet: LoRA slots live beside the "
                "weights in leased memory, and adapters loaded after start would not "
                "survive a sleep; run this model without the daemon (unset VLLM_MUX_SOCKET)"
            )
        ascend = get_ascend_config()
        refusal = nz_config_refusal(
            ascend.weight_nz_mode, self.vllm_config.quant_config is not None, is_310p()
        )
        if refusal:
            raise ValueError(refusal)
        if getattr(ascend, "enable_sleep_mode_extra_cleanup", False):
            log.warning("vllm-mux: enable_sleep_mode_extra_cleanup is ignored (graphs stay valid)")
        mux = instance(self)
        with mux.loading(), set_current_vllm_config(self.vllm_config):
            self.model_runner.load_model()
        tensors, buffers, named = model_tensors(self)
        refuse_formats({name: int(torch_npu.get_npu_format(t)) for name, t in named.items()})
        mux.reload = None  # no cold wake on NPU: the host copy is kept
        mux.adopt_weights(tensors, buffers)
        if self.vllm_config.weight_transfer_config is not None:  # as upstream
            from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

            self.weight_transfer_engine = WeightTransferEngineFactory.create_engine(
                self.vllm_config.weight_transfer_config,
                self.vllm_config.parallel_config,
                self.model_runner.get_model(),
            )

    @torch.inference_mode()
    def determine_available_memory(self) -> int:
        mux = instance(self)
        cache = self.cache_config
        budget = kv_cache_budget(
            mux.weights.capacity,
            mux.weights.mapped,
            cache.gpu_memory_utilization,
            cache.kv_cache_memory_bytes,
        )
        torch.npu.reset_peak_memory_stats(self.device)
        self.model_runner.profile_run()  # compiles and warms up
        peak = torch.npu.max_memory_reserved(self.device) - (mux.heap.live_bytes if mux.heap else 0)
        (log.warning if peak > self.requested_memory else log.info)(
            "vllm-mux: torch's private NPU memory at the profile's peak %.2f GiB (without the "
            "ACL context, HCCL and graphs) of a %.2f GiB budget; KV cache %.2f GiB from the "
            "pool",
            peak / 2**30,
            self.requested_memory / 2**30,
            budget / 2**30,
        )
        self.available_kv_cache_memory_bytes = budget
        return budget

    def initialize_from_config(self, kv_cache_config) -> None:
        # Upstream's steps, without CaMemAllocator's pool around them: only
        # the raw KV tensors go to the KV arena (_allocate_kv_cache_tensors).
        ensure_kv_transfer_initialized(self.vllm_config, kv_cache_config)
        self.model_runner.initialize_kv_cache(kv_cache_config)
        spec = self.vllm_config.speculative_config
        if (
            kv_cache_config.needs_kv_cache_zeroing
            and hasattr(self.model_runner, "_init_kv_zero_meta")
            and spec is not None
            and spec.method == "eagle3"
            and spec.num_speculative_tokens > 1
        ):
            self.model_runner._init_kv_zero_meta()

    def _allocate_kv_cache_tensors(self, kv_cache_config):
        context = _instance.allocations() if _instance is not None else contextlib.nullcontext()
        with context:
            return upstream_allocate_kv(self, kv_cache_config)

    def sleep(self, level: int = 1) -> None:
        if self._weight_update_active:
            raise RuntimeError(
                "vllm-mux: not sleeping in the middle of a weight update "
                "(start_weight_update ... finish_weight_update): finish it first"
            )
        instance(self).sleep()
        idle_spin.park(True)  # see idle_spin: stop spinning while asleep

    def wake_up(self, tags: list[str] | None = None) -> None:
        # One lease maps weights and KV cache together (see vllm_mux.worker.SleepMode).
        idle_spin.park(False)
        instance(self).wake()

    def guarded(name: str, refresh: bool):
        upstream = getattr(NPUWorker, name)

        def method(self, *args, **kwargs):
            _refuse_while_asleep(self, name)
            try:
                return upstream(self, *args, **kwargs)
            finally:  # even one that failed half way may have written some weights
                if refresh:
                    tensors, buffers, _ = model_tensors(self)
                    instance(self).refresh_weights(tensors, buffers)

        method.__name__ = name
        return method

    def mux_sleep_mode(self) -> bool:
        """Whether this worker sleeps through vllm-mux (engine_core_v023)."""
        return True

    def mux_kv_intact(self) -> bool:
        """Whether the last wake got every KV-cache chunk back untouched."""
        return _instance is not None and _instance.kv_intact

    def mux_drop_host(self) -> bool:
        """The daemon needs the host copy's memory: let it go if asleep."""
        return _instance is not None and _instance.drop_host()

    def mux_tensor_addresses(self) -> dict:
        """Addresses of every weight and KV-cache tensor (dev mode): they must
        never change across sleeps."""
        mux = instance(self)
        _, _, named = model_tensors(self)
        return {
            "weights": {name: t.data_ptr() for name, t in named.items()},
            "kv_cache": [t.data_ptr() for t in getattr(self.model_runner, "kv_caches", [])],
            "arenas": {
                "weights": [mux.weights.base, mux.weights.capacity],
                "kv_cache": [mux.kv_cache.base, mux.kv_cache.capacity],
            },
        }

    def mux_plain_copy(self) -> float:
        """A plain copy of the weights' bytes from the same host buffer."""
        seconds = instance(self).plain_copy()
        torch.npu.empty_cache()
        return seconds

    NPUWorker._init_device = _init_device
    NPUWorker.load_model = load_model
    NPUWorker.determine_available_memory = determine_available_memory
    NPUWorker.initialize_from_config = initialize_from_config
    NPUModelRunner._allocate_kv_cache_tensors = _allocate_kv_cache_tensors
    NPUWorker.sleep = sleep
    NPUWorker.wake_up = wake_up
    for name, refresh in (
        ("start_weight_update", False),
        ("update_weights", False),
        ("finish_weight_update", True),
    ):
        setattr(NPUWorker, name, guarded(name, refresh))
    for fn in (mux_sleep_mode, mux_kv_intact, mux_drop_host, mux_tensor_addresses, mux_plain_copy):
        setattr(NPUWorker, fn.__name__, fn)
