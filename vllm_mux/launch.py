"""Start and stop the processes vllm-mux is made of: a daemon, vLLM servers.

Used by ``vllm-mux serve``, ``vllm-mux bench`` and the tests; each process gets its own session so
that stopping it stops everything it spawned (vLLM's engine and workers).
"""

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx

# What a model gets on the CPU when nobody says otherwise: float32 (bf16 gives
# garbage on these CPUs), eager mode (a 36 s start instead of 210 s) and a KV
# cache small enough for a pool of a few GiB.
CPU_ARGS = [
    "--dtype", "float32", "--enforce-eager", "--max-model-len", "2048",
    "--kv-cache-memory-bytes", "256M",
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Process:
    """A child process in its own session, logging to a file."""

    def __init__(self, argv: list[str], log: Path, env: dict | None = None):
        self.argv, self.log_path = argv, Path(log)
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self, tail: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-tail:]

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM the whole session, then SIGKILL what is left."""
        if self.alive():
            _signal_group(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        _signal_group(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self._log.close()
        return self.proc.returncode


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


class DaemonProcess(Process):
    """``vllm-mux daemon`` in a child process; ``wait_listening`` waits for it."""

    def __init__(
        self, socket_path: str, device_memory: str, log: Path, device: str = "cpu", args=()
    ):
        self.socket_path = socket_path
        argv = [sys.executable, "-m", "vllm_mux.cli", "daemon", "--device", device]
        argv += ["--device-memory", device_memory, "--socket", socket_path, *args]
        super().__init__(argv, log)

    def wait_listening(self, timeout: float = 300) -> "DaemonProcess":
        """Until it listens (a busy machine imports slowly); a daemon that
        exits first, or hangs, is stopped, and RuntimeError says why."""
        deadline = time.monotonic() + timeout
        while not _listening(self.socket_path):
            if not self.alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the daemon did not start:\n{self.log()}")
            time.sleep(0.05)
        return self


def start_daemon(
    socket_path: str, device_memory: str, log: Path, device: str = "cpu", args: list[str] = ()
) -> DaemonProcess:
    return DaemonProcess(socket_path, device_memory, log, device, args).wait_listening()


def _listening(socket_path: str) -> bool:
    """Whether a daemon listens there: the path alone may be a dead one's socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as probe:
        try:
            probe.connect(socket_path)
        except OSError:
            return False
    return True


def cpu_binds(count: int, cores: list[int] | None = None) -> list[str]:
    """``VLLM_CPU_OMP_THREADS_BIND`` for each of ``count`` CPU instances.

    vLLM's default ("auto") binds every instance to the same cores, so two
    instances computing at once fight over them while other cores idle. Here
    each gets a block of ``cores`` (default: the ones this process may run on)
    of its own, as large as they can be, with one core left to the front ends
    (API servers, engine loops, router) when there are more cores than
    instances, as "auto" does. With fewer cores than instances the blocks (one
    core each) wrap around: instances share a core, each with one thread, the
    least they can share; an instance's engine and API server are not bound
    and go wherever the OS finds room.
    """
    cores = sorted(os.sched_getaffinity(0)) if cores is None else cores
    if count == 0:
        return []
    spare = 1 if len(cores) > count else 0
    per = max(1, (len(cores) - spare) // count)
    return [
        ",".join(str(cores[(i * per + j) % len(cores)]) for j in range(per)) for i in range(count)
    ]


def cpu_ids(bind: str) -> set[int]:
    """The cpu ids a ``VLLM_CPU_OMP_THREADS_BIND`` value names ("0-3,8"; none
    for "auto" and "nobind")."""
    if bind in ("auto", "nobind"):
        return set()
    ids = set()
    for part in bind.split(","):
        first, _, last = part.partition("-")
        ids.update(range(int(first), int(last or first) + 1))
    return ids


class VllmServer(Process):
    """vLLM's OpenAI server, started the way users start it on this platform.

    It listens on 127.0.0.1 only, whatever ``args`` say: with dev mode on it
    serves /sleep, /wake_up and /collective_rpc with no key, so it must not
    be reachable from the network (the router is the door, behind its key).
    """

    def __init__(
        self,
        model: str,
        log: Path,
        *,
        name: str = "model",
        socket_path: str | None = None,
        args: list[str] = (),
        env: dict | None = None,
    ):
        self.port = free_port()
        self.name = name
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model]
        argv += ["--served-model-name", name, *args]
        argv += ["--host", "127.0.0.1", "--port", str(self.port)]  # last: they win
        env = {"VLLM_SERVER_DEV_MODE": "1", **(env or {})}
        if socket_path:
            env["VLLM_MUX_SOCKET"] = socket_path
        else:
            env["VLLM_MUX_SOCKET"] = ""  # plain vLLM, even inside a configured shell
        # The key that joins this instance's worker and controller: its own, never
        # one inherited from our environment, which would join every instance to
        # one controller after another (each replacing the last).
        env["VLLM_MUX_INSTANCE"] = uuid.uuid4().hex
        super().__init__(argv, log, env)

    def wait_ready(self, timeout: float = 900, poll: float = 0.5) -> "VllmServer":
        """Until /health answers; the timeout is for a server that hangs, far
        above a start on a busy 2-core machine (minutes)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(
                    f"vLLM exited with {self.proc.returncode} (log: {self.log_path}):\n{self.log()}"
                )
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(poll)
        raise TimeoutError(
            f"vLLM not ready after {timeout} s (log: {self.log_path}):\n{self.log()}"
        )

    def post(self, path: str, timeout: float = 600, **kwargs) -> httpx.Response:
        response = httpx.post(f"{self.url}{path}", timeout=timeout, **kwargs)
        response.raise_for_status()
        return response

    def sleep(self) -> None:
        self.post("/sleep", params={"level": 1})

    def wake_up(self) -> None:
        self.post("/wake_up")

    def worker_rpc(self, method: str):
        """Call a worker method through vLLM's dev-mode ``/collective_rpc``."""
        return self.post("/collective_rpc", json={"method": method}).json()["results"][0]
