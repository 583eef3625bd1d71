"""A pool that holds two of three: space sharing, idle TTL, pinned instances."""

import threading
import time

import pytest

from conftest import PATIENCE_S, assert_books_balance, greedy, stream_text
from vllm_mux.launch import cpu_binds

pytestmark = pytest.mark.vllm

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def pool_for_two(module_daemon_factory, module_server_factory, model_dir, tiny_model_dir):
    # 52 chunks of 32 MiB: two bundled models (25 each) fit, not all three.
    daemon = module_daemon_factory("1664MiB")
    instances = (
        ("smol-a", model_dir, {"VLLM_MUX_PINNED": "1", "VLLM_MUX_IDLE_TTL": "3"}),
        ("smol-b", model_dir, {}),
        ("tiny", tiny_model_dir, {"VLLM_MUX_IDLE_TTL": "3"}),
    )
    # Cores as serve gives them: smol-a and smol-b, which compute at once
    # below, get cores of their own (one each on two cores; tiny shares).
    cores = cpu_binds(len(instances))
    servers, solo = {}, {}
    for (name, model, env), bind in zip(instances, cores):
        servers[name] = module_server_factory(
            model, name=name, socket_path=daemon.socket, env=env, cpu_cores=bind
        )
        solo[name] = greedy(servers[name], QUESTION)
    return daemon, servers, solo


def test_idle_instance_sleeps_by_itself_and_pinned_never(pool_for_two):
    daemon, servers, solo = pool_for_two
    status = daemon.wait_for(lambda s: states_of(s)["tiny"] == "asleep")
    assert states_of(status)["tiny"] == "asleep"
    assert_books_balance(status)
    # smol-a's TTL (3 s) passed long ago, but it is pinned.
    assert states_of(status)["smol-a"] == "awake"
    me = {i["model"]: i for i in status["instances"]}["smol-a"]
    assert me["pinned"] and time.time() - me["last_active"] > 3

    # The next request wakes the sleeper; it falls asleep again after its TTL
    # (the daemon's clock: "last_active" of a sleeper is when it fell asleep).
    before = instance(status, "tiny")
    sent = time.time()
    assert greedy(servers["tiny"], QUESTION) == solo["tiny"]
    status = daemon.wait_for(lambda s: instance(s, "tiny")["sleeps"] == before["sleeps"] + 1)
    tiny = instance(status, "tiny")
    assert tiny["state"] == "asleep" and tiny["wakes"] == before["wakes"] + 1
    assert tiny["last_active"] - sent > 2.5
    assert_books_balance(status)


def test_two_stay_awake_and_serve_at_once(pool_for_two):
    daemon, servers, solo = pool_for_two
    a, b = servers["smol-a"], servers["smol-b"]
    assert greedy(b, QUESTION) == solo["smol-b"]
    assert greedy(a, QUESTION) == solo["smol-a"]
    before = {i["model"]: i["wakes"] for i in daemon.status()["instances"]}

    long_answer, started, hang_up = [], threading.Event(), threading.Event()

    def stream():  # far longer than b's answers take, cut short once they are in
        text = stream_text(a, QUESTION, 1900, ignore_eos=True, stop=hang_up, started=started)
        long_answer.append(text)

    streaming = threading.Thread(target=stream)
    streaming.start()
    assert started.wait(PATIENCE_S)
    for _ in range(3):  # served while smol-a's stream is still running
        assert greedy(b, QUESTION) == solo["smol-b"]
    still_streaming = streaming.is_alive()
    hang_up.set()
    streaming.join(PATIENCE_S)
    assert still_streaming and long_answer[0].startswith(solo["smol-a"])

    status = daemon.status()
    after = {i["model"]: i["wakes"] for i in status["instances"]}
    assert (after["smol-a"], after["smol-b"]) == (before["smol-a"], before["smol-b"])
    assert states_of(status)["smol-a"] == states_of(status)["smol-b"] == "awake"
    assert_books_balance(status)


def test_a_pinned_instance_is_never_asked_to_sleep(pool_for_two):
    daemon, servers, solo = pool_for_two
    greedy(servers["smol-a"], QUESTION)
    greedy(servers["smol-b"], QUESTION)  # smol-a is now the least recently used
    assert greedy(servers["tiny"], QUESTION) == solo["tiny"]  # needs room: one must sleep
    expected = {"smol-a": "awake", "smol-b": "asleep", "tiny": "awake"}
    # smol-b hands its chunks back a moment before it reports itself asleep
    status = daemon.wait_for(lambda s: states_of(s) == expected)
    assert states_of(status) == expected
    assert_books_balance(status)


def states_of(status: dict) -> dict:
    return {i["model"]: i["state"] for i in status["instances"]}


def instance(status: dict, model: str) -> dict:
    (found,) = [i for i in status["instances"] if i["model"] == model]
    return found
