"""The router, in front of fake vLLM servers, with a real daemon in this process.

The fakes are real HTTP servers that answer the way vLLM does (JSON, SSE
streams with pauses, 503 with Retry-After) and record what reached them,
including clients that went away; clients are the official ``openai``
package and plain httpx. No vLLM, no model: fast.
"""

import asyncio
import json
import os
import socket
import tempfile
import threading
import time
from dataclasses import dataclass

import httpx
import openai
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client.parser import text_string_to_metric_families

from conftest import LiveDaemon
from vllm_mux.router import METRICS, make_app
from vllm_mux.router.app import FORM_ROUTED, RESPONSE_ROUTES, ROUTED, Upstream

CS = 64 << 10  # small chunks keep the pool cheap
PAUSE = 0.02  # between two streamed chunks of a fake
PATIENCE_S = 60  # waits end on what they wait for; this only on a hang


# -- servers in threads --


class Served:
    """An ASGI app served by uvicorn from a thread, on a port of its own."""

    def __init__(self, app):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )
        self.thread.start()
        assert wait_for(lambda: self.server.started), "uvicorn did not start"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(5)
        self.sock.close()


def wait_for(predicate, timeout=PATIENCE_S):
    deadline = time.monotonic() + timeout
    while not (value := predicate()) and time.monotonic() < deadline:
        time.sleep(0.01)
    return value


class FakeVllm:
    """A vLLM OpenAI server as the router sees it.

    Answers are deterministic: a non-streamed one is ``"<name>: <prompt>"``; a
    stream is ``max_tokens`` chunks ``"<name>-<i> "``, PAUSE apart. The prompt
    "die" makes a stream break off after two chunks. ``status`` 503 answers
    like an instance that cannot wake in time; a ``gate`` holds every request
    until it is set. ``abandoned`` lists the requests whose client went away.
    Every other endpoint of vLLM's (``echo``) answers with what reached it.
    """

    def __init__(self, name: str, status: int = 200, gated: bool = False):
        self.name, self.status = name, status
        self.gate = threading.Event() if gated else None
        self.arrived: list[dict] = []  # headers of every request
        self.echoed: list[Echoed] = []
        self.abandoned: list[str] = []
        app = FastAPI()
        app.post("/v1/chat/completions")(self.chat)
        app.post("/v1/completions")(self.completions)
        for path in (*ROUTED, *FORM_ROUTED):
            if path not in ("/v1/chat/completions", "/v1/completions"):
                app.post(path)(self.echo)
        for method, path in RESPONSE_ROUTES:
            app.add_api_route(path, self.echo, methods=[method])
        self.served = Served(app)
        self.url = self.served.url

    async def echo(self, request: Request):
        """What arrived, as JSON (for the openai client: an embedding, a
        transcription's text and a response, all in one); a new response's
        id is ``resp-<name>-<n>``; ``stream`` in a JSON body or the query asks
        for Responses API events."""
        body = await request.body()
        seen = Echoed(
            request.method,
            request.url.path + (f"?{request.url.query}" if request.url.query else ""),
            request.headers.get("content-type"),
            body,
        )
        self.echoed.append(seen)
        self.arrived.append(dict(request.headers))
        if not await self._through_gate(request, f"{seen.method} {seen.path}"):
            return JSONResponse({}, 499)
        if self.status != 200:
            return self._refusal()
        answer = {
            "id": request.path_params.get("response_id", f"resp-{self.name}-{len(self.echoed)}"),
            "object": "echo",
            "created_at": 0,
            "model": self.name,
            "path": seen.path,
            "text": f"{self.name}: {seen.path}",
            "data": [{"object": "embedding", "index": 0, "embedding": [1.0, 2.0]}],
            "output": [],
            "usage": {"prompt_tokens": 1, "total_tokens": 1},
        }
        asked = json.loads(body) if seen.content_type == "application/json" else {}
        if asked.get("stream") or request.query_params.get("stream") == "true":
            created = {"type": "response.created", "sequence_number": 0, "response": answer}
            events = f"event: response.created\ndata: {json.dumps(created)}\n\n"
            return StreamingResponse(iter([events]), media_type="text/event-stream")
        return answer

    async def _through_gate(self, request, tag) -> bool:
        """Held at the gate, if any; False if the client went away meanwhile."""
        if self.gate is not None:
            while not self.gate.is_set():
                if await request.is_disconnected():
                    self.abandoned.append(tag)
                    return False
                await asyncio.sleep(0.01)
        return True

    def _refusal(self):
        error = {"message": "could not wake", "type": "ServiceUnavailableError", "code": 503}
        return JSONResponse({"error": error}, self.status, headers={"Retry-After": "5"})

    async def chat(self, request: Request):
        body = await request.json()
        prompt = body["messages"][-1]["content"]

        def chunk(text, finish=None):
            delta = {"role": "assistant", "content": text} if text else {}
            return {"object": "chat.completion.chunk", "choices": [{"delta": delta}], "f": finish}

        def answer(text):
            message = {"role": "assistant", "content": text}
            return {"object": "chat.completion", "choices": [{"message": message}]}

        return await self._answer(request, body, prompt, chunk, answer)

    async def completions(self, request: Request):
        body = await request.json()

        def chunk(text, finish=None):
            return {"object": "text_completion", "choices": [{"text": text}], "f": finish}

        def answer(text):
            return {"object": "text_completion", "choices": [{"text": text}]}

        return await self._answer(request, body, body["prompt"], chunk, answer)

    async def _answer(self, request, body, prompt, chunk, answer):
        self.arrived.append(dict(request.headers))
        if not await self._through_gate(request, prompt):
            return JSONResponse({}, 499)
        if self.status != 200:
            return self._refusal()
        if not body.get("stream"):
            return _complete(self.name, answer(f"{self.name}: {prompt}"))
        return StreamingResponse(
            self._stream(prompt, body.get("max_tokens") or 4, chunk),
            media_type="text/event-stream",
        )

    async def _stream(self, prompt, n, chunk):
        finished = False
        try:
            for i in range(n):
                if prompt == "die" and i == 2:
                    raise RuntimeError("the fake instance died mid-stream (on purpose)")
                yield _sse(_complete(self.name, chunk(f"{self.name}-{i} ")))
                await asyncio.sleep(PAUSE)
            yield _sse(_complete(self.name, chunk("", "stop")))
            yield "data: [DONE]\n\n"
            finished = True
        finally:
            if not finished:
                self.abandoned.append(prompt)


