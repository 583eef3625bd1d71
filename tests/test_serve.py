"""`vllm-mux serve`: one OpenAI port for two models on a pool that holds one,
beside a third whose source is broken; serve heals a killed instance and a
killed daemon."""

import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import assert_books_balance, start_serve
from vllm_mux.daemon.client import Client, DaemonError
from vllm_mux.launch import free_port

pytestmark = pytest.mark.vllm

KEY = "sk-test"
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def serve(tmp_path_factory, model_dir):
    tmp = tmp_path_factory.mktemp("serve")
    port, sock = free_port(), str(tmp / "mux.sock")
    broken = tmp / "broken"  # a model directory whose config is not JSON
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama", oops')
    argv = [sys.executable, "-m", "vllm_mux.cli", "serve", "--port", str(port)]
    argv += ["--socket", sock, "--log-dir", str(tmp / "logs"), "--api-key", KEY]
    # The default config's two models (a pool that holds one), and the broken one.
    argv += [
        "--model",
        "smol-a=smollm2",
        "--model",
        "smol-b=smollm2",
        "--model",
        f"broken={broken}",
    ]
    url = f"http://127.0.0.1:{port}"
    proc = start_serve(argv, tmp / "serve.log", url)
    yield proc, url, sock, tmp
    if proc.poll() is None:  # the SIGTERM test did not run: serve stops its children
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


AUTH = {"Authorization": f"Bearer {KEY}"}


