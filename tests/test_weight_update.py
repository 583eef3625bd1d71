"""Weight updates never leave a stale host copy: a wake after ``reload_weights``
restores the new weights, and an update while asleep (its arenas unmapped) is
refused with a clear error instead of writing into unmapped memory."""

import shutil

import httpx
import pytest

from conftest import PATIENCE_S, assert_books_balance, greedy

pytestmark = pytest.mark.vllm

PROMPT = "Name three colours."


@pytest.fixture(scope="module")
def other_weights(tiny_model_dir, tmp_path_factory) -> str:
    """The tiny model's shape and tokenizer, other random weights."""
    import torch
    from transformers import LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama-other")
    model = LlamaForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(f"{tiny_model_dir}/{name}", out / name)
    return str(out)


def rpc(server, method: str, **kwargs) -> httpx.Response:
    body = {"method": method, "kwargs": kwargs}
    return httpx.post(f"{server.url}/collective_rpc", json=body, timeout=PATIENCE_S)


def test_a_wake_restores_reloaded_weights_and_a_reload_while_asleep_is_refused(
    daemon_factory, server_factory, tiny_model_dir, other_weights
):
    daemon = daemon_factory("1GiB")
    server = server_factory(tiny_model_dir, socket_path=daemon.socket, args=["--enable-sleep-mode"])
    before = greedy(server, PROMPT)
    addresses = server.worker_rpc("mux_tensor_addresses")

    server.post("/sleep")
    refused = rpc(server, "reload_weights", weights_path=other_weights)
    assert refused.status_code >= 400
    assert "refused: this instance is asleep" in refused.text
    assert daemon.instance("smol")["state"] == "asleep"
    server.post("/wake_up")
    assert greedy(server, PROMPT) == before, "the refused reload changed nothing"

    assert rpc(server, "reload_weights", weights_path=other_weights).status_code == 200
    after = greedy(server, PROMPT)
    assert after != before, "the other weights answer differently (else this proves nothing)"
    assert server.worker_rpc("mux_tensor_addresses") == addresses, "reloaded in place"

    for _ in range(2):
        server.post("/sleep")
        assert daemon.instance("smol")["chunks"] == 0
        server.post("/wake_up")
        assert greedy(server, PROMPT) == after, "a wake restored stale weights"
    assert_books_balance(daemon.status())
