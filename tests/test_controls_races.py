"""Controls by hand racing the rest: a busy API server loop, requests, idle
sleeps, pins and other controls; a real in-process daemon, real controllers,
fake engines (test_controller's). Each test waits on states and counts."""

import asyncio
import threading
import time

import pytest
from test_controller import Engine, books, control, wait_for

from conftest import LiveDaemon, assert_books_balance
from vllm_mux.controller import Controller
from vllm_mux.daemon.client import DaemonError, outcome


@pytest.fixture
def pool(tmp_path):
    """A live daemon of 4 chunks whose leases wait up to 60 s: a test that
    ends well before that saw a refusal at once, not a wait that ran out."""
    daemon = LiveDaemon(str(tmp_path / "d.sock"), 4, 1 << 20, wait_timeout=60)
    yield daemon
    assert_books_balance(daemon.status())
    daemon.stop()


def instance(path, model, chunks, *, pinned=False, idle_ttl=0.0):
    """``model``'s fake engine and its real controller, on this loop."""
    engine = Engine(path, model, chunks)
    loop = asyncio.get_running_loop()
    controller = Controller(
        path, model, engine.sleep, engine.wake_up, idle_ttl, pinned, loop, lambda: None
    )
    return engine, controller


def counted(controller) -> list:
    """Count the wakes the controller's loop runs for the daemon's asks."""
    runs = []
    wake_up = controller.wake_up

    def counting():
        runs.append(1)
        return wake_up()

    controller.wake_up = counting
    return runs


def gated(function):
    """``function`` run only once the returned event is set (from the test)."""
    gate = threading.Event()

    def run(*args):
        assert gate.wait(60)
        return function(*args)

    return run, gate


async def request(controller, done: asyncio.Event | None = None):
    async with controller.request():
        if done is not None:
            await done.wait()


def test_a_wake_asked_while_the_loop_is_busy_runs_once_and_fails_once(pool):
    """The API server's loop is busy when the daemon asks the wake: the daemon
    does not ask again while that ask waits, so one engine wake runs, and no
    other follows after the user was told it failed."""

    async def main():
        engine, controller = instance(pool.path, "b", 2)
        await asyncio.to_thread(control, pool.path, "sleep", "b")
        tries = []

        async def failing_wake():
            tries.append(1)
            raise RuntimeError("the worker could not map")

        controller._wake_up = failing_wake
        runs = counted(controller)
        asyncio.get_running_loop().call_soon(time.sleep, 1.0)  # a long tokenization
        with pytest.raises(DaemonError, match="b failed to wake: the worker could not map") as e:
            await asyncio.to_thread(control, pool.path, "wake", "b")
        assert e.value.code == "failed"
        await asyncio.sleep(0.2)  # whatever was queued on the loop has run by now
        assert (len(runs), len(tries)) == (1, 1)
        assert controller.report()["asked"] == [] and controller.state == "asleep"

    asyncio.run(main())


def test_wakes_by_hand_at_once_share_one_ask_and_one_reply(pool):
    async def main():
        engine, controller = instance(pool.path, "b", 2)
        await asyncio.to_thread(control, pool.path, "sleep", "b")
        runs = counted(controller)
        engine._wake, gate = gated(engine._wake)
        wakes = [asyncio.to_thread(control, pool.path, "wake", "b") for _ in range(4)]
        wakes = asyncio.gather(*wakes)
        await asyncio.sleep(0)  # the controls are on their way
        asyncio.get_running_loop().call_soon(time.sleep, 1.0)  # busy as the asks come
        assert await asyncio.to_thread(wait_for, lambda: controller.state == "waking")
        gate.set()
        replies = await wakes
        assert [(r["state"], r["changed"]) for r in replies] == [("awake", True)] * 4
        assert len(runs) == 1 and books(pool.path, "b")["wakes"] == 1

    asyncio.run(main())


