"""Two models, one pool that holds one of them: switch by sleep and wake.

Starts a daemon with a 1.25 GiB pool, and two vLLM servers of the bundled
model under two names (each needs about 0.8 GiB awake). While one serves, the
other sleeps with no chunk of the pool; switching is a sleep and a wake, not a
restart. Run from the repository after `bash scripts/install.sh`.
"""

import tempfile
import time
from pathlib import Path

import httpx

from vllm_mux.daemon.client import Client
from vllm_mux.launch import VllmServer, start_daemon
from vllm_mux.models import model_path

ARGS = [
    "--dtype", "float32", "--enforce-eager", "--max-model-len", "2048",
    "--kv-cache-memory-bytes", "256M", "--enable-sleep-mode",
]  # fmt: skip


def ask(server: VllmServer, question: str) -> str:
    body = {"model": server.name, "messages": [{"role": "user", "content": question}]}
    body |= {"max_tokens": 32, "temperature": 0}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120)
    return r.json()["choices"][0]["message"]["content"]


def show(sock: str) -> None:
    status = Client(sock).status()
    free = status["free_chunks"] * status["chunk_size"] / 2**30
    rows = ", ".join(
        f"{i['model']}: {i['state']} ({i['chunks']} chunks)" for i in status["instances"]
    )
    print(f"    pool: {free:.2f} GiB free | {rows}")


def timed(label: str, fn) -> None:
    start = time.perf_counter()
    fn()
    print(f"  {label} in {(time.perf_counter() - start) * 1000:.0f} ms")


def main() -> None:
    model = str(model_path("smollm2"))
    work = Path(tempfile.mkdtemp(prefix="vllm-mux-demo-"))
    sock = str(work / "mux.sock")
    daemon = start_daemon(sock, "1280MiB", work / "daemon.log")
    servers = []
    try:
        print("starting model 'alpha' (about 40 s)...")
        alpha = VllmServer(model, work / "alpha.log", name="alpha", socket_path=sock, args=ARGS)
        servers.append(alpha.wait_ready())
        print("alpha:", ask(alpha, "What is the capital of France?"))
        timed("alpha sleeps", alpha.sleep)
        show(sock)
        print("starting model 'beta' in the memory alpha gave back...")
        beta = VllmServer(model, work / "beta.log", name="beta", socket_path=sock, args=ARGS)
        servers.append(beta.wait_ready())
        show(sock)
        print("beta:", ask(beta, "Write a haiku about the sea."))
        for _ in range(3):
            timed("beta sleeps", beta.sleep)
            timed("alpha wakes", alpha.wake_up)
            show(sock)
            print("alpha:", ask(alpha, "What is 12 times 12?"))
            timed("alpha sleeps", alpha.sleep)
            timed("beta wakes", beta.wake_up)
            show(sock)
            print("beta:", ask(beta, "Name a colour of the rainbow."))
    finally:
        for s in servers:
            s.stop()
        daemon.stop()


if __name__ == "__main__":
    main()
