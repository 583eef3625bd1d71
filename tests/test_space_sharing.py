"""A pool that holds two of three: space sharing, idle TTL, pinned instances."""

import threading
import time

import pytest

from conftest import assert_books_balance, greedy, stream_text

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
    servers, solo = {}, {}
    for name, model, env in instances:
        servers[name] = module_server_factory(model, name=name, socket_path=daemon.socket, env=env)
        solo[name] = greedy(servers[name], QUESTION)
    return daemon, servers, solo


def states(daemon) -> dict:
    return states_of(daemon.status())


def test_idle_instance_sleeps_by_itself_and_pinned_never(pool_for_two):
    daemon, servers, solo = pool_for_two
    status = daemon.wait_for(lambda s: states_of(s)["tiny"] == "asleep", timeout=15)
    assert states_of(status)["tiny"] == "asleep"
    assert_books_balance(status)
    # smol-a's TTL (3 s) passed long ago, but it is pinned.
    assert states_of(status)["smol-a"] == "awake"
    me = {i["model"]: i for i in status["instances"]}["smol-a"]
    assert me["pinned"] and time.time() - me["last_active"] > 3

    # The next request wakes the sleeper; it falls asleep again after its TTL.
    assert greedy(servers["tiny"], QUESTION) == solo["tiny"]
    assert states(daemon)["tiny"] == "awake"
    start = time.monotonic()
    status = daemon.wait_for(lambda s: states_of(s)["tiny"] == "asleep", timeout=15)
    assert states_of(status)["tiny"] == "asleep" and 2.5 < time.monotonic() - start < 10
    assert_books_balance(status)


def test_two_stay_awake_and_serve_at_once(pool_for_two):
    daemon, servers, solo = pool_for_two
    a, b = servers["smol-a"], servers["smol-b"]
    assert greedy(b, QUESTION) == solo["smol-b"]
    assert greedy(a, QUESTION) == solo["smol-a"]
    before = {i["model"]: i["wakes"] for i in daemon.status()["instances"]}

    long_answer, hang_up = [], threading.Event()

    def stream():  # far longer than b's answers take, cut short once they are in
        long_answer.append(stream_text(a, QUESTION, 1900, ignore_eos=True, stop=hang_up))

    streaming = threading.Thread(target=stream)
    streaming.start()
    time.sleep(1)
    for _ in range(3):  # served while smol-a's stream is still running
        assert greedy(b, QUESTION) == solo["smol-b"]
    still_streaming = streaming.is_alive()
    hang_up.set()
    streaming.join(300)
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
    status = daemon.wait_for(lambda s: states_of(s) == expected, timeout=10)
    assert states_of(status) == expected
    assert_books_balance(status)


def states_of(status: dict) -> dict:
    return {i["model"]: i["state"] for i in status["instances"]}