@dataclass
class Echoed:
    """A request as it reached a fake: the path with its query."""

    method: str
    path: str
    content_type: str | None
    body: bytes


def _complete(model: str, partial: dict) -> dict:
    """Fill in what the openai client expects around ``partial``."""
    out = {"id": "fake-1", "created": 0, "model": model, **partial}
    finish = out.pop("f", "stop")
    for i, choice in enumerate(out["choices"]):
        choice.update(index=i, finish_reason=finish, logprobs=None)
    return out


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


# -- fixtures --


@pytest.fixture(scope="module")
def fakes():
    started = {
        "alpha": FakeVllm("alpha"),
        "beta": FakeVllm("beta"),
        "busy": FakeVllm("busy", status=503),
        "slow": FakeVllm("slow", gated=True),
    }
    yield started
    for fake in started.values():
        if fake.gate is not None:
            fake.gate.set()
        fake.served.stop()


@pytest.fixture(scope="module")
def dead_url():
    """A port nobody listens on: an instance that has exited."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture(scope="module")
def daemon():
    """A real daemon in a thread, with two instances registered by hand:
    alpha awake (woke once, in 0.25 s, holds 2 chunks), beta asleep."""
    d = LiveDaemon(os.path.join(tempfile.mkdtemp(prefix="vmux"), "d.sock"), 8, CS)
    path = d.path
    alpha, beta = d.client(), d.client()
    alpha.hello("alpha")
    ids, fds = alpha.lease(2)
    for fd in fds:
        os.close(fd)
    alpha.set_state("waking")
    alpha.set_state("awake", wake={"seconds": 0.25})
    beta.hello("beta")
    beta.set_state("asleep")
    yield path
    alpha.release(ids)  # an instance that leaves holding chunks is waited for
    d.stop()


@pytest.fixture
def router_factory(fakes, dead_url, daemon):
    """Routers in front of the fakes; the default one knows the daemon."""
    started = []

    def start(daemon_socket=daemon, upstreams=None, **kwargs) -> Served:
        if upstreams is None:
            upstreams = {name: fake.url for name, fake in fakes.items()}
            upstreams["dead"] = dead_url
        served = Served(make_app(upstreams, daemon_socket=daemon_socket, **kwargs))
        started.append(served)
        return served

    yield start
    for served in started:
        served.stop()


@pytest.fixture
def router(router_factory):
    return router_factory()


def client(router: Served, api_key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{router.url}/v1", api_key=api_key, max_retries=0, timeout=PATIENCE_S
    )


def chat(c: openai.OpenAI, model: str, prompt: str = "hi", **kwargs):
    return c.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], **kwargs
    )


def assert_error(response: httpx.Response, status: int, code, retry_after=None) -> dict:
    """An error in OpenAI's shape, exactly."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and isinstance(error["type"], str)
    assert error["code"] == code
    assert response.headers.get("retry-after") == retry_after
    return error


def assert_serving(router: Served) -> None:
    """The router still answers after whatever just happened."""
    answer = chat(client(router), "beta", "still there?")
    assert answer.choices[0].message.content == "beta: still there?"


def raw(router: Served, data: bytes) -> tuple[int, dict]:
    """Send ``data`` as it is (no client checks it); the answer's status and
    JSON body, read as soon as it comes, whether or not the request ended.
    The socket's timeout is only reached when no answer comes at all."""
    port = int(router.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=PATIENCE_S) as s:
        s.sendall(data)
        f = s.makefile("rb")
        status, length = int(f.readline().split()[1]), 0
        while (line := f.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value)
        return status, json.loads(f.read(length))


