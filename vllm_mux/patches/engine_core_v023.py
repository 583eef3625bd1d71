"""``engine_core`` on vLLM 0.23 (Ascend NPUs, with vllm-ascend 0.23.0.post1):
keep the prefix cache across a sleep when the KV cache comes back untouched.

Why its own file: ``engine_core`` imports ``vllm_mux.worker``, which needs
vLLM 0.32's sleep-mode backend registry (absent from 0.23), and asks the
workers for that backend's name; and vLLM 0.23's ``EngineCore.wake_up``
differs (below). The idea and the reasons are ``engine_core``'s.

Targets, on ``vllm.v1.engine.core.EngineCore`` in vLLM 0.23.0:
- ``sleep``: as in 0.32 (only its docstring moved): it pauses the scheduler
  with ``clear_cache=True`` at level 1 and above, which resets the prefix
  cache (through ``_reset_caches``, called inline in 0.23's
  ``pause_scheduler``, where 0.32 has ``_finish_pause``).
- ``wake_up``: 0.23 wakes the executor and then always resumes the scheduler,
  even after a partial wake by tags, and returns nothing (0.32 resumes only
  once fully awake and returns whether it is).
How: a level-1 sleep, when every worker answers ``mux_sleep_mode``
(``patches/npu_worker.py``), runs upstream's with ``pause_scheduler``
shadowed to keep the caches. Upstream's ``wake_up`` runs with
``resume_scheduler`` shadowed: before scheduling resumes every worker is
asked ``mux_kv_intact``, and the caches are reset as upstream resets them
at sleep unless all say yes. A partial wake by tags (how weights get
replaced between sleep and wake) resets them whatever the chunks say. A
sleep or a wake that fails resets them at once; if even that fails, the next
wake does it before scheduling resumes.
Upstream: as ``engine_core``: a ``preserves_kv_cache`` hook on sleep-mode
backends; vLLM 0.23 has no such backends at all.
"""

import functools

from vllm_mux.patches.engine_core import (
    STALE,
    STATE,
    _reset,
    _warm_sleep,
    resume_checking_caches,
    sleep_keeping_caches,
)

_CORE = "vllm.v1.engine.core"
# Upstream symbols this patch replaces or relies on -> sha256 of their source in vLLM 0.23.0.
TARGETS = {
    f"{_CORE}.EngineCore.sleep": "4a9d9c07cb53dde2",
    f"{_CORE}.EngineCore.wake_up": "fc074bdfbdba00b2",
    # sleep calls self.pause_scheduler(mode=..., clear_cache=...); wake_up
    # calls self.resume_scheduler() after the executor's wake_up, always.
    f"{_CORE}.EngineCore.pause_scheduler": "64f190b6114050d6",
    f"{_CORE}.EngineCoreProc.pause_scheduler": "a91082c0af16c02b",
    f"{_CORE}.EngineCore.resume_scheduler": "206f103ac66e1ee7",
    f"{_CORE}.EngineCore._reset_caches": "f788041c1160bc77",
    "vllm.v1.executor.abstract.Executor.wake_up": "a8ff8dfbff50540c",
}


def apply() -> None:
    from vllm.v1.engine.core import EngineCore

    upstream_wake_up = EngineCore.wake_up

    def wake_up(self, tags: list[str] | None = None):
        if getattr(self, STATE, None) is None:
            return upstream_wake_up(self, tags)
        was_asleep = self.model_executor.is_sleeping
        if tags is not None and any(tag != "scheduling" for tag in tags):
            setattr(self, STATE, STALE)  # a partial wake: weights may be replaced
        # 0.23 resumes scheduling after the executor's wake, whatever it woke.
        self.resume_scheduler = resume_checking_caches(self, was_asleep)
        try:
            return upstream_wake_up(self, tags)
        except BaseException:
            _reset(self, "the wake failed")
            raise
        finally:
            del self.resume_scheduler

    # The NPU worker says how it sleeps (npu_worker.mux_sleep_mode): no registry in 0.23.
    warm_sleep = functools.partial(_warm_sleep, ask="mux_sleep_mode")
    EngineCore.sleep = sleep_keeping_caches(EngineCore.sleep, warm_sleep)
    EngineCore.wake_up = wake_up
