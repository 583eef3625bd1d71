"""Wake an instance for its requests; sleep it when idle or asked by the daemon.

Targets, on ``vllm.v1.engine.async_llm.AsyncLLM`` (the API server's engine
client):
- ``__init__``: once upstream has started the engine, attach a
  ``vllm_mux.controller.Controller`` to it (per-instance ``VLLM_MUX_IDLE_TTL``,
  ``VLLM_MUX_PINNED`` and the switch policy's knobs, ``VLLM_MUX_QUANTUM_S``,
  ``VLLM_MUX_LINGER_S``, ``VLLM_MUX_MAX_WAIT_S``, ``VLLM_MUX_PRIORITY``, from
  the environment).
- ``generate`` and ``encode``: each request first passes the controller, which
  wakes a sleeping instance and counts the request in flight. Upstream would
  queue a request for a sleeping engine until someone called ``/wake_up``.
  A wake that fails answers 503 (``GracefulHTTPError``) instead of a stack
  trace; the next request tries again. One whose engine dies under it (its
  worker was killed) fails with a 503 too, in its stream if it has one.
- ``sleep`` and ``wake_up``: upstream's ``/sleep`` and ``/wake_up`` go through
  the controller, so that its state stays the engine's state. The controller
  also reaches the workers through ``collective_rpc`` when the daemon takes a
  sleeping model's host copy back (``mux_drop_host``, worker.py).
And ``vllm.entrypoints.launchers.app.init_entrypoints_middleware``: also adds
a middleware that puts ``Retry-After`` on 503 answers, and a handler for
``EngineDeadError`` (a request to an engine whose worker died) that answers
503 instead of upstream's ``engine_error_handler``'s 500, stopping the server
as upstream does, so that ``vllm-mux serve`` restarts it.
Upstream: delete once vLLM wakes a sleeping engine on request (vllm#36753
shows two wakes at once hanging) and exposes a hook for idle policy.
"""

import asyncio
import os
import uuid

# Upstream symbols this patch replaces or relies on -> sha256 of their source.
TARGETS = {
    "vllm.v1.engine.async_llm.AsyncLLM.__init__": "337e63555ec24df9",
    "vllm.v1.engine.async_llm.AsyncLLM.generate": "5bd0ee90459b0e29",
    "vllm.v1.engine.async_llm.AsyncLLM.encode": "d118957480161971",
    "vllm.v1.engine.async_llm.AsyncLLM.sleep": "bb67106aaeca1cb7",
    "vllm.v1.engine.async_llm.AsyncLLM.wake_up": "5bcec2632c8c4fe9",
    "vllm.entrypoints.serve.exception_handling.handlers.vllm_error.engine_error_handler": "33ab4b4cab55742e",  # noqa: E501
    "vllm.entrypoints.launchers.launcher.terminate_if_errored": "be01d1ccb65c4097",
    "vllm.entrypoints.serve.middleware.register.init_entrypoints_middleware": "583c2958f2eb48d0",
    "vllm.entrypoints.launchers.app.build_app": "6438b7e524cb0b4f",
}

RETRY_AFTER_S = 5
ENGINE_DEAD = "the model's engine died; it is being restarted, try again"


def apply() -> None:
    from http import HTTPStatus

    from vllm.entrypoints.launchers import app as launcher_app
    from vllm.exceptions import GracefulHTTPError
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.engine.exceptions import EngineDeadError

    class Unavailable(GracefulHTTPError):
        def __init__(self, message: str):
            super().__init__(message, HTTPStatus.SERVICE_UNAVAILABLE)

    # vLLM 0.32's wake_up returns whether the engine is fully awake: ours
    # always wakes it fully.
    patch_engine_client(AsyncLLM, Unavailable, EngineDeadError, woke=True)

    upstream_middleware = launcher_app.init_entrypoints_middleware

    def init_entrypoints_middleware(args, app, supported_tasks, *rest, **kwargs):
        upstream_middleware(args, app, supported_tasks, *rest, **kwargs)
        app.add_middleware(RetryAfter)
        app.add_exception_handler(EngineDeadError, engine_dead)

    launcher_app.init_entrypoints_middleware = init_entrypoints_middleware


