"""The controller's states under cancellation, with a fake engine and a real daemon;
its daemon restarting, or gone for good."""

import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import LiveDaemon, assert_books_balance
from vllm_mux.controller import Controller, WakeError
from vllm_mux.daemon.client import Client, DaemonError


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


def test_requests_that_waited_for_a_wake_run_in_its_turn_even_if_asked_to_sleep(daemon_socket):
    """The daemon may ask an instance to sleep the moment it wakes: every
    request that waited for that wake still runs before the sleep, instead of
    waiting for (and causing) another wake."""

    async def main():
        controller, calls = make(daemon_socket)
        engine_wake = controller._wake_up
        asked = []

        async def wake_up():  # the daemon's "sleep" lands as the engine finishes waking
            await engine_wake()
            if not asked:
                asked.append(asyncio.ensure_future(controller.sleep()))

        controller._wake_up = wake_up
        await controller.sleep()
        turns = []  # the turn each request ran in

        async def request():
            async with controller.request():
                turns.append(controller.turn)

        waiters = [asyncio.ensure_future(request()) for _ in range(5)]
        await asyncio.sleep(0.05)
        assert controller.state == "waking" and controller.waiting == 5
        await asyncio.wait_for(asyncio.gather(*waiters), 5)
        assert await asked[0]  # it slept, after all five ran
        assert turns == [1] * 5 and calls == {"wake": 1, "sleep": 2}
        assert (controller.in_flight, controller.waiting, controller.owed) == (0, 0, 0)

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


# -- a user's controls: the daemon's sleep, wake, pin and unpin by model name --


class Engine:
    """A fake engine whose sleep and wake move its worker's chunks on the
    daemon's books, as vLLM's workers do; it starts awake, holding ``chunks``."""

    def __init__(self, path: str, model: str, chunks: int, fail: str = ""):
        self.chunks, self.fail = chunks, fail
        self.worker = Client(path, timeout=30)
        self.worker.hello(model, key=model)
        self.ids, self.fds = self.worker.lease(chunks)
        self.worker.set_state("awake")

    async def sleep(self, **kwargs):
        await asyncio.to_thread(self._sleep)

    async def wake_up(self):
        await asyncio.to_thread(self._wake)

    def _sleep(self):
        if self.fail == "sleep":
            raise RuntimeError("the worker could not unmap")
        self.worker.set_state("sleeping")
        self.worker.release(self.ids)
        for fd in self.fds:
            os.close(fd)
        self.ids, self.fds = [], []
        self.worker.set_state("asleep")

    def _wake(self):
        if self.ids:  # the engine's wake_up after a failed sleep: still awake
            return
        self.worker.set_state("waking")
        try:
            self.ids, self.fds = self.worker.lease(self.chunks)
        except DaemonError:
            self.worker.set_state("asleep")
            raise
        self.worker.set_state("awake")


def join(path, model, chunks, *, pinned=False, idle_ttl=0.0, fail=""):
    """An instance of ``model``: its fake engine and a real controller, on this loop."""
    engine = Engine(path, model, chunks, fail)
    loop = asyncio.get_running_loop()
    Controller(path, model, engine.sleep, engine.wake_up, idle_ttl, pinned, loop, lambda: None)
    return engine


def control(path: str, op: str, model: str) -> dict:
    """The daemon's reply to a control, as `vllm-mux OP MODEL` gets it (blocking)."""
    client = Client(path, timeout=60)
    try:
        return getattr(client, op)(model)
    finally:
        client.close()


def books(path: str, model: str) -> dict:
    client = Client(path)
    try:
        status = client.status()
    finally:
        client.close()
    assert_books_balance(status)
    (found,) = [i for i in status["instances"] if i["model"] == model]
    return found


@pytest.fixture
def pool(tmp_path):
    """A live daemon of 4 chunks whose leases wait up to 2 s."""
    daemon = LiveDaemon(str(tmp_path / "d.sock"), 4, 1 << 20, wait_timeout=2)
    yield daemon.path
    assert_books_balance(daemon.status())
    daemon.stop()


