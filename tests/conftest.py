"""Shared fixtures: the bundled model, a daemon, vLLM servers, the books."""

import os
import threading
import time
from pathlib import Path

import httpx
import pytest

from vllm_mux.daemon.client import Client
from vllm_mux.daemon.server import Daemon as InProcessDaemon
from vllm_mux.launch import CPU_ARGS, VllmServer, start_daemon
from vllm_mux.memory.cpu import Backend

# What every test instance runs with on this CPU (see CPU_ARGS), with fewer
# sequences at once.
SERVER_ARGS = [*CPU_ARGS, "--max-num-seqs", "16"]

# How long a test waits for an answer or a state: far beyond what a busy
# 2-core machine takes (minutes), so that only a hang reaches it.
PATIENCE_S = 900

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Translate 'good morning' into Spanish.",
    "What is 12 times 12?",
    "Name a famous painting by Leonardo da Vinci.",
    "Explain photosynthesis in one sentence.",
    "What colour is the sky on a clear day?",
]


@pytest.fixture(scope="session")
def model_dir() -> str:
    from vllm_mux.models import model_path

    return str(model_path("smollm2"))


class Daemon:
    def __init__(self, tmp_path, device_memory: str, args=()):
        tmp_path.mkdir(parents=True, exist_ok=True)
        self.socket = str(tmp_path / "mux.sock")
        log = tmp_path / "daemon.log"
        self.process = start_daemon(self.socket, device_memory, log, args=list(args))

    def status(self) -> dict:
        client = Client(self.socket)
        try:
            return client.status()
        finally:
            client.close()

    def wait_for(self, predicate, timeout: float = PATIENCE_S) -> dict:
        """The first status that satisfies ``predicate``."""
        import time

        deadline = time.monotonic() + timeout
        while True:
            status = self.status()
            if predicate(status) or time.monotonic() > deadline:
                return status
            time.sleep(0.1)

    def instance(self, model: str) -> dict:
        (found,) = [i for i in self.status()["instances"] if i["model"] == model]
        return found

    def stop(self) -> None:
        self.process.stop()


class LiveDaemon:
    """A Daemon served from a thread of this process."""

    def __init__(
        self,
        path: str,
        chunks: int,
        chunk_size: int,
        wait_timeout: float = 0.5,
        backend=None,
        host_memory: int | None = None,
        policy: str = "switch-per-request",
    ):
        self.path = path
        # A lease that does not fit waits for holders to sleep; where nobody
        # can be asked, the wait is kept short.
        self.daemon = InProcessDaemon(
            backend or Backend(),
            "cpu",
            chunks * chunk_size,
            chunk_size,
            path,
            wait_timeout=wait_timeout,
            host_memory=host_memory,
            policy=policy,
        )
        self.daemon.listen()
        self.thread = threading.Thread(target=self.daemon.serve_forever, daemon=True)
        self.thread.start()
        self.clients: list[Client] = []

    def client(self) -> Client:
        c = Client(self.path, timeout=10)
        self.clients.append(c)
        return c

    def status(self) -> dict:
        c = Client(self.path, timeout=10)
        try:
            return c.status()
        finally:
            c.close()

    def stop(self) -> None:
        for c in self.clients:
            c.close()
        self.daemon.shutdown()
        self.thread.join(2)  # a daemon thread: a hang here is caught by its own test


def start_serve(argv: list[str], log_path, url: str, env=None):
    """``vllm-mux serve`` with ``argv``, in a session of its own, logging to
    ``log_path``: the process once ``url`` answers /health."""
    import subprocess

    with open(log_path, "w") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env
        )
    deadline = time.monotonic() + 3 * PATIENCE_S  # only reached if serve hangs
    while time.monotonic() < deadline:
        assert proc.poll() is None, open(log_path).read()
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(1)
    pytest.fail("vllm-mux serve did not start")


def take_chunks(socket_path: str, n: int) -> None:
    """Another instance leases ``n`` chunks of a daemon served from this
    process and hands them back: whatever sleeper's bytes they held are gone
    (a lease takes chunks that hold nobody's bytes first). Returns once the
    daemon's thread for it has ended, its fds closed."""
    from vllm_mux.bench import take

    threads = threading.active_count()
    take(socket_path, n)
    deadline = time.monotonic() + PATIENCE_S
    while threading.active_count() > threads and time.monotonic() < deadline:
        time.sleep(0.01)


