"""The router: one OpenAI-compatible port in front of one vLLM server per model.

Clients of a vllm-mux device want one base URL, as with any OpenAI-style
service, while vLLM serves one model per process, each on its own port. The
router routes each request by its ``model`` to that model's server and
passes the answer back as it comes: status, body and ``Retry-After`` as the
instance sent them, a stream chunk by chunk as vLLM writes it. It does so for
every request endpoint of vLLM's server (``ROUTED``, ``FORM_ROUTED``): chat
and completions, responses, embeddings, pooling, scores and reranking,
tokens, audio; a stored response, fetched or cancelled by its id alone, goes
to the model that answered it.

It never wakes an instance itself: under vllm-mux a request reaching a
sleeping instance wakes it, and the instance answers 503 with Retry-After
when it cannot wake in time. So the router only forwards, with no read
timeout on streams and a generous one otherwise (a request may wait for a
wake, which may wait for other instances to sleep). What it adds:

- an API key for every endpoint but ``/health`` (no OpenAPI schema or docs
  pages: they would list the endpoints to anyone);
- no request from another site (403): a browser's cross-site request carries
  an ``Origin`` that is not this router's, and a DNS rebinding attack a
  ``Host`` that is not a loopback name while the router listens on loopback.
  A JSON endpoint takes only a JSON media type (415 otherwise, as vLLM's
  ``validate_json_request``), an audio one only multipart/form-data: the
  types a web page can send without asking (text/plain) are refused;
- a bound on the body's size (413 beyond ``max_body``), checked against
  Content-Length before reading and counted while reading, so a huge body is
  refused before it is in memory; on the bytes of all bodies held at once
  (503 beyond ``max_buffered``); and on the time a body takes to arrive (408);
- a bound on the requests it holds per model (429 beyond ``max_queue``), so
  one model's backlog cannot take the whole port;
- 503 with Retry-After when an instance is gone (its port refuses) or being
  restarted by ``vllm-mux serve``, and 503 without it for a model that failed
  to start (its state and the tail of its log are in ``/v1/models``);
- a client that hangs up, waiting or mid-stream, closes the upstream request,
  so that vLLM aborts it rather than generate for no one;
- ``/v1/models`` with each model's state from the daemon, and ``/metrics``
  (see ``vllm_mux.router.metrics`` for the table). The daemon's status is
  read at most once a second for all of them, on a thread of its own, so a
  slow daemon or a control's long wait never holds up a poll or a scrape.

Every error the router makes itself is in OpenAI's shape,
``{"error": {"message", "type", "param", "code"}}``, and counted in
``/metrics``.
"""

import asyncio
import ipaddress
import json
import logging
import multiprocessing
import secrets
import time
from collections import OrderedDict
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import asynccontextmanager
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

import anyio
import httpx
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client.exposition import choose_encoder
from pydantic import TypeAdapter, ValidationError
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from vllm_mux.daemon import protocol
from vllm_mux.daemon.client import Client, DaemonError
from vllm_mux.router import controls, page
from vllm_mux.router.metrics import Metrics, model_states

# vLLM 0.32's request endpoints whose JSON body names the model, each forwarded
# to that model's server. tests/test_router.py checks them against vLLM's own
# routes, with the ones left out and why.
ROUTED = (
    # OpenAI's
    "/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/embeddings",
    # vLLM's: pooling, classification, scores and reranking (Jina's and
    # Cohere's shapes), tokens, batched chat
    "/pooling", "/classify", "/score", "/v1/score", "/rerank", "/v1/rerank", "/v2/rerank",
    "/v2/embed", "/tokenize", "/detokenize", "/generative_scoring", "/v1/systemone",
    "/v1/chat/completions/batch",
    # Anthropic's Messages API, and SageMaker's one door to all of the above
    "/v1/messages", "/v1/messages/count_tokens", "/invocations",
    # disaggregated serving: a request rendered into tokens, tokens generated, and back
    "/v1/chat/completions/render", "/v1/completions/render", "/v1/messages/render",
    "/v1/responses/render", "/inference/v1/generate", "/v1/chat/completions/derender",
    "/v1/completions/derender",
)  # fmt: skip
# multipart/form-data: the model is a form field, beside the audio file.
FORM_ROUTED = ("/v1/audio/transcriptions", "/v1/audio/translations")
# A stored response is fetched or cancelled by its id, with no model: the
# router remembers which model answered each of the last RESPONSE_IDS ids.
RESPONSE_ROUTES = (("GET", "/v1/responses/{response_id}"),
                   ("POST", "/v1/responses/{response_id}/cancel"))  # fmt: skip