def test_sleep_and_wake_by_name_wait_for_the_books(pool):
    async def main():
        join(pool, "a", 2)
        reply = await asyncio.to_thread(control, pool, "sleep", "a")
        assert (reply["state"], reply["changed"]) == ("asleep", True) and reply["seconds"] >= 0
        assert (books(pool, "a")["state"], books(pool, "a")["chunks"]) == ("asleep", 0)
        again = await asyncio.to_thread(control, pool, "sleep", "a")
        assert (again["state"], again["changed"]) == ("asleep", False)
        reply = await asyncio.to_thread(control, pool, "wake", "a")
        assert (reply["state"], reply["changed"]) == ("awake", True)
        a = books(pool, "a")
        assert (a["state"], a["chunks"], a["wakes"], a["sleeps"]) == ("awake", 2, 1, 1)
        again = await asyncio.to_thread(control, pool, "wake", "a")
        assert again["changed"] is False

    asyncio.run(main())


def test_a_wake_by_hand_has_others_sleep_for_its_memory(pool):
    async def main():
        join(pool, "b", 3)
        await asyncio.to_thread(control, pool, "sleep", "b")
        join(pool, "a", 3)  # the pool holds one of them
        reply = await asyncio.to_thread(control, pool, "wake", "b")
        assert reply["state"] == "awake"
        assert (books(pool, "a")["state"], books(pool, "b")["chunks"]) == ("asleep", 3)

    asyncio.run(main())


def test_a_pinned_model_refuses_a_sleep_by_hand_and_is_never_asked_for_another(pool):
    async def main():
        join(pool, "b", 3)
        await asyncio.to_thread(control, pool, "sleep", "b")
        join(pool, "a", 3)
        reply = await asyncio.to_thread(control, pool, "pin", "a")
        assert (reply["pinned"], reply["changed"], reply["state"]) == (True, True, "awake")
        assert books(pool, "a")["pinned"]
        with pytest.raises(DaemonError, match=r"a is pinned: `vllm-mux unpin a` first") as e:
            await asyncio.to_thread(control, pool, "sleep", "a")
        assert e.value.code == "pinned"
        # b's wake needs memory only a pinned model holds: refused at once, saying why.
        with pytest.raises(DaemonError, match=r"b cannot wake: 3 chunks .*pinned a \(3\)") as e:
            await asyncio.to_thread(control, pool, "wake", "b")
        assert e.value.code == "pinned"
        assert (books(pool, "a")["state"], books(pool, "b")["state"]) == ("awake", "asleep")
        reply = await asyncio.to_thread(control, pool, "unpin", "a")
        assert (reply["pinned"], reply["changed"]) == (False, True)
        assert (await asyncio.to_thread(control, pool, "wake", "b"))["state"] == "awake"
        assert books(pool, "a")["state"] == "asleep"

    asyncio.run(main())


def test_an_unpin_at_run_time_lets_the_idle_sleep_happen(pool):
    async def main():
        join(pool, "a", 2, pinned=True, idle_ttl=0.1)
        join(pool, "c", 2, idle_ttl=0.1)  # its twin, unpinned: the idle checks ran once it sleeps
        assert await asyncio.to_thread(wait_for, lambda: books(pool, "c")["state"] == "asleep")
        assert books(pool, "a")["state"] == "awake"  # idle as long, but pinned
        await asyncio.to_thread(control, pool, "unpin", "a")
        assert await asyncio.to_thread(wait_for, lambda: books(pool, "a")["state"] == "asleep")

    asyncio.run(main())


def test_a_failed_sleep_by_hand_says_why_and_leaves_it_awake(pool):
    async def main():
        join(pool, "a", 2, fail="sleep")
        with pytest.raises(DaemonError, match="a failed to sleep: the worker could not unmap"):
            await asyncio.to_thread(control, pool, "sleep", "a")
        assert books(pool, "a")["state"] == "awake"

    asyncio.run(main())


def test_controls_name_the_models_the_daemon_knows(pool):
    worker = Client(pool)
    worker.hello("starting", key="s")  # no controller yet: its API server is not up
    try:
        for op in ("sleep", "wake", "pin", "unpin"):
            with pytest.raises(DaemonError, match=r"no model 'nope' on this daemon; it knows st"):
                control(pool, op, "nope")
        with pytest.raises(DaemonError, match="starting is not running") as e:
            control(pool, "sleep", "starting")
        assert e.value.code == "not_running"
        worker.set_state("awake")  # loaded, and its API server not up yet
        with pytest.raises(DaemonError, match="its API server has not joined the daemon yet"):
            control(pool, "pin", "starting")
        worker.lease(1)
        worker.close()  # its process lives on: kept on the books, disconnected
        assert wait_for(lambda: books(pool, "starting")["state"] == "disconnected")
        with pytest.raises(DaemonError, match=r"starting is not running \(its instance is disc"):
            control(pool, "wake", "starting")
    finally:
        worker.close()


