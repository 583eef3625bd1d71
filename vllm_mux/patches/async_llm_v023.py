"""``async_llm`` on vLLM 0.23 (Ascend NPUs, with vllm-ascend 0.23.0.post1):
wake an instance for its requests; sleep it when idle or asked by the daemon.

Written against vLLM 0.23.0's sources; never run on an NPU, nor on vLLM
0.23 at all (nothing here can run it). ``apply`` does nothing unless this
process runs on the NPU platform with vLLM 0.23: it never patches the vLLM
0.32 of the CPU and CUDA platforms (``async_llm`` does that).

Why its own file: the engine client's targets differ in 0.23 (``__init__``,
``generate``, ``encode`` and ``wake_up`` are other code), vLLM 0.23 has no
``GracefulHTTPError`` (0.32's way to answer a request with a 503), and the
server code that ``async_llm`` hooks sits elsewhere: 0.23 registers its
exception handlers in ``entrypoints/openai/api_server.py:build_app`` (0.32:
``launchers/app.py:init_entrypoints_middleware``), its
``engine_error_handler`` is in ``entrypoints/serve/utils/server_utils.py``
and ``terminate_if_errored`` in ``entrypoints/launcher.py``. The behaviour,
the reasons and the code are ``async_llm``'s: the engine-client part is
its ``patch_engine_client``, the middleware and the answers are its
``RetryAfter``, ``dead_engine_response`` and ``unavailable_response``.

Targets, in vLLM 0.23.0:
- ``vllm.v1.engine.async_llm.AsyncLLM``: ``__init__`` (attach a
  ``vllm_mux.controller.Controller``), ``generate`` and ``encode`` (each
  request passes the controller, which wakes a sleeping instance), ``sleep``
  and ``wake_up`` (upstream's ``/sleep`` and ``/wake_up`` go through the
  controller), exactly as ``async_llm`` on 0.32; ``collective_rpc`` is how
  the controller reaches the workers' ``mux_drop_host``
  (``patches/npu_worker.py``). One difference: 0.23's ``wake_up`` returns
  nothing (0.32's says whether the engine is fully awake), so ours returns
  None too.
- A wake that fails, or an engine that dies under a request, answers 503.
  In 0.23 that is a ``GenerationError``
  (``entrypoints/openai/engine/protocol.py``) whose ``status_code`` is 503:
  its serving code answers a streamed request with that status in the
  stream (``OpenAIServing._convert_generation_error_to_streaming_response``,
  or ``create_error_response``, which takes a ``GenerationError``'s status),
  and an unstreamed one through the app's exception handlers, where ours
  (below) answers it as ``async_llm``'s ``unavailable_response``.
- ``vllm.entrypoints.openai.api_server.build_app``: upstream's, then
  ``RetryAfter`` (a 503 says when to come back), a handler for that 503
  exception, and one for ``EngineDeadError`` that replaces upstream's
  ``engine_error_handler`` (a 500) with a 503, stopping the server as
  upstream does (``terminate_if_errored``) so that ``vllm-mux serve``
  restarts it. ``build_and_serve`` looks ``build_app`` up in its module at
  call time, so the module's attribute is replaced; where the server runs
  as ``python -m vllm.entrypoints.openai.api_server`` (how ``vllm-mux
  serve`` starts it, ``launch.py``) its code is the ``__main__`` module, a
  second copy, whose ``build_app`` is replaced as well.
Upstream: as ``async_llm``: delete once vLLM wakes a sleeping engine on
request (vllm#36753) and exposes a hook for idle policy; and once
vllm-ascend pairs with a vLLM that ``async_llm`` serves, this file goes.
"""

import logging
import sys

from vllm_mux.patches.async_llm import (
    RetryAfter,
    dead_engine_response,
    patch_engine_client,
    unavailable_response,
)

log = logging.getLogger("vllm_mux.async_llm")