def patch_engine_client(engine_class, unavailable, engine_dead_error, woke) -> None:
    """Replace ``__init__``, ``generate``, ``encode``, ``sleep`` and
    ``wake_up`` on ``engine_class``, vLLM's ``AsyncLLM`` (shared with the
    vLLM 0.23 patch, ``async_llm_v023``). ``unavailable(message)`` is the
    exception that this vLLM answers with a 503; ``engine_dead_error`` the
    one its engine client raises when the engine died; ``woke`` what
    ``wake_up`` returns after a wake through the controller."""
    from vllm_mux.controller import DEFAULT_IDLE_TTL, Controller, WakeError, knobs_from_env

    # Every process of this instance (API server, engine, workers) shares the
    # key that joins the worker's and the controller's connections.
    os.environ.setdefault("VLLM_MUX_INSTANCE", uuid.uuid4().hex)

    upstream_init = engine_class.__init__
    upstream_generate = engine_class.generate
    upstream_encode = engine_class.encode
    upstream_sleep = engine_class.sleep
    upstream_wake_up = engine_class.wake_up

    def __init__(self, *args, **kwargs):
        upstream_init(self, *args, **kwargs)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # built outside a server's loop: nobody to control
            self._mux = None
            return
        self._mux = Controller(
            os.environ["VLLM_MUX_SOCKET"],
            os.environ["VLLM_MUX_INSTANCE"],
            sleep=lambda **kw: upstream_sleep(self, **kw),
            wake_up=lambda: upstream_wake_up(self),
            drop_host=lambda: self.collective_rpc("mux_drop_host"),
            idle_ttl=float(os.environ.get("VLLM_MUX_IDLE_TTL", DEFAULT_IDLE_TTL)),
            pinned=os.environ.get("VLLM_MUX_PINNED", "") not in ("", "0"),
            loop=loop,
            knobs=knobs_from_env(),
        )

    def gated(upstream):
        async def through_controller(self, *args, **kwargs):
            if self._mux is None:
                async for output in upstream(self, *args, **kwargs):
                    yield output
                return
            try:
                async with self._mux.request():
                    async for output in upstream(self, *args, **kwargs):
                        yield output
            except WakeError as e:
                raise unavailable(str(e)) from e
            except engine_dead_error as e:  # mid-request: a 503 (in the stream, if one)
                raise unavailable(ENGINE_DEAD) from e

        through_controller.__name__ = upstream.__name__
        return through_controller

    async def sleep(self, level: int = 1, mode="abort") -> None:
        if self._mux is None:
            return await upstream_sleep(self, level, mode)
        await self._mux.sleep(drain=False, level=level, mode=mode)

    async def wake_up(self, tags=None):
        if self._mux is None:
            return await upstream_wake_up(self, tags)
        await self._mux.wake_up()
        return woke

    engine_class.__init__ = __init__
    engine_class.generate = gated(upstream_generate)
    engine_class.encode = gated(upstream_encode)
    engine_class.sleep = sleep
    engine_class.wake_up = wake_up


class RetryAfter:
    """ASGI middleware: a 503 tells the client when to come back."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_retry_after(message):
            if message["type"] == "http.response.start" and message["status"] == 503:
                headers = [
                    *message.get("headers", []),
                    (b"retry-after", str(RETRY_AFTER_S).encode()),
                ]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_retry_after)


async def engine_dead(request, exc):
    """A request to an engine that died (its worker was killed): 503, which
    RetryAfter completes, instead of upstream's 500, since ``vllm-mux serve``
    restarts the instance. Upstream's handler also stops the server, so that
    its supervisor notices: so does this one."""
    from vllm.entrypoints.launchers.launcher import terminate_if_errored

    return dead_engine_response(request, terminate_if_errored)


def dead_engine_response(request, terminate_if_errored):
    """``engine_dead``'s answer, given this vLLM's ``terminate_if_errored``."""
    terminate_if_errored(server=request.app.state.server, engine=request.app.state.engine_client)
    return unavailable_response(ENGINE_DEAD)


def unavailable_response(message: str):
    """A 503 in OpenAI's error shape (RetryAfter adds the header)."""
    from starlette.responses import JSONResponse

    error = {"message": message, "type": "ServiceUnavailableError", "param": None, "code": 503}
    return JSONResponse({"error": error}, status_code=503)
