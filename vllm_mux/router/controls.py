"""The router's controls under ``/mux/``: sleep, wake, pin and unpin a model by hand.

``POST /mux/models/{name}/sleep`` (``wake``, ``pin``, ``unpin``), with the API
key, does what ``vllm-mux sleep NAME`` does, through the daemon, and answers
``{"model", "state", "changed", "message", ...}`` with the daemon's fields:
``seconds`` for sleep and wake, ``pinned`` for pin and unpin. The call blocks
until the model is asleep or awake, so it runs in a thread, with a timeout
beyond the daemon's own bound (a wake may wait for others to sleep, 120 s by
default). Errors are in OpenAI's shape, each refusal with its own status.
"""

import asyncio

from fastapi import APIRouter, Depends

from vllm_mux.daemon.client import Client, DaemonError, Disconnected, Unreachable, outcome

OPS = ("sleep", "wake", "pin", "unpin")
TIMEOUT_S = 600.0  # beyond any --wait-timeout anyone sets: the daemon answers first
# The daemon's refusal codes (daemon/server.py) as HTTP statuses and OpenAI types.
STATUS = {
    # The router serves it, the daemon does not know it: its server is not up.
    "model_not_found": (503, "server_error"),
    "pinned": (409, "invalid_request_error"),
    "ambiguous": (409, "invalid_request_error"),
    "not_running": (503, "server_error"),
    "failed": (503, "server_error"),
    "timeout": (504, "server_error"),
}


def routes(router) -> APIRouter:
    api = APIRouter(prefix="/mux", dependencies=[Depends(router.authorize)])
    for op in OPS:
        # :path: served names often have a slash (Qwen/Qwen3-8B)
        api.add_api_route(f"/models/{{name:path}}/{op}", _handler(router, op), methods=["POST"])
    return api


def _handler(router, op: str):
    async def control(name: str) -> dict:
        from vllm_mux.router.app import ApiError  # app imports this module

        if name not in router.upstreams:
            raise ApiError(
                404,
                f"The model `{name}` does not exist. This server serves: "
                f"{', '.join(sorted(router.upstreams)) or 'no models'}.",
                "invalid_request_error",
                code="model_not_found",
            )
        router._check_running(name)  # 503 while serve restarts it, or once it failed
        if router.daemon_socket is None:
            raise ApiError(503, "This router has no daemon to ask.", "server_error")
        try:
            reply = await asyncio.to_thread(_call, router.daemon_socket, op, name)
        except (Unreachable, Disconnected) as e:
            raise ApiError(503, f"The daemon did not answer: {e}", "server_error") from None
        except DaemonError as e:
            status, type_ = STATUS.get(e.code, (500, "server_error"))
            raise ApiError(status, str(e), type_, code=e.code) from None
        return {**reply, "model": name, "message": outcome(op, name, reply)}

    control.__name__ = op
    return control


def _call(socket_path: str, op: str, name: str) -> dict:
    """The daemon's reply to a control (blocking: run it in a thread)."""
    client = Client(socket_path, timeout=TIMEOUT_S)
    try:
        reply = getattr(client, op)(name)
    finally:
        client.close()
    return {k: v for k, v in reply.items() if k != "ok"}
