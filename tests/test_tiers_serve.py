"""Issue 10, the tiers of memory, end to end: one `vllm-mux serve` with six
models (the bundled one under three names, three tiny ones of other shapes)
on a device pool that holds one or two of them and a host budget that holds
three sets of weights, driven through the router with the official client.

Every answer equals the model's solo answer (its first); the books of both
tiers balance after every step; the three names of the bundled model share
one host copy; a warm wake copies nothing; a model whose copy was dropped
wakes cold, reloading the very bytes it had; and a killed instance leaves the
shared copy to the others and rejoins it when serve restarts it.
"""

import os
import random
import signal
import subprocess
import sys
import time

import httpx
import openai
import psutil
import pytest
import yaml

from conftest import PATIENCE_S, assert_books_balance, start_serve, take_chunks
from vllm_mux.bench.tiers import daemon_status, make_tiny_model, weights_bytes
from vllm_mux.launch import free_port

# Six vLLM servers start one after the other: on a busy 2-core machine that
# alone takes many minutes, and it is counted in the first test's time.
pytestmark = [pytest.mark.vllm, pytest.mark.timeout(3600)]

KEY = "sk-tiers"
QUESTION = "What is the capital of France?"
MAX_TOKENS = 12
CHUNK = 32 << 20  # the cpu default
POOL_CHUNKS = 22  # one bundled model (17 chunks of weights, 1 of KV) and a tiny one
BUNDLED = ("smol-a", "smol-b", "smol-c")
# name: (hidden size, attention heads, layers); head_dim 64 (the CPU attention
# kernels need >= 32), one KV head. Their weights take 1, 2 and 3 chunks.
TINY = {"tiny-s": (64, 1, 1), "tiny-m": (128, 2, 2), "tiny-l": (192, 3, 2)}
NAMES = (*BUNDLED, *TINY)
# float32, eager, and a small KV cache: one chunk each. VLLM_CPU_KVCACHE_SPACE
# would override --kv-cache-memory-bytes: it is taken out of serve's env.
COMMON = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "512", "--max-num-seqs", "4"]
BUNDLED_ARGS = [*COMMON, "--kv-cache-memory-bytes", str(30 << 20)]  # 640 tokens of 46 KB
TINY_ARGS = [*COMMON, "--kv-cache-memory-bytes", str(4 << 20)]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory, model_dir) -> dict[str, str]:
    """Three tiny random Llamas of different shapes, with the bundled
    model's tokenizer (like conftest's ``tiny_model_dir``)."""

    out = {}
    for seed, (name, (hidden, heads, layers)) in enumerate(TINY.items()):
        path = tmp_path_factory.mktemp(name)
        out[name] = make_tiny_model(model_dir, path, hidden, heads, layers, seed)
    return out


class Serve:
    def __init__(self, proc, url, sock, tmp, budget):
        self.proc, self.url, self.sock, self.tmp, self.budget = proc, url, sock, tmp, budget
        self.solo: dict[str, str] = {}  # each model's first answer
        self.had_copy: set[str] = set()  # models seen with a host copy after their solo answer
        self.dropped: set[str] = set()  # ... and later seen asleep without one
        self.wakes: list[tuple[str, dict]] = []  # (model, last_wake) of every wake seen
        self.last: dict | None = None  # the last status checked

    def log(self) -> str:
        return (self.tmp / "serve.log").read_text(errors="replace")[-6000:]


