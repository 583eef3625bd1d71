"""The controls against a live ``vllm-mux serve examples/rag.yaml`` (``rag_serve``):
``vllm-mux sleep|wake|pin|unpin|ps`` and the router's ``/mux/`` endpoints on
real vLLM servers, and ``preload: false`` (the embed model starts asleep).
Each test leaves the models unpinned."""

import subprocess
import sys

import httpx
import pytest

from conftest import PATIENCE_S, assert_books_balance
from vllm_mux.daemon.client import Client

pytestmark = pytest.mark.vllm


def mux(rag_serve, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vllm_mux.cli", *args, "--socket", rag_serve["socket"]],
        capture_output=True,
        text=True,
        timeout=PATIENCE_S,
    )


def status(rag_serve) -> dict:
    client = Client(rag_serve["socket"])
    try:
        return client.status()
    finally:
        client.close()


def instance(s: dict, model: str) -> dict:
    (found,) = [i for i in s["instances"] if i["model"] == model]
    return found


def test_embed_started_asleep_as_its_preload_false_says(rag_serve):
    log = (rag_serve["tmp"] / "serve.log").read_text()
    assert "embed started asleep (preload: false)" in log
    assert "chat ready in" in log and "awake (preload: true)" in log
    embed = instance(status(rag_serve), "embed")
    assert embed["sleeps"] >= 1  # serve put it to sleep through the daemon


def test_sleep_wake_pin_and_unpin_by_hand(rag_serve):
    done = mux(rag_serve, "sleep", "chat")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("chat is asleep")
    s = status(rag_serve)
    assert (instance(s, "chat")["state"], instance(s, "chat")["chunks"]) == ("asleep", 0)
    assert_books_balance(s)

    done = mux(rag_serve, "wake", "chat")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("chat is awake")
    assert instance(status(rag_serve), "chat")["state"] == "awake"

    try:
        done = mux(rag_serve, "pin", "chat")
        assert done.returncode == 0 and "a pin changes no state" in done.stdout
        assert instance(status(rag_serve), "chat")["pinned"]
        done = mux(rag_serve, "sleep", "chat")
        assert done.returncode == 1 and "`vllm-mux unpin chat` first" in done.stderr
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
        assert instance(status(rag_serve), "chat")["state"] == "awake"
    finally:
        assert mux(rag_serve, "unpin", "chat").returncode == 0
    assert mux(rag_serve, "sleep", "chat").returncode == 0
    s = status(rag_serve)
    assert instance(s, "chat")["state"] == "asleep" and not instance(s, "chat")["pinned"]
    assert_books_balance(s)

    done = mux(rag_serve, "ps")
    assert done.returncode == 0 and "chat" in done.stdout and "embed" in done.stdout


def test_the_mux_endpoints_need_the_key_and_do_the_same(rag_serve):
    url = f"{rag_serve['url']}/mux/models"
    key = {"Authorization": f"Bearer {rag_serve['key']}"}

    def post(path: str, headers=key) -> httpx.Response:
        return httpx.post(f"{url}/{path}", headers=headers, timeout=PATIENCE_S)

    assert post("chat/wake", headers={}).status_code == 401
    assert post("nobody/wake").json()["error"]["code"] == "model_not_found"

    r = post("chat/wake")
    assert r.status_code == 200 and r.json()["state"] == "awake", r.text
    try:
        r = post("chat/pin")
        assert r.status_code == 200 and r.json()["pinned"] is True
        r = post("chat/sleep")
        assert r.status_code == 409 and r.json()["error"]["code"] == "pinned"
    finally:
        assert post("chat/unpin").json()["pinned"] is False
    r = post("chat/sleep")
    assert r.status_code == 200 and r.json()["state"] == "asleep", r.text
    assert r.json()["message"].startswith("chat is asleep")
    s = status(rag_serve)
    assert instance(s, "chat")["chunks"] == 0
    assert_books_balance(s)
