"""``vllm-mux serve``: the daemon, one vLLM server per model, one router port.

Everything runs as children of this process, each in its own session, and is
stopped on SIGINT/SIGTERM (or when start-up fails), so nothing is left behind.

Serve heals: a server that exits (killed, out of memory, crashed) is started
again after a backoff, and meanwhile the router answers its model's requests
with 503 and Retry-After. A model whose server fails to start three times in
a row is marked failed, with the tail of its log in the router's /v1/models,
and the other models keep serving. Restarts are counted there and in
/metrics (``vllm_mux:instance_restarts_total``). A daemon that exits is
started again the same way, on the same socket: the instances serve on
meanwhile and reconnect to it, and it takes their chunks back from them
(see daemon/server.py); a request that needs a wake in the gap waits for it,
or gets 503 with Retry-After.

A model with ``preload: false`` is put to sleep, through the daemon, as soon
as its server is ready, after a restart too; such models start first, so
that the others find the memory free.
"""

import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from vllm_mux.config import EMPTY_KEY, SIZES, Config, Model, problem, size
from vllm_mux.controller import KNOB_ENV
from vllm_mux.launch import CPU_ARGS, DaemonProcess, VllmServer, cpu_binds, cpu_ids
from vllm_mux.router.app import Upstream

ATTEMPTS = 3  # starts in a row that may fail before a model is marked failed
MAX_BACKOFF_S = 60  # the longest wait before a start: 1, 2, 4, ... seconds
STABLE_S = 60  # a server up this long before it died starts again without delay growth


def backoff(streak: int) -> int:
    """Seconds before the next start after ``streak`` deaths in a row: 1, 2, 4 ..."""
    return min(MAX_BACKOFF_S, 2 ** (streak - 1))


LOG_TAIL = 2000  # characters of a failed model's log shown in /v1/models


def default_config() -> Config:
    """The bundled model under two names on a pool that holds one: a newcomer
    sees a switch on their first two requests."""
    return Config(
        models=[Model("smol-a", "smollm2"), Model("smol-b", "smollm2")],
        device_memory="1GiB",
    )


def _source(model: Model) -> str:
    from vllm_mux.models import BUNDLED, model_path

    return str(model_path(model.source)) if model.source in BUNDLED else model.source


def core_binds(models: list[Model]) -> dict[str, str]:
    """Each model's ``VLLM_CPU_OMP_THREADS_BIND``: its ``cpu_cores`` if set;
    the others share out, by ``cpu_binds``, the cores nobody named (all the
    cores, if the named ones take every core)."""
    allowed = sorted(os.sched_getaffinity(0))
    named = set().union(*(cpu_ids(m.cpu_cores) for m in models if m.cpu_cores))
    free = [c for c in allowed if c not in named] or allowed
    rest = [m.name for m in models if not m.cpu_cores]
    binds = dict(zip(rest, cpu_binds(len(rest), free)))
    return {m.name: m.cpu_cores or binds[m.name] for m in models}


class DaemonKeeper:
    """Keeps the daemon running: starts it, and starts it again when it exits
    (killed, crashed), with a growing delay, for as long as serve runs."""

    def __init__(self, config: Config, socket_path: str, logs: Path, stopping, lock):
        self.config, self.socket_path, self.logs = config, socket_path, logs
        self.stopping, self.lock = stopping, lock
        self.args = ["--chunk-size", config.chunk_size] if config.chunk_size else []
        self.args += ["--host-memory", config.host_memory] if config.host_memory else []
        self.args += ["--policy", config.policy]
        self.process: DaemonProcess | None = None
        self.starts = 0  # daemons started, for the log's name
        self.streak = 0  # exits since one ran STABLE_S
        self.ready_at = 0.0  # when the last one started

    def start(self) -> bool:
        """Start it and wait until it listens: False if serve stops first,
        RuntimeError if it does not start."""
        log = self.logs / ("daemon.log" if not self.starts else f"daemon.{self.starts}.log")
        with self.lock:  # serve stops every daemon it started, never one started after
            if self.stopping.is_set():
                return False
            self.process = DaemonProcess(
                self.socket_path, self.config.device_memory, log, self.config.device, self.args
            )
            self.starts += 1
            self.ready_at = time.monotonic()
        self.process.wait_listening()
        return True

    def watch(self) -> None:
        """Start the daemon again whenever it exits, until serve stops."""
        while True:
            code = self.process.proc.wait()
            if self.stopping.is_set():
                return
            if time.monotonic() - self.ready_at > STABLE_S:
                self.streak = 0
            self.streak += 1
            delay = backoff(self.streak)
            print(
                f"vllm-mux: the daemon exited ({code}); starting it again in {delay} s (log: "
                f"{self.process.log_path}); the models serve on and will reconnect to it",
                flush=True,
            )
            self.process.stop()
            if self.stopping.wait(delay):
                return
            try:
                if not self.start():
                    return
            except RuntimeError as e:
                if self.stopping.is_set():
                    return
                last = str(e).strip().splitlines()[-1]  # the end of its log says why
                print(f"vllm-mux: the daemon did not start: {last}", file=sys.stderr, flush=True)
                continue
            print(f"vllm-mux: the daemon is back (restart {self.starts - 1})", flush=True)


