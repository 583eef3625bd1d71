"""``vllm-mux bench switch``: sleep, wake and TTFT of a real instance, with peers.

Every figure comes with its peer measured in the same run on the same
machine: the wake's copy against a plain copy of the same bytes from the same
host buffer (measured inside the instance right after each wake), time-to-first-token right after a
wake against while awake, and tokens/s of the instance with vllm-mux active
against plain vLLM serving the same model, and the time to first token of a
request that finds the instance asleep against stopping and starting vLLM.
"""

import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from vllm_mux.bench import take
from vllm_mux.daemon.client import Client
from vllm_mux.launch import CPU_ARGS, VllmServer, start_daemon

PROMPT = "Write a short story about a lighthouse keeper."


def ttft(server: VllmServer, max_tokens: int = 1) -> float:
    """Seconds from sending a streamed completion to its first token."""
    body = {"model": server.name, "prompt": PROMPT, "max_tokens": max_tokens}
    body |= {"temperature": 0, "stream": True}
    start = time.perf_counter()
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=120) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: ") and '"text"' in line:
                return time.perf_counter() - start
    raise RuntimeError("no token came back")


def tokens_per_second(server: VllmServer, requests: int = 4, max_tokens: int = 128) -> float:
    """Decode throughput of ``requests`` sequential greedy completions."""
    body = {"model": server.name, "prompt": PROMPT, "max_tokens": max_tokens}
    body |= {"temperature": 0, "ignore_eos": True}
    tokens, start = 0, time.perf_counter()
    for _ in range(requests):
        r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=300)
        r.raise_for_status()
        tokens += r.json()["usage"]["completion_tokens"]
    return tokens / (time.perf_counter() - start)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def switch(args) -> int:
    model = args.model
    if not os.path.isdir(model):
        from vllm_mux.models import model_path

        model = str(model_path(model))
    work = Path(tempfile.mkdtemp(prefix="vllm-mux-bench-"))
    sock = str(work / "mux.sock")
    # A pool that holds one instance of the model (25 of 32 chunks for SmolLM2).
    daemon = start_daemon(sock, args.device_memory, work / "daemon.log")
    servers = []
    try:
        other, mux = (
            VllmServer(
                model,
                work / f"{name}.log",
                name=name,
                socket_path=sock,
                args=[*CPU_ARGS, "--enable-sleep-mode"],
            )  # fmt: skip
            for name in ("other", "mux")
        )
        plain = VllmServer(model, work / "plain.log", name="plain", args=CPU_ARGS)
        servers = [other, mux, plain]
        for s in servers:
            s.wait_ready()
        for s in servers:
            ttft(s, max_tokens=8)  # warm up

        # Switching models: each request finds its model asleep and the other
        # one awake in the memory it needs.
        switch_ttft = [ttft(s) for _ in range(args.cycles) for s in (other, mux)]

        awake_ttft = [ttft(mux) for _ in range(args.cycles)]
        sleeps, wakes, after_wake_ttft, inside, plain_copies = [], [], [], [], []
        client = Client(sock)  # here: a connection must speak within the daemon's hello timeout
        for _ in range(args.cycles):
            sleeps.append(_timed(mux.sleep))
            # Another instance used its chunks meanwhile: the wake copies every
            # byte from the host copy (bench tiers measures the other tiers).
            take(sock, client.status()["free_chunks"])
            wakes.append(_timed(mux.wake_up))
            (me,) = [i for i in client.status()["instances"] if i["model"] == "mux"]
            inside.append(me["last_wake"])
            plain_copies.append(float(mux.worker_rpc("mux_plain_copy")))
            after_wake_ttft.append(ttft(mux))
        # A request that finds the instance asleep wakes it by itself.
        asleep_ttft = []
        for _ in range(args.cycles):
            mux.sleep()
            asleep_ttft.append(ttft(mux))
        status = client.status()
        client.close()

        # Hot throughput, alternating so drift hits both alike; best of rounds.
        tps = {"mux": [], "plain": []}
        for _ in range(2):
            for s in (mux, plain):
                tps[s.name].append(tokens_per_second(s))

        # What users do today to switch models: stop one vLLM, start another.
        start = time.perf_counter()
        plain.stop()
        plain = VllmServer(model, work / "restart.log", name="plain", args=CPU_ARGS)
        servers.append(plain)
        plain.wait_ready(poll=0.05)
        restart_ttft = time.perf_counter() - start + ttft(plain)
    finally:
        for s in servers:
            s.stop()
        daemon.stop()

    med = statistics.median
    nbytes = inside[0]["bytes"]
    wake_s = med(i["seconds"] for i in inside)
    plain_s = med(plain_copies)
    results = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "device": status["device"],
        "chunk_size": status["chunk_size"],
        "weights_bytes": nbytes,
        "cycles": args.cycles,
        "sleep_ms_http": med(sleeps) * 1e3,
        "wake_ms_http": med(wakes) * 1e3,
        "wake_tiers": sorted({i["tier"] for i in inside}),
        "wake_ms_instance": wake_s * 1e3,
        "wake_map_ms": med(i["map_seconds"] for i in inside) * 1e3,
        "wake_copy_wait_ms": med(i["copy_wait_seconds"] for i in inside) * 1e3,
        "wake_gbps": nbytes / wake_s / 1e9,
        "plain_copy_ms": plain_s * 1e3,
        "plain_copy_gbps": nbytes / plain_s / 1e9,
        "wake_vs_plain_copy": plain_s / wake_s,
        "ttft_awake_ms": med(awake_ttft) * 1e3,
        "ttft_after_wake_ms": med(after_wake_ttft) * 1e3,
        "ttft_asleep_ms": med(asleep_ttft) * 1e3,
        "ttft_switch_ms": med(switch_ttft) * 1e3,
        "ttft_restart_ms": restart_ttft * 1e3,
        "restart_vs_switch_ttft": restart_ttft / med(switch_ttft),
        "tokens_per_s_mux": max(tps["mux"]),
        "tokens_per_s_plain": max(tps["plain"]),
        "mux_vs_plain_throughput": max(tps["mux"]) / max(tps["plain"]),
    }
    for key, value in results.items():
        print(f"{key:>26}: {value:.3f}" if isinstance(value, float) else f"{key:>26}: {value}")
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    return 0