def assert_raw_error(answer: tuple[int, dict], status: int, code) -> None:
    assert answer[0] == status, answer
    error = answer[1]["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code


def metrics(router: Served, **headers) -> dict:
    """{(sample name, sorted labels): value} from /metrics."""
    r = httpx.get(f"{router.url}/metrics", headers=headers)
    assert r.status_code == 200, r.text
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[s.name, tuple(sorted(s.labels.items()))] = s.value
    return out


# -- tests --


def test_health_and_models_with_states_from_the_daemon(router):
    assert httpx.get(f"{router.url}/health").json() == {"status": "ok"}
    r = httpx.get(f"{router.url}/v1/models")
    assert r.json()["object"] == "list"
    models = {m["id"]: m for m in r.json()["data"]}
    assert {m: models[m]["state"] for m in models} == {
        "alpha": "awake",
        "beta": "asleep",
        "busy": "starting",  # not registered with the daemon
        "slow": "starting",
        "dead": "starting",
    }
    for m in models.values():
        assert m["object"] == "model" and m["owned_by"] == "vllm-mux"
        assert isinstance(m["created"], int)
    assert sorted(m.id for m in client(router).models.list()) == sorted(models)


def test_states_unknown_without_a_daemon(router_factory, tmp_path):
    for socket_path in (None, str(tmp_path / "nobody.sock")):
        router = router_factory(daemon_socket=socket_path)
        states = {m["id"]: m["state"] for m in httpx.get(f"{router.url}/v1/models").json()["data"]}
        assert set(states.values()) == {"unknown"}
        m = metrics(router)
        assert m["vllm_mux:daemon_up", ()] == 0
        assert m["vllm_mux:model_state", (("model", "alpha"), ("state", "unknown"))] == 1
        assert m["vllm_mux:model_state", (("model", "alpha"), ("state", "awake"))] == 0
        assert not any(name == "vllm_mux:pool_bytes_total" for name, _ in m)


def test_chat_and_completions_reach_their_model(router, fakes):
    c = client(router)
    r = chat(c, "alpha", "hello", extra_headers={"X-Trace": "t1"})
    assert r.choices[0].message.content == "alpha: hello"
    assert chat(c, "beta", "hello").choices[0].message.content == "beta: hello"
    assert c.completions.create(model="beta", prompt="once").choices[0].text == "beta: once"
    seen = fakes["alpha"].arrived[-1]
    assert seen["x-trace"] == "t1"  # the client's headers go through...
    assert "authorization" not in seen  # ...but not its credentials
    assert seen["host"] == fakes["alpha"].url.removeprefix("http://")


def test_streams_pass_through(router):
    c = client(router)
    chunks = chat(c, "alpha", "s", stream=True, max_tokens=5)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks)
    assert text == "alpha-0 alpha-1 alpha-2 alpha-3 alpha-4 "
    chunks = c.completions.create(model="beta", prompt="s", stream=True, max_tokens=3)
    assert "".join(ch.choices[0].text for ch in chunks) == "beta-0 beta-1 beta-2 "