_ENGINE = "vllm.v1.engine.async_llm.AsyncLLM"
_SERVER = "vllm.entrypoints.openai.api_server"
# Upstream symbols this patch replaces or relies on -> sha256 of their source in vLLM 0.23.0.
TARGETS = {
    f"{_ENGINE}.__init__": "21de44c03440aa87",
    f"{_ENGINE}.generate": "4e4b7963a54786b2",
    f"{_ENGINE}.encode": "e9881cd9e66a328a",
    f"{_ENGINE}.sleep": "bb67106aaeca1cb7",  # as in 0.32
    f"{_ENGINE}.wake_up": "3dac9c99ee0eefaf",
    f"{_ENGINE}.collective_rpc": "52c424b3bae45ed0",
    f"{_SERVER}.build_app": "f5e8c1058238e5eb",
    # calls build_app through its module's globals
    f"{_SERVER}.build_and_serve": "c4a8a5b5c1cab6a8",
    "vllm.entrypoints.serve.utils.server_utils.engine_error_handler": "7bea71fcbfae16e7",
    "vllm.entrypoints.launcher.terminate_if_errored": "8788d78b2fd39431",
    # a GenerationError's status_code is the status its answer carries
    "vllm.entrypoints.openai.engine.protocol.GenerationError": "3b2b11650cbcab67",
    "vllm.entrypoints.serve.utils.error_response.create_error_response": "559b9e71733d5d73",
    "vllm.entrypoints.openai.engine.serving.OpenAIServing."
    "_convert_generation_error_to_streaming_response": "12c7a28cb2a4b091",
}


def apply() -> None:
    if not npu_vllm():
        return
    from vllm.entrypoints.openai import api_server
    from vllm.entrypoints.openai.engine.protocol import GenerationError
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.engine.exceptions import EngineDeadError

    unavailable = unavailable_error(GenerationError)
    patch_engine_client(AsyncLLM, unavailable, EngineDeadError, woke=None)
    for module in server_modules(api_server):
        module.build_app = with_mux_handlers(module.build_app, unavailable, EngineDeadError)


def npu_vllm() -> bool:
    """Whether this process runs vLLM 0.23 on an Ascend NPU: the only place
    this patch applies. On the NPU platform with another vLLM it says so in
    the log and applies nothing."""
    from vllm.platforms import current_platform

    if current_platform.device_type != "npu":
        return False
    import vllm

    from vllm_mux.patches import NPU_VLLM_VERSION

    have = str(getattr(vllm, "__version__", "unknown"))
    if have.split("+")[0] != NPU_VLLM_VERSION:
        log.warning(
            "vllm-mux: vLLM %s on an NPU; the engine-side patch is written for %s: not applied",
            have,
            NPU_VLLM_VERSION,
        )
        return False
    return True


def unavailable_error(generation_error: type) -> type:
    """vLLM 0.23's way to a 503: its ``GenerationError``, with the status."""
    from http import HTTPStatus

    class Unavailable(generation_error):
        def __init__(self, message: str):
            super().__init__(message)
            self.status_code = HTTPStatus.SERVICE_UNAVAILABLE

    return Unavailable


def server_modules(api_server) -> list:
    """The modules whose ``build_app`` the server calls: ``api_server``, and
    ``__main__`` too where that is the same file run with ``python -m``."""
    found = [api_server]
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if main is not api_server and getattr(spec, "name", None) == api_server.__name__:
        found.append(main)
    return found


def with_mux_handlers(upstream_build_app, unavailable: type, engine_dead_error: type):
    def build_app(*args, **kwargs):
        app = upstream_build_app(*args, **kwargs)
        app.add_middleware(RetryAfter)
        app.add_exception_handler(unavailable, answer_unavailable)
        app.add_exception_handler(engine_dead_error, engine_dead)  # replaces upstream's
        return app

    return build_app


async def answer_unavailable(request, exc):
    """A request the instance could not serve now (its wake failed, or its
    engine died under it): 503, which RetryAfter completes."""
    return unavailable_response(str(exc))


async def engine_dead(request, exc):
    """As ``async_llm.engine_dead``, with vLLM 0.23's ``terminate_if_errored``."""
    from vllm.entrypoints.launcher import terminate_if_errored

    return dead_engine_response(request, terminate_if_errored)