def models(url: str) -> dict:
    r = httpx.get(f"{url}/v1/models", headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    return {m["id"]: m for m in r.json()["data"]}


def wait_until(predicate, timeout: float = 900):
    """The predicate's first true value; the timeout is only reached when
    something is broken, not on a slow machine."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return value


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=300)


def books(sock: str) -> dict:
    c = Client(sock)
    try:
        status = c.status()
    finally:
        c.close()
    assert_books_balance(status)
    return status


def test_chat_and_completions_for_two_models(serve):
    proc, url, sock, _ = serve
    c = client(url)
    answers = {}
    for round_ in range(2):
        for model in ("smol-a", "smol-b"):
            chat = c.chat.completions.create(
                model=model, messages=[{"role": "user", "content": QUESTION}],
                max_tokens=16, temperature=0,
            )  # fmt: skip
            streamed = "".join(
                chunk.choices[0].delta.content or ""
                for chunk in c.chat.completions.create(
                    model=model,
                    messages=[{"role": "user", "content": QUESTION}],
                    max_tokens=16,
                    temperature=0,
                    stream=True,
                )  # fmt: skip
                if chunk.choices
            )
            text = c.completions.create(
                model=model, prompt="The sky is", max_tokens=8, temperature=0
            )
            streamed_text = "".join(
                chunk.choices[0].text
                for chunk in c.completions.create(
                    model=model, prompt="The sky is", max_tokens=8, temperature=0, stream=True
                )
            )
            got = (chat.choices[0].message.content, streamed, text.choices[0].text, streamed_text)
            assert got[0] == got[1] and got[2] == got[3]
            assert "Paris" in got[0]
            # the same model under another name, and after switches: the same answers
            answers.setdefault("any", got)
            assert got == answers["any"], (round_, model)
            books(sock)

    listed = {m.id: m for m in c.models.list().data}
    assert set(listed) == {"smol-a", "smol-b", "broken"}
    status = books(sock)
    wakes = {i["model"]: i["wakes"] for i in status["instances"]}
    assert wakes["smol-a"] >= 1 and wakes["smol-b"] >= 1
    metrics = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    families = {f.name: f for f in text_string_to_metric_families(metrics)}
    table = subprocess.run(
        [sys.executable, "-m", "vllm_mux.cli", "status", "--socket", sock],
        capture_output=True, text=True, timeout=60,
    ).stdout  # fmt: skip
    assert "smol-a" in table and "smol-b" in table and "awake" in table
    woke = {
        s.labels["model"]: s.value
        for s in families["vllm_mux:wakes"].samples
        if s.name.endswith("_total")
    }
    assert woke == {**{m: float(w) for m, w in wakes.items()}, "broken": 0.0}


def test_thirty_two_concurrent_streams_complete(serve):
    proc, url, sock, _ = serve
    c = client(url)
    done, errors = [], []

    def stream(k: int) -> None:
        try:
            chunks = c.chat.completions.create(
                model=("smol-a", "smol-b")[k % 2], stream=True, max_tokens=12, temperature=0,
                messages=[{"role": "user", "content": QUESTION}],
            )  # fmt: skip
            done.append("".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices))
        except Exception as e:
            errors.append(repr(e))

    threads = [threading.Thread(target=stream, args=(k,)) for k in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(400)
    assert errors == [] and len(done) == 32 and all("Paris" in d for d in done)
    books(sock)


def test_errors_are_openai_shaped_and_the_server_keeps_serving(serve):
    proc, url, sock, _ = serve
    chat = {"model": "smol-a", "messages": [{"role": "user", "content": QUESTION}]}
    auth = {"Authorization": f"Bearer {KEY}"}
    cases = [
        (httpx.post(f"{url}/v1/chat/completions", json=chat), 401, "invalid_api_key"),
        (httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer wrong"}), 401, None),
        (
            httpx.post(f"{url}/v1/chat/completions", json={**chat, "model": "gpt-9"}, headers=auth),
            404,
            "model_not_found",
        ),
    ]
    for response, status, code in cases:
        assert response.status_code == status
        error = response.json()["error"]
        assert error["message"] and "type" in error
        if code:
            assert error["code"] == code
    assert httpx.get(f"{url}/health").status_code == 200  # no key needed
    r = httpx.post(
        f"{url}/v1/chat/completions", json={**chat, "max_tokens": 8}, headers=auth, timeout=300
    )
    assert r.status_code == 200
    books(sock)


def test_a_client_that_leaves_mid_stream_frees_its_request(serve):
    proc, url, sock, _ = serve

    def requests_at(model: str) -> int:
        (me,) = [i for i in books(sock)["instances"] if i["model"] == model]
        return me["in_flight"] + me["waiting"]

    def wait_until(predicate) -> bool:
        deadline = time.monotonic() + 30
        while not predicate() and time.monotonic() < deadline:
            time.sleep(0.2)
        return predicate()

    body = {"model": "smol-b", "prompt": "Once upon a time", "max_tokens": 1000}
    body |= {"ignore_eos": True, "stream": True, "temperature": 0}
    with httpx.stream(
        "POST", f"{url}/v1/completions", json=body, timeout=300,
        headers={"Authorization": f"Bearer {KEY}"},
    ) as r:  # fmt: skip
        lines, tokens = r.iter_lines(), 0  # not a for loop: leaving one closes the stream
        while tokens < 5:
            line = next(lines)
            tokens += line.startswith("data: {") and '"text"' in line
        assert wait_until(lambda: requests_at("smol-b") == 1)  # still streaming
    # Upstream aborted the request, long before its 1000 tokens (about 50 s here).
    assert wait_until(lambda: requests_at("smol-b") == 0)


def test_instances_listen_on_loopback_only(serve):
    """vLLM's dev-mode endpoints (/sleep, /collective_rpc) have no key: no
    process of serve's may listen beyond 127.0.0.1 (the router's --host is)."""
    proc, url, sock, _ = serve
    family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    listening = {
        (p.pid, c.laddr.ip, c.laddr.port)
        for p in family
        for c in p.net_connections("inet")
        if c.status == psutil.CONN_LISTEN
    }
    servers = [p for p in family if "--served-model-name" in p.cmdline()]
    assert {p.pid for p in servers} <= {pid for pid, _, _ in listening}
    assert {ip for _, ip, _ in listening} == {"127.0.0.1"}, listening


def test_instances_compute_on_cores_of_their_own(serve):
    """smol-a and smol-b may compute at once: every thread of one's worker
    runs on other cores than the other's (vLLM's default puts both on the
    same); serve says which cores each got."""
    proc, url, sock, tmp = serve
    assert len(os.sched_getaffinity(0)) >= 2, "this test needs two cores"
    workers = {i["model"]: i["pid"] for i in books(sock)["instances"]}
    cores = {}
    for model in ("smol-a", "smol-b"):
        threads = psutil.Process(workers[model]).threads()
        cores[model] = set().union(*(os.sched_getaffinity(t.id) for t in threads))
        bind = ",".join(map(str, sorted(cores[model])))
        assert f"vllm-mux: {model} computes on cpu cores {bind} " in (tmp / "serve.log").read_text()
    assert cores["smol-a"].isdisjoint(cores["smol-b"]), cores


def test_a_broken_model_is_marked_failed_and_the_others_serve(serve):
    proc, url, sock, tmp = serve
    broken = models(url)["broken"]
    assert broken["state"] == "failed" and broken["restarts"] == 0
    assert "is not a valid JSON file" in broken["error"]  # the end of its log
    log = (tmp / "serve.log").read_text()
    for attempt in (1, 2, 3):
        assert f"vllm-mux: broken did not start ({attempt}/3)" in log
    r = httpx.post(
        f"{url}/v1/completions", json={"model": "broken", "prompt": "x"}, headers=AUTH, timeout=60
    )
    assert r.status_code == 503 and r.json()["error"]["code"] == "model_failed"
    metrics = httpx.get(f"{url}/metrics", headers=AUTH, timeout=60).text
    assert 'vllm_mux:model_state{model="broken",state="failed"} 1.0' in metrics
    body = {"model": "smol-b", "prompt": "The sky is", "max_tokens": 4}
    r = httpx.post(f"{url}/v1/completions", json=body, headers=AUTH, timeout=None)
    assert r.status_code == 200


def test_a_killed_instance_is_restarted_and_serves_again(serve):
    proc, url, sock, tmp = serve
    body = {"model": "smol-a", "prompt": "The sky is", "max_tokens": 8, "temperature": 0}

    def complete() -> httpx.Response:
        return httpx.post(f"{url}/v1/completions", json=body, headers=AUTH, timeout=None)

    before = complete()
    assert before.status_code == 200
    (worker,) = [i["pid"] for i in books(sock)["instances"] if i["model"] == "smol-a"]
    os.kill(worker, signal.SIGKILL)  # what the OOM killer does to the biggest process

    # Its server exits, and serve starts it again: meanwhile, 503 and Retry-After.
    assert wait_until(lambda: models(url)["smol-a"]["state"] == "restarting")
    r = complete()
    assert r.status_code == 503 and r.headers["retry-after"] == "5"
    assert r.json()["error"]["code"] == "model_unavailable"

    # Then it serves again, the same answers, and both counts show the restart.
    assert wait_until(lambda: models(url)["smol-a"]["state"] != "restarting")
    after = complete()
    assert after.status_code == 200
    assert after.json()["choices"][0]["text"] == before.json()["choices"][0]["text"]
    assert models(url)["smol-a"]["restarts"] == 1 and models(url)["smol-b"]["restarts"] == 0
    metrics = httpx.get(f"{url}/metrics", headers=AUTH, timeout=60).text
    assert 'vllm_mux:instance_restarts_total{model="smol-a"} 1.0' in metrics
    # The dead worker's memory went back to the pool; only the new one holds any.
    status = wait_until(lambda: _only_live(books(sock)))
    assert status, books(sock)
    assert "vllm-mux: smol-a exited" in (tmp / "serve.log").read_text()


def _only_live(status: dict) -> dict | None:
    """The status once no instance of a dead process holds a chunk."""
    dead = [i for i in status["instances"] if not psutil.pid_exists(i["pid"])]
    return None if any(i["chunks"] for i in dead) else status


def test_a_killed_daemon_is_started_again_and_the_models_serve_on(serve):
    """SIGKILL serve's daemon: the awake model answers meanwhile, serve starts
    a new daemon, both instances join it, the books balance, and both models
    answer as before (a wake that needs the daemon in the gap waits for it, or
    gets 503 with Retry-After)."""
    proc, url, sock, tmp = serve

    def complete(model: str) -> httpx.Response:
        body = {"model": model, "prompt": "The sky is", "max_tokens": 8, "temperature": 0}
        r = httpx.post(f"{url}/v1/completions", json=body, headers=AUTH, timeout=None)
        if r.status_code == 503:
            assert r.headers["retry-after"] == "5"
            r = httpx.post(f"{url}/v1/completions", json=body, headers=AUTH, timeout=None)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    before = {m: complete(m) for m in ("smol-a", "smol-b")}
    (awake,) = [i["model"] for i in books(sock)["instances"] if i["state"] == "awake"]
    (old,) = [p for p in psutil.Process(proc.pid).children() if "daemon" in p.cmdline()]
    old.kill()
    old.wait(60)
    assert complete(awake) == before[awake]  # no daemon needed to compute

    def rejoined() -> dict | None:
        try:
            status = books(sock)
        except DaemonError:
            return None  # not listening yet
        states = {i["model"]: i["state"] for i in status["instances"]}
        back = sorted(states) == ["smol-a", "smol-b"] and "disconnected" not in states.values()
        return status if back else None

    assert wait_until(rejoined), books(sock)
    (new,) = [p for p in psutil.Process(proc.pid).children() if "daemon" in p.cmdline()]
    assert new.pid != old.pid
    assert "vllm-mux: the daemon exited (-9); starting it again" in (tmp / "serve.log").read_text()
    assert {m: complete(m) for m in ("smol-a", "smol-b")} == before
    books(sock)


def test_sigterm_leaves_no_process_behind(serve):
    proc, url, sock, tmp = serve
    family = [proc.pid, *(p.pid for p in psutil.Process(proc.pid).children(recursive=True))]
    assert len(family) >= 5  # serve, daemon, and each server with its engine and worker
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(120) == 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(_alive(p) for p in family):
        time.sleep(0.2)
    assert not [p for p in family if _alive(p)]
    assert not os.path.exists(sock)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
