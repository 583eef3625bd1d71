"""Keep the prefix cache across a sleep when the KV cache comes back untouched.

Targets, on ``vllm.v1.engine.core.EngineCore`` (the engine-core process's
engine; ``EngineCoreProc`` and the data-parallel engines inherit both):
- ``sleep``: upstream pauses the scheduler with ``clear_cache=True`` at level
  1 and above, which resets the prefix cache (and the multi-modal and encoder
  caches) before the executor sleeps, since its sleep discards the KV cache.
- ``wake_up``: upstream wakes the executor, then resumes the scheduler.
Why: vllm-mux's sleep-mode backend hands the KV cache's chunks back to the
daemon's pool with their bytes, and a wake gets back those that nobody took
meanwhile (the warm tier, ``daemon/pool.py``). When every KV chunk comes back
untouched the blocks the prefix cache points at still hold their keys and
values, and a request after the wake reuses them.
How: when the workers' sleep-mode backend is "vllm_mux" (asked once through
``collective_rpc``: the worker sets it in its own process, which on a
multi-process executor is not the engine's), a level-1 sleep calls upstream's
``sleep`` with ``pause_scheduler`` shadowed on the instance for that call, so
that the pause does not clear the caches. Upstream's ``wake_up`` then runs
with ``resume_scheduler`` shadowed: once the executor is fully awake and
before scheduling resumes, every worker is asked ``mux_kv_intact``
(``vllm_mux.worker``: the last wake got every KV chunk back untouched), and
the caches are reset as upstream resets them at sleep (``_reset_caches``)
unless all say yes. A level-0 sleep, a level-2 sleep (its caller means to
reload or replace the weights) and an engine whose workers use another
backend run upstream's code unchanged. A partial wake by tags (the window in
which weights get replaced) makes the reset due whatever the chunks say. A
sleep or a wake that fails resets the caches at once, as upstream would have
found them; if even that fails, the reset stays due and the next wake does it
before scheduling resumes. Without a daemon (``VLLM_MUX_SOCKET`` unset)
nothing is patched.
Upstream: delete once a sleep-mode backend can say that it preserves the KV
cache (a ``preserves_kv_cache`` beside ``preserves_communicators`` on
``SleepModeBackend``, consulted by ``EngineCore.sleep`` for ``clear_cache``
and by ``wake_up``). vLLM-Ascend's vnpu daemon loses the prefix cache on
every restore for want of the same hook.
"""

import logging
from concurrent.futures import Future

log = logging.getLogger("vllm_mux.engine_core")

# Upstream symbols this patch replaces or relies on -> sha256 of their source.
TARGETS = {
    "vllm.v1.engine.core.EngineCore.sleep": "f08683c8b249ae7b",
    "vllm.v1.engine.core.EngineCore.wake_up": "d5eb07522022abed",
    # sleep calls self.pause_scheduler(mode=..., clear_cache=...); wake_up calls
    # self.resume_scheduler() once the executor is fully awake.
    "vllm.v1.engine.core.EngineCore.pause_scheduler": "dc44b06a1a99ee69",
    "vllm.v1.engine.core.EngineCoreProc.pause_scheduler": "e02778ea0e810f9c",
    "vllm.v1.engine.core.EngineCore.resume_scheduler": "206f103ac66e1ee7",
    "vllm.v1.engine.core.EngineCore._finish_pause": "a676d04ac1f1733f",
    "vllm.v1.engine.core.EngineCore._reset_caches": "2bf1e4a269acf99c",
    "vllm.v1.executor.abstract.Executor.wake_up": "44101c0a17f8800b",
}

# EngineCore attribute: None (the caches are what upstream would have),
# UNCHECKED (a sleep kept them; the next full wake asks the workers) or
# STALE (they must be reset before scheduling resumes).
STATE = "_mux_prefix_cache"
UNCHECKED, STALE = "unchecked", "stale"


def uses_mux_sleep_mode(worker) -> bool:
    """Run in each worker's process by ``collective_rpc``."""
    from vllm_mux.worker import SLEEP_MODE_BACKEND  # vLLM 0.32's registry: not at import

    worker = getattr(worker, "worker", worker)  # the WorkerWrapperBase's worker
    return getattr(worker.vllm_config.model_config, "sleep_mode_backend", None) == (
        SLEEP_MODE_BACKEND
    )