class Keeper:
    """Keeps one model's vLLM server running: starts it, and starts it again
    when it exits, with a growing delay, until it fails ``ATTEMPTS`` times in
    a row. ``upstream`` is what the router sees of it."""

    def __init__(self, model: Model, config: Config, socket_path, logs: Path, env, stopping, lock):
        self.model, self.logs, self.stopping, self.lock = model, logs, stopping, lock
        extra = model.args or (CPU_ARGS if config.device == "cpu" else [])
        self.args, self.socket_path = [*extra, "--enable-sleep-mode"], socket_path
        self.env = {"VLLM_MUX_PINNED": "1" if model.pinned else "", **env}
        if model.idle_ttl is not None:
            self.env["VLLM_MUX_IDLE_TTL"] = str(model.idle_ttl)
        for knob, name in KNOB_ENV.items():  # the config's, never the shell's
            self.env[name] = str(model.knobs.get(knob, ""))
        self.upstream = Upstream(url="", state="starting")
        self.server: VllmServer | None = None
        self.starts = 0  # servers started, for the log's name
        self.streak = 0  # deaths and failed starts since it last ran STABLE_S
        self.ready_at = 0.0

    def start(self) -> bool:
        """Start the server, retrying; True once it is ready, False if it
        failed ``ATTEMPTS`` times in a row (then marked failed) or serve stops."""
        name = self.model.name
        for attempt in range(1, ATTEMPTS + 1):
            if self.streak:
                delay = backoff(self.streak)
                print(f"vllm-mux: starting {name} again in {delay} s", flush=True)
                if self.stopping.wait(delay):
                    return False
            log = self.logs / (f"{name}.log" if not self.starts else f"{name}.{self.starts}.log")
            with self.lock:  # serve stops every server it started, never one started after
                if self.stopping.is_set():
                    return False
                self.server = VllmServer(
                    _source(self.model), log, name=name, socket_path=self.socket_path,
                    args=self.args, env=self.env,
                )  # fmt: skip
                self.starts += 1
            try:
                self.server.wait_ready()
            except (RuntimeError, TimeoutError) as e:
                if self.stopping.is_set():
                    return False
                self.server.stop()
                self.streak += 1
                reason = str(e).splitlines()[0].rstrip(":")
                print(
                    f"vllm-mux: {name} did not start ({attempt}/{ATTEMPTS}): {reason}", flush=True
                )
                continue
            self.ready_at = time.monotonic()
            if not self.model.preload:
                self.put_to_sleep()
            self.upstream.url, self.upstream.error = self.server.url, None
            self.upstream.state = None  # last: the router uses the url from now on
            return True
        self.upstream.error = self.server.log(LOG_TAIL)
        self.upstream.state = "failed"
        print(
            f"vllm-mux: {name} failed to start {ATTEMPTS} times in a row; it is marked failed "
            f"and the other models keep serving. The end of its log ({log}):\n"
            f"{self.upstream.error}",
            file=sys.stderr,
            flush=True,
        )
        return False

    def put_to_sleep(self) -> None:
        """``preload: false``: to sleep through the daemon, as ``vllm-mux
        sleep`` does; if that fails the model serves on awake, and sleeps
        when idle or when another model needs the memory."""
        from vllm_mux.daemon.client import Client, DaemonError

        name = self.model.name
        try:
            client = Client(self.socket_path, timeout=None)  # the daemon bounds the wait
            try:
                reply = client.sleep(name)
            finally:
                client.close()
        except DaemonError as e:
            print(f"vllm-mux: could not put {name} to sleep (preload: false): {e}", flush=True)
            return
        if reply.get("state") != "asleep":  # requests came while it drained, and woke it
            print(
                f"vllm-mux: {name} slept (preload: false) and woke again at once for "
                f"{reply.get('woke_for', 0)} requests that were waiting",
                flush=True,
            )
            return
        print(
            f"vllm-mux: {name} started asleep (preload: false): its first request wakes it",
            flush=True,
        )

    def watch(self) -> None:
        """Start the server again whenever it exits, until it fails for good."""
        while True:
            code = self.server.proc.wait()
            if self.stopping.is_set():
                return
            self.upstream.state = "restarting"
            self.upstream.restarts += 1
            if time.monotonic() - self.ready_at > STABLE_S:
                self.streak = 0
            self.streak += 1
            print(
                f"vllm-mux: {self.model.name} exited ({code}); restarting it "
                f"(restart {self.upstream.restarts}, log: {self.server.log_path})",
                flush=True,
            )
            self.server.stop()  # its engine and workers, if they outlived it
            if not self.start():
                return
            print(f"vllm-mux: {self.model.name} is serving again", flush=True)