@pytest.fixture(scope="module")
def serve(tmp_path_factory, model_dir, tiny_models):
    tmp = tmp_path_factory.mktemp("tiers-serve")
    port, sock = free_port(), str(tmp / "mux.sock")
    sizes = {name: weights_bytes(path) for name, path in tiny_models.items()}
    bundled = weights_bytes(model_dir)
    # Room for the bundled model and two tiny ones, never all three: whichever
    # tiny model's copy is needed last makes a sleeping one's go (or the
    # bundled one's, if all three of its names sleep and it is used least).
    budget = bundled + sizes["tiny-m"] + sizes["tiny-l"] + sizes["tiny-s"] // 2
    models = [
        {"name": name, "source": tiny_models[name], "args": TINY_ARGS, "idle_ttl": 0}
        for name in TINY
    ]  # started first: the bundled model's copy makes the least recently used one cold
    models += [
        {"name": name, "source": model_dir, "args": BUNDLED_ARGS, "idle_ttl": 0} for name in BUNDLED
    ]
    config = {
        "device": "cpu",
        "device_memory": str(POOL_CHUNKS * CHUNK),
        "host_memory": str(budget),
        "port": port,
        "api_key": KEY,
        "models": models,
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    argv = [sys.executable, "-m", "vllm_mux.cli", "serve", str(path)]
    argv += ["--socket", sock, "--log-dir", str(tmp / "logs")]
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}
    url = f"http://127.0.0.1:{port}"
    proc = start_serve(argv, tmp / "serve.log", url, env=env)
    yield Serve(proc, url, sock, tmp, budget)
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


# -- helpers --


def wait_until(predicate, timeout: float = PATIENCE_S):
    """The predicate's first true value; the timeout is only reached when
    something is broken, not on a slow machine."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return value


def instance(s: dict, model: str) -> dict:
    """The model's live instance (a killed one may sit beside it, disconnected)."""
    found = [i for i in s["instances"] if i["model"] == model and i["state"] != "disconnected"]
    assert len(found) == 1, (model, s["instances"])
    return found[0]


def check(srv: Serve) -> dict:
    """The daemon's status, once both tiers' books are checked: they balance,
    the host copies fit the budget, the bundled model's names map one copy
    between them, and weights that differ never share one."""
    s = daemon_status(srv.sock)
    assert_books_balance(s)
    assert s["host_budget"] == srv.budget and s["host_used"] <= s["host_budget"]
    copies = {c["digest"]: c for c in s["host_copies"]}
    for i in s["instances"]:
        assert len(i["host_copy"]) <= 1, i
        for d in i["host_copy"]:
            assert copies[d]["sealed"], copies[d]
    bundled = [i for i in s["instances"] if i["model"] in BUNDLED]
    shared = {d for i in bundled for d in i["host_copy"]}
    assert len(shared) <= 1, f"identical weights, {len(shared)} host copies: {s['host_copies']}"
    for d in shared:  # the copy's users are exactly the bundled instances that map it
        assert set(copies[d]["users"]) == {i["id"] for i in bundled if d in i["host_copy"]}
    tiny = [d for i in s["instances"] if i["model"] in TINY for d in i["host_copy"]]
    assert len(set(tiny)) == len(tiny) and not set(tiny) & shared, s["host_copies"]
    for model in srv.solo:
        live = [i for i in s["instances"] if i["model"] == model and i["state"] != "disconnected"]
        if len(live) != 1:
            continue  # being restarted
        if live[0]["host_copy"]:
            srv.had_copy.add(model)
        elif model in srv.had_copy and live[0]["state"] == "asleep":
            srv.dropped.add(model)  # its copy went while it slept: it is cold now
    srv.last = s
    return s


def ask(srv: Serve, model: str) -> dict:
    """One chat request through the router, alone; the answer must equal the
    model's solo answer (or becomes it). Returns the model's instance after,
    with ``woke``: the wake it took, if it took one."""
    before = instance(srv.last or check(srv), model)
    c = openai.OpenAI(base_url=f"{srv.url}/v1", api_key=KEY, max_retries=0, timeout=PATIENCE_S)
    reply = c.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=MAX_TOKENS,
        temperature=0,
    )
    text = reply.choices[0].message.content
    if model not in srv.solo:
        assert text, model
        srv.solo[model] = text
    assert text == srv.solo[model], (model, text, srv.solo[model])
    s = check(srv)
    me = instance(s, model)
    assert me["state"] == "awake", me
    woke = None
    if me["wakes"] > (before["wakes"] if me["id"] == before["id"] else 0):
        woke = me["last_wake"]
        srv.wakes.append((model, woke))
    return {**me, "woke": woke}