@pytest.fixture
def children():
    """Popen objects appended here are SIGKILLed at teardown, their pipes closed."""
    procs = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(10)
        for stream in (p.stdin, p.stdout, p.stderr):
            if stream:
                stream.close()


def assert_books_balance(status: dict) -> None:
    """The one invariant: leased + free = total, a sleeping instance holds
    nothing; and the host tier's: used + free = budget, never more than the
    budget, each copy counted once and used by the instances it names."""
    assert status["balanced"]
    held = sum(i["chunks"] for i in status["instances"])
    assert status["leased_chunks"] == held
    assert status["leased_chunks"] + status["free_chunks"] == status["total_chunks"]
    for i in status["instances"]:
        if i["state"] == "asleep":
            assert i["chunks"] == 0, i
    assert status["host_balanced"]
    copies = status["host_copies"]
    assert status["host_used"] == sum(c["size"] for c in copies) <= status["host_budget"]
    assert status["host_used"] + status["host_free"] == status["host_budget"]
    assert len({c["digest"] for c in copies}) == len(copies)
    if all(c["sealed"] for c in copies):  # one memfd per copy, none left behind
        assert status["host_memfds"] == len(copies)
    users = {i["id"]: set(i["host_copy"]) for i in status["instances"]}
    for c in copies:
        for u in c["users"]:
            assert c["digest"] in users[u], (c, users)


@pytest.fixture
def daemon_factory(tmp_path):
    yield from _daemons(tmp_path)


@pytest.fixture(scope="module")
def module_daemon_factory(tmp_path_factory):
    yield from _daemons(tmp_path_factory.mktemp("daemon"))


def _daemons(tmp_path):
    started = []

    def start(device_memory: str = "2GiB", args=()) -> Daemon:
        d = Daemon(tmp_path / f"daemon{len(started)}", device_memory, args)
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop()


@pytest.fixture
def server_factory(tmp_path):
    yield from _servers(tmp_path)


@pytest.fixture(scope="module")
def module_server_factory(tmp_path_factory):
    yield from _servers(tmp_path_factory.mktemp("vllm"))


def _servers(tmp_path):
    started = []

    def start(
        model: str, name="smol", socket_path=None, args=(), wait=True, env=None, cpu_cores=None
    ):
        """``cpu_cores``: its VLLM_CPU_OMP_THREADS_BIND; instances that compute
        at once get theirs from ``cpu_binds``, as under ``vllm-mux serve``."""
        if cpu_cores is not None:
            env = {**(env or {}), "VLLM_CPU_OMP_THREADS_BIND": cpu_cores}
        s = VllmServer(
            model,
            tmp_path / f"vllm-{name}-{len(started)}.log",
            name=name,
            socket_path=socket_path,
            args=[*SERVER_ARGS, *args],
            env=env,
        )
        started.append(s)
        return s.wait_ready() if wait else s

    yield start
    for s in started:
        s.stop()


def greedy(server: VllmServer, prompt: str, max_tokens: int = 24) -> str:
    body = {
        "model": server.name,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=PATIENCE_S)
    r.raise_for_status()
    return r.json()["choices"][0]["message"]["content"]


def process_tree(pid: int) -> list[int]:
    import psutil

    root = psutil.Process(pid)
    return [root.pid, *(p.pid for p in root.children(recursive=True))]


def worker_pid(server: VllmServer, daemon: Daemon) -> int:
    """The instance process the daemon sees: vLLM's worker, under the server."""
    pid = daemon.instance(server.name)["pid"]
    assert pid in process_tree(server.pid)
    return pid


def mapped_ranges(pid: int) -> list[tuple[int, int, str, str]]:
    """(start, end, perms, path) of every mapping of a process."""
    out = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            fields = line.split()
            start, end = (int(x, 16) for x in fields[0].split("-"))
            out.append((start, end, fields[1], fields[5] if len(fields) > 5 else ""))
    return out


def perms_at(addr: int) -> str:
    """The permissions of the mapping of this process that contains ``addr``."""
    with open("/proc/self/maps") as f:
        for line in f:
            span, perms = line.split()[:2]
            lo, hi = (int(x, 16) for x in span.split("-"))
            if lo <= addr < hi:
                return perms
    return ""


def shmem_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssShmem:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no RssShmem line")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, model_dir) -> str:
    """A tiny random Llama with the bundled model's tokenizer: another shape."""
    from vllm_mux.bench.tiers import make_tiny_model

    return make_tiny_model(model_dir, tmp_path_factory.mktemp("tiny-llama"))


