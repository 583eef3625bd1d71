"""The vLLM 0.23 engine-client patch (``patches/async_llm_v023.py``), as far
as a machine with vLLM 0.32 and no NPU can test it honestly: it imports
here, applies nothing off the NPU platform nor on any vLLM but 0.23, and its
own pieces behave: the 503 built on vLLM 0.23's real ``GenerationError``
(read from its sdist), the app's handlers on a FastAPI app, and the shared
engine-client logic (``async_llm.patch_engine_client``) on a stand-in client
with 0.23's ``wake_up`` contract, against a real daemon. Its targets are
checked against vLLM 0.23's sources in tests/test_check_upstream.py.
Nothing here runs vLLM 0.23, or pretends to."""

import asyncio
import functools
import logging
import sys
import types
from http import HTTPStatus

import pytest
from test_check_upstream import load_tool, npu_sources  # noqa: F401  (a fixture)

from conftest import LiveDaemon, assert_books_balance
from vllm_mux import controller
from vllm_mux.patches import NPU_PATCHES, PATCHES, async_llm, async_llm_v023

SERVER = "vllm.entrypoints.openai.api_server"


def engine_client_methods():
    from vllm.v1.engine.async_llm import AsyncLLM

    names = ("__init__", "generate", "encode", "sleep", "wake_up")
    return {name: AsyncLLM.__dict__[name] for name in names}


def test_it_is_an_npu_patch_only():
    assert "async_llm_v023" in NPU_PATCHES and "async_llm_v023" not in PATCHES
    assert NPU_PATCHES.index("async_llm_v023") < NPU_PATCHES.index("engine_core_v023")


def test_imports_and_apply_is_a_no_op_off_npu():
    from vllm.entrypoints.openai import api_server
    from vllm.platforms import current_platform

    assert current_platform.device_type != "npu"
    before, build_app = engine_client_methods(), api_server.build_app
    assert async_llm_v023.apply() is None
    assert engine_client_methods() == before and api_server.build_app is build_app
    assert "vllm_ascend" not in sys.modules


def test_on_npu_with_vllm_032_it_applies_nothing(monkeypatch, caplog):
    """The NPU platform with the vLLM installed here (0.32): never patched."""
    from vllm.platforms import current_platform

    monkeypatch.setattr(type(current_platform), "device_type", "npu")
    before = engine_client_methods()
    with caplog.at_level(logging.WARNING, logger="vllm_mux.async_llm"):
        assert async_llm_v023.apply() is None
    assert engine_client_methods() == before
    assert "the engine-side patch is written for 0.23.0: not applied" in caplog.text


@pytest.mark.parametrize(
    "device, version, applies",
    [
        ("npu", "0.23.0", True),
        ("npu", "0.23.0+empty", True),  # vLLM built for vllm-ascend (VLLM_TARGET_DEVICE=empty)
        ("npu", "0.32.0", False),
        ("npu", "dev", False),
        ("cpu", "0.23.0", False),
        ("cuda", "0.23.0", False),
    ],
)
def test_the_guard(monkeypatch, device, version, applies):
    import vllm
    from vllm.platforms import current_platform

    monkeypatch.setattr(type(current_platform), "device_type", device)
    monkeypatch.setattr(vllm, "__version__", version)
    assert async_llm_v023.npu_vllm() is applies


# -- the 503, on vLLM 0.23's own GenerationError --


@pytest.fixture(scope="module")
def generation_error(npu_sources):  # noqa: F811
    """vLLM 0.23.0's ``GenerationError``, executed from its sdist's source."""
    tool = load_tool()
    tree = tool.SourceTree([npu_sources / "vllm-0.23.0"])
    namespace = {"HTTPStatus": HTTPStatus}
    exec(tree.source("vllm.entrypoints.openai.engine.protocol.GenerationError"), namespace)
    return namespace["GenerationError"]


def test_unavailable_is_a_0_23_generation_error_with_status_503(generation_error):
    unavailable = async_llm_v023.unavailable_error(generation_error)
    assert generation_error("x").status_code == HTTPStatus.INTERNAL_SERVER_ERROR
    e = unavailable("the instance failed to wake: no memory in time")
    assert isinstance(e, generation_error)
    assert e.status_code == HTTPStatus.SERVICE_UNAVAILABLE == 503
    assert str(e) == "the instance failed to wake: no memory in time"