RESPONSE_IDS = 10_000
# Longer ids are not remembered: vLLM's own are under 64 characters, and a
# client's request_id could otherwise make each key megabytes.
RESPONSE_ID_CHARS = 256
# An id that two models answered (a client may choose its request_id, and so
# its response's id): fetching it by id alone would pick one of them.
AMBIGUOUS = ""
# Endpoints that generate tokens, whose first byte is a first token: the
# time-to-first-token histogram is theirs alone (not /invocations, which may
# as well be an embedding).
GENERATES = (
    "/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages",
    "/v1/chat/completions/batch", "/inference/v1/generate", *FORM_ROUTED,
)  # fmt: skip
# A response's first event echoes the request (instructions, tools): the most
# of a stream read for its id.
RESPONSE_HEAD_BYTES = 1 << 20

RETRY_AFTER_GONE_S = 5  # what an instance that cannot wake in time says too
RETRY_AFTER_FULL_S = 1
# A request may wait for a wake, and a wake for the daemon to free memory
# (120 s by default): minutes, not seconds. A stream may pause for as long as
# it likes between tokens, so it has no read timeout at all.
UPSTREAM_TIMEOUT = httpx.Timeout(600.0, connect=10.0)
STREAM_TIMEOUT = httpx.Timeout(600.0, connect=10.0, read=None)
DAEMON_TIMEOUT_S = 5.0
# How long one read of the daemon's status serves everyone who asks for it.
STATUS_TTL_S = 1.0
# Far above any chat or completion request (a 128k-token prompt is under 1 MiB
# of JSON, an image a few MiB) and above OpenAI's and vLLM's 25 MB for audio;
# a limit keeps one client from filling memory.
MAX_BODY_BYTES = 32 << 20
# All the bodies held at once, by default: eight of the largest.
BUFFERED_BODIES = 8
# A body must arrive within this: the largest (32 MiB) over a slow 2.5 Mbit/s
# uplink takes under two minutes; a client slower than that holds its share of
# the buffer for nothing (a slow-loris upload).
BODY_READ_S = 120.0
# json.loads of a body this large takes long enough (up to 0.1 s per MiB) to
# stall every stream on the event loop. A thread would not help: json.loads
# holds the GIL from start to end. So it is parsed in a process of its own,
# one body at a time, where the parse's memory (often 20 times the body's)
# stays too.
PARSE_ON_LOOP_BYTES = 1 << 20
# The router's own JSON answers: never sniffed as HTML, never cached.
OWN_HEADERS = {"X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"}

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
    """An error the router answers itself, in OpenAI's shape; counted in
    /metrics under ``model`` ("" unless it names a served model)."""

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
        self.model = ""

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
        return own_json(body, self.status, headers)


def own_json(content, status: int = 200, headers: dict | None = None) -> JSONResponse:
    """A JSON answer of the router's own (not an instance's), with OWN_HEADERS."""
    return JSONResponse(content, status, headers={**OWN_HEADERS, **(headers or {})})


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
    max_buffered: int | None = None,
    bound_host: str = "127.0.0.1",
) -> FastAPI:
    """The router's app: ``upstreams`` maps each served model name to its vLLM
    server's base URL (``http://127.0.0.1:8001``) or to an ``Upstream`` that
    serve keeps up to date; ``daemon_socket`` is where the daemon answers for
    states and metrics (None: states are "unknown"). An empty ``api_key`` is
    refused: it would look like protection and accept an empty bearer.
    ``max_buffered``: the bytes of all request bodies held at once
    (BUFFERED_BODIES times ``max_body`` by default). ``bound_host``: the
    address the server listens on; on a loopback one, only loopback names are
    taken in ``Host`` (against DNS rebinding)."""
    if api_key == "":
        raise ValueError("the API key is empty: give a key, or none for no key")
    if max_buffered is None:
        max_buffered = BUFFERED_BODIES * max_body
    router = Router(upstreams, daemon_socket, api_key, max_queue, max_body, max_buffered)

    @asynccontextmanager
    async def lifespan(app):
        try:
            yield
        finally:
            if router.http is not None:
                await router.http.aclose()
            if router.parser is not None:
                router.parser.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="vllm-mux router", lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None
    )
    app.state.router = router
    auth = [Depends(router.authorize)]

    app.add_middleware(_SameSite, router=router, loopback=_loopback(bound_host))

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        router.metrics.count(e.model, e.status)
        return e.response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        # FastAPI's own (unknown path, wrong method), in the same shape as ours.
        return await api_error(
            request, ApiError(e.status_code, str(e.detail), "invalid_request_error")
        )

    @app.get("/health")
    async def health():
        return own_json({"status": "ok"})

    @app.get("/v1/models", dependencies=auth)
    async def models():
        return own_json(await router.models())

    @app.get("/metrics", dependencies=auth)
    async def metrics(request: Request):
        await router.status()  # what the collector reads
        encode, content_type = choose_encoder(request.headers.get("accept", ""))
        body = encode(router.metrics.registry)
        return Response(body, headers={"Content-Type": content_type, **OWN_HEADERS})

    routes = [(path, "POST", router.json_route) for path in ROUTED]
    routes += [(path, "POST", router.form_route) for path in FORM_ROUTED]
    routes += [(path, method, router.response_route) for method, path in RESPONSE_ROUTES]
    for path, method, route in routes:
        app.add_api_route(path, router.endpoint(route), methods=[method], dependencies=auth)
    # Each checks the API key itself: the page's HTML is served without one.
    app.include_router(controls.routes(router))
    app.include_router(page.routes(router))
    return app