def stream_text(
    server: VllmServer,
    prompt: str,
    max_tokens: int = 24,
    ignore_eos=False,
    stop=None,
    started=None,
) -> str:
    """A streamed greedy chat answer, joined; ``ignore_eos`` makes it exactly
    ``max_tokens`` long (a vLLM extension), to keep an instance busy; setting
    the event ``stop`` hangs up early (vLLM aborts the request); the event
    ``started`` is set once the first words are in."""
    import json

    body = {
        "model": server.name,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": ignore_eos,
    }
    parts = []
    url = f"{server.url}/v1/chat/completions"
    with httpx.stream("POST", url, json=body, timeout=PATIENCE_S) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                delta = json.loads(line[6:])["choices"][0]["delta"]
                parts.append(delta.get("content") or "")
                if started is not None and parts[-1]:
                    started.set()
            if stop is not None and stop.is_set():
                break
    return "".join(parts)


RAG_KEY = "sk-rag"


@pytest.fixture(scope="session")
def rag_serve(tmp_path_factory):
    """``vllm-mux serve examples/rag.yaml`` (a chat and an embedding model on a
    pool that holds one), with an API key, for every test of the router's
    endpoints, controls and status page: one start for all of them. Tests that
    pin, sleep or wake leave the models as they found them: unpinned."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from vllm_mux.launch import free_port

    tmp = tmp_path_factory.mktemp("rag")
    port, sock = free_port(), str(tmp / "mux.sock")
    config = Path(__file__).parent.parent / "examples" / "rag.yaml"
    argv = [sys.executable, "-m", "vllm_mux.cli", "serve", str(config), "--port", str(port)]
    argv += ["--socket", sock, "--log-dir", str(tmp / "logs"), "--api-key", RAG_KEY]
    url = f"http://127.0.0.1:{port}"
    proc = start_serve(argv, tmp / "serve.log", url)
    yield {"url": url, "socket": sock, "key": RAG_KEY, "tmp": tmp, "proc": proc}
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def pypi_file(project: str, filename: str) -> Path:
    """One release file from PyPI's simple index (JSON, PEP 691), its sha256
    checked, cached in ~/.cache/vllm-mux-test: the test that needs it skips,
    saying why, only when PyPI cannot be reached."""
    import hashlib
    import json
    import urllib.error
    import urllib.request

    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vllm-mux-test"
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / filename
    if path.is_file():
        return path
    try:
        request = urllib.request.Request(
            f"https://pypi.org/simple/{project}/",
            headers={"Accept": "application/vnd.pypi.simple.v1+json"},
        )
        with urllib.request.urlopen(request, timeout=30) as reply:
            files = json.load(reply)["files"]
        entry = next(f for f in files if f["filename"] == filename)
        with urllib.request.urlopen(entry["url"], timeout=300) as reply:
            data = reply.read()
    except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
        pytest.skip(f"PyPI is unreachable, cannot fetch {filename}: {e}")
    assert hashlib.sha256(data).hexdigest() == entry["hashes"]["sha256"], filename
    tmp = path.with_suffix(".part")
    tmp.write_bytes(data)
    tmp.replace(path)
    return path


# The torch-npu wheel vllm-ascend 0.23.0.post1 pins ships CANN's own headers
# (tests/acl_sim/SOURCES.md); no other package installable here does.
TORCH_NPU_WHEEL = ("torch-npu", "torch_npu-2.10.0.post4-cp312-cp312-manylinux_2_28_x86_64.whl")
CANN_INCLUDE = "torch_npu/include/third_party/acl/inc/"


@pytest.fixture(scope="session")
def cann_include(tmp_path_factory) -> Path:
    """CANN's include directory (acl/acl.h, acl/acl_rt.h, ...), from the wheel."""
    import zipfile

    wheel = pypi_file(*TORCH_NPU_WHEEL)
    into = tmp_path_factory.mktemp("cann")
    with zipfile.ZipFile(wheel) as z:
        z.extractall(into, [n for n in z.namelist() if n.startswith(CANN_INCLUDE)])
    include = into / CANN_INCLUDE
    assert (include / "acl" / "acl_rt.h").is_file()
    return include


@pytest.fixture(autouse=True)
def no_instance_key_left_behind():
    """VLLM_MUX_INSTANCE set in this process would be inherited by every vLLM
    a later test starts (see test_launch): no test may leave it set."""
    before = os.environ.get("VLLM_MUX_INSTANCE")
    yield
    assert os.environ.get("VLLM_MUX_INSTANCE") == before, "a test left VLLM_MUX_INSTANCE set"