def test_a_stream_is_relayed_as_it_comes_not_buffered(router):
    n = 10
    body = {"model": "alpha", "prompt": "x", "stream": True, "max_tokens": n}
    start = time.monotonic()
    with httpx.stream("POST", f"{router.url}/v1/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        arrivals = [time.monotonic() - start for _ in r.iter_raw()]
    # The chunks come as the fake writes them, PAUSE apart, not all at once at
    # the end (however late the first one comes on a busy machine).
    assert arrivals[-1] - arrivals[0] > (n - 3) * PAUSE, arrivals


def test_unknown_model_404(router):
    with pytest.raises(openai.NotFoundError) as e:
        chat(client(router), "gamma")
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    r = httpx.post(f"{router.url}/v1/completions", json={"model": "gamma", "prompt": "x"})
    error = assert_error(r, 404, "model_not_found")
    assert "gamma" in error["message"] and "alpha" in error["message"]
    assert_serving(router)


def test_bad_requests_400(router):
    r = httpx.post(f"{router.url}/v1/chat/completions", json={"messages": []})
    assert assert_error(r, 400, None)["param"] == "model"
    r = httpx.post(f"{router.url}/v1/chat/completions", content=b"{not json")
    assert_error(r, 400, None)
    r = httpx.post(f"{router.url}/v1/completions", json=["model", "alpha"])
    assert_error(r, 400, None)
    assert_serving(router)


def test_upstream_503_passes_through_with_retry_after(router):
    with pytest.raises(openai.InternalServerError) as e:
        chat(client(router), "busy")
    assert e.value.status_code == 503
    assert e.value.response.headers["retry-after"] == "5"
    assert e.value.body["message"] == "could not wake"  # the instance's own body
    r = httpx.post(f"{router.url}/v1/completions", json={"model": "busy", "prompt": "x"})
    assert r.json()["error"]["type"] == "ServiceUnavailableError"
    # A stream that the instance refuses is refused the same way.
    body = {"model": "busy", "prompt": "x", "stream": True}
    r = httpx.post(f"{router.url}/v1/completions", json=body)
    assert r.status_code == 503 and r.headers["retry-after"] == "5"
    assert_serving(router)


def test_dead_upstream_503(router):
    with pytest.raises(openai.InternalServerError) as e:
        chat(client(router), "dead")
    assert e.value.status_code == 503 and e.value.body["code"] == "model_unavailable"
    for stream in (False, True):
        body = {"model": "dead", "prompt": "x", "stream": stream}
        r = httpx.post(f"{router.url}/v1/completions", json=body)
        assert_error(r, 503, "model_unavailable", retry_after="5")
    assert_serving(router)


def test_upstream_dying_mid_stream_ends_the_stream_with_an_error(router):
    with pytest.raises(openai.APIError) as e:
        for _ in chat(client(router), "alpha", "die", stream=True, max_tokens=5):
            pass
    assert e.value.body["code"] == "model_unavailable"
    assert_serving(router)


def test_api_key(router_factory, fakes):
    router = router_factory(api_key="sekret")
    assert httpx.get(f"{router.url}/health").status_code == 200
    for path in ("/v1/models", "/metrics"):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
            r = httpx.get(f"{router.url}{path}", headers=headers)
            assert_error(r, 401, "invalid_api_key")
        r = httpx.get(f"{router.url}{path}", headers={"Authorization": "Bearer sekret"})
        assert r.status_code == 200
    with pytest.raises(openai.AuthenticationError) as e:
        chat(client(router, "wrong"), "alpha")
    assert e.value.body["code"] == "invalid_api_key"
    answer = chat(client(router, "sekret"), "alpha", "with key")
    assert answer.choices[0].message.content == "alpha: with key"
    assert "authorization" not in fakes["alpha"].arrived[-1]
    assert metrics(router, Authorization="Bearer sekret")  # the router kept serving


def test_queue_full_429(router_factory, fakes):
    router = router_factory(max_queue=1)
    slow = fakes["slow"]
    slow.gate.clear()
    queue = "vllm_mux:request_queue_length", (("model", "slow"),)
    results = []
    held = threading.Thread(
        target=lambda: results.append(chat(client(router), "slow", "first")), daemon=True
    )
    held.start()
    try:
        assert wait_for(lambda: slow.arrived and metrics(router)[queue] == 1)
        with pytest.raises(openai.RateLimitError) as e:
            chat(client(router), "slow", "second")
        assert e.value.body["code"] == "rate_limit_exceeded"
        assert e.value.response.headers["retry-after"] == "1"
        assert_serving(router)  # another model is not held up
    finally:
        slow.gate.set()
    held.join(PATIENCE_S)
    assert results[0].choices[0].message.content == "slow: first"
    assert metrics(router)[queue] == 0
    assert chat(client(router), "slow", "third").choices[0].message.content == "slow: third"


def test_client_leaving_mid_stream_aborts_the_upstream_request(router, fakes):
    alpha = fakes["alpha"]
    stream = chat(client(router), "alpha", "long", stream=True, max_tokens=500)  # 10 s
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    assert wait_for(lambda: "long" in alpha.abandoned), "the fake never saw the client leave"
    queue = "vllm_mux:request_queue_length", (("model", "alpha"),)
    assert wait_for(lambda: metrics(router)[queue] == 0)
    assert_serving(router)


def test_client_leaving_while_waiting_aborts_the_upstream_request(router, fakes):
    slow = fakes["slow"]
    slow.gate.clear()
    try:
        body = {"model": "slow", "prompt": "impatient"}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{router.url}/v1/completions", json=body, timeout=0.3)
        assert wait_for(lambda: "impatient" in slow.abandoned)
    finally:
        slow.gate.set()
    m = metrics(router)
    assert m["vllm_mux:requests_total", (("model", "slow"), ("status", "499"))] == 1
    assert m["vllm_mux:request_queue_length", (("model", "slow"),)] == 0
    assert_serving(router)


def test_32_concurrent_streams_over_two_models(router):
    async def one(c, model, i):
        chunks = await c.chat.completions.create(
            model=model, messages=[{"role": "user", "content": f"{i}"}], stream=True, max_tokens=8
        )
        return "".join([ch.choices[0].delta.content or "" async for ch in chunks])

    async def main():
        async with openai.AsyncOpenAI(
            base_url=f"{router.url}/v1", api_key="none", max_retries=0, timeout=PATIENCE_S
        ) as c:
            models = ["alpha", "beta"] * 16
            return models, await asyncio.gather(*(one(c, m, i) for i, m in enumerate(models)))

    models, texts = asyncio.run(main())
    for model, text in zip(models, texts):
        assert text == "".join(f"{model}-{i} " for i in range(8))


def test_metrics(router):
    c = client(router)
    chat(c, "alpha")
    list(chat(c, "alpha", stream=True))
    with pytest.raises(openai.NotFoundError):
        chat(c, "gamma")
    r = httpx.get(f"{router.url}/metrics")
    assert r.headers["content-type"].startswith("text/plain")
    families = {f.name for f in text_string_to_metric_families(r.text)}
    documented = {n.removesuffix("_total") if t == "counter" else n for n, t, *_ in METRICS}
    assert documented <= families, documented - families
    m = metrics(router)
    assert m["vllm_mux:requests_total", (("model", "alpha"), ("status", "200"))] == 2
    assert m["vllm_mux:requests_total", (("model", ""), ("status", "404"))] == 1
    ttft = "vllm_mux:time_to_first_token_seconds"
    assert m[f"{ttft}_count", (("model", "alpha"),)] == 2
    assert 0 < m[f"{ttft}_sum", (("model", "alpha"),)] < 5
    assert (f"{ttft}_count", (("model", "beta"),)) not in m  # nothing sent to beta yet
    # What the daemon counts, read at scrape time.
    assert m["vllm_mux:daemon_up", ()] == 1
    assert m["vllm_mux:model_state", (("model", "alpha"), ("state", "awake"))] == 1
    assert m["vllm_mux:model_state", (("model", "alpha"), ("state", "asleep"))] == 0
    assert m["vllm_mux:model_state", (("model", "beta"), ("state", "asleep"))] == 1
    assert m["vllm_mux:model_state", (("model", "dead"), ("state", "starting"))] == 1
    assert m["vllm_mux:wakes_total", (("model", "alpha"),)] == 1
    assert m["vllm_mux:sleeps_total", (("model", "beta"),)] == 1
    assert m["vllm_mux:last_wake_seconds", (("model", "alpha"),)] == 0.25
    assert m["vllm_mux:instance_bytes", (("model", "alpha"),)] == 2 * CS
    assert m["vllm_mux:instance_bytes", (("model", "beta"),)] == 0
    assert m["vllm_mux:pool_bytes_total", ()] == 8 * CS
    assert m["vllm_mux:pool_bytes_free", ()] == 6 * CS
    assert m["vllm_mux:request_queue_length", (("model", "alpha"),)] == 0


def test_unknown_path_is_openai_shaped(router):
    assert_error(httpx.get(f"{router.url}/v1/nothing"), 404, None)
    assert_error(httpx.get(f"{router.url}/v1/completions"), 405, None)


def test_deeply_nested_json_is_a_400_and_counted(router):
    body = b'{"model": "alpha", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    r = httpx.post(f"{router.url}/v1/completions", content=body)
    assert_error(r, 400, None)
    assert metrics(router)["vllm_mux:requests_total", (("model", ""), ("status", "400"))] == 1
    assert_serving(router)


def test_a_non_ascii_header_is_a_400_and_counted(router, fakes):
    body = b'{"model": "alpha", "prompt": "x"}'
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Name: caf\xe9\r\n"
    head += b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
    arrived = len(fakes["alpha"].arrived)
    assert_raw_error(raw(router, head + body), 400, None)
    assert len(fakes["alpha"].arrived) == arrived
    assert metrics(router)["vllm_mux:requests_total", (("model", ""), ("status", "400"))] == 1
    assert_serving(router)


def test_a_body_over_the_limit_is_refused_before_it_is_read(router_factory):
    limit = 64 << 10
    router = router_factory(max_body=limit)
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    # Announced: refused at once, though not one byte of the body was sent.
    assert_raw_error(raw(router, head + b"Content-Length: 100000000\r\n\r\n"), 413,
                     "request_too_large")  # fmt: skip
    # Not announced (chunked): refused once the bytes read pass the limit,
    # while the body has not ended.
    chunk = b"x" * (16 << 10)
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(8))
    assert_raw_error(raw(router, head + b"Transfer-Encoding: chunked\r\n\r\n" + chunks), 413,
                     "request_too_large")  # fmt: skip
    # From an ordinary client: one byte over is refused, the limit itself served.
    prompt = "x" * (limit - len(json.dumps({"model": "alpha", "prompt": ""})))
    body = json.dumps({"model": "alpha", "prompt": prompt}).encode()
    assert len(body) == limit
    r = httpx.post(f"{router.url}/v1/completions", content=body + b" ")
    assert_error(r, 413, "request_too_large")
    r = httpx.post(f"{router.url}/v1/completions", content=body)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == f"alpha: {prompt}"
    assert metrics(router)["vllm_mux:requests_total", (("model", ""), ("status", "413"))] == 3
    assert_serving(router)


