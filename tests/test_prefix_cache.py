"""The prefix cache survives a sleep whose KV chunks come back untouched, and
is reset when another instance took them (patches/engine_core.py).

The first tests drive upstream's ``EngineCore.sleep`` / ``wake_up`` with the
patch applied over a fake scheduler, executor and workers (fast, every
branch); the last two run real vLLM instances through a daemon and read
vLLM's prefix-cache counters.
"""

import time
from types import SimpleNamespace

import httpx
import pytest

from conftest import PATIENCE_S, assert_books_balance, greedy
from vllm_mux.patches import engine_core

# --- the patch's branches, on upstream's EngineCore with fakes around it ---


class FakeWorker:
    def __init__(self, events: list, backend: str | None = "vllm_mux", intact: bool = True):
        self.events = events
        self.vllm_config = SimpleNamespace(model_config=SimpleNamespace(sleep_mode_backend=backend))
        self.intact = intact
        self.fail_sleep = self.fail_wake = False

    def sleep(self, level: int = 1) -> None:
        if self.fail_sleep:
            raise RuntimeError("sleep failed")
        self.events.append("worker sleep")

    def wake_up(self, tags=None) -> None:
        if self.fail_wake:
            raise RuntimeError("wake failed")
        self.events.append("worker wake")

    def mux_kv_intact(self) -> bool:
        self.events.append("asked")
        return self.intact

    def synchronize_device(self) -> None:
        pass

    def reset_mm_cache(self) -> None:
        pass

    def reset_encoder_cache(self) -> None:
        pass


def fake_engine(workers: list[FakeWorker], events: list):
    from vllm.v1.core.sched.interface import PauseState
    from vllm.v1.engine.core import EngineCore
    from vllm.v1.executor.abstract import Executor
    from vllm.v1.serial_utils import run_method

    class FakeExecutor:
        # Upstream's own bookkeeping of what sleeps.
        sleep, wake_up, is_sleeping = Executor.sleep, Executor.wake_up, Executor.is_sleeping
        reset_mm_cache, reset_encoder_cache = Executor.reset_mm_cache, Executor.reset_encoder_cache

        def __init__(self):
            self.sleeping_tags = set()

        def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
            return [run_method(w, method, args, kwargs or {}) for w in workers]

    class FakeScheduler:
        pause_state = PauseState.UNPAUSED

        def set_pause_state(self, state) -> None:
            self.pause_state = state
            if state == PauseState.UNPAUSED:
                events.append("resume")

        def finish_requests(self, request_ids, status):
            return []

        def reset_prefix_cache(self, reset_running_requests=False, reset_connector=False):
            events.append("reset")
            return True

        def has_unfinished_requests(self) -> bool:
            return False

        def reset_encoder_cache(self) -> None:
            pass

    engine = EngineCore.__new__(EngineCore)
    engine.scheduler, engine.model_executor = FakeScheduler(), FakeExecutor()
    engine.mm_receiver_cache = None
    return engine


@pytest.fixture
def patched(monkeypatch):
    """The patch applied for one test, upstream's methods back afterwards."""
    from vllm.v1.engine.core import EngineCore

    for name in ("sleep", "wake_up"):
        monkeypatch.setattr(EngineCore, name, getattr(EngineCore, name))
    engine_core.apply()


def make(intact=True, backend="vllm_mux", workers=2):
    events = []
    ws = [FakeWorker(events, backend, intact) for _ in range(workers)]
    return fake_engine(ws, events), ws, events


def test_untouched_kv_keeps_the_prefix_cache(patched):
    engine, _, events = make(intact=True)
    engine.sleep(1)
    assert "reset" not in events and engine.model_executor.is_sleeping
    assert engine.wake_up() is True
    assert events[-3:] == ["asked", "asked", "resume"] and "reset" not in events
    assert not engine.is_sleeping()
    assert "pause_scheduler" not in vars(engine) and "resume_scheduler" not in vars(engine)


def test_a_worker_that_lost_its_kv_resets_before_scheduling_resumes(patched):
    engine, workers, events = make()
    workers[1].intact = False
    engine.sleep(1)
    assert "reset" not in events
    engine.wake_up()
    assert events[-4:] == ["asked", "asked", "reset", "resume"]
    events.clear()
    engine.sleep(1)  # the next cycle starts clean
    workers[1].intact = True
    engine.wake_up()
    assert "reset" not in events


def test_another_sleep_mode_backend_runs_upstream(patched):
    engine, _, events = make(backend=None)
    engine.sleep(1)
    assert events.count("reset") == 1 and events.index("reset") < events.index("worker sleep")
    engine.wake_up()
    assert "asked" not in events and events.count("reset") == 1


def test_level_0_runs_upstream(patched):
    engine, _, events = make()
    engine.sleep(0)
    assert engine.is_sleeping() and not engine.model_executor.is_sleeping
    engine.wake_up(["scheduling"])
    assert events == ["resume"]


def test_level_2_runs_upstream(patched):
    engine, _, events = make()
    engine.sleep(2)  # its caller means to reload the weights
    assert events.count("reset") == 1 and events.index("reset") < events.index("worker sleep")
    engine.wake_up()
    assert "asked" not in events and events.count("reset") == 1