def serve(config: Config, socket_path: str, log_dir: str | None = None) -> int:
    import uvicorn

    from vllm_mux.router.app import make_app

    if config.api_key == "":
        print(f"vllm-mux: {EMPTY_KEY}", file=sys.stderr)
        return 2
    for key in ("device", "port", *SIZES):  # the file's are checked; these may be flags
        value = getattr(config, key)
        if value is not None and (reason := problem(key, value)):
            flag = "--" + key.replace("_", "-")
            print(f"vllm-mux: {reason} (the config's {key}, or {flag})", file=sys.stderr)
            return 2
    if reason := _unbindable(config.host, config.port):
        print(f"vllm-mux: {reason}", file=sys.stderr)
        return 2
    max_body = size(config.max_body)
    logs = Path(log_dir or tempfile.mkdtemp(prefix="vllm-mux-serve-"))
    logs.mkdir(parents=True, exist_ok=True)

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    stopping, lock = threading.Event(), threading.Lock()
    daemon, keepers = None, []
    try:
        print(f"vllm-mux: logs in {logs}", flush=True)
        daemon = DaemonKeeper(config, socket_path, logs, stopping, lock)
        try:
            daemon.start()
        except RuntimeError as e:  # the end of its log says why, in one line
            last = str(e).strip().splitlines()[-1]
            raise RuntimeError(f"the daemon did not start: {last}") from None
        threading.Thread(target=daemon.watch, daemon=True).start()
        print(f"vllm-mux: daemon on {config.device} with {config.device_memory}", flush=True)
        binds = core_binds(config.models) if config.device == "cpu" else {}
        if binds:
            _say_cores(binds)
        for model in config.models:
            env = {"VLLM_CPU_OMP_THREADS_BIND": binds[model.name]} if binds else {}
            keepers.append(Keeper(model, config, socket_path, logs, env, stopping, lock))
        # Those that start asleep first: the ones preloaded then find the memory free.
        for i, keeper in enumerate(sorted(keepers, key=lambda k: k.model.preload), 1):
            print(
                f"vllm-mux: starting model {i} of {len(keepers)}, {keeper.model.name}...",
                flush=True,
            )
            start = time.monotonic()
            if keeper.start():
                took = time.monotonic() - start
                awake = (
                    ", awake (preload: true); it sleeps when idle or when another model needs "
                    "the memory"
                    if keeper.model.preload
                    else ""
                )
                print(f"vllm-mux: {keeper.model.name} ready in {took:.0f} s{awake}", flush=True)
        running = [k for k in keepers if k.upstream.state is None]
        if not running:
            raise RuntimeError("no model started; nothing to serve")
        for keeper in running:
            threading.Thread(target=keeper.watch, daemon=True).start()
        app = make_app(
            {k.model.name: k.upstream for k in keepers},
            daemon_socket=socket_path,
            api_key=config.api_key,
            max_body=max_body,
            bound_host=config.host,  # on loopback, only loopback Host names (DNS rebinding)
        )
        print(f"vllm-mux: serving {len(running)} models on http://{config.host}:{config.port}")
        sys.stdout.flush()
        # A stop waits for requests in flight, but not for ever: a stream that
        # never ends would hold SIGTERM up for good.
        uvicorn.run(
            app,
            host=config.host,
            port=config.port,
            log_level="warning",
            timeout_graceful_shutdown=30,
        )
        return 0
    except KeyboardInterrupt:
        return 0
    except (RuntimeError, TimeoutError, OSError, ValueError) as e:
        print(f"vllm-mux: {e}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # finish stopping the children
        print("vllm-mux: stopping", flush=True)
        with lock:
            stopping.set()
        for keeper in reversed(keepers):
            if keeper.server is not None:
                keeper.server.stop()
        if daemon is not None and daemon.process is not None:
            daemon.process.stop()


def _unbindable(host: str, port: int) -> str | None:
    """Why the router could not listen on ``host:port``, or None: found out
    before the models start (minutes), not after."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, kind, proto, _, address = infos[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as e:
        return (
            f"cannot listen on {host}:{port} ({e.strerror or e}): pass a free --port, or a "
            "--host of this machine"
        )
    return None


def _say_cores(binds: dict[str, str]) -> None:
    """Print the cores each model computes on, and which ones models share."""
    users = {}
    for name, bind in binds.items():
        print(f"vllm-mux: {name} computes on cpu cores {bind} (VLLM_CPU_OMP_THREADS_BIND)")
        for core in cpu_ids(bind):
            users.setdefault(core, []).append(name)
    for core, names in users.items():
        if len(names) > 1:
            print(
                f"vllm-mux: {', '.join(names)} share core {core} (too few cores for a core "
                "each): while they compute at once, each gets part of it",
                flush=True,
            )