def test_an_empty_api_key_is_refused_never_accepted(router_factory):
    with pytest.raises(ValueError, match="empty"):
        make_app({"alpha": "http://127.0.0.1:1"}, daemon_socket=None, api_key="")
    router = router_factory(api_key="sekret")
    for value in (b"Bearer ", b"Bearer", b"Bearer  \t", b""):
        answer = raw(
            router, b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: %s\r\n\r\n" % value
        )
        assert_raw_error(answer, 401, "invalid_api_key")


def test_no_openapi_schema_or_docs(router_factory):
    for router in (router_factory(), router_factory(api_key="sekret")):
        for path in ("/openapi.json", "/docs", "/redoc", "/docs/oauth2-redirect"):
            for headers in ({}, {"Authorization": "Bearer sekret"}):
                assert_error(httpx.get(f"{router.url}{path}", headers=headers), 404, None)


def test_restarting_and_failed_models_as_serve_reports_them(router_factory, fakes):
    """``vllm-mux serve`` updates each model's Upstream as it restarts its
    server; the router answers for such a model without reaching it."""
    alpha = Upstream(fakes["alpha"].url, state="restarting", restarts=1)
    beta = Upstream(fakes["beta"].url, state="failed", restarts=2, error="OSError: bad config")
    gamma = Upstream(fakes["alpha"].url)
    router = router_factory(upstreams={"alpha": alpha, "beta": beta, "gamma": gamma})
    arrived = len(fakes["alpha"].arrived), len(fakes["beta"].arrived)
    for stream in (False, True):
        body = {"model": "alpha", "prompt": "x", "stream": stream}
        r = httpx.post(f"{router.url}/v1/completions", json=body)
        assert_error(r, 503, "model_unavailable", retry_after="5")
        r = httpx.post(f"{router.url}/v1/completions", json={**body, "model": "beta"})
        assert "/v1/models" in assert_error(r, 503, "model_failed")["message"]
    assert (len(fakes["alpha"].arrived), len(fakes["beta"].arrived)) == arrived
    models = {m["id"]: m for m in httpx.get(f"{router.url}/v1/models").json()["data"]}
    assert (models["alpha"]["state"], models["alpha"]["restarts"]) == ("restarting", 1)
    assert (models["beta"]["state"], models["beta"]["restarts"]) == ("failed", 2)
    assert models["beta"]["error"] == "OSError: bad config" and "error" not in models["alpha"]
    assert models["gamma"]["state"] == "starting" and models["gamma"]["restarts"] == 0
    m = metrics(router)
    assert m["vllm_mux:instance_restarts_total", (("model", "alpha"),)] == 1
    assert m["vllm_mux:instance_restarts_total", (("model", "beta"),)] == 2
    assert m["vllm_mux:model_state", (("model", "alpha"), ("state", "restarting"))] == 1
    assert m["vllm_mux:model_state", (("model", "beta"), ("state", "failed"))] == 1
    assert m["vllm_mux:requests_total", (("model", "alpha"), ("status", "503"))] == 2

    # Serve started alpha again, on a new port: the next request goes there.
    alpha.url, alpha.state = fakes["beta"].url, None
    assert chat(client(router), "alpha", "back").choices[0].message.content == "beta: back"