def test_a_wake_that_pinned_models_block_is_refused_at_once_and_holds_up_nobody(pool):
    """A pinned model holds 3 of 4 chunks: b's 3 can never come free. Its
    wake is refused at once, naming the pin, and c's wake of 1 chunk, which
    fits, is not held up behind it."""

    async def main():
        instance(pool.path, "b", 3)
        await asyncio.to_thread(control, pool.path, "sleep", "b")
        instance(pool.path, "c", 1)
        await asyncio.to_thread(control, pool.path, "sleep", "c")
        instance(pool.path, "a", 3, pinned=True)
        start = time.monotonic()
        with pytest.raises(DaemonError, match=r"b cannot wake: 3 chunks .* pinned a \(3\)") as e:
            await asyncio.to_thread(control, pool.path, "wake", "b")
        assert e.value.code == "pinned" and "`vllm-mux unpin NAME`" in str(e.value)
        assert (await asyncio.to_thread(control, pool.path, "wake", "c"))["state"] == "awake"
        assert time.monotonic() - start < 30  # the pool's wait is 60 s
        assert books(pool.path, "b")["state"] == "asleep"

    asyncio.run(main())


def test_a_pin_during_a_drain_calls_the_sleep_off_and_the_wake_waiting_for_it(tmp_path):
    """b's wake has a asked to sleep; a drains its long request. Pinned then,
    a stays awake, and b's wake, which can no longer fit, is refused."""
    daemon = LiveDaemon(str(tmp_path / "d.sock"), 4, 1 << 20, wait_timeout=60,
                        policy="switch-per-request")  # fmt: skip
    path = daemon.path

    async def main():
        instance(path, "b", 3)
        await asyncio.to_thread(control, path, "sleep", "b")
        _, a = instance(path, "a", 3)
        done = asyncio.Event()
        running = asyncio.ensure_future(request(a, done))
        wake = asyncio.ensure_future(asyncio.to_thread(control, path, "wake", "b"))
        assert await asyncio.to_thread(wait_for, lambda: a.draining)
        pinned = await asyncio.to_thread(control, path, "pin", "a")
        assert (pinned["state"], pinned["pinned"]) == ("awake", True)
        with pytest.raises(DaemonError, match="b cannot wake") as e:
            await wake
        assert e.value.code == "pinned"
        done.set()
        await running
        assert (a.state, a.draining, a.sleeps) == ("awake", False, 0)
        assert books(path, "a")["state"] == "awake"

    try:
        asyncio.run(main())
    finally:
        daemon.stop()


def test_a_pin_after_the_engine_was_told_to_sleep_says_so(pool):
    """An idle sleep has reached the engine when the pin comes: the reply says
    the model is going to sleep, as it then does."""

    async def main():
        engine, controller = instance(pool.path, "a", 2, idle_ttl=0.1)
        engine._sleep, gate = gated(engine._sleep)
        assert await asyncio.to_thread(wait_for, lambda: controller.state == "sleeping")
        reply = await asyncio.to_thread(control, pool.path, "pin", "a")
        assert (reply["state"], reply["pinned"]) == ("sleeping", True)
        assert outcome("pin", "a", reply).startswith("a is pinned, but was going to sleep")
        gate.set()
        assert await asyncio.to_thread(wait_for, lambda: books(pool.path, "a")["state"] == "asleep")

    asyncio.run(main())


def test_a_sleep_by_hand_that_a_pin_overtakes_is_refused_as_pinned(pool):
    """A wake is under way; a sleep by hand waits for it; a pin comes. Once
    awake, the sleep is refused as pinned, not after the pool's wait."""

    async def main():
        engine, controller = instance(pool.path, "b", 2)
        await asyncio.to_thread(control, pool.path, "sleep", "b")
        engine._wake, gate = gated(engine._wake)
        wake = asyncio.ensure_future(asyncio.to_thread(control, pool.path, "wake", "b"))
        assert await asyncio.to_thread(wait_for, lambda: controller.state == "waking")
        sleep = asyncio.ensure_future(asyncio.to_thread(control, pool.path, "sleep", "b"))
        assert (await asyncio.to_thread(control, pool.path, "pin", "b"))["state"] == "waking"
        gate.set()
        assert (await wake)["state"] == "awake"
        start = time.monotonic()
        with pytest.raises(DaemonError, match=r"b is pinned: `vllm-mux unpin b` first") as e:
            await sleep
        assert e.value.code == "pinned" and time.monotonic() - start < 30
        assert books(pool.path, "b")["state"] == "awake"

    asyncio.run(main())


