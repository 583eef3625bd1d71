"""Every endpoint by model, through the router of a live ``vllm-mux serve``.

``rag_serve`` serves a chat model and an embedding model (the bundled SmolLM2
under ``--runner pooling --convert embed``) on a pool that holds one of them:
a request for the other switches, the first sleeps and the second wakes. The
clients are the official ``openai`` package and plain httpx; the daemon's
status says whether an instance really slept and woke.
"""

import math

import httpx
import numpy as np
import openai
import psutil
import pytest

from conftest import PATIENCE_S, assert_books_balance
from vllm_mux.daemon.client import Client

pytestmark = pytest.mark.vllm

TEXTS = ["The capital of France is Paris.", "Seven is a prime number."]


def status(serve) -> dict:
    client = Client(serve["socket"])
    try:
        return client.status()
    finally:
        client.close()


def instance(status: dict, model: str) -> dict:
    """The model's live instance (a restarted one leaves its predecessor)."""
    (found,) = [
        i for i in status["instances"] if i["model"] == model and i["state"] != "disconnected"
    ]
    return found


def openai_client(serve) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{serve['url']}/v1", api_key=serve["key"], max_retries=0, timeout=PATIENCE_S
    )


def embed(c: openai.OpenAI) -> np.ndarray:
    return np.array([d.embedding for d in c.embeddings.create(model="embed", input=TEXTS).data])


def upstream_url(serve, model: str) -> str:
    """The model's own vLLM server, found by its command line under serve."""
    for child in psutil.Process(serve["proc"].pid).children(recursive=True):
        argv = child.cmdline()
        if "--served-model-name" in argv and argv[argv.index("--served-model-name") + 1] == model:
            return f"http://127.0.0.1:{argv[argv.index('--port') + 1]}"
    raise AssertionError(f"no server for {model} under serve")


def test_embeddings_are_the_same_after_the_embedding_model_slept_and_woke(rag_serve):
    c = openai_client(rag_serve)
    before = embed(c)  # wakes the embedding model if it slept
    assert before.shape == (2, 576) and not np.allclose(before[0], before[1])
    start = instance(status(rag_serve), "embed")
    assert start["state"] == "awake" and start["chunks"] > 0

    # The chat model's turn: the pool holds one, so the embedding model sleeps.
    answer = c.responses.create(model="chat", input="Say hello.", max_output_tokens=8)
    assert answer.model == "chat" and answer.output_text
    s = status(rag_serve)
    slept, chat = instance(s, "embed"), instance(s, "chat")
    assert (slept["state"], slept["chunks"], slept["sleeps"]) == ("asleep", 0, start["sleeps"] + 1)
    assert chat["state"] == "awake"
    assert_books_balance(s)

    # And back: the chat model sleeps, the embedding model wakes, same answers.
    after = embed(c)
    s = status(rag_serve)
    woke, chat = instance(s, "embed"), instance(s, "chat")
    assert (woke["state"], woke["wakes"]) == ("awake", start["wakes"] + 1)
    assert chat["state"] == "asleep" and chat["chunks"] == 0
    assert_books_balance(s)
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-6)


def test_responses_streamed_and_by_id_through_the_router(rag_serve):
    c = openai_client(rag_serve)
    events = list(c.responses.create(model="chat", input="Count to three.", stream=True,
                                     max_output_tokens=8))  # fmt: skip
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    # vLLM keeps no responses unless told to (VLLM_ENABLE_RESPONSES_API_STORE):
    # the router sends the id to the model that made it, whose own 404 comes back.
    with pytest.raises(openai.NotFoundError) as e:
        c.responses.retrieve(events[0].response.id)
    assert e.value.body["code"] == 404  # vLLM's, not the router's (None)


def test_tokens_pooling_and_scores_pass_through_as_vllm_answers(rag_serve):
    headers = {"Authorization": f"Bearer {rag_serve['key']}"}

    def post(base, path, body):
        return httpx.post(f"{base}{path}", json=body, headers=headers, timeout=PATIENCE_S)

    url = rag_serve["url"]
    tokens = post(url, "/tokenize", {"model": "embed", "prompt": TEXTS[0]}).json()["tokens"]
    assert post(url, "/tokenize", {"model": "chat", "prompt": TEXTS[0]}).json()["tokens"] == tokens
    text = post(url, "/detokenize", {"model": "chat", "tokens": tokens}).json()["prompt"]
    assert text == TEXTS[0]

    direct = upstream_url(rag_serve, "embed")
    asks = [
        ("/pooling", {"model": "embed", "input": TEXTS[0]}),
        ("/score", {"model": "embed", "text_1": TEXTS[0], "text_2": TEXTS[1]}),
        ("/rerank", {"model": "embed", "query": "France", "documents": TEXTS}),
        ("/classify", {"model": "embed", "input": TEXTS[0]}),  # not an embedding model's
    ]
    for path, body in asks:
        routed, own = post(url, path, body), post(direct, path, body)
        assert routed.status_code == own.status_code, (path, routed.text, own.text)
        assert routed.headers["content-type"] == own.headers["content-type"]
        if routed.status_code != 200:
            assert routed.content == own.content, path
            continue
        # The same answer but for what vLLM makes new for each request, and
        # for float noise: two runs of a model on CPU may differ in the last
        # digits (a score of 0.38704100 once, 0.38704094 the next time).
        fresh = ("id", "created")
        routed_json = {k: v for k, v in routed.json().items() if k not in fresh}
        assert same(routed_json, {k: v for k, v in own.json().items() if k not in fresh}), path


def same(a, b) -> bool:
    """``a == b``, but for floats within a relative 1e-5."""
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-5)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b