# -- every endpoint of vLLM's --

# vLLM's endpoints the router does not forward, and why; the guard below fails
# on any other that vLLM serves and the router does not forward.
LEFT_OUT = {
    **dict.fromkeys(("/health", "/v1/models", "/metrics"), "the router answers it itself"),
    **dict.fromkeys(
        ("/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"),
        "no schema or docs: they would list the endpoints to anyone",
    ),
    **dict.fromkeys(
        ("/load", "/version", "/kv_event_sources", "/ping", "/tokenizer_info", "/server_info"),
        "about one server, with no model to route by (the router's /health and /v1/models "
        "speak for all)",
    ),
    "/v1/realtime": "a WebSocket, whose model comes in a message after it opened: the router "
    "forwards HTTP requests",
    **dict.fromkeys(
        ("/sleep", "/wake_up", "/is_sleeping", "/release_kv_cache_memory"),
        "vllm-mux sleeps and wakes instances itself (through the daemon)",
    ),
    **dict.fromkeys(
        (
            "/reset_prefix_cache", "/reset_mm_cache", "/reset_encoder_cache", "/collective_rpc",
            "/start_profile", "/stop_profile", "/v1/load_lora_adapter",
            "/v1/unload_lora_adapter", "/adapters", "/adapters/{adapter_name}", "/pause",
            "/resume", "/is_paused", "/abort_requests", "/inference/v1/abort_requests",
            "/init_weight_transfer_engine", "/shutdown_weight_transfer_engine",
            "/start_weight_update", "/start_draft_weight_update", "/update_weights",
            "/finish_weight_update", "/update_weight_version", "/weight_info",
            "/weight_checker", "/get_world_size", "/scale_elastic_ep", "/is_scaling_elastic_ep",
            "/fault_tolerance/apply", "/fault_tolerance/status",
        ),
        "an operator's control of one server (admin, dev, RL, scaling), not a request by model",
    ),
}  # fmt: skip

# Every route vLLM's server can have: its app built with every task and every
# optional group of endpoints on, with a stand-in for the model's config
# (an embedding model, so that every pooling endpoint is there).
VLLM_ROUTES = """
import json, types, typing
from vllm.entrypoints.launchers.app import build_app
from vllm.entrypoints.launchers.cli_args import make_arg_parser
from vllm.tasks import SupportedTask
from vllm.utils.argparse_utils import FlexibleArgumentParser
from starlette.routing import Mount, WebSocketRoute

args = make_arg_parser(FlexibleArgumentParser()).parse_args([
    "--enable-tokenizer-info-endpoint", "--enable-fault-tolerance",
    "--profiler-config", '{"profiler": "torch", "torch_profiler_dir": "/tmp"}',
])
config = types.SimpleNamespace(get_pooling_task=lambda tasks: "embed", architecture="",
                               hf_config=None)
app = build_app(args, typing.get_args(SupportedTask), config)
routes = []
for r in app.routes:
    if isinstance(r, WebSocketRoute):
        routes.append(("WEBSOCKET", r.path))
    elif not isinstance(r, Mount):
        routes += [(m, r.path) for m in r.methods - {"HEAD"}]
print(json.dumps(routes))
"""