def test_a_sleep_by_hand_that_waiting_requests_undo_says_so(pool):
    """A request arrives while the sleep drains another: it waits, and wakes
    the model as soon as it sleeps. The reply says so, with the state then."""

    async def main():
        engine, controller = instance(pool.path, "a", 2)
        done = asyncio.Event()
        first = asyncio.ensure_future(request(controller, done))
        sleep = asyncio.ensure_future(asyncio.to_thread(control, pool.path, "sleep", "a"))
        assert await asyncio.to_thread(wait_for, lambda: controller.draining)
        engine._wake, gate = gated(engine._wake)
        second = asyncio.ensure_future(request(controller))
        assert await asyncio.to_thread(wait_for, lambda: controller.waiting == 1)
        done.set()
        reply = await sleep
        assert (reply["state"], reply["changed"], reply["woke_for"]) == ("waking", True, 1)
        assert outcome("sleep", "a", reply).startswith("a slept in ")
        assert "woke it again: it is waking, serving 1" in outcome("sleep", "a", reply)
        gate.set()
        await asyncio.gather(first, second)
        assert controller.state == "awake" and books(pool.path, "a")["sleeps"] == 1

    asyncio.run(main())


def test_a_sleep_by_hand_while_a_request_wakes_the_model_is_no_already_asleep(pool):
    """The books still say asleep while the controller wakes for a request:
    the sleep goes by the controller, and puts it to sleep once it is awake."""

    async def main():
        engine, controller = instance(pool.path, "a", 2)
        await asyncio.to_thread(control, pool.path, "sleep", "a")
        engine._wake, gate = gated(engine._wake)
        woken = asyncio.ensure_future(request(controller))
        assert await asyncio.to_thread(wait_for, lambda: controller.state == "waking")
        assert books(pool.path, "a")["state"] == "asleep"
        reports = []
        report = controller.report
        controller.report = lambda: reports.append(1) or report()
        sleep = asyncio.ensure_future(asyncio.to_thread(control, pool.path, "sleep", "a"))
        assert await asyncio.to_thread(wait_for, lambda: reports, 60)  # the daemon looked
        gate.set()
        reply = await sleep
        assert (reply["state"], reply["changed"]) == ("asleep", True)
        await woken
        assert books(pool.path, "a")["sleeps"] == 2

    asyncio.run(main())


def test_a_wake_whose_copy_outlasts_the_wait_for_memory_is_waited_for(tmp_path):
    """The wait for memory is bounded by --wait-timeout; the wake's own work
    once it holds its memory (a copy, a cold reload: minutes) is not."""
    daemon = LiveDaemon(str(tmp_path / "d.sock"), 4, 1 << 20, wait_timeout=0.5)
    daemon.daemon.ask_timeout = 0.5
    path = daemon.path

    async def main():
        engine, controller = instance(path, "b", 2)
        await asyncio.to_thread(control, path, "sleep", "b")
        lease = engine.worker.lease
        copying = threading.Event()

        def lease_then_copy(n):
            got = lease(n)
            copying.set()
            assert gate.wait(60)
            return got

        engine.worker.lease, gate = lease_then_copy, threading.Event()
        wake = asyncio.ensure_future(asyncio.to_thread(control, path, "wake", "b"))
        assert await asyncio.to_thread(copying.wait, 60)
        await asyncio.sleep(2.0)  # twice the wait for memory and the answer
        gate.set()
        assert (await wake)["state"] == "awake"

    try:
        asyncio.run(main())
    finally:
        daemon.stop()