# -- build_app: RetryAfter and the handlers, on a FastAPI app --


@pytest.fixture
def app(generation_error, monkeypatch):
    """A FastAPI app built as 0.23's build_app builds its handlers (upstream's
    500 for a dead engine), through ``with_mux_handlers``; ``terminate_if_errored``
    (0.23's ``vllm.entrypoints.launcher``, absent here) stood in for."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse
    from vllm.v1.engine.exceptions import EngineDeadError

    stopped = []
    launcher = types.ModuleType("vllm.entrypoints.launcher")
    launcher.terminate_if_errored = lambda server, engine: stopped.append((server, engine))
    monkeypatch.setitem(sys.modules, "vllm.entrypoints.launcher", launcher)
    unavailable = async_llm_v023.unavailable_error(generation_error)

    def upstream_build_app(args, supported_tasks=None, model_config=None):
        app = FastAPI()

        async def upstream_engine_error(request, exc):
            return JSONResponse({"error": {"code": 500}}, status_code=500)

        app.exception_handler(EngineDeadError)(upstream_engine_error)

        @app.get("/asleep")
        async def asleep():
            raise unavailable("the instance failed to wake: no memory in time")

        @app.get("/dead")
        async def dead():
            raise EngineDeadError()

        @app.get("/ok")
        async def ok():
            return {"ok": True}

        return app

    build_app = async_llm_v023.with_mux_handlers(upstream_build_app, unavailable, EngineDeadError)
    app = build_app(None, ("generate",), None)
    app.state.server, app.state.engine_client = "server", "engine"
    app.stopped = stopped
    return app


def test_a_failed_wake_answers_503_with_retry_after(app):
    from fastapi.testclient import TestClient

    reply = TestClient(app).get("/asleep")
    assert reply.status_code == 503
    assert reply.headers["retry-after"] == str(async_llm.RETRY_AFTER_S)
    error = reply.json()["error"]
    assert error["type"] == "ServiceUnavailableError" and error["code"] == 503
    assert error["message"] == "the instance failed to wake: no memory in time"
    assert app.stopped == []


def test_a_dead_engine_answers_503_and_stops_the_server_as_upstream_does(app):
    from fastapi.testclient import TestClient

    reply = TestClient(app).get("/dead")
    assert reply.status_code == 503  # not upstream's 500: vllm-mux serve restarts it
    assert reply.headers["retry-after"] == str(async_llm.RETRY_AFTER_S)
    assert reply.json()["error"]["message"] == async_llm.ENGINE_DEAD
    assert app.stopped == [("server", "engine")]


def test_other_answers_are_untouched(app):
    from fastapi.testclient import TestClient

    reply = TestClient(app).get("/ok")
    assert reply.status_code == 200 and "retry-after" not in reply.headers


def test_build_app_is_replaced_in_main_too_when_the_server_runs_with_python_m(monkeypatch):
    api_server = types.ModuleType(SERVER)
    assert async_llm_v023.server_modules(api_server) == [api_server]
    main = types.ModuleType("__main__")  # python -m vllm.entrypoints.openai.api_server
    main.__spec__ = types.SimpleNamespace(name=SERVER)
    monkeypatch.setitem(sys.modules, "__main__", main)
    assert async_llm_v023.server_modules(api_server) == [api_server, main]
    main.__spec__ = types.SimpleNamespace(name="vllm.entrypoints.cli.main")  # vllm serve
    assert async_llm_v023.server_modules(api_server) == [api_server]


# -- the shared engine-client logic, on a stand-in with 0.23's contract --


class EngineDead(Exception):
    """Stands in for vLLM's EngineDeadError."""


class FakeClient:
    """vLLM 0.23's ``AsyncLLM`` as the patch sees it: generate and encode are
    async generators; ``wake_up`` returns nothing (0.32's returns a bool)."""

    def __init__(self):
        self.calls, self.asleep, self.wake_fails, self.dies = [], False, False, False

    async def generate(self, prompt, sampling_params, request_id, **kwargs):
        assert not self.asleep, "a request reached a sleeping engine"
        for token in prompt.split():
            if self.dies:
                raise EngineDead()
            yield token

    async def encode(self, prompt, pooling_params, request_id, **kwargs):
        assert not self.asleep, "a request reached a sleeping engine"
        yield len(prompt)

    async def sleep(self, level: int = 1, mode="abort") -> None:
        self.calls.append(("sleep", level, mode))
        self.asleep = True

    async def wake_up(self, tags=None) -> None:
        self.calls.append(("wake_up", tags))
        await asyncio.sleep(0.05)
        if self.wake_fails:
            raise RuntimeError("no memory in time")
        self.asleep = False

    async def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        self.calls.append(("collective_rpc", method))
        return [True]


