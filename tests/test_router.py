"""The router, in front of fake vLLM servers, with a real daemon in this process.

The fakes are real HTTP servers that answer the way vLLM does (JSON, SSE
streams with pauses, 503 with Retry-After) and record what reached them,
including clients that went away; clients are the official ``openai``
package and plain httpx. No vLLM, no model: fast.
"""

import asyncio
import contextlib
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
        id is its ``request_id`` or ``resp-<name>-<n>``; ``stream`` in a JSON
        body or the query asks for Responses API events."""
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
        asked = json.loads(body) if seen.content_type == "application/json" else {}
        made = asked.get("request_id") or f"resp-{self.name}-{len(self.echoed)}"  # vLLM's way
        answer = {
            "id": request.path_params.get("response_id", made),
            "object": "echo",
            "created_at": 0,
            "model": self.name,
            "path": seen.path,
            "text": f"{self.name}: {seen.path}",
            "data": [{"object": "embedding", "index": 0, "embedding": [1.0, 2.0]}],
            "output": [],
            "usage": {"prompt_tokens": 1, "total_tokens": 1},
        }
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


JSON = {"Content-Type": "application/json"}


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
    r = httpx.post(f"{router.url}/v1/chat/completions", content=b"{not json", headers=JSON)
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


def test_unknown_path_is_openai_shaped_and_counted(router_factory):
    router = router_factory(api_key="k")
    key = {"Authorization": "Bearer k"}
    assert_error(httpx.get(f"{router.url}/v1/nothing", headers=key), 404, None)
    assert_error(httpx.get(f"{router.url}/v1/completions", headers=key), 405, None)
    assert_error(httpx.get(f"{router.url}/v1/models"), 401, "invalid_api_key")
    r = httpx.post(
        f"{router.url}/v1/embeddings",
        json={"model": "alpha"},
        headers={"Authorization": "Bearer no"},
    )
    assert_error(r, 401, "invalid_api_key")
    m = metrics(router, **key)
    for status, n in (("404", 1), ("405", 1), ("401", 2)):
        assert m["vllm_mux:requests_total", (("model", ""), ("status", status))] == n, status


def test_deeply_nested_json_is_a_400_and_counted(router):
    body = b'{"model": "alpha", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    r = httpx.post(f"{router.url}/v1/completions", content=body, headers=JSON)
    assert_error(r, 400, None)
    assert metrics(router)["vllm_mux:requests_total", (("model", ""), ("status", "400"))] == 1
    assert_serving(router)


def test_a_non_ascii_header_is_a_400_and_counted(router, fakes):
    body = b'{"model": "alpha", "prompt": "x"}'
    head = b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Name: caf\xe9\r\n"
    head += b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
    arrived = len(fakes["alpha"].arrived)
    assert_raw_error(raw(router, head + body), 400, None)
    assert len(fakes["alpha"].arrived) == arrived
    assert metrics(router)["vllm_mux:requests_total", (("model", ""), ("status", "400"))] == 1
    assert_serving(router)


def test_a_body_over_the_limit_is_refused_before_it_is_read(router_factory):
    limit = 64 << 10
    router = router_factory(max_body=limit)
    head = b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
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
    r = httpx.post(f"{router.url}/v1/completions", content=body + b" ", headers=JSON)
    assert_error(r, 413, "request_too_large")
    r = httpx.post(f"{router.url}/v1/completions", content=body, headers=JSON)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == f"alpha: {prompt}"
    assert metrics(router)["vllm_mux:requests_total", (("model", ""), ("status", "413"))] == 3
    assert_serving(router)


def test_an_empty_api_key_is_refused_never_accepted(router_factory):
    with pytest.raises(ValueError, match="empty"):
        make_app({"alpha": "http://127.0.0.1:1"}, daemon_socket=None, api_key="")
    router = router_factory(api_key="sekret")
    for value in (b"Bearer ", b"Bearer", b"Bearer  \t", b""):
        answer = raw(
            router,
            b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: %s\r\n\r\n" % value,
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
        # Any JSON type, which goes on as the one vLLM takes.
        kind = ("application/json; charset=utf-8", "application/vnd.api+json")[i % 2]
        headers = {"X-Trace": path, "Content-Type": kind}
        r = httpx.post(f"{router.url}{path}", content=body, headers=headers)
        assert r.status_code == 200, (path, r.text)
        assert (r.json()["model"], r.json()["path"]) == (model, path)
        seen = fakes[model].echoed[-1]
        assert (seen.method, seen.path, seen.body) == ("POST", path, body)
        assert seen.content_type == "application/json"
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
    # A form without a boundary, a broken or non-UTF-8 one.
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
    n = 4 * 4 + 3 + 3  # JSON, forms without a model, bad forms
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
    # Embeddings, scores and tokens generate no tokens: no time to first token.
    assert ("vllm_mux:time_to_first_token_seconds_count", (("model", "slow"),)) not in m
    assert m[queue] == 0


# -- what a hostile client or web page may try --


def test_json_endpoints_take_json_only_and_forms_only_forms(router, fakes):
    """What a web page may send without asking (text/plain, a form) is
    refused, as vLLM refuses it, before it reaches an instance."""
    arrived = {name: len(fake.arrived) for name, fake in fakes.items()}
    body = json.dumps({"model": "alpha", "input": "x"}).encode()
    for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; b=x",
                 "application/jsonx", None):  # fmt: skip
        headers = {"Content-Type": kind} if kind else {}
        r = httpx.post(f"{router.url}/v1/embeddings", content=body, headers=headers)
        assert_error(r, 415, "unsupported_media_type")
    form = f"{router.url}/v1/audio/transcriptions"
    assert_error(httpx.post(form, json={"model": "alpha"}), 415, "unsupported_media_type")
    assert {name: len(fake.arrived) for name, fake in fakes.items()} == arrived
    assert metrics(router)["vllm_mux:requests_total", (("model", ""), ("status", "415"))] == 6


def test_requests_from_another_site_are_refused(router_factory, fakes):
    """A page elsewhere (its Origin), or one that rebinds its own name to the
    loopback address (its name in Host), gets nothing, not even the controls."""
    router = router_factory()
    port = router.url.rsplit(":", 1)[1]
    arrived = len(fakes["alpha"].arrived)
    body = {"model": "alpha", "input": "x"}
    for origin in ("https://evil.example", "null", f"http://evil.example:{port}",
                   f"https://127.0.0.1:{port}", "http://127.0.0.1"):  # fmt: skip
        headers = {"Origin": origin}
        r = httpx.post(f"{router.url}/v1/embeddings", json=body, headers=headers)
        assert_error(r, 403, "forbidden")
        assert_error(httpx.post(f"{router.url}/mux/models/alpha/sleep", headers=headers), 403,
                     "forbidden")  # fmt: skip
    for host in (f"evil.example:{port}", "evil.example", "127.0.0.1.nip.io"):
        r = httpx.get(f"{router.url}/v1/models", headers={"Host": host})
        assert_error(r, 403, "forbidden")
    assert len(fakes["alpha"].arrived) == arrived
    assert httpx.get(f"{router.url}/health", headers={"Host": "probe.example"}).status_code == 200
    # The router's own page, under its loopback names.
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "[::1]", "LOCALHOST"):
        origin = f"http://{host}"
        r = httpx.post(f"{router.url}/v1/embeddings", json=body,
                       headers={"Host": host, "Origin": origin})  # fmt: skip
        assert r.status_code == 200, (host, r.text)
    # Listening on every address, it is reached by any name, but still not
    # from another origin.
    anywhere = router_factory(bound_host="0.0.0.0")
    headers = {"Host": "gpu-box.lan:8000"}
    assert httpx.get(f"{anywhere.url}/v1/models", headers=headers).status_code == 200
    r = httpx.get(f"{anywhere.url}/v1/models", headers={**headers, "Origin": "http://a.example"})
    assert_error(r, 403, "forbidden")
    assert metrics(router)["vllm_mux:requests_total", (("model", ""), ("status", "403"))] == 13


def test_a_response_id_two_models_answered_is_neither_ones(router, fakes):
    """A client may choose its response's id (``request_id``): choosing
    another's must not take that response over."""
    made = httpx.post(f"{router.url}/v1/responses", json={"model": "alpha", "input": "mine"})
    mine = made.json()["id"]
    assert httpx.get(f"{router.url}/v1/responses/{mine}").json()["model"] == "alpha"
    theirs = {"model": "beta", "input": "x", "request_id": mine}
    assert httpx.post(f"{router.url}/v1/responses", json=theirs).json()["id"] == mine
    arrived = len(fakes["beta"].arrived)
    assert_error(httpx.get(f"{router.url}/v1/responses/{mine}"), 409, "ambiguous_response_id")
    assert_error(httpx.post(f"{router.url}/v1/responses/{mine}/cancel"), 409,
                 "ambiguous_response_id")  # fmt: skip
    assert len(fakes["beta"].arrived) == arrived
    # The same model answering an id again is no ambiguity.
    again = {"model": "alpha", "input": "x", "request_id": "again"}
    for _ in range(2):
        httpx.post(f"{router.url}/v1/responses", json=again)
    assert httpx.get(f"{router.url}/v1/responses/again").json()["model"] == "alpha"
    # An id too long to keep is not kept.
    long = {"model": "alpha", "input": "x", "request_id": "r" * 257}
    assert httpx.post(f"{router.url}/v1/responses", json=long).status_code == 200
    assert_error(httpx.get(f"{router.url}/v1/responses/{'r' * 257}"), 404, None)