def sleep_keeping_caches(upstream_sleep, warm_sleep):
    """``EngineCore.sleep`` that keeps the caches at level 1 when
    ``warm_sleep(engine)`` says every worker sleeps through vllm-mux (shared
    with ``engine_core_v023``)."""

    def sleep(self, level: int = 1, mode="abort"):
        # Level 2 says the weights will be reloaded (or replaced): upstream's reset.
        if level != 1 or not warm_sleep(self):
            return upstream_sleep(self, level, mode)
        pause = self.pause_scheduler

        def pause_keeping_caches(mode="abort", clear_cache: bool = True):
            return pause(mode=mode, clear_cache=False)

        if getattr(self, STATE, None) is None:
            setattr(self, STATE, UNCHECKED)
        self.pause_scheduler = pause_keeping_caches
        try:
            result = upstream_sleep(self, level, mode)
        except BaseException:
            _reset(self, "the sleep failed")
            raise
        finally:
            del self.pause_scheduler
        if isinstance(result, Future):  # the pause completes once in-flight work is done

            def failed(future: Future) -> None:
                if future.cancelled() or future.exception() is not None:
                    _reset(self, "the sleep failed")

            result.add_done_callback(failed)
        return result

    return sleep


def resume_checking_caches(engine, was_asleep: bool):
    """A stand-in for ``engine.resume_scheduler`` for upstream's wake_up to
    call: before scheduling resumes, the caches are kept if every worker got
    its KV cache back untouched, else reset as upstream's sleep would have."""
    resume = engine.resume_scheduler

    def resume_with_checked_caches() -> None:
        if was_asleep and getattr(engine, STATE) == UNCHECKED:
            setattr(engine, STATE, None if _kv_intact(engine) else STALE)
            if getattr(engine, STATE) is None:
                log.info("vllm-mux: the KV cache survived the sleep; prefix cache kept")
        if getattr(engine, STATE) == STALE:
            log.info("vllm-mux: the KV cache did not survive the sleep; resetting caches")
            engine._reset_caches()
            setattr(engine, STATE, None)
        resume()

    return resume_with_checked_caches


def apply() -> None:
    from vllm.v1.engine.core import EngineCore

    upstream_wake_up = EngineCore.wake_up

    def wake_up(self, tags: list[str] | None = None) -> bool:
        if getattr(self, STATE, None) is None:
            return upstream_wake_up(self, tags)
        # Upstream calls resume_scheduler once the executor is fully awake.
        self.resume_scheduler = resume_checking_caches(self, self.model_executor.is_sleeping)
        try:
            fully_awake = upstream_wake_up(self, tags)
        except BaseException:
            _reset(self, "the wake failed")
            raise
        finally:
            del self.resume_scheduler
        partial = tags is not None and any(tag != "scheduling" for tag in tags)
        if partial and not fully_awake and getattr(self, STATE) == UNCHECKED:
            # A partial wake (by tags) is how weights get replaced between
            # sleep and wake: whatever the chunks say, the keys and values
            # were computed with the old weights.
            setattr(self, STATE, STALE)
        return fully_awake

    EngineCore.sleep = sleep_keeping_caches(EngineCore.sleep, _warm_sleep)
    EngineCore.wake_up = wake_up


def _warm_sleep(engine, ask=uses_mux_sleep_mode) -> bool:
    """Whether every worker sleeps through vllm-mux, ``ask``-ed of each (once:
    how a worker sleeps is chosen at load and never changes)."""
    known = getattr(engine, "_mux_warm_sleep", None)
    if known is None:
        try:
            known = all(engine.model_executor.collective_rpc(ask))
        except Exception as e:  # a worker that cannot say: upstream's sleep
            log.warning("vllm-mux: cannot ask the workers for their sleep mode (%s)", e)
            return False
        engine._mux_warm_sleep = known
    return known


def _kv_intact(engine) -> bool:
    try:
        return all(engine.model_executor.collective_rpc("mux_kv_intact"))
    except Exception as e:  # a worker that cannot say lost it, as far as we know
        log.warning("vllm-mux: cannot ask the workers whether the KV cache survived (%s)", e)
        return False


def _reset(engine, why: str) -> None:
    """Reset the caches now, as upstream's sleep would have; if that fails
    too, the next wake resets them before scheduling resumes."""
    if getattr(engine, STATE, None) is None:
        return
    setattr(engine, STATE, STALE)
    try:
        engine._reset_caches()
    except Exception as e:
        log.warning("vllm-mux: %s and the caches could not be reset yet (%s)", why, e)
        return
    setattr(engine, STATE, None)