def test_a_partial_wake_resets_once_everything_is_awake(patched):
    """Weights may be replaced between the two halves of a wake: the keys
    and values in the untouched chunks were computed with the old ones."""
    engine, _, events = make(intact=True)
    engine.sleep(1)
    assert engine.wake_up(["weights"]) is False
    assert "reset" not in events and "resume" not in events
    assert engine.wake_up(["kv_cache"]) is True
    assert events[-2:] == ["reset", "resume"]


def test_a_failed_wake_leaves_the_caches_reset_as_upstream(patched):
    engine, workers, events = make(intact=True)
    engine.sleep(1)
    workers[0].fail_wake = True
    with pytest.raises(RuntimeError, match="wake failed"):
        engine.wake_up()
    assert events.count("reset") == 1 and "resume" not in events
    assert engine.model_executor.is_sleeping and engine.is_scheduler_paused()
    workers[0].fail_wake = False
    engine.wake_up()  # the caches are already empty: nothing to ask
    assert events.count("reset") == 1 and "asked" not in events and events[-1] == "resume"


def test_a_failed_sleep_resets_the_caches_as_upstream(patched):
    engine, workers, events = make()
    workers[1].fail_sleep = True
    with pytest.raises(RuntimeError, match="sleep failed"):
        engine.sleep(1)
    assert events.count("reset") == 1 and not engine.model_executor.is_sleeping
    assert "pause_scheduler" not in vars(engine)
    engine.wake_up()
    assert "asked" not in events and events.count("reset") == 1


# --- real vLLM instances ---

BLOCK = 128  # vLLM's default block size on CPU: only full blocks are cached


def long_prompt(topic: str) -> str:
    """A few hundred tokens: several full blocks that a second ask can reuse."""
    facts = " ".join(
        f"Fact {i}: {topic} number {i} weighs {i * 7 % 13 + 1} kilograms." for i in range(30)
    )
    return f"Here are some facts about {topic}. {facts} Which {topic} is the heaviest?"


def prefix_cache(server) -> tuple[float, float]:
    """vLLM's counters (hits, queries), in prompt tokens."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{server.url}/metrics", timeout=60).text
    totals = {"vllm:prefix_cache_hits_total": 0.0, "vllm:prefix_cache_queries_total": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in totals:
                totals[sample.name] += sample.value
    return totals["vllm:prefix_cache_hits_total"], totals["vllm:prefix_cache_queries_total"]


def ask_counting(server, prompt: str) -> tuple[str, float, float]:
    """A greedy answer, with the prefix-cache hits and queries it made."""
    hits, queries = prefix_cache(server)
    answer = greedy(server, prompt, max_tokens=8)
    deadline = time.monotonic() + 30
    while (now := prefix_cache(server))[1] == queries and time.monotonic() < deadline:
        time.sleep(0.1)  # the counters are recorded as the outputs arrive
    return answer, now[0] - hits, now[1] - queries


@pytest.fixture(scope="module")
def pool_for_one(module_daemon_factory, module_server_factory, model_dir):
    # 25 chunks of 32 MiB: exactly what the bundled model holds awake (weights
    # and a 256 MB KV cache), so that a second instance takes every chunk of
    # a sleeping first one.
    daemon = module_daemon_factory("800MiB")
    a = module_server_factory(model_dir, name="smol-a", socket_path=daemon.socket)
    status = daemon.status()
    assert daemon.instance("smol-a")["chunks"] == status["total_chunks"], status
    return daemon, a


@pytest.mark.vllm
def test_warm_wake_keeps_the_prefix_cache(pool_for_one):
    daemon, a = pool_for_one
    prompt = long_prompt("stones")
    first, hits, queries = ask_counting(a, prompt)  # wakes it if need be
    assert queries > 2 * BLOCK
    a.sleep()  # POST /sleep; nobody else wants its chunks
    me = daemon.instance("smol-a")
    assert (me["state"], me["chunks"]) == ("asleep", 0)
    assert_books_balance(daemon.status())

    again, hits, queries = ask_counting(a, prompt)  # the request wakes it
    assert daemon.instance("smol-a")["state"] == "awake"
    assert again == first
    # Every full block of the prompt but the one its last token is in.
    assert hits > 0 and hits >= queries - BLOCK, (hits, queries)
    assert_books_balance(daemon.status())


@pytest.mark.vllm
def test_kv_chunks_taken_by_another_instance_reset_the_prefix_cache(
    pool_for_one, module_server_factory, model_dir
):
    daemon, a = pool_for_one
    prompt = long_prompt("shells")
    first, _, _ = ask_counting(a, prompt)  # cached in a's KV cache
    # b's start leases the whole pool: a sleeps and b maps every chunk a had.
    b = module_server_factory(model_dir, name="smol-b", socket_path=daemon.socket)
    assert greedy(b, "What is 12 times 12?", max_tokens=8)
    assert daemon.instance("smol-a")["state"] == "asleep"

    again, hits, queries = ask_counting(a, prompt)  # a wakes; b sleeps
    assert again == first
    assert queries > 2 * BLOCK and hits == 0, (hits, queries)
    status = daemon.wait_for(lambda s: s["balanced"], PATIENCE_S)
    assert_books_balance(status)
    assert daemon.instance("smol-b")["state"] == "asleep"
