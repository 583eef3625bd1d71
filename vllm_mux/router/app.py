"""The router: one OpenAI-compatible port in front of one vLLM server per model.

Clients of a vllm-mux device want one base URL, as with any OpenAI-style
service, while vLLM serves one model per process, each on its own port. The
router routes each request by its ``model`` to that model's server and
passes the answer back as it comes: status, body and ``Retry-After`` as the
instance sent them, a stream chunk by chunk as vLLM writes it.

It never wakes an instance itself: under vllm-mux a request reaching a
sleeping instance wakes it, and the instance answers 503 with Retry-After
when it cannot wake in time. So the router only forwards, with no read
timeout on streams and a generous one otherwise (a request may wait for a
wake, which may wait for other instances to sleep). What it adds:

- an API key for every endpoint but ``/health`` (no OpenAPI schema or docs
  pages: they would list the endpoints to anyone);
- a bound on the body's size (413 beyond ``max_body``), checked against
  Content-Length before reading and counted while reading, so a huge body is
  refused before it is in memory;
- a bound on the requests it holds per model (429 beyond ``max_queue``), so
  one model's backlog cannot take the whole port;
- 503 with Retry-After when an instance is gone (its port refuses) or being
  restarted by ``vllm-mux serve``, and 503 without it for a model that failed
  to start (its state and the tail of its log are in ``/v1/models``);
- a client that hangs up, waiting or mid-stream, closes the upstream request,
  so that vLLM aborts it rather than generate for no one;
- ``/v1/models`` with each model's state from the daemon, and ``/metrics``
  (see ``vllm_mux.router.metrics`` for the table).

Every error the router makes itself is in OpenAI's shape,
``{"error": {"message", "type", "param", "code"}}``.
"""

import asyncio
import json
import logging
import secrets
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio
import httpx
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client.exposition import choose_encoder
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from vllm_mux.daemon import protocol
from vllm_mux.daemon.client import Client, DaemonError
from vllm_mux.router import controls, page
from vllm_mux.router.metrics import Metrics, model_states

ROUTED = ("/v1/chat/completions", "/v1/completions")

RETRY_AFTER_GONE_S = 5  # what an instance that cannot wake in time says too
RETRY_AFTER_FULL_S = 1
# A request may wait for a wake, and a wake for the daemon to free memory
# (120 s by default): minutes, not seconds. A stream may pause for as long as
# it likes between tokens, so it has no read timeout at all.
UPSTREAM_TIMEOUT = httpx.Timeout(600.0, connect=10.0)
STREAM_TIMEOUT = httpx.Timeout(600.0, connect=10.0, read=None)
DAEMON_TIMEOUT_S = 5.0
# Far above any chat or completion request (a 128k-token prompt is under 1 MiB
# of JSON, an image a few MiB); a limit keeps one client from filling memory.
MAX_BODY_BYTES = 16 << 20

log = logging.getLogger(__name__)

# Not passed on to the instance: the client's credentials (the router checked
# them; the instance has its own), and headers about this hop or this body,
# which httpx sets anew for the upstream request.
_DROP_REQUEST = {
    "authorization", "host", "content-length", "content-type", "accept-encoding", "connection",
    "keep-alive", "proxy-authorization", "proxy-connection", "te", "trailer",
    "transfer-encoding", "upgrade",
}  # fmt: skip
# Not passed back: headers about the upstream hop (uvicorn sets its own), and
# the body's encoding, which httpx has already decoded.
_DROP_RESPONSE = {
    "content-length", "content-encoding", "transfer-encoding", "connection", "keep-alive",
    "date", "server",
}  # fmt: skip


