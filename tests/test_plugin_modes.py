"""The plugin is inert without a daemon, and refuses loudly when one is missing
or stays away."""

import time

import pytest

from conftest import PROMPTS, assert_books_balance, greedy, mapped_ranges
from vllm_mux.launch import VllmServer

pytestmark = pytest.mark.vllm


def exits_with(server: VllmServer, timeout: float = 300) -> str:
    deadline = time.monotonic() + timeout
    while server.alive() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not server.alive(), "the server should have refused to start"
    assert server.proc.returncode != 0
    return server.log(tail=20000)


def test_without_a_daemon_configured_vllm_is_upstream(server_factory, model_dir):
    plain = server_factory(model_dir)  # VLLM_MUX_SOCKET is empty
    answers = [greedy(plain, p) for p in PROMPTS[:3]]
    assert "Paris" in answers[0]
    # Nothing leased: no pool memory is mapped anywhere in the server's processes.
    import psutil

    for proc in [psutil.Process(plain.pid), *psutil.Process(plain.pid).children(recursive=True)]:
        assert not any("vllm-mux-chunk" in path for *_, path in mapped_ranges(proc.pid))
    # And upstream still refuses sleep mode on CPU.
    refused = server_factory(model_dir, name="sleepy", args=["--enable-sleep-mode"], wait=False)
    assert "Sleep mode is not supported on current platform" in exits_with(refused)


def test_daemon_configured_but_not_running(server_factory, model_dir, tmp_path):
    missing = str(tmp_path / "nobody.sock")
    server = server_factory(model_dir, socket_path=missing, wait=False)
    log = exits_with(server)
    assert f"no vllm-mux daemon is listening at {missing}" in log


def test_pool_too_small_for_the_model(daemon_factory, server_factory, model_dir):
    daemon = daemon_factory("256MiB")  # the weights alone are 538 MB
    server = server_factory(model_dir, socket_path=daemon.socket, wait=False)
    log = exits_with(server)
    assert "but the whole pool is 8 chunks (0.25 GiB)" in log
    deadline = time.monotonic() + 10
    while daemon.status()["instances"] and time.monotonic() < deadline:
        time.sleep(0.2)  # the dead instance is reaped once its process is gone
    status = daemon.status()
    assert status["instances"] == [] and status["free_chunks"] == status["total_chunks"]
    assert_books_balance(status)


def test_pool_too_small_for_the_kv_cache(daemon_factory, server_factory, model_dir):
    daemon = daemon_factory("640MiB")  # the weights fit (17 chunks), a 256 MB cache does not
    server = server_factory(model_dir, socket_path=daemon.socket, wait=False)
    log = exits_with(server)
    assert "asks for 8 chunks; the pool has 20 and this instance holds 17 already" in log
    deadline = time.monotonic() + 10
    while daemon.status()["instances"] and time.monotonic() < deadline:
        time.sleep(0.2)
    status = daemon.status()
    assert status["free_chunks"] == status["total_chunks"]
    assert_books_balance(status)


def test_instance_stops_loudly_when_its_daemon_stays_away(
    daemon_factory, server_factory, model_dir
):
    """An instance serves on without its daemon and reconnects to the next one
    (test_daemon_restart.py); one that does not come back in
    VLLM_MUX_RECONNECT_S stops the server: its memory is accounted for nowhere."""
    daemon = daemon_factory("2GiB")
    env = {"VLLM_MUX_RECONNECT_S": "3"}
    server = server_factory(model_dir, socket_path=daemon.socket, env=env)
    assert "Paris" in greedy(server, PROMPTS[0])
    daemon.process.proc.kill()
    deadline = time.monotonic() + 300
    while server.alive() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not server.alive()
    log = server.log(tail=200000)
    assert "lost the vllm-mux daemon for good" in log and "did not come back in 3 s" in log