@pytest.mark.parametrize("stream", ["true", 1, "on"])
def test_a_loosely_true_stream_is_a_stream(router_factory, fakes, monkeypatch, stream):
    """vLLM (pydantic) reads "true", 1, "on" as true and streams: the router
    relays the stream as it comes, with no read timeout while it waits."""
    from vllm_mux.router import app

    monkeypatch.setattr(app, "UPSTREAM_TIMEOUT", httpx.Timeout(60, connect=10, read=0.5))
    router = router_factory()
    n = 10
    body = {"model": "alpha", "prompt": "x", "stream": stream, "max_tokens": n}
    start = time.monotonic()
    with httpx.stream("POST", f"{router.url}/v1/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        arrivals = [time.monotonic() - start for _ in r.iter_raw()]
    assert arrivals[-1] - arrivals[0] > (n - 3) * PAUSE, arrivals
    # Held longer than a request's read timeout before its stream starts.
    slow = fakes["slow"]
    slow.gate.clear()
    threading.Timer(1.0, slow.gate.set).start()
    body = {"model": "slow", "prompt": "x", "stream": stream, "max_tokens": 2}
    r = httpx.post(f"{router.url}/v1/completions", json=body, timeout=PATIENCE_S)
    assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n"), r.text


def test_a_large_body_is_parsed_off_the_event_loop(router):
    """Parsing 15 MiB of nested JSON takes a second or two (and the GIL, all
    of it): meanwhile the router answers others at once."""
    body = b'{"model": "dead", "input": [' + b"[]," * ((15 << 20) // 3) + b"[]]}"
    answered, done = [time.monotonic()], threading.Event()

    def probe():
        # The gaps between answers: a stalled process holds up this thread
        # too, so only the gaps tell.
        with httpx.Client() as c:
            while not done.is_set():
                c.get(f"{router.url}/health")
                answered.append(time.monotonic())
                time.sleep(0.01)

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        r = httpx.post(f"{router.url}/tokenize", content=body, headers=JSON, timeout=60)
        assert_error(r, 503, "model_unavailable", retry_after="5")  # read, and routed
        r = httpx.post(f"{router.url}/tokenize", content=body[:-1], headers=JSON, timeout=60)
        assert_error(r, 400, None)  # still refused when it is no JSON
    finally:
        done.set()
        prober.join()
    gaps = [b - a for a, b in zip(answered, answered[1:])]
    assert max(gaps) < 0.75, max(gaps)


def send_part(router: Served, length: int, sent: bytes) -> socket.socket:
    """A request whose body of ``length`` bytes has only ``sent`` so far."""
    port = int(router.url.rsplit(":", 1)[1])
    s = socket.create_connection(("127.0.0.1", port), timeout=PATIENCE_S)
    head = b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    head += b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % length
    s.sendall(head + sent)
    return s


def answer(s: socket.socket) -> tuple[int, dict]:
    f = s.makefile("rb")
    status, length = int(f.readline().split()[1]), 0
    while (line := f.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        if name.lower() == "content-length":
            length = int(value)
    return status, json.loads(f.read(length))


def test_bodies_held_at_once_are_bounded(router_factory):
    router = router_factory(max_body=64 << 10, max_buffered=96 << 10)
    body = json.dumps({"model": "alpha", "prompt": "x" * (60 << 10)}).encode()
    first = send_part(router, len(body), body[:50_000])
    try:
        time.sleep(0.5)  # its first bytes are in
        # Announced, or not: either way past what the router may hold now.
        r = httpx.post(f"{router.url}/v1/completions", content=body, headers=JSON)
        assert_error(r, 503, "server_busy", retry_after="1")
        chunked = iter([body[:30_000], body[30_000:]])
        r = httpx.post(f"{router.url}/v1/completions", content=chunked, headers=JSON)
        assert_error(r, 503, "server_busy", retry_after="1")
        first.sendall(body[50_000:])
        assert answer(first)[0] == 200
    finally:
        first.close()
    # Given back once done with: the same body goes through now.
    r = httpx.post(f"{router.url}/v1/completions", content=body, headers=JSON)
    assert r.status_code == 200, r.text


def test_a_body_that_comes_too_slowly_is_a_408(router_factory, monkeypatch):
    from vllm_mux.router import app

    monkeypatch.setattr(app, "BODY_READ_S", 0.5)
    router = router_factory()
    s = send_part(router, 100, b'{"model": ')
    try:
        assert_raw_error(answer(s), 408, "request_timeout")
    finally:
        s.close()
    assert_serving(router)


def test_a_25_mb_upload_fits_the_default_limit(router, fakes):
    audio = b"\0" * (25 * 10**6)  # OpenAI's limit, and vLLM's
    text = client(router).audio.transcriptions.create(model="alpha", file=("a.wav", audio))
    assert text.text == "alpha: /v1/audio/transcriptions"


def test_a_form_part_is_named_by_its_last_content_disposition(router, fakes):
    """As Starlette (so vLLM) names it: a part that says "model" and then
    "file" is the file, and the model is the field before it."""
    as_field = b'Content-Disposition: form-data; name="model"\r\n'
    as_file = b'Content-Disposition: form-data; name="file"; filename="a.wav"\r\n'
    field = b"--b\r\n" + as_field + b"\r\nalpha\r\n"
    model_then_file = b"--b\r\n" + as_field + as_file + b"\r\n"
    file_then_model = b"--b\r\n" + as_file + as_field + b"\r\n"
    headers = {"Content-Type": "multipart/form-data; boundary=b"}
    for part, model in ((model_then_file, "alpha"), (file_then_model, "beta")):
        body = field + part + b"beta\r\n--b--\r\n"
        r = httpx.post(f"{router.url}/v1/audio/transcriptions", content=body, headers=headers)
        assert r.json()["model"] == model


def test_the_routers_own_answers_are_not_sniffed_or_cached(router):
    for r in (httpx.get(f"{router.url}/v1/models"), httpx.get(f"{router.url}/mux/status"),
              httpx.get(f"{router.url}/health"), httpx.get(f"{router.url}/metrics"),
              httpx.post(f"{router.url}/v1/embeddings", json={"model": "gamma"}),
              httpx.get(f"{router.url}/nothing")):  # fmt: skip
        assert r.headers["x-content-type-options"] == "nosniff", r.url
        assert r.headers["cache-control"] == "no-store", r.url


def fake_daemon(path: str, control_s: float | None):
    """A daemon on ``path`` that answers a control after ``control_s`` seconds
    (None: never) and refuses anything else at once; what it returns stops it."""
    from vllm_mux.daemon import protocol

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(128)
    conns = []

    def serve(conn):
        conns.append(conn)
        with conn:
            while (message := protocol.recv(conn)[0]) is not None:
                if message["op"] not in ("sleep", "wake", "pin", "unpin"):
                    protocol.send(conn, {"ok": False, "error": "not here"})
                    continue
                if control_s is None:
                    conn.recv(1)  # until the router hangs up
                    return
                time.sleep(control_s)
                protocol.send(conn, {"ok": True, "state": "awake", "changed": True, "seconds": 0})

    def take():
        while True:
            try:
                conn = listener.accept()[0]
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    def stop():
        listener.close()
        for conn in conns:
            with contextlib.suppress(OSError):  # closed already
                conn.shutdown(socket.SHUT_RDWR)  # the router's waits end

    threading.Thread(target=take, daemon=True).start()
    return stop


@pytest.fixture
def silent_daemon(tmp_path):
    """A stuck daemon: it takes a control and never answers."""
    path = str(tmp_path / "silent.sock")
    stop = fake_daemon(path, None)
    yield path
    stop()


@pytest.mark.parametrize("control_s", [None, 2.0])
def test_stuck_or_slow_controls_hold_up_no_poll_or_scrape(router_factory, tmp_path, control_s):
    """More controls at once than Python's default thread pool has threads,
    each stuck on the daemon or answered after 2 s: the ones beyond the
    router's own few are refused at once, and the status, the metrics and
    the model list answer meanwhile."""
    from vllm_mux.router import controls

    path = str(tmp_path / "d.sock")
    stop = fake_daemon(path, control_s)
    router = router_factory(daemon_socket=path)
    n = min(32, os.cpu_count() + 4) + controls.AT_ONCE

    async def main():
        async with httpx.AsyncClient(base_url=router.url, timeout=PATIENCE_S) as http:
            wakes = [asyncio.ensure_future(http.post("/mux/models/alpha/wake")) for _ in range(n)]
            await asyncio.sleep(0.5)  # all in the router, the first ones waiting
            start = time.monotonic()
            paths = ["/v1/models", "/mux/status", "/metrics"] * 10
            answers = await asyncio.gather(*(http.get(p) for p in paths))
            assert {r.status_code for r in answers} == {200}
            assert time.monotonic() - start < 1
            assert {m["state"] for m in answers[0].json()["data"]} == {"unknown"}
            if control_s is None:
                return [w.cancel() for w in wakes]
            answers = await asyncio.gather(*wakes)
            statuses = sorted(r.status_code for r in answers)
            assert statuses == [200] * controls.AT_ONCE + [429] * (n - controls.AT_ONCE)
            refused = [r for r in answers if r.status_code == 429]
            assert_error(refused[0], 429, "rate_limit_exceeded", retry_after="5")

    try:
        asyncio.run(main())
    finally:
        stop()


def test_a_daemon_that_never_answers_its_status_is_read_once_for_all(
    router_factory, tmp_path, monkeypatch
):
    """Polls and scrapes at once, the daemon stuck: one read, not one each."""
    from vllm_mux.router import app

    monkeypatch.setattr(app, "DAEMON_TIMEOUT_S", 0.5)
    path = str(tmp_path / "stuck.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(128)  # connections wait in the backlog, never answered
    router = router_factory(daemon_socket=path)

    async def main():
        async with httpx.AsyncClient(base_url=router.url, timeout=PATIENCE_S) as http:
            start = time.monotonic()
            paths = ["/v1/models", "/mux/status", "/metrics"] * 20
            answers = await asyncio.gather(*(http.get(p) for p in paths))
            assert {r.status_code for r in answers} == {200}
            assert time.monotonic() - start < 2  # one read of 0.5 s, not 60 in turn

    try:
        asyncio.run(main())
    finally:
        listener.close()


def test_a_control_longer_than_the_routers_wait_is_a_504_not_a_daemon_gone(
    router_factory, silent_daemon, monkeypatch
):
    """A daemon whose --wait-timeout is beyond the router's wait is still at
    work when the router stops waiting: it says so."""
    from vllm_mux.router import controls

    monkeypatch.setattr(controls, "TIMEOUT_S", 0.5)
    router = router_factory(daemon_socket=silent_daemon)
    r = httpx.post(f"{router.url}/mux/models/alpha/wake")
    assert "still" in assert_error(r, 504, "timeout")["message"]
