"""The router's controls under ``/mux/``: sleep, wake, pin and unpin a model by hand.

``POST /mux/models/{name}/sleep`` (``wake``, ``pin``, ``unpin``), with the API
key, does what ``vllm-mux sleep NAME`` does, through the daemon, and answers
``{"model", "state", "changed", "message", ...}`` with the daemon's fields:
``seconds`` for sleep and wake, ``pinned`` for pin and unpin. The call blocks
until the model is asleep or awake (a wake may wait for others to sleep, 120 s
by default), so it runs in a thread, with a timeout beyond the daemon's own
bound. Those threads are the controls' own, AT_ONCE of them: more controls at
once are refused (429) rather than queued, and however long they wait, they
never hold up a request, a poll of the status page or a scrape. Errors are in
OpenAI's shape, each refusal with its own status.
"""

import anyio
from fastapi import APIRouter, Depends

from vllm_mux.daemon.client import Client, DaemonError, Disconnected, Unreachable, outcome

OPS = ("sleep", "wake", "pin", "unpin")
# Beyond the daemon's own bounds (its --wait-timeout for memory, then SETTLE_S,
# 30 minutes, for a drain or a wake's copy or reload): the daemon answers first.
TIMEOUT_S = 2100.0
AT_ONCE = 8  # controls waiting on the daemon at once
RETRY_AFTER_S = 5
# The daemon's refusal codes (daemon/server.py) as HTTP statuses, OpenAI types
# and the router's codes.
STATUS = {
    # The router serves it, the daemon does not know it: its server is not up.
    "model_not_found": (503, "server_error", "model_not_running"),
    "pinned": (409, "invalid_request_error", "pinned"),
    "ambiguous": (409, "invalid_request_error", "ambiguous"),
    "not_running": (503, "server_error", "not_running"),
    "failed": (503, "server_error", "failed"),
    "timeout": (504, "server_error", "timeout"),
}


def routes(router) -> APIRouter:
    api = APIRouter(prefix="/mux", dependencies=[Depends(router.authorize)])
    threads = _Threads()
    for op in OPS:
        # :path: served names often have a slash (Qwen/Qwen3-8B)
        api.add_api_route(
            f"/models/{{name:path}}/{op}", _handler(router, op, threads), methods=["POST"]
        )
    return api


class _Threads:
    """The controls' threads: AT_ONCE at most, counted as controls come in
    (the limiter alone would only be taken after a checkpoint, too late to
    refuse the ones beyond)."""

    def __init__(self):
        self.busy = 0
        self.limiter = anyio.CapacityLimiter(AT_ONCE)


def _handler(router, op: str, threads: _Threads):
    async def control(name: str):
        from vllm_mux.router.app import ApiError, own_json  # app imports this module

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
        if threads.busy >= AT_ONCE:
            raise ApiError(
                429,
                f"{AT_ONCE} controls are already waiting on the daemon; retry later.",
                "rate_limit_error",
                code="rate_limit_exceeded",
                retry_after=RETRY_AFTER_S,
            )
        threads.busy += 1
        try:
            reply = await anyio.to_thread.run_sync(
                _call, router.daemon_socket, op, name, limiter=threads.limiter
            )
        except (Unreachable, Disconnected) as e:
            # The client's socket timed out (its error hides the cause):
            # the daemon is still at it, with a --wait-timeout beyond ours.
            if isinstance(e.__context__, TimeoutError):
                raise ApiError(
                    504,
                    f"The {op} of `{name}` did not end within {TIMEOUT_S:g} s; the daemon may "
                    "still be at it (see /mux/status).",
                    "server_error",
                    code="timeout",
                ) from None
            raise ApiError(503, f"The daemon did not answer: {e}", "server_error") from None
        except DaemonError as e:
            status, type_, code = STATUS.get(e.code, (500, "server_error", e.code))
            raise ApiError(status, str(e), type_, code=code) from None
        finally:
            threads.busy -= 1
            router.status_until = 0.0  # the next poll reads what the control did
        return own_json({**reply, "model": name, "message": outcome(op, name, reply)})

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
