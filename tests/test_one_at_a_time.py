"""Three instances on a pool that holds one: requests switch them, nobody calls /sleep."""

import os
import random
import signal
import threading
import time

import httpx
import openai
import psutil
import pytest

from conftest import assert_books_balance, stream_text

pytestmark = pytest.mark.vllm

QUESTION = "Name a famous painting by Leonardo da Vinci."


@pytest.fixture(scope="module")
def pool_for_one(module_daemon_factory, module_server_factory, model_dir, tiny_model_dir):
    # 32 chunks of 32 MiB: the bundled model needs 25 awake, the tiny one 9.
    daemon = module_daemon_factory("1GiB", args=["--wait-timeout", "15"])
    servers, solo = {}, {}
    for name, model in (("smol-a", model_dir), ("smol-b", model_dir), ("tiny", tiny_model_dir)):
        servers[name] = module_server_factory(model, name=name, socket_path=daemon.socket)
        solo[name] = chat(servers[name], QUESTION)  # alone awake: the reference answer
    return daemon, servers, solo


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)


def chat(server, prompt: str, max_tokens: int = 16) -> str:
    reply = client(server).chat.completions.create(
        model=server.name,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0,
    )
    return reply.choices[0].message.content


def counts(daemon) -> dict:
    return {i["model"]: (i["wakes"], i["sleeps"]) for i in daemon.status()["instances"]}


def test_interleaved_requests_switch_instances(pool_for_one):
    daemon, servers, solo = pool_for_one
    status = daemon.status()
    awake = [i["model"] for i in status["instances"] if i["state"] == "awake"]
    assert awake == ["tiny"]  # the last one started; the pool holds one
    before = counts(daemon)

    order = [random.Random(7).choice(sorted(servers)) for _ in range(30)]
    for name in order:
        assert chat(servers[name], QUESTION) == solo[name], name
        status = daemon.status()
        assert_books_balance(status)
        states = {i["model"]: i["state"] for i in status["instances"]}
        assert states[name] == "awake"

    # Every change of model is one wake of the new one and one sleep of the old.
    expected = {name: [0, 0] for name in servers}
    previous = "tiny"
    for name in order:
        if name != previous:
            expected[name][0] += 1
            expected[previous][1] += 1
        previous = name
    after = counts(daemon)
    for name in servers:
        assert (
            after[name][0] - before[name][0],
            after[name][1] - before[name][1],
        ) == tuple(expected[name]), name


def test_eight_concurrent_clients_finish(pool_for_one):
    daemon, servers, solo = pool_for_one
    names = sorted(servers)
    errors, answers = [], []

    def run(k: int) -> None:
        try:
            for j in range(3):
                name = names[(k + j) % len(names)]
                answers.append((name, chat(servers[name], QUESTION)))
        except Exception as e:  # collected, asserted below
            errors.append(repr(e))

    threads = [threading.Thread(target=run, args=(k,)) for k in range(8)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    elapsed = time.monotonic() - start
    assert not any(t.is_alive() for t in threads), "deadlock: clients still waiting"
    assert errors == []
    assert len(answers) == 24 and all(text == solo[name] for name, text in answers)
    assert elapsed < 240
    assert_books_balance(daemon.status())


def test_busy_holders_make_a_wake_wait_then_fail_with_503(pool_for_one):
    daemon, servers, solo = pool_for_one
    holder, other = servers["smol-a"], servers["smol-b"]
    chat(holder, QUESTION)  # smol-a awake, smol-b asleep
    hang_up = threading.Event()
    streaming = threading.Thread(target=stream_text, args=(holder, QUESTION, 1900, True, hang_up))
    streaming.start()  # keeps smol-a busy far longer than the daemon's 15 s wait
    time.sleep(1)
    body = {"model": other.name, "messages": [{"role": "user", "content": QUESTION}]}
    body |= {"max_tokens": 16, "temperature": 0}
    start = time.monotonic()
    r = httpx.post(f"{other.url}/v1/chat/completions", json=body, timeout=120)
    waited = time.monotonic() - start
    assert r.status_code == 503, r.text
    assert r.headers["retry-after"] == "5"
    assert "failed to wake" in r.json()["error"]["message"]
    assert 14 < waited < 60
    me = daemon.instance("smol-b")
    assert (me["state"], me["chunks"]) == ("asleep", 0)
    assert_books_balance(daemon.status())
    hang_up.set()
    streaming.join(300)
    # The next request tries again, and now the holder is idle.
    assert chat(other, QUESTION) == solo["smol-b"]
    assert_books_balance(daemon.status())


def test_sigkill_mid_stream_leaves_the_others_serving(pool_for_one):
    daemon, servers, solo = pool_for_one
    victim = servers["smol-a"]
    chat(victim, QUESTION)
    worker = daemon.instance("smol-a")["pid"]
    streaming = threading.Thread(target=lambda: _ignore(stream_text, victim, QUESTION, 600, True))
    streaming.start()
    time.sleep(2)
    os.killpg(victim.pid, signal.SIGKILL)  # the server, its engine and its worker
    status = daemon.wait_for(lambda s: all(i["model"] != "smol-a" for i in s["instances"]))
    assert all(i["model"] != "smol-a" for i in status["instances"])
    assert _gone(worker)  # its chunks came back once it was gone
    assert_books_balance(status)
    for name in ("smol-b", "tiny", "smol-b"):
        assert chat(servers[name], QUESTION) == solo[name]
    status = daemon.status()
    assert_books_balance(status)
    streaming.join(60)


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE  # exited, not reaped
    except psutil.NoSuchProcess:
        return True


def _ignore(fn, *args):
    try:
        fn(*args)
    except Exception:
        pass  # the stream dies with its server: that is the point
