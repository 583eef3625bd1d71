"""The controller's states under cancellation, with a fake engine and a real daemon;
its daemon restarting, or gone for good."""

import asyncio
import time

import pytest

from conftest import LiveDaemon, assert_books_balance
from vllm_mux.controller import Controller, WakeError
from vllm_mux.daemon.client import Client


@pytest.fixture
def daemon_socket(tmp_path):
    daemon = LiveDaemon(str(tmp_path / "d.sock"), 4, 1 << 20, wait_timeout=1)
    daemon.client().hello("fake", key="k")  # the instance the controller joins
    yield daemon.path
    assert_books_balance(daemon.status())
    daemon.stop()


def make(path, *, wake_seconds=0.3, wake_fails=False):
    calls = {"wake": 0, "sleep": 0}

    async def wake_up():
        calls["wake"] += 1
        await asyncio.sleep(wake_seconds)
        if wake_fails:
            raise RuntimeError("no memory in time")

    async def sleep(**kwargs):
        calls["sleep"] += 1

    loop = asyncio.get_running_loop()
    controller = Controller(
        path, "k", sleep, wake_up, idle_ttl=0, pinned=False, loop=loop, on_lost=lambda: None
    )
    return controller, calls


async def use(controller) -> None:
    async with controller.request():
        await asyncio.sleep(0)


def test_a_request_cancelled_during_the_wake_leaves_it_awake(daemon_socket):
    async def main():
        controller, calls = make(daemon_socket)
        assert await controller.sleep()
        assert controller.state == "asleep"
        first = asyncio.ensure_future(use(controller))
        await asyncio.sleep(0.05)
        assert controller.state == "waking"
        first.cancel()  # its client left mid-wake
        await asyncio.sleep(0.5)
        assert controller.state == "awake"  # the wake finished all the same
        await asyncio.wait_for(use(controller), 2)  # and the next request goes through
        assert calls == {"wake": 1, "sleep": 1}
        assert (controller.in_flight, controller.waiting) == (0, 0)

    asyncio.run(main())


def test_a_failed_wake_fails_its_waiters_and_the_next_request_retries(daemon_socket):
    async def main():
        controller, calls = make(daemon_socket, wake_fails=True)
        await controller.sleep()
        results = await asyncio.gather(*(use(controller) for _ in range(3)), return_exceptions=True)
        assert all(isinstance(r, WakeError) for r in results)
        assert controller.state == "asleep" and calls["wake"] == 1  # one wake, joined
        with pytest.raises(WakeError):
            await use(controller)
        assert calls["wake"] == 2  # tried again
        assert (controller.in_flight, controller.waiting) == (0, 0)

    asyncio.run(main())


def test_a_drain_waits_for_requests_in_flight(daemon_socket):
    async def main():
        controller, calls = make(daemon_socket)
        release = asyncio.Event()

        async def long_request():
            async with controller.request():
                await release.wait()

        running = asyncio.ensure_future(long_request())
        await asyncio.sleep(0.05)
        sleeping = asyncio.ensure_future(controller.sleep())
        await asyncio.sleep(0.1)
        assert controller.draining and controller.state == "awake" and calls["sleep"] == 0
        waiting = asyncio.ensure_future(use(controller))  # held while draining
        await asyncio.sleep(0.1)
        assert controller.waiting == 1
        release.set()
        await running
        assert await sleeping
        await asyncio.wait_for(waiting, 2)  # then it woke the instance again
        assert calls == {"wake": 1, "sleep": 1} and controller.state == "awake"

    asyncio.run(main())


def test_the_controller_reconnects_to_a_restarted_daemon(daemon_factory):
    """The daemon dies: the controller keeps its server up and joins the daemon
    started next on the same socket, once its worker is known there again."""
    first = daemon_factory("4MiB", args=["--chunk-size", "1MiB"])
    worker = Client(first.socket)
    worker.hello("fake", key="k")
    lost = []

    async def main():
        loop = asyncio.get_running_loop()
        Controller(
            first.socket, "k", None, None, 0, pinned=True, loop=loop, on_lost=lambda: lost.append(1)
        )
        first.process.proc.kill()
        first.process.proc.wait()
        second = LiveDaemon(first.socket, 4, 1 << 20)
        try:
            again = Client(first.socket)
            again.hello("fake", key="k")  # the worker, reconnected

            def joined():
                rows = second.status()["instances"]
                return rows and rows[0]["pinned"]  # the controller said hello again

            assert await asyncio.to_thread(wait_for, joined)
            assert lost == []
            assert_books_balance(second.status())
            again.close()
        finally:
            second.stop()

    asyncio.run(main())
    worker.close()


def test_the_controller_stops_the_server_when_the_daemon_stays_away(daemon_factory, monkeypatch):
    monkeypatch.setenv("VLLM_MUX_RECONNECT_S", "0.5")
    daemon = daemon_factory("4MiB", args=["--chunk-size", "1MiB"])
    worker = Client(daemon.socket)
    worker.hello("fake", key="k")
    lost = []

    async def main():
        loop = asyncio.get_running_loop()
        Controller(daemon.socket, "k", None, None, 0, False, loop, on_lost=lambda: lost.append(1))
        daemon.process.proc.kill()
        assert await asyncio.to_thread(wait_for, lambda: lost)

    asyncio.run(main())
    worker.close()


def wait_for(predicate, timeout: float = 120.0):
    """``predicate()``'s first true value; the timeout only bounds a failure."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return value