@pytest.fixture
def patched_client(tmp_path, monkeypatch, generation_error):
    daemon = LiveDaemon(str(tmp_path / "d.sock"), 4, 1 << 20, wait_timeout=1)
    daemon.client().hello("fake", key="k")  # the instance the controller joins
    monkeypatch.setenv("VLLM_MUX_SOCKET", daemon.path)
    monkeypatch.setenv("VLLM_MUX_INSTANCE", "k")
    monkeypatch.setenv("VLLM_MUX_IDLE_TTL", "0")
    # A test's daemon goes away for good: the server this would stop is pytest.
    monkeypatch.setattr(
        controller, "Controller", functools.partial(controller.Controller, on_lost=lambda: None)
    )
    cls = type("PatchedClient", (FakeClient,), {})
    unavailable = async_llm_v023.unavailable_error(generation_error)
    async_llm.patch_engine_client(cls, unavailable, EngineDead, woke=None)
    yield cls, unavailable
    assert_books_balance(daemon.status())
    daemon.stop()


def test_a_request_to_a_sleeping_client_wakes_it(patched_client):
    cls, _ = patched_client

    async def main():
        client = cls()
        assert client._mux is not None
        assert await client.sleep(1) is None
        assert client.asleep and client._mux.state == "asleep"
        out = [t async for t in client.generate("a b c", None, "r1")]
        assert out == ["a", "b", "c"] and client._mux.state == "awake"
        assert [t async for t in client.encode("abcd", None, "r2")] == [4]
        assert client.calls == [("sleep", 1, "abort"), ("wake_up", None)]  # one wake

    asyncio.run(main())


def test_wake_up_keeps_0_23s_contract(patched_client):
    """0.23's ``/wake_up`` awaits ``wake_up`` and ignores its result, which
    upstream's is None: ours returns None too (0.32's returns True)."""
    cls, _ = patched_client

    async def main():
        client = cls()
        await client.sleep(1, "wait")
        assert await client.wake_up() is None
        assert await client.wake_up(["weights"]) is None  # already awake: no second wake
        assert client.calls == [("sleep", 1, "wait"), ("wake_up", None)]
        assert not client.asleep

    asyncio.run(main())


def test_a_failed_wake_is_a_503_and_the_next_request_tries_again(patched_client):
    cls, unavailable = patched_client

    async def main():
        client = cls()
        await client.sleep()
        client.wake_fails = True
        with pytest.raises(unavailable) as failed:
            [t async for t in client.generate("a", None, "r1")]
        assert failed.value.status_code == 503 and "no memory in time" in str(failed.value)
        client.wake_fails = False
        assert [t async for t in client.generate("a", None, "r2")] == ["a"]
        assert [c[0] for c in client.calls] == ["sleep", "wake_up", "wake_up"]

    asyncio.run(main())


def test_an_engine_dying_under_a_request_is_a_503(patched_client):
    cls, unavailable = patched_client

    async def main():
        client = cls()
        client.dies = True
        with pytest.raises(unavailable) as failed:
            [t async for t in client.generate("a", None, "r1")]
        assert str(failed.value) == async_llm.ENGINE_DEAD
        assert client._mux.in_flight == 0

    asyncio.run(main())


def test_built_outside_a_loop_it_passes_through(monkeypatch):
    # Patching sets VLLM_MUX_INSTANCE if unset: not in this process's environment for good.
    monkeypatch.setenv("VLLM_MUX_INSTANCE", "outside")
    cls = type("Unpatched", (FakeClient,), {})
    async_llm.patch_engine_client(cls, RuntimeError, EngineDead, woke=None)
    client = cls()  # no running loop: no controller, upstream's behaviour
    assert client._mux is None

    async def main():
        await client.sleep(2)
        assert client.asleep
        assert await client.wake_up(["weights"]) is None
        assert client.calls == [("sleep", 2, "abort"), ("wake_up", ["weights"])]

    asyncio.run(main())
