"""The daemon SIGKILLed under two real vLLM instances, one awake, one asleep:
the awake one keeps answering; a daemon started on the same socket takes the
awake one's chunks back from it (the same memfds), both reconnect, the asleep
one wakes on a request, the books balance, and every answer is the one from
before."""

import os
import threading

import httpx
import psutil
import pytest

from conftest import PATIENCE_S, PROMPTS, assert_books_balance, greedy
from vllm_mux.launch import cpu_binds, start_daemon

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def pair(module_daemon_factory, module_server_factory, model_dir):
    daemon = module_daemon_factory("2GiB")  # room for both awake: 25 chunks each
    cores = cpu_binds(2)
    awake, asleep = (
        module_server_factory(model_dir, name=name, socket_path=daemon.socket, cpu_cores=bind)
        for name, bind in zip(("awake", "asleep"), cores)
    )
    return daemon, awake, asleep


def memfd_inodes(pid: int) -> set[int]:
    """The inodes of the pool's memfds that a process holds open."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if "vllm-mux-chunk" in os.readlink(f"/proc/{pid}/fd/{fd}"):
                inodes.add(os.stat(f"/proc/{pid}/fd/{fd}").st_ino)
        except FileNotFoundError:
            pass
    return inodes


def mapped_inodes(pid: int) -> set[int]:
    """The inodes of the pool's memfds that a process maps."""
    with open(f"/proc/{pid}/maps") as f:
        return {int(line.split()[4]) for line in f if "vllm-mux-chunk" in line}


def rows(status: dict) -> dict:
    return {i["model"]: i for i in status["instances"]}


def both_back(status: dict) -> bool:
    states = {m: r["state"] for m, r in rows(status).items()}
    return sorted(states) == ["asleep", "awake"] and "disconnected" not in states.values()


def ask(server, prompt: str) -> httpx.Response:
    body = {
        "model": server.name,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 24,
        "temperature": 0,
    }
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=PATIENCE_S)


def test_instances_outlive_their_daemon(pair, tmp_path):
    daemon, awake, asleep = pair
    before = {s.name: greedy(s, PROMPTS[0]) for s in (awake, asleep)}
    asleep.sleep()
    status = daemon.status()
    assert_books_balance(status)
    held = {m: r["chunks"] for m, r in rows(status).items()}
    assert held["asleep"] == 0 and held["awake"] > 0
    worker = rows(status)["awake"]["pid"]

    daemon.process.proc.kill()
    daemon.process.stop()
    assert greedy(awake, PROMPTS[0]) == before["awake"]  # serves on, no daemon needed

    # A request to the sleeping one needs a lease: it waits for the daemon.
    woken = []
    waking = threading.Thread(target=lambda: woken.append(ask(asleep, PROMPTS[0])))
    waking.start()
    waking.join(2)
    assert waking.is_alive()  # no daemon, no memory, no wake

    daemon.process = start_daemon(daemon.socket, "2GiB", tmp_path / "daemon-after.log")
    waking.join(PATIENCE_S)
    (r,) = woken
    if r.status_code == 503:  # it waited longer than a wake waits for the daemon
        assert r.headers["retry-after"]
        r = ask(asleep, PROMPTS[0])
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == before["asleep"]

    status = daemon.wait_for(lambda s: both_back(s) and rows(s)["asleep"]["state"] == "awake")
    assert both_back(status), status
    assert_books_balance(status)
    after = {m: r["chunks"] for m, r in rows(status).items()}
    assert after == {"awake": held["awake"], "asleep": held["awake"]}
    # The new daemon made only the chunks nobody held, and holds the awake
    # one's own memfds: one memory, one mapper.
    log = daemon.process.log(tail=200000)
    assert f"1 live instances hold {held['awake']} chunks; made the other" in log
    assert f"holding {held['awake']} chunks ({held['awake']} taken back from it)" in log
    ours = memfd_inodes(daemon.process.pid)
    assert len(ours) == status["total_chunks"]
    assert mapped_inodes(worker) <= ours and len(mapped_inodes(worker)) == held["awake"]
    assert psutil.pid_exists(worker)  # the same process: nobody restarted it
    # Both hand their host copy over: one copy of the weights, both its users,
    # the same memory the old daemon made.
    (copy,) = status["host_copies"]
    assert sorted(copy["users"]) == sorted(r["id"] for r in rows(status).values())
    assert "handed over its host copy" in log

    assert {s.name: greedy(s, PROMPTS[0]) for s in (awake, asleep)} == before
    assert_books_balance(daemon.status())