def test_the_router_forwards_every_request_endpoint_vllm_serves():
    import subprocess
    import sys

    env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"}
    done = subprocess.run(
        [sys.executable, "-c", VLLM_ROUTES], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    served = {tuple(r) for r in json.loads(done.stdout.splitlines()[-1])}
    forwarded = {("POST", p) for p in (*ROUTED, *FORM_ROUTED)} | set(RESPONSE_ROUTES)
    unaccounted = {r for r in served - forwarded if r[1] not in LEFT_OUT}
    assert not unaccounted, f"vLLM serves these: forward them or say why not: {unaccounted}"
    assert forwarded <= served, forwarded - served  # nothing vLLM no longer serves
    assert set(LEFT_OUT) <= {path for _, path in served}, set(LEFT_OUT) - {p for _, p in served}
    assert len(ROUTED + FORM_ROUTED) == len(set(ROUTED + FORM_ROUTED))


def test_every_json_endpoint_reaches_its_model(router, fakes):
    """Chat and completions have their own tests; every other endpoint here."""
    others = [p for p in ROUTED if p not in ("/v1/chat/completions", "/v1/completions")]
    for i, path in enumerate(others):
        model = ("alpha", "beta")[i % 2]
        body = json.dumps({"model": model, "input": path}).encode()
        headers = {"X-Trace": path, "Content-Type": "text/plain"}
        r = httpx.post(f"{router.url}{path}", content=body, headers=headers)
        assert r.status_code == 200, (path, r.text)
        assert (r.json()["model"], r.json()["path"]) == (model, path)
        seen = fakes[model].echoed[-1]
        assert (seen.method, seen.path, seen.body) == ("POST", path, body)
        assert seen.content_type == "application/json"  # what vLLM takes, and it parsed as such
        assert fakes[model].arrived[-1]["x-trace"] == path


def test_embeddings_responses_and_audio_through_the_openai_client(router, fakes):
    c = client(router)
    r = c.embeddings.create(model="beta", input=["a", "b"], encoding_format="float")
    assert r.model == "beta" and r.data[0].embedding == [1.0, 2.0]
    assert fakes["beta"].echoed[-1].path == "/v1/embeddings"
    r = c.responses.create(model="alpha", input="hi")
    assert r.model == "alpha" and fakes["alpha"].echoed[-1].path == "/v1/responses"
    events = list(c.responses.create(model="beta", input="hi", stream=True))
    assert events[0].type == "response.created" and events[0].response.model == "beta"

    # Transcriptions by the openai client, translations (deprecated there) by httpx.
    audio = b"RIFF\x00\x01fake audio\r\n--not-a-boundary\r\n" * 100
    for model in ("alpha", "beta"):
        answer = c.audio.transcriptions.create(model=model, file=("a.wav", audio, "audio/wav"))
        assert answer.text == f"{model}: /v1/audio/transcriptions"
        r = httpx.post(f"{router.url}/v1/audio/translations", data={"model": model},
                       files={"file": ("a.wav", audio, "audio/wav")})  # fmt: skip
        assert r.json()["text"] == f"{model}: /v1/audio/translations"
        for seen, path in zip(fakes[model].echoed[-2:], FORM_ROUTED):
            assert seen.path == path and audio in seen.body
            assert seen.content_type.startswith("multipart/form-data; boundary=")


def multipart(*parts: tuple[str, str | None, bytes], boundary="b0und") -> tuple[bytes, dict]:
    """A multipart/form-data body of (name, filename, value) parts, and its headers."""
    body = b""
    for name, filename, value in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        body += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode()
        body += value + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f'multipart/form-data; boundary="{boundary}"'}


def test_a_form_is_routed_by_its_model_field_and_passed_on_as_it_came(router, fakes):
    path = f"{router.url}/v1/audio/transcriptions"
    # The model after the file, twice (FastAPI, and so vLLM, reads the last),
    # with a file part named "model" that is not the field.
    body, headers = multipart(
        ("file", "model.wav", b'name="model"\r\n\r\nalpha'),
        ("model", "x.txt", b"alpha"),
        ("model", None, b"alpha"),
        ("model", None, b"beta"),
        ("language", None, b"en"),
    )
    r = httpx.post(path, content=body, headers=headers)
    assert r.status_code == 200 and r.json()["model"] == "beta"
    seen = fakes["beta"].echoed[-1]
    assert (seen.body, seen.content_type) == (body, headers["Content-Type"])
    # A form that asks for a stream is relayed as one.
    body, headers = multipart(("file", "a.wav", b"x"), ("model", None, b"alpha"),
                              ("stream", None, b"true"))  # fmt: skip
    r = httpx.post(path, content=body, headers=headers)
    assert r.status_code == 200 and fakes["alpha"].echoed[-1].body == body