class Router:
    """The state one app keeps: where each model is, its requests, its metrics."""

    def __init__(self, upstreams, daemon_socket, api_key, max_queue, max_body, max_buffered):
        self.upstreams = {
            model: u if isinstance(u, Upstream) else Upstream(u) for model, u in upstreams.items()
        }
        self.daemon_socket, self.api_key, self.max_queue = daemon_socket, api_key, max_queue
        self.max_body, self.max_buffered = max_body, max_buffered
        self.buffered = 0  # bytes of request bodies held now
        self.parser: ProcessPoolExecutor | None = None  # for large bodies, made on first use
        self.queued = dict.fromkeys(self.upstreams, 0)  # requests in the router, by model
        self.response_models: OrderedDict[str, str] = OrderedDict()  # response id: model
        # The daemon's last status (None: it did not answer), until when it holds.
        self.last_status: dict | None = None
        self.status_until = 0.0
        self.status_lock = anyio.Lock()
        self.status_thread = anyio.CapacityLimiter(1)
        self.metrics = Metrics(self.upstreams, lambda: self.last_status, self.queued)
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

    async def status(self) -> dict | None:
        """The daemon's status (None: it did not answer), read at most once a
        STATUS_TTL_S for everyone who asks at once (the page's polls, scrapes,
        /v1/models), in a thread of its own: a daemon that is slow to answer
        holds up one read, and a control waiting minutes for a wake none."""
        async with self.status_lock:
            if time.monotonic() >= self.status_until:
                self.last_status = await anyio.to_thread.run_sync(
                    self.read_status, limiter=self.status_thread
                )
                self.status_until = time.monotonic() + STATUS_TTL_S
        return self.last_status

    def read_status(self) -> dict | None:
        """The daemon's status, or None if there is no daemon or it does not
        answer. Blocking: call it from a thread (``status`` does)."""
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
        states = model_states(self.upstreams, await self.status())
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

    def endpoint(self, route):
        """A route handler that forwards where ``route`` says (``json_route``,
        ``form_route``, ``response_route``)."""

        async def forward(request: Request) -> Response:
            return await self.forward(request, route)

        return forward

    async def forward(self, request: Request, route) -> Response:
        started = time.perf_counter()
        generates = request.scope["route"].path in GENERATES
        model = ""  # until the request names a served model
        request.state.buffered = 0  # bytes of its body counted in self.buffered
        try:
            headers = _headers_on(request)
            model, path, stream, body, content_type = await route(request)
            if content_type is not None:
                headers["content-type"] = content_type
            self._check_running(model)
            work = self._forward(
                model, request.method, path, body, stream, headers, started if generates else None
            )
            response = await _unless_client_leaves(request, work)
        except ApiError as e:
            e.model = model
            raise
        except Exception:
            # A bug of ours: still an answer in OpenAI's shape, and counted.
            log.exception("the router failed on a request for model %r", model)
            e = ApiError(500, "The router failed on this request.", "server_error")
            e.model = model
            raise e from None
        finally:
            self.buffered -= request.state.buffered  # sent on, or refused: not held
        self.metrics.count(model, response.status_code)
        return response

    async def json_route(self, request: Request):
        """(model, upstream path, stream?, body, Content-Type) of a request
        whose JSON body names its model. ``stream`` as vLLM's request models
        (pydantic, lax) read it, for the upstream request's timeout."""
        _require_type(request, _is_json, "a JSON media type (application/json)")
        body = await self._body(request)
        try:
            if len(body) > PARSE_ON_LOOP_BYTES:
                top = await self._parse_aside(body)
            else:
                top = _top_level(body)
        except (ValueError, RecursionError):  # RecursionError: nested too deeply
            raise ApiError(
                400, "The request body is not valid JSON.", "invalid_request_error"
            ) from None
        if top is None:
            raise ApiError(400, "The request body is not a JSON object.", "invalid_request_error")
        model = self._served(top[0])
        # vLLM takes application/json alone (a +json type is JSON as well).
        path = request.scope["route"].path
        return model, path, top[1], body, "application/json"

    async def _parse_aside(self, body: bytes):
        """``_top_level(body)`` in the parse process (started on first use;
        started again if it died, say killed for memory)."""
        if self.parser is None:
            self.parser = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        try:
            return await asyncio.get_running_loop().run_in_executor(self.parser, _top_level, body)
        except BrokenProcessPool:
            self.parser.shutdown(wait=False)  # its management thread and pipes go too
            self.parser = None
            raise

    async def form_route(self, request: Request):
        """The same for a multipart/form-data request (audio): the model is a
        form field; the body goes on as it came, with its own Content-Type
        (and boundary)."""
        _require_type(request, lambda kind: kind == "multipart/form-data", "multipart/form-data")
        content_type = request.headers["content-type"]
        body = await self._body(request)
        fields = _form_fields(content_type, body, ("model", "stream"))
        model = self._served(fields.get("model"))
        path = request.scope["route"].path
        return model, path, _lax_true(fields.get("stream")), body, content_type

    async def response_route(self, request: Request):
        """The same for a stored response fetched or cancelled by id: the
        model that answered that id, no body."""
        response_id = request.path_params["response_id"]
        model = self.response_models.get(response_id)
        if model is None:
            raise ApiError(
                404,
                f"Response with id '{response_id}' not found.",
                "invalid_request_error",
                param="response_id",
            )
        if model == AMBIGUOUS:
            raise ApiError(
                409,
                f"Responses of more than one model have the id '{response_id}' (a request_id "
                "chosen twice): it cannot be fetched or cancelled by id alone.",
                "invalid_request_error",
                code="ambiguous_response_id",
                param="response_id",
            )
        path = "/v1/responses/" + quote(response_id, safe="")
        if request.url.path.endswith("/cancel"):
            path += "/cancel"
        if request.url.query:
            path += "?" + request.url.query
        return model, path, _lax_true(request.query_params.get("stream")), b"", None

    def remember_response(self, model: str, response_id) -> None:
        """Keep which model answered ``response_id``, for the last RESPONSE_IDS.
        An id another model answered too is never given to either: it becomes
        AMBIGUOUS (a client could otherwise take over another's id)."""
        if isinstance(response_id, str) and 0 < len(response_id) <= RESPONSE_ID_CHARS:
            known = self.response_models.get(response_id, model)
            self.response_models[response_id] = model if known == model else AMBIGUOUS
            self.response_models.move_to_end(response_id)
            while len(self.response_models) > RESPONSE_IDS:
                self.response_models.popitem(last=False)

    async def _body(self, request: Request) -> bytes:
        """The body, refused past ``max_body`` (413), or past ``max_buffered``
        with the bodies held now (503), before it is all in memory; and if it
        has not all come in BODY_READ_S (408). What it holds is counted in
        ``self.buffered`` until ``forward`` is done with it."""
        too_large = ApiError(
            413,
            f"The request body is larger than {self.max_body} bytes.",
            "invalid_request_error",
            code="request_too_large",
        )
        full = ApiError(
            503,
            "The router holds as many request bodies as it may; retry later.",
            "server_error",
            code="server_busy",
            retry_after=RETRY_AFTER_FULL_S,
        )
        length = request.headers.get("content-length")
        if length is not None:  # the server checked it is a number
            if int(length) > self.max_body:
                raise too_large
            if self.buffered + int(length) > self.max_buffered:
                raise full
        chunks, size = [], 0
        try:
            with anyio.fail_after(BODY_READ_S):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > self.max_body:
                        raise too_large
                    if self.buffered + len(chunk) > self.max_buffered:
                        raise full
                    self.buffered += len(chunk)
                    request.state.buffered += len(chunk)
                    chunks.append(chunk)
        except ClientDisconnect:
            raise ApiError(499, "The client hung up.", "invalid_request_error") from None
        except TimeoutError:
            raise ApiError(
                408,
                f"The request body did not arrive within {BODY_READ_S:g} s.",
                "invalid_request_error",
                code="request_timeout",
            ) from None
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

    def _served(self, model) -> str:
        """``model`` if it names a served model; else a 400 (none, or not a
        string) or a 404 (not served here)."""
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
        return model

    async def _forward(self, model, method, path, body, stream, headers, started) -> Response:
        """``started``: the request's arrival (``time.perf_counter()``) for the
        time to first token, None for an endpoint that generates no tokens."""
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
        creates_response = (method, path) == ("POST", "/v1/responses")
        try:
            upstream = await self._send(model, method, path, body, stream, headers)
            # An event stream, whatever the request said (vLLM reads "stream"
            # more loosely than anyone could guess): relayed as it comes.
            media_type = upstream.headers.get("content-type", "").partition(";")[0]
            if upstream.is_success and media_type.strip().lower() == "text/event-stream":
                handed_over = True  # the relay frees the place when the stream ends
                return _Relay(self, model, upstream, started, creates_response)
            try:
                chunks = []
                async for chunk in upstream.aiter_bytes():
                    if not chunks and upstream.is_success and started is not None:
                        self.metrics.first_byte(model, started)
                    chunks.append(chunk)
            except httpx.HTTPError as e:
                raise self._unreachable(model, e) from None
            finally:
                await upstream.aclose()
            answer = b"".join(chunks)
            if creates_response and upstream.is_success:
                self.remember_response(model, _response_id(answer, stream=False))
            return Response(answer, upstream.status_code, _headers_back(upstream))
        finally:
            if not handed_over:
                self.queued[model] -= 1

    async def _send(self, model, method, path, body, stream, headers) -> httpx.Response:
        http = self.client()
        request = http.build_request(
            method,
            self.upstreams[model].url.rstrip("/") + path,
            content=body,
            headers=headers,
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

    def __init__(self, router, model, upstream: httpx.Response, started, creates_response):
        """``started``: as for ``Router._forward``; ``creates_response``: a new
        response's stream, whose id the router remembers from the first event."""
        self.router, self.model, self.upstream = router, model, upstream
        self.creates_response = creates_response
        super().__init__(
            self._chunks(started),
            upstream.status_code,
            _headers_back(upstream),
            media_type="text/event-stream",
        )

    async def _chunks(self, started: float | None):
        first = started is not None
        head = b"" if self.creates_response else None  # until the first event is whole
        try:
            async for chunk in self.upstream.aiter_bytes():
                if first:
                    self.router.metrics.first_byte(self.model, started)
                    first = False
                if head is not None:
                    head += chunk
                    event, end, _ = head.partition(b"\n\n")
                    if end or len(head) > RESPONSE_HEAD_BYTES:
                        self.router.remember_response(self.model, _response_id(event, stream=True))
                        head = None
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


_BOOL = TypeAdapter(bool)


def _top_level(body: bytes) -> tuple | None:
    """(model, stream?) of a JSON body, None if it is not a JSON object: all
    the router needs of it, small to send back from the parse process."""
    payload = json.loads(body)
    if not isinstance(payload, dict):
        return None
    model = payload.get("model")
    return model if isinstance(model, str) else None, _lax_true(payload.get("stream"))


def _lax_true(value) -> bool:
    """True where vLLM's request models (pydantic, lax) read ``value`` as true:
    true, 1, 1.0, "true", "1", "yes", "on" and the like, in JSON, a form or a query."""
    try:
        return _BOOL.validate_python(value)
    except ValidationError:
        return False


def _is_json(kind: str) -> bool:
    return kind == "application/json" or (
        kind.startswith("application/") and kind.endswith("+json")
    )


def _require_type(request: Request, accepts, name: str) -> None:
    """415 unless the request's media type is one ``accepts`` (a lower-case
    type/subtype, no parameters)."""
    kind = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if not accepts(kind):
        raise ApiError(
            415,
            f"Unsupported media type {kind or '(none)'!r}: this endpoint takes {name}.",
            "invalid_request_error",
            code="unsupported_media_type",
        )


class _SameSite:
    """Refuses (403) a request that another site made a browser send.

    Without a key (serve's default on loopback) any web page the user visits
    could otherwise drive the router: a cross-site request comes with the
    page's ``Origin``, which is not this router's; a DNS-rebinding page's
    comes as same-origin, but under its own name in ``Host``, where a router
    listening on loopback is only ever reached as localhost or by address.
    ``/health`` answers any ``Host`` (probes use names of their own)."""

    def __init__(self, app, router, loopback: bool):
        self.app, self.router, self.loopback = app, router, loopback

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and (why := self._foreign(scope)):
            self.router.metrics.count("", 403)
            error = ApiError(403, why, "invalid_request_error", code="forbidden")
            await error.response()(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _foreign(self, scope) -> str | None:
        headers = Headers(scope=scope)
        host = headers.get("host", "")
        if self.loopback and host and scope["path"] != "/health" and not _loopback(_name(host)):
            return f"The Host {host!r} is not a loopback name, and this router listens on loopback."
        origin = headers.get("origin")
        mine = _origin(f"{scope['scheme']}://{host}")
        if origin is not None and (mine is None or _origin(origin) != mine):
            return f"Requests from another origin ({origin!r}) are refused."
        return None


def _name(host: str) -> str | None:
    """The name in a ``Host`` header (``[::1]:8000`` is ``::1``)."""
    try:
        return urlsplit("//" + host).hostname
    except ValueError:
        return None


def _loopback(name: str | None) -> bool:
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name or "").is_loopback
    except ValueError:
        return False


def _origin(url: str) -> tuple | None:
    """(scheme, host, port) of an origin or URL; None if it is not one."""
    try:
        u = urlsplit(url)
        scheme = u.scheme.lower()
        port = u.port or {"http": 80, "https": 443}.get(scheme)
    except ValueError:
        return None
    return (scheme, u.hostname, port) if scheme and u.hostname else None


def _response_id(answer: bytes, stream: bool):
    """The id of a new response: a JSON answer's ``id``, or a stream's first
    event's (``response.created``) ``response.id``; None if it has none."""
    try:
        if not stream:
            return json.loads(answer).get("id")
        for line in answer.split(b"\n"):
            if line.startswith(b"data:"):
                return json.loads(line[5:]).get("response", {}).get("id")
    except (ValueError, AttributeError, RecursionError):
        pass
    return None


def _form_fields(content_type: str, body: bytes, names: tuple[str, ...]) -> dict[str, str]:
    """The text fields ``names`` of a multipart/form-data ``body``, each the
    last of its name as FastAPI reads a form (vLLM reads it so). Parsed with
    the parser Starlette uses, and a part named as Starlette names it (by its
    last Content-Disposition), so the router reads the form as vLLM will;
    files are skipped, never stored: the body is already in memory, within
    ``max_body``, and nothing else is kept."""
    kind, options = parse_options_header(content_type)
    if kind != b"multipart/form-data" or not options.get(b"boundary"):
        raise ApiError(
            400,
            "This endpoint takes multipart/form-data (with a boundary), as OpenAI's does.",
            "invalid_request_error",
        )
    fields: dict[str, bytearray] = {}
    header = [b"", b""]  # the part's header being read: name, value
    disposition = b""  # the part's last Content-Disposition
    part: bytearray | None = None  # the wanted field being read

    def on_header_field(data, start, end):
        header[0] += data[start:end]

    def on_header_value(data, start, end):
        header[1] += data[start:end]

    def on_header_end():
        nonlocal disposition
        if header[0].lower() == b"content-disposition":
            disposition = header[1]
        header[:] = [b"", b""]

    def on_headers_finished():
        nonlocal part
        _, params = parse_options_header(disposition)
        name = params.get(b"name", b"").decode("latin-1")
        if name in names and b"filename" not in params:
            part = fields[name] = bytearray()

    def on_part_begin():
        nonlocal part, disposition
        part, disposition = None, b""

    def on_part_data(data, start, end):
        if part is not None:
            part.extend(data[start:end])

    callbacks = {
        "on_part_begin": on_part_begin,
        "on_header_field": on_header_field,
        "on_header_value": on_header_value,
        "on_header_end": on_header_end,
        "on_headers_finished": on_headers_finished,
        "on_part_data": on_part_data,
    }
    try:
        parser = MultipartParser(options[b"boundary"], callbacks)
        parser.write(body)
        parser.finalize()
        return {name: value.decode() for name, value in fields.items()}
    except (MultipartParseError, UnicodeDecodeError):
        raise ApiError(
            400, "The request body is not valid multipart/form-data.", "invalid_request_error"
        ) from None