class ApiError(Exception):
    """An error the router answers itself, in OpenAI's shape."""

    def __init__(self, status, message, type_, code=None, param=None, retry_after=None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = (
            status,
            message,
            type_,
            code,
            param,
        )
        self.retry_after = retry_after

    def response(self) -> JSONResponse:
        body = {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after else None
        return JSONResponse(body, self.status, headers=headers)


@dataclass
class Upstream:
    """A model's vLLM server as ``vllm-mux serve`` keeps it. Serve updates it
    from its own thread when it restarts the server; the router reads it at
    each request, so a restarted server (on a new port) is used at once."""

    url: str
    # None while the server runs (the daemon then says awake, asleep, ...);
    # "restarting" while serve starts it again, "failed" once it gave up.
    state: str | None = None
    restarts: int = 0  # times serve started it again after it died
    error: str | None = None  # why it failed: the tail of its last log


def make_app(
    upstreams: dict[str, "str | Upstream"],
    *,
    daemon_socket: str | None,
    api_key: str | None = None,
    max_queue: int = 64,
    max_body: int = MAX_BODY_BYTES,
) -> FastAPI:
    """The router's app: ``upstreams`` maps each served model name to its vLLM
    server's base URL (``http://127.0.0.1:8001``) or to an ``Upstream`` that
    serve keeps up to date; ``daemon_socket`` is where the daemon answers for
    states and metrics (None: states are "unknown"). An empty ``api_key`` is
    refused: it would look like protection and accept an empty bearer."""
    if api_key == "":
        raise ValueError("the API key is empty: give a key, or none for no key")
    router = Router(upstreams, daemon_socket, api_key, max_queue, max_body)

    @asynccontextmanager
    async def lifespan(app):
        try:
            yield
        finally:
            if router.http is not None:
                await router.http.aclose()

    app = FastAPI(
        title="vllm-mux router", lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None
    )
    app.state.router = router
    auth = [Depends(router.authorize)]

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return e.response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        # FastAPI's own (unknown path, wrong method), in the same shape as ours.
        return ApiError(e.status_code, str(e.detail), "invalid_request_error").response()

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models", dependencies=auth)
    async def models():
        return await router.models()

    @app.get("/metrics", dependencies=auth)
    async def metrics(request: Request):
        encode, content_type = choose_encoder(request.headers.get("accept", ""))
        # Collecting asks the daemon, a blocking call: not on the event loop.
        body = await asyncio.to_thread(encode, router.metrics.registry)
        return Response(body, headers={"Content-Type": content_type})

    for path in ROUTED:
        app.add_api_route(path, router.endpoint(path), methods=["POST"], dependencies=auth)
    # Each checks the API key itself: the page's HTML is served without one.
    app.include_router(controls.routes(router))
    app.include_router(page.routes(router))
    return app


class Router:
    """The state one app keeps: where each model is, its requests, its metrics."""

    def __init__(self, upstreams, daemon_socket, api_key, max_queue, max_body):
        self.upstreams = {
            model: u if isinstance(u, Upstream) else Upstream(u) for model, u in upstreams.items()
        }
        self.daemon_socket, self.api_key, self.max_queue = daemon_socket, api_key, max_queue
        self.max_body = max_body
        self.queued = dict.fromkeys(self.upstreams, 0)  # requests in the router, by model
        self.metrics = Metrics(self.upstreams, self.read_status, self.queued)
        self.created = int(time.time())
        self.http: httpx.AsyncClient | None = None

    def client(self) -> httpx.AsyncClient:
        # Made on first use, inside the server's event loop.
        if self.http is None:
            self.http = httpx.AsyncClient(
                # Every request gets a connection: the per-model bound is max_queue.
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
                trust_env=False,  # the instances are local: no proxy from the environment
            )
        return self.http

    async def authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(
            token.strip().encode(), self.api_key.encode()
        ):
            raise ApiError(
                401,
                "Incorrect or missing API key: send `Authorization: Bearer <key>`.",
                "invalid_request_error",
                code="invalid_api_key",
            )

    def read_status(self) -> dict | None:
        """The daemon's status, or None if there is no daemon or it does not
        answer. Blocking: call it from a thread."""
        if self.daemon_socket is None:
            return None
        try:
            client = Client(self.daemon_socket, timeout=DAEMON_TIMEOUT_S)
        except DaemonError:
            return None
        try:
            return client.status()
        except (DaemonError, protocol.ProtocolError, OSError):
            return None
        finally:
            client.close()

    async def models(self) -> dict:
        states = model_states(self.upstreams, await asyncio.to_thread(self.read_status))
        data = []
        for model, upstream in self.upstreams.items():
            entry = {
                "id": model,
                "object": "model",
                "created": self.created,
                "owned_by": "vllm-mux",
                "state": states[model],
                "restarts": upstream.restarts,
            }
            if upstream.error is not None:
                entry["error"] = upstream.error
            data.append(entry)
        return {"object": "list", "data": data}

    def endpoint(self, path: str):
        """The route handler that forwards to ``path`` on the model's server."""

        async def forward(request: Request) -> Response:
            return await self.forward(request, path)

        return forward

    async def forward(self, request: Request, path: str) -> Response:
        started = time.perf_counter()
        model = ""  # until the request names a served model
        try:
            headers = _headers_on(request)
            model, stream, body = self._route(await self._body(request))
            self._check_running(model)
            work = self._forward(model, path, body, stream, headers, started)
            response = await _unless_client_leaves(request, work)
        except ApiError as e:
            self.metrics.count(model, e.status)
            raise
        except Exception:
            # A bug of ours: still an answer in OpenAI's shape, and counted.
            log.exception("the router failed on a request for model %r", model)
            self.metrics.count(model, 500)
            raise ApiError(500, "The router failed on this request.", "server_error") from None
        self.metrics.count(model, response.status_code)
        return response

    async def _body(self, request: Request) -> bytes:
        """The body, refused (413) past ``max_body`` before it is all in memory."""
        too_large = ApiError(
            413,
            f"The request body is larger than {self.max_body} bytes.",
            "invalid_request_error",
            code="request_too_large",
        )
        length = request.headers.get("content-length")
        if length is not None and int(length) > self.max_body:  # the server checked it is a number
            raise too_large
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > self.max_body:
                    raise too_large
                chunks.append(chunk)
        except ClientDisconnect:
            raise ApiError(499, "The client hung up.", "invalid_request_error") from None
        return b"".join(chunks)

    def _check_running(self, model: str) -> None:
        """No request goes to a model serve is restarting or gave up on."""
        upstream = self.upstreams[model]
        if upstream.state == "restarting":
            raise ApiError(
                503,
                f"The server for model `{model}` exited and is being restarted; retry later.",
                "server_error",
                code="model_unavailable",
                retry_after=RETRY_AFTER_GONE_S,
            )
        if upstream.state == "failed":
            raise ApiError(
                503,
                f"The server for model `{model}` failed to start; its log is in /v1/models.",
                "server_error",
                code="model_failed",
            )

    def _route(self, body: bytes) -> tuple[str, bool, bytes]:
        """The served model the body names, and whether it asks for a stream."""
        try:
            payload = json.loads(body)
        except (ValueError, RecursionError):  # RecursionError: nested too deeply
            raise ApiError(
                400, "The request body is not valid JSON.", "invalid_request_error"
            ) from None
        if not isinstance(payload, dict):
            raise ApiError(400, "The request body is not a JSON object.", "invalid_request_error")
        model = payload.get("model")
        if not isinstance(model, str) or not model:
            raise ApiError(
                400,
                "You must provide a model parameter (a string).",
                "invalid_request_error",
                param="model",
            )
        if model not in self.upstreams:
            raise ApiError(
                404,
                f"The model `{model}` does not exist. This server serves: "
                f"{', '.join(sorted(self.upstreams)) or 'no models'}.",
                "invalid_request_error",
                code="model_not_found",
                param="model",
            )
        return model, payload.get("stream") is True, body

    async def _forward(self, model, path, body, stream, headers, started) -> Response:
        if self.queued[model] >= self.max_queue:
            raise ApiError(
                429,
                f"{self.max_queue} requests for model `{model}` are already waiting or running; "
                "retry later.",
                "rate_limit_error",
                code="rate_limit_exceeded",
                retry_after=RETRY_AFTER_FULL_S,
            )
        self.queued[model] += 1
        handed_over = False
        try:
            upstream = await self._send(model, path, body, stream, headers)
            if stream and upstream.is_success:
                handed_over = True  # the relay frees the place when the stream ends
                return _Relay(self, model, upstream, started)
            try:
                chunks = []
                async for chunk in upstream.aiter_bytes():
                    if not chunks and upstream.is_success:
                        self.metrics.first_byte(model, started)
                    chunks.append(chunk)
            except httpx.HTTPError as e:
                raise self._unreachable(model, e) from None
            finally:
                await upstream.aclose()
            return Response(b"".join(chunks), upstream.status_code, _headers_back(upstream))
        finally:
            if not handed_over:
                self.queued[model] -= 1

    async def _send(self, model, path, body, stream, headers) -> httpx.Response:
        http = self.client()
        request = http.build_request(
            "POST",
            self.upstreams[model].url.rstrip("/") + path,
            content=body,
            headers={**headers, "content-type": "application/json"},  # it parsed as JSON
            timeout=STREAM_TIMEOUT if stream else UPSTREAM_TIMEOUT,
        )
        try:
            return await http.send(request, stream=True)
        except httpx.HTTPError as e:
            raise self._unreachable(model, e) from None

    def _unreachable(self, model: str, e: httpx.HTTPError) -> ApiError:
        if isinstance(e, httpx.TimeoutException):
            return ApiError(
                504,
                f"The server for model `{model}` did not answer in time ({type(e).__name__}).",
                "server_error",
                code="upstream_timeout",
            )
        return ApiError(
            503,
            f"The server for model `{model}` is unavailable ({type(e).__name__}: {e}); "
            "it may have exited. Retry later.",
            "server_error",
            code="model_unavailable",
            retry_after=RETRY_AFTER_GONE_S,
        )


class _Relay(StreamingResponse):
    """A streamed answer passed on chunk by chunk, as the instance sends it.

    However it ends — the last chunk, the client hanging up, the server
    stopping — the upstream response is closed, which vLLM sees as the client
    going away: it aborts the request instead of generating for no one. Then
    the request's place in the model's queue is freed.
    """

    def __init__(self, router: Router, model: str, upstream: httpx.Response, started: float):
        self.router, self.model, self.upstream = router, model, upstream
        super().__init__(
            self._chunks(started),
            upstream.status_code,
            _headers_back(upstream),
            media_type="text/event-stream",
        )

    async def _chunks(self, started: float):
        first = True
        try:
            async for chunk in self.upstream.aiter_bytes():
                if first:
                    self.router.metrics.first_byte(self.model, started)
                    first = False
                yield chunk
        except httpx.HTTPError as e:
            # The instance went away mid-answer. The status is long sent: say
            # so in the stream, the way vLLM reports an error mid-stream.
            error = self.router._unreachable(self.model, e).response().body.decode()
            yield f"data: {error}\n\ndata: [DONE]\n\n".encode()
        finally:
            await self.upstream.aclose()

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            # A client that hung up leaves the generator suspended (or its
            # cleanup cancelled): close both here, shielded from cancellation.
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()
                await self.upstream.aclose()
            self.router.queued[self.model] -= 1


async def _unless_client_leaves(request: Request, work) -> Response:
    """Await ``work`` (the upstream request, up to its first response), but
    cancel it if the client hangs up first — a request waiting for a wake
    should not run for a client that gave up (vLLM's own endpoints do the
    same). Cancelling closes the upstream connection, so vLLM aborts too."""

    async def client_left():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(client_left())
    try:
        await asyncio.wait((task, watch), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait((task,))  # let it close the upstream and free its place
    if task.cancelled():
        return Response(status_code=499)  # "client closed request": nobody reads it
    return task.result()


def _headers_on(request: Request) -> dict[str, str]:
    """The client's headers that go on to the instance. HTTP header values are
    ASCII (RFC 9110 calls anything else obsolete); httpx cannot send others."""
    headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROP_REQUEST}
    for name, value in headers.items():
        if not value.isascii():
            raise ApiError(
                400, f"The header {name!r} has a non-ASCII value.", "invalid_request_error"
            )
    return headers


def _headers_back(upstream: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in upstream.headers.items() if k.lower() not in _DROP_RESPONSE}