def test_a_body_without_a_usable_model_is_a_400(router, fakes):
    arrived = {name: len(fake.arrived) for name, fake in fakes.items()}
    for path in ("/v1/embeddings", "/tokenize", "/v1/responses", "/rerank"):
        for body in ({"input": "x"}, {"model": ""}, {"model": 7}, {"model": None}):
            r = httpx.post(f"{router.url}{path}", json=body)
            assert assert_error(r, 400, None)["param"] == "model"
    form = f"{router.url}/v1/audio/translations"
    for parts in ([("file", "a.wav", b"x")], [("file", "a.wav", b"x"), ("model", None, b"")],
                  [("model", "model.txt", b"alpha")]):  # fmt: skip
        body, headers = multipart(*parts)
        assert (
            assert_error(httpx.post(form, content=body, headers=headers), 400, None)["param"]
            == "model"
        )
    # Not a form at all, a form without a boundary, a broken or non-UTF-8 one.
    assert_error(httpx.post(form, json={"model": "alpha"}), 400, None)
    body, headers = multipart(("model", None, b"alpha"))
    no_boundary = {"Content-Type": "multipart/form-data"}
    assert_error(httpx.post(form, content=body, headers=no_boundary), 400, None)
    bad = {"Content-Type": 'multipart/form-data; boundary="b0und"'}
    assert_error(httpx.post(form, content=b"--b0und\r\nno headers end", headers=bad), 400, None)
    assert_error(httpx.post(form, content=body.replace(b"alpha", b"\xff"), headers=bad), 400, None)
    # The model named must be served.
    body, headers = multipart(("model", None, b"gamma"))
    assert_error(httpx.post(form, content=body, headers=headers), 404, "model_not_found")
    assert {name: len(fake.arrived) for name, fake in fakes.items()} == arrived
    n = 4 * 4 + 3 + 4  # JSON, forms without a model, bad forms
    assert metrics(router)["vllm_mux:requests_total", (("model", ""), ("status", "400"))] == n
    assert_serving(router)


def test_a_form_over_the_limit_is_refused(router_factory):
    router = router_factory(max_body=64 << 10)
    body, headers = multipart(("file", "a.wav", b"x" * (64 << 10)), ("model", None, b"alpha"))
    r = httpx.post(f"{router.url}/v1/audio/transcriptions", content=body, headers=headers)
    assert_error(r, 413, "request_too_large")


def test_a_response_is_fetched_and_cancelled_where_it_was_made(router_factory, fakes, monkeypatch):
    from vllm_mux.router import app

    monkeypatch.setattr(app, "RESPONSE_IDS", 3)
    router = router_factory()
    c = client(router)
    made = c.responses.create(model="beta", input="hi").id
    streamed = next(iter(c.responses.create(model="alpha", input="hi", stream=True))).response.id
    assert made.startswith("resp-beta-") and streamed.startswith("resp-alpha-")
    assert c.responses.retrieve(made).model == "beta"
    assert fakes["beta"].echoed[-1].path == f"/v1/responses/{made}"
    r = httpx.get(f"{router.url}/v1/responses/{streamed}?stream=true&starting_after=2")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert (
        fakes["alpha"].echoed[-1].path == f"/v1/responses/{streamed}?stream=true&starting_after=2"
    )
    assert c.responses.cancel(streamed).model == "alpha"
    seen = fakes["alpha"].echoed[-1]
    assert (seen.method, seen.path) == ("POST", f"/v1/responses/{streamed}/cancel")
    # An id nobody made, and one forgotten: the last RESPONSE_IDS are kept.
    with pytest.raises(openai.NotFoundError) as e:
        c.responses.retrieve("resp-nobody")
    assert e.value.body["param"] == "response_id"
    for _ in range(2):
        c.responses.create(model="alpha", input="more")
    assert_error(httpx.post(f"{router.url}/v1/responses/{made}/cancel"), 404, None)
    assert c.responses.retrieve(streamed).model == "alpha"


def test_a_new_endpoint_queues_and_counts_like_chat(router_factory, fakes):
    router = router_factory(max_queue=1)
    slow = fakes["slow"]
    slow.gate.clear()
    queue = "vllm_mux:request_queue_length", (("model", "slow"),)
    embed = {"model": "slow", "input": "first"}
    try:
        held = threading.Thread(
            target=lambda: httpx.post(f"{router.url}/v1/embeddings", json=embed, timeout=60),
            daemon=True,
        )
        held.start()
        assert wait_for(lambda: slow.echoed and metrics(router)[queue] == 1)
        body, headers = multipart(("file", "a.wav", b"x"), ("model", None, b"slow"))
        r = httpx.post(f"{router.url}/v1/audio/transcriptions", content=body, headers=headers)
        assert_error(r, 429, "rate_limit_exceeded", retry_after="1")
        assert_serving(router)
    finally:
        slow.gate.set()
    held.join(PATIENCE_S)
    assert wait_for(lambda: metrics(router)[queue] == 0)
    # A client that gives up waiting: the upstream request is abandoned too.
    slow.gate.clear()
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{router.url}/score", json={"model": "slow"}, timeout=0.3)
        assert wait_for(lambda: "POST /score" in slow.abandoned)
    finally:
        slow.gate.set()
    # The instance's refusal and an instance that is gone, as for chat.
    r = httpx.post(f"{router.url}/v1/embeddings", json={"model": "busy", "input": "x"})
    assert r.status_code == 503 and r.headers["retry-after"] == "5"
    assert r.json()["error"]["message"] == "could not wake"
    assert_error(httpx.post(f"{router.url}/tokenize", json={"model": "dead"}), 503,
                 "model_unavailable", retry_after="5")  # fmt: skip
    m = metrics(router)
    for status, n in (("200", 1), ("429", 1), ("499", 1)):
        assert m["vllm_mux:requests_total", (("model", "slow"), ("status", status))] == n
    assert m["vllm_mux:requests_total", (("model", "busy"), ("status", "503"))] == 1
    assert m["vllm_mux:requests_total", (("model", "dead"), ("status", "503"))] == 1
    assert m["vllm_mux:time_to_first_token_seconds_count", (("model", "slow"),)] == 1
    assert m[queue] == 0