def test_the_routers_mux_endpoints_need_the_key_and_answer_in_openais_shape(pool):
    """Under a served name with a slash, as many are (Qwen/Qwen3-8B)."""
    from fastapi.testclient import TestClient

    from vllm_mux.router.app import Upstream, make_app

    upstreams = {"org/a": "http://127.0.0.1:9", "ghost": "http://127.0.0.1:9"}
    upstreams["back"] = Upstream("http://127.0.0.1:9", state="restarting")
    app = make_app(upstreams, daemon_socket=pool, api_key="k")

    async def main():
        join(pool, "org/a", 2)
        with TestClient(app, base_url="http://localhost:8000") as http:

            def post(path: str, key="k"):
                headers = {"Authorization": f"Bearer {key}"} if key else {}
                return http.post(f"/mux/models/{path}", headers=headers)

            def code(r):
                return r.status_code, r.json()["error"]["code"]

            for key in (None, "wrong"):
                refused = await asyncio.to_thread(post, "org/a/sleep", key)
                assert code(refused) == (401, "invalid_api_key")
            assert code(await asyncio.to_thread(post, "b/sleep")) == (404, "model_not_found")
            # Served by the router, unknown to the daemon (its server is not up
            # yet): not "model_not_found", which says the router does not serve it.
            assert code(await asyncio.to_thread(post, "ghost/wake")) == (503, "model_not_running")
            assert code(await asyncio.to_thread(post, "back/wake")) == (503, "model_unavailable")
            r = await asyncio.to_thread(post, "org/a/pin")
            assert r.json() | {"message": ""} == {
                "model": "org/a", "pinned": True, "changed": True, "state": "awake", "message": ""
            }  # fmt: skip
            assert code(await asyncio.to_thread(post, "org/a/sleep")) == (409, "pinned")
            assert (await asyncio.to_thread(post, "org/a/unpin")).json()["pinned"] is False
            r = await asyncio.to_thread(post, "org/a/sleep")
            assert r.status_code == 200 and r.json()["state"] == "asleep"
            assert r.json()["message"].startswith("org/a is asleep (slept in ")
            assert r.headers["x-content-type-options"] == "nosniff"
            assert r.headers["cache-control"] == "no-store"
        assert books(pool, "org/a")["chunks"] == 0

    asyncio.run(main())


def test_ctrl_c_on_a_wake_by_hand_is_one_line_and_the_wake_goes_on(tmp_path):
    """The wake waits for memory a starting instance holds (nobody can ask it
    to sleep); the user gives up waiting; the holder lets the memory go: the
    wake goes through all the same."""
    daemon = LiveDaemon(str(tmp_path / "d.sock"), 4, 1 << 20, wait_timeout=60)
    path = daemon.path

    async def main():
        join(path, "b", 3)
        await asyncio.to_thread(control, path, "sleep", "b")
        holder = Client(path)
        holder.hello("holder", key="holder")  # no controller: still starting
        ids, fds = holder.lease(3)
        argv = [sys.executable, "-m", "vllm_mux.cli", "wake", "b", "--socket", path]
        # As from a terminal: a run in the background (CI under nohup) inherits
        # SIGINT ignored, and Python then never turns it into KeyboardInterrupt.
        cli = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        assert await asyncio.to_thread(wait_for, lambda: books(path, "b")["state"] == "waking")
        cli.send_signal(signal.SIGINT)
        out, err = await asyncio.to_thread(cli.communicate, timeout=60)
        assert cli.returncode == 130 and not out
        assert err == "vllm-mux: interrupted; the daemon sees the wake of b through\n"
        holder.release(ids)
        for fd in fds:
            os.close(fd)
        assert await asyncio.to_thread(wait_for, lambda: books(path, "b")["state"] == "awake")
        holder.close()

    try:
        asyncio.run(main())
    finally:
        daemon.stop()