def make_unresident(srv: Serve, model: str) -> None:
    """Take every free chunk once (conftest's thief): none holds the
    sleeping model's bytes any more, so its next wake cannot be warm."""
    me = instance(check(srv), model)
    assert me["state"] == "asleep", me
    if me["resident_chunks"]:
        take_chunks(srv.sock, srv.last["free_chunks"])
        assert instance(check(srv), model)["resident_chunks"] == 0


def server_process(srv: Serve, model: str) -> psutil.Process:
    """The model's vLLM server: serve's child that serves that name."""
    for p in psutil.Process(srv.proc.pid).children():
        try:
            argv = p.cmdline()
        except psutil.Error:
            continue
        if "--served-model-name" in argv and argv[argv.index("--served-model-name") + 1] == model:
            return p
    raise AssertionError(f"no server for {model}")


def server_url(srv: Serve, model: str) -> str:
    argv = server_process(srv, model).cmdline()
    return f"http://127.0.0.1:{argv[argv.index('--port') + 1]}"


def router_state(srv: Serve, model: str) -> str:
    r = httpx.get(f"{srv.url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == 200, r.text
    return {m["id"]: m for m in r.json()["data"]}[model]["state"]


def shared_copy(s: dict) -> dict | None:
    users = {i["id"] for i in s["instances"] if i["model"] in BUNDLED}
    found = [c for c in s["host_copies"] if set(c["users"]) & users]
    return found[0] if found else None


# -- the tests, in order: each leaves the next its state --


def test_six_models_start_and_the_bundled_names_share_one_copy(serve):
    s = check(serve)
    assert sorted(i["model"] for i in s["instances"]) == sorted(NAMES)
    assert s["total_chunks"] == POOL_CHUNKS
    bundled = {instance(s, m)["id"] for m in BUNDLED}
    copy = shared_copy(s)
    assert copy is not None and set(copy["users"]) == bundled, s["host_copies"]
    # The budget holds the bundled model and two tiny ones: the third tiny
    # one's copy went to make room (or it never had one): it is cold.
    assert len(s["host_copies"]) == 3, s["host_copies"]
    assert sum(not instance(s, m)["host_copy"] for m in TINY) == 1
    awake = [i for i in s["instances"] if i["state"] == "awake"]
    assert sum(i["chunks"] for i in awake) <= POOL_CHUNKS and len(awake) <= 2


def test_solo_answers(serve):
    """Each model's first answer, alone, is its reference. The tiny model
    without a copy goes last, while a bundled name is awake: it wakes cold
    (reloads its files), and the copy it makes again takes a sleeping tiny
    model's place, whose answer we already have."""
    s = check(serve)
    cold = [m for m in TINY if not instance(s, m)["host_copy"]]
    order = [m for m in TINY if m not in cold]
    order += sorted(BUNDLED, key=lambda m: instance(s, m)["state"] != "awake")
    for model in order:
        ask(serve, model)
    assert len({serve.solo[m] for m in BUNDLED}) == 1, serve.solo  # the same weights
    for model in cold:
        make_unresident(serve, model)
        woke = ask(serve, model)["woke"]
        assert woke and woke["tier"] == "cold" and woke["same_bytes"] is True, woke
    s = serve.last
    assert serve.dropped, (
        "no tiny model lost its host copy to the cold one's new copy",
        s["host_copies"],
    )
    copy = shared_copy(s)
    assert copy and len(copy["users"]) == 3, s["host_copies"]


def test_a_warm_wake_copies_nothing(serve):
    """Put an awake bundled name to sleep through its own server's /sleep;
    nobody takes its chunks meanwhile, so its next request maps them back
    and copies no byte."""
    s = check(serve)
    awake = [m for m in BUNDLED if instance(s, m)["state"] == "awake"]
    assert len(awake) == 1, s["instances"]  # the last bundled name asked, and a tiny one
    model = awake[0]
    held = instance(s, model)["chunks"]
    r = httpx.post(f"{server_url(serve, model)}/sleep", params={"level": 1}, timeout=PATIENCE_S)
    assert r.status_code == 200, r.text
    me = instance(check(serve), model)
    assert me["state"] == "asleep" and me["chunks"] == 0 and me["resident_chunks"] == held, me
    woke = ask(serve, model)["woke"]
    assert woke["tier"] == "warm" and woke["copied_bytes"] == 0, woke
    assert woke["chunks_kept"] == woke["chunks"] == held and woke["kv_intact"], woke


def test_a_model_whose_copy_was_dropped_wakes_cold_with_the_same_bytes(serve):
    check(serve)
    assert serve.dropped, "no model's host copy was dropped after its solo answer"
    model = sorted(serve.dropped)[0]
    me = instance(serve.last, model)
    assert me["state"] == "asleep" and me["host_copy"] == [], me
    make_unresident(serve, model)
    woke = ask(serve, model)["woke"]  # equal to the answer it gave before its copy went
    assert woke["tier"] == "cold" and woke["same_bytes"] is True, woke
    assert woke["copied_bytes"] == 0 and woke["reload_seconds"] > 0, woke


def test_a_killed_instance_leaves_the_shared_copy_to_the_others(serve):
    s = check(serve)
    copy = shared_copy(s)
    assert copy and len(copy["users"]) == 3, s["host_copies"]
    victim = "smol-b"
    old = instance(s, victim)
    others = [m for m in BUNDLED if m != victim]
    server = server_process(serve, victim)
    tree = [server, *server.children(recursive=True)]
    assert old["pid"] in {p.pid for p in tree}
    for p in tree:
        p.kill()

    def gone() -> dict | None:
        s = check(serve)
        return None if any(i["id"] == old["id"] for i in s["instances"]) else s

    s = wait_until(gone)
    assert s, serve.last["instances"]
    # The copy stays, one user fewer (the new server takes many seconds to
    # load: the daemon forgets the dead one long before).
    after = [c for c in s["host_copies"] if c["digest"] == copy["digest"]]
    assert after and set(after[0]["users"]) == set(copy["users"]) - {old["id"]}, s["host_copies"]
    copied = 0
    for model in others:  # they wake from the copy the dead one shared, not cold
        woke = ask(serve, model)["woke"]
        assert woke is None or woke["tier"] in ("warm", "partial", "host"), woke
        copied += woke["copied_bytes"] if woke else 0
    assert copied > 0  # others took their chunks while they slept: bytes came from the copy

    def back() -> bool:  # a new instance, and its server ready (the router says so)
        live = [i for i in check(serve)["instances"] if i["model"] == victim]
        new = [i for i in live if i["id"] != old["id"] and i["state"] != "disconnected"]
        return bool(new) and router_state(serve, victim) in ("awake", "asleep")

    assert wait_until(back), serve.log()
    assert "vllm-mux: smol-b exited" in serve.log()
    s = check(serve)
    new = instance(s, victim)
    assert new["id"] != old["id"] and new["host_copy"] == [copy["digest"]], new
    assert set(shared_copy(s)["users"]) == {instance(s, m)["id"] for m in BUNDLED}
    ask(serve, victim)  # the restarted instance answers as before


def test_interleaved_requests_answer_as_alone_and_both_tiers_balance(serve):
    order = random.Random(10).choices(NAMES, k=20)
    assert set(order) == set(NAMES)
    for model in order:
        ask(serve, model)
    tiers = {w["tier"] for _, w in serve.wakes}
    assert {"warm", "cold"} <= tiers and tiers & {"host", "partial"}, serve.wakes
    for model, w in serve.wakes:
        if w["tier"] == "cold":
            assert w["same_bytes"] is True, (model, w)
        if w["tier"] == "warm":
            assert w["copied_bytes"] == 0, (model, w)
