"""Host copies with real vLLM: two models whose files differ in one tensor get
two copies; the same files under another name share one."""

import shutil

import pytest
from safetensors.torch import load_file, save_file

from conftest import assert_books_balance, greedy
from vllm_mux.bench import take

pytestmark = pytest.mark.vllm

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def one_tensor_apart(tmp_path_factory, tiny_model_dir) -> str:
    """The tiny model, but for one element of one tensor (the final norm)."""
    out = tmp_path_factory.mktemp("tiny-one-tensor-apart")
    shutil.copytree(tiny_model_dir, out, dirs_exist_ok=True)
    (weights,) = out.glob("*.safetensors")
    tensors = load_file(weights)
    tensors["model.norm.weight"][0] += 1.0
    save_file(tensors, weights, metadata={"format": "pt"})
    return str(out)


def test_different_bytes_get_two_copies_and_equal_ones_share(
    module_daemon_factory, module_server_factory, tiny_model_dir, one_tensor_apart
):
    daemon = module_daemon_factory("1GiB")
    names = (("tiny", tiny_model_dir), ("tiny-again", tiny_model_dir), ("apart", one_tensor_apart))
    servers = {
        name: module_server_factory(model, name=name, socket_path=daemon.socket)
        for name, model in names
    }
    status = daemon.status()
    assert_books_balance(status)
    digests = {i["model"]: i["host_copy"] for i in status["instances"]}
    assert digests["tiny"] == digests["tiny-again"] != digests["apart"]
    copies = {c["digest"]: c for c in status["host_copies"]}
    assert len(copies) == 2 and all(c["sealed"] for c in copies.values())
    (shared,) = digests["tiny"]
    ids = {i["model"]: i["id"] for i in status["instances"]}
    assert sorted(copies[shared]["users"]) == sorted([ids["tiny"], ids["tiny-again"]])
    assert copies[shared]["size"] == copies[digests["apart"][0]]["size"]  # same layout
    assert status["host_used"] == 2 * copies[shared]["size"]
    # Each still answers from its own bytes after a wake from its copy.
    answers = {name: greedy(s, QUESTION) for name, s in servers.items()}
    assert answers["tiny"] == answers["tiny-again"]
    for s in servers.values():
        s.sleep()
    take(daemon.socket, daemon.status()["free_chunks"])  # every chunk they slept on
    assert {name: greedy(s, QUESTION) for name, s in servers.items()} == answers
    status = daemon.status()
    assert_books_balance(status)
    assert {i["model"]: i["last_wake"]["tier"] for i in status["instances"]} == {
        name: "host" for name in servers
    }
