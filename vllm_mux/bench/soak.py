"""``vllm-mux bench soak``: serve three models under random faults; nothing may be lost.

It starts ``vllm-mux serve`` as a subprocess (a free loopback port, a private
socket in a 0700 temporary directory, a random API key) with the bundled
model under three names on a pool that holds two of them, so that switching
models means arbitration. Before any fault it records each model's greedy
answer to a fixed set of prompts, alone, through the router. Then, for
``--minutes``, it sends random requests through the router with the official
``openai`` client (random model and prompt, some streamed, ``--concurrency``
at once) while it injects faults at random:

- ``sleep`` and ``wake``: ``POST /sleep`` and ``/wake_up`` on an instance's own
  loopback port (vLLM's dev mode, which serve turns on), found from the
  command lines of serve's children. ``/sleep`` is sent with ``mode=wait``,
  so the requests it finds running finish; upstream's default mode aborts
  them by design, which would lose them on purpose;
- ``kill``: SIGKILL an instance's vLLM API server; serve restarts it;
- ``kill-worker``: SIGKILL an instance's worker, the process that holds its
  memory (the one an OOM killer picks); its server exits and serve restarts it;
- ``daemon``: SIGKILL the daemon; serve starts another on the same socket, the
  instances serve on and reconnect, and the new daemon takes their chunks
  back from them.

``SUPPORTED`` (the default of ``--faults``) names the kinds the system
survives today; ``NOT_SUPPORTED`` says why the others are left out, and the
summary repeats it.

Every enabled kind is injected once first (in ``FAULTS``' order, so that a
one-minute run covers them all), then kinds at random among those the
system's state allows: a kill while at least one other model serves, a
daemon restart only once everything serves again.

Invariants (any failure: exit 1), checked throughout and at the end:

- the daemon's books balance: leased + free = total, every leased chunk is
  held by one instance, a sleeping instance holds nothing;
- every answer equals that model's solo answer. A request may get 503 with
  Retry-After during a fault (counted, retried after the hinted delay; a
  stream cut by a dying instance ends with a 503 error in the stream, the
  router's ``model_unavailable``, and is retried the same way); any other
  error, a wrong answer, or no answer within ``REQUEST_BOUND_S`` is a lost
  request;
- once the system is quiet again, the daemon and the router (serve's own
  process) hold no more fds and threads than before the faults (give or take
  a few that pools keep), serve's process tree has the same shape, and no
  process that was ever in it lives on outside it;
- SIGTERM stops serve with status 0, and no process of its tree is left.

Results: a table, and JSON with ``--output``. Loopback only; every loop and
wait is bounded, and the run stops by itself.
"""

import argparse
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from pathlib import Path

import psutil  # httpx and openai are imported where used: the CLI imports this module

# Faults in the order of their first injection: the daemon first (it needs
# every model serving, and is back in seconds), then the kills (a model is
# back in 30 to 60 s), then sleep and wake, which any moment allows.
FAULTS = ("daemon", "kill", "kill-worker", "sleep", "wake")
# What --faults defaults to: every kind the system survives today.
SUPPORTED = FAULTS
NOT_SUPPORTED: dict[str, str] = {}

MODELS = ("soak-a", "soak-b", "soak-c")
# 52 chunks of 32 MiB: two SmolLM2 instances at most (25 chunks each: its
# float32 weights and the 256M KV cache serve gives it on cpu), never three.
POOL = "1664MiB"
PROMPTS = (
    "What is the capital of France?",
    "List three prime numbers.",
    "What is 12 times 12?",
    "Name a colour of the rainbow.",
    "Translate 'good morning' into Spanish.",
    "Write a haiku about the sea.",
)
MAX_TOKENS = 12  # enough to tell answers apart, cheap on two cores

# Bounds, all far above what a busy 2-core machine takes (a model starts in
# 30 to 60 s there, a few minutes at worst), so that only a hang reaches
# them: serve starting three models one after the other; a model coming back
# after a kill; one request with its retries (a wake may wait 120 s for
# memory, then 503).
START_S = 1800
RECOVER_S = 600
REQUEST_BOUND_S = 600
READ_TIMEOUT_S = 300  # one attempt's wait for the next bytes
FAULT_CALL_S = 300  # /sleep waits for the requests it finds running
MAX_RETRY_WAIT_S = 60  # a Retry-After is honoured up to this
RETRY_AFTER_GONE_S = 5  # what the router says when an instance goes (router.app)
MONITOR_S = 2.0
STOP_S = 180  # serve stops each server (30 s each at most) and the daemon
# Quiet: httpx's keep-alive expiry is 5 s; after it the router's next request
# drops its idle upstream connections, so the count is the same as at start.
SETTLE_S = 6.0
QUIET_S = 120
# Counts that may differ by a few between two quiet moments without a leak:
# the asyncio default executor's threads (router status calls) and a socket
# or two still closing. A leak grows with the faults and requests; this does not.
FD_SLACK = 4
THREAD_SLACK = 6


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--minutes", type=float, default=30.0, help="how long to inject faults")
    p.add_argument(
        "--faults",
        default=",".join(SUPPORTED),
        help=f"comma-separated kinds among {', '.join(FAULTS)} (default: {','.join(SUPPORTED)})",
    )
    p.add_argument("--concurrency", type=int, default=2, help="requests at once (default 2)")
    p.add_argument(
        "--fault-every", type=float, default=10.0, help="mean seconds between faults (default 10)"
    )
    p.add_argument("--seed", type=int, default=None, help="default: random (printed)")
    p.add_argument("--output", help="also write the summary as JSON here")
    p.add_argument("--log-dir", help="serve's logs (default: a new temporary folder, kept)")


def run(args) -> int:
    faults = [f.strip() for f in args.faults.split(",") if f.strip()]
    unknown = [f for f in faults if f not in FAULTS]
    if unknown or args.minutes <= 0 or not 1 <= args.concurrency <= 16:
        print(
            f"vllm-mux bench soak: --faults takes kinds among {', '.join(FAULTS)} (not "
            f"{', '.join(unknown)}), --minutes > 0, --concurrency 1 to 16",
            file=sys.stderr,
        )
        return 2
    seed = args.seed if args.seed is not None else random.randrange(1 << 31)
    soak = Soak(args, [f for f in FAULTS if f in faults], seed)

    def interrupted(signum, frame):
        raise KeyboardInterrupt

    # Stopped from outside, it still stops serve and says what it saw.
    previous = signal.signal(signal.SIGTERM, interrupted)
    try:
        soak.run()
    except KeyboardInterrupt:
        soak.fail("interrupted (SIGINT or SIGTERM) before the end")
    except Exception as e:  # a bug of the soak's own: still stop serve and report
        soak.fail(f"the soak failed: {describe(e)}")
        traceback.print_exc()
    finally:
        soak.teardown()
        signal.signal(signal.SIGTERM, previous)
    summary = soak.summary()
    if args.output:
        Path(args.output).write_text(json.dumps(summary, indent=2) + "\n")
    print_table(summary)
    return 0 if summary["ok"] else 1


class Soak:
    """One run: serve, the traffic, the faults, and what was seen."""

    def __init__(self, args, faults: list[str], seed: int):
        self.args, self.enabled, self.seed = args, faults, seed
        self.tmp = Path(tempfile.mkdtemp(prefix="vllm-mux-soak-"))  # 0700: the socket's home
        self.logs = Path(args.log_dir or self.tmp / "logs")
        self.logs.mkdir(parents=True, exist_ok=True)
        self.socket = str(self.tmp / "mux.sock")
        self.key = secrets.token_hex(16)
        self.url = ""
        self.proc: subprocess.Popen | None = None
        self.lock = threading.Lock()
        self.counts = Counter()  # requests, served, streamed, retried, lost, books checks
        self.faults = Counter()
        self.failures: dict[str, int] = {}  # message -> times seen
        self.events: list[dict] = []  # faults and recoveries, for the JSON
        self.seen: dict[int, tuple[float, str]] = {}  # every pid of serve's tree
        self.solo: dict[tuple[str, str], str] = {}
        self.start_resources: dict = {}
        self.end_resources: dict = {}
        self.t0 = time.monotonic()
        self.deadline = 0.0
        # Faults not recovered from yet: model (or "daemon") -> (when, the
        # killed server's or daemon's pid: recovered means another one serves).
        self.recovering: dict[str, tuple[float, int]] = {}

    # -- what happened --

    def fail(self, message: str) -> None:
        with self.lock:
            times = self.failures[message] = self.failures.get(message, 0) + 1
        if times == 1:
            print(f"vllm-mux soak: FAIL {message}", flush=True)

    def event(self, what: str, **facts) -> None:
        entry = {"t": round(time.monotonic() - self.t0, 1), "what": what, **facts}
        with self.lock:
            self.events.append(entry)
        print(f"vllm-mux soak: {entry}", flush=True)

    # -- the run --

    def run(self) -> None:
        if not self.start_serve():
            return
        self.record_solo()
        if self.failures:
            return
        self.settle()
        self.start_resources = self.quiet_resources(None)
        self.event("soak", minutes=self.args.minutes, faults=self.enabled, seed=self.seed)
        self.deadline = time.monotonic() + self.args.minutes * 60
        workers = [
            threading.Thread(target=self.traffic, args=(i,), daemon=True)
            for i in range(self.args.concurrency)
        ]
        workers.append(threading.Thread(target=self.inject, daemon=True))
        for t in workers:
            t.start()
        # A request started at the deadline may retry for REQUEST_BOUND_S, then
        # wait READ_TIMEOUT_S on its last try: beyond that, something hangs.
        late = REQUEST_BOUND_S + READ_TIMEOUT_S + 60
        while any(t.is_alive() for t in workers) and time.monotonic() < self.deadline + late:
            self.monitor()
            time.sleep(MONITOR_S)
        if any(t.is_alive() for t in workers):
            self.fail(f"requests or faults still running {late} s past the end")
        self.event("traffic stopped")
        if not self.wait_recovered():
            return
        self.check_final_answers()
        self.settle()
        self.end_resources = self.quiet_resources(self.start_resources)
        self.check_orphans()

    def start_serve(self) -> bool:
        import httpx

        from vllm_mux.launch import free_port

        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        argv = [sys.executable, "-m", "vllm_mux.cli", "serve", "--host", "127.0.0.1"]
        argv += ["--port", str(port), "--socket", self.socket, "--log-dir", str(self.logs)]
        argv += ["--device", "cpu", "--device-memory", POOL]
        for model in MODELS:
            argv += ["--model", f"{model}=smollm2"]
        env = {**os.environ, "VLLM_MUX_API_KEY": self.key}  # not on the command line
        self.serve_log = open(self.logs / "serve.log", "wb")
        self.proc = subprocess.Popen(
            argv, stdout=self.serve_log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        self.event("serve started", pid=self.proc.pid, url=self.url, logs=str(self.logs))
        deadline = time.monotonic() + START_S
        while time.monotonic() < deadline:
            self.sample_tree()
            if self.proc.poll() is not None:
                self.fail(f"serve exited with {self.proc.returncode} while starting")
                return False
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            self.fail(f"serve did not answer /health within {START_S} s")
            return False
        states = self.router_states()
        if any(states.get(m) in (None, "failed", "starting") for m in MODELS):
            self.fail(f"not every model started: {states}")
            return False
        self.event("serving", states=states)
        return True

    def record_solo(self) -> None:
        """Each model's greedy answer to each prompt, alone, before any fault."""
        client = self.client()
        try:
            for model in MODELS:
                for prompt in PROMPTS:
                    try:
                        self.solo[model, prompt] = ask(client, model, prompt, stream=False)
                    except Exception as e:
                        self.fail(f"solo answer of {model}: {describe(e)}")
                        return
        finally:
            client.close()
        answers = {m: self.solo[m, PROMPTS[0]] for m in MODELS}
        self.event("solo answers recorded", first_prompt=answers)

    def traffic(self, worker: int) -> None:
        rng = random.Random(self.seed + 1 + worker)
        client = self.client()
        try:
            while time.monotonic() < self.deadline:
                model, prompt = rng.choice(MODELS), rng.choice(PROMPTS)
                self.request(client, model, prompt, stream=rng.random() < 0.5)
        except Exception as e:  # a bug of the soak's: still a failed run, and said
            self.fail(f"traffic worker {worker} stopped: {describe(e)}")
        finally:
            client.close()

    def request(self, client, model: str, prompt: str, stream: bool) -> None:
        """One request, retried after a 503's hinted delay until it is
        answered or ``REQUEST_BOUND_S`` has passed. Any other outcome is lost."""
        import openai

        with self.lock:
            self.counts["requests"] += 1
            self.counts["streamed"] += stream
        first = time.monotonic()
        while True:
            try:
                text = ask(client, model, prompt, stream)
            except openai.APIStatusError as e:
                wait = retry_after(e.response.headers) if e.status_code == 503 else None
                error = f"{e.status_code} {code_of(e.body)}"
                if wait is None:
                    error += f": {str(e)[:200]}"
            except openai.APIConnectionError as e:  # timeouts included: a hang
                wait, error = None, describe(e)
            except openai.APIError as e:  # an error inside a stream, after its 200
                code = code_of(e.body)
                gone = code in ("model_unavailable", "503")  # the router's or vLLM's 503
                wait, error = (RETRY_AFTER_GONE_S if gone else None), f"in a stream: {code}"
                if not gone:
                    error += f": {str(e)[:200]}"
            else:
                if text == self.solo[model, prompt]:
                    with self.lock:
                        self.counts["served"] += 1
                else:
                    with self.lock:
                        self.counts["lost"] += 1
                        self.counts["wrong"] += 1
                    self.fail(
                        f"{model} answered {prompt!r} with {text!r}, alone it said "
                        f"{self.solo[model, prompt]!r} (stream={stream})"
                    )
                return
            if wait is None or time.monotonic() + wait - first > REQUEST_BOUND_S:
                with self.lock:
                    self.counts["lost"] += 1
                why = error if wait is None else f"{error}, still after {REQUEST_BOUND_S} s"
                self.fail(f"a request to {model} was lost: {why}")
                return
            with self.lock:
                self.counts["retried"] += 1
                self.counts[f"retried after {error}"] += 1
            time.sleep(wait)

    # -- faults --

    def inject(self) -> None:
        rng = random.Random(self.seed)
        while True:
            pause = rng.uniform(0.5, 1.5) * self.args.fault_every
            if time.monotonic() + pause >= self.deadline:
                return
            time.sleep(pause)
            state = self.state()
            possible = [k for k in self.enabled if self.possible(k, state)]
            if not possible:
                continue
            fresh = [k for k in possible if not self.faults[k]]
            kind = fresh[0] if fresh else rng.choice(possible)
            try:
                getattr(self, "fault_" + kind.replace("-", "_"))(rng, state)
            except Exception as e:  # HTTP, OS or psutil errors: the fault's failure
                self.fail(f"injecting {kind}: {describe(e)}")

    def state(self) -> dict:
        """What the faults need to know: each model's state in the router,
        its server's (pid, port), the daemon's books (None: no answer)."""
        return {
            "router": self.router_states(),
            "servers": self.servers(),
            "books": self.books(),
        }

    def serving(self, state: dict, model: str) -> bool:
        books = state["books"]
        return (
            model not in self.recovering
            and state["router"].get(model) in ("awake", "asleep", "waking", "sleeping")
            and model in state["servers"]
            and books is not None
            and instance_of(books, model) is not None
        )

    def possible(self, kind: str, state: dict) -> bool:
        serving = [m for m in MODELS if self.serving(state, m)]
        if kind == "daemon":  # on a system that serves, nothing else recovering
            return not self.recovering and len(serving) == len(MODELS)
        if kind.startswith("kill"):  # never the last model serving
            return "daemon" not in self.recovering and len(serving) >= 2
        wanted = "awake" if kind == "sleep" else "asleep"
        return any(instance_of(state["books"], m)["state"] == wanted for m in serving)

    def fault_sleep(self, rng, state) -> None:
        self._sleep_or_wake("sleep", rng, state)

    def fault_wake(self, rng, state) -> None:
        self._sleep_or_wake("wake", rng, state)

    def _sleep_or_wake(self, kind: str, rng, state) -> None:
        import httpx

        wanted = "awake" if kind == "sleep" else "asleep"
        books = state["books"]
        models = [m for m in MODELS if self.serving(state, m)]
        model = rng.choice([m for m in models if instance_of(books, m)["state"] == wanted])
        _, port = state["servers"][model]
        if kind == "sleep":
            path, params = "/sleep", {"level": 1, "mode": "wait"}
        else:
            path, params = "/wake_up", {}
        self.faults[kind] += 1
        self.event(kind, model=model)
        r = httpx.post(
            f"http://127.0.0.1:{port}{path}", params=params, timeout=FAULT_CALL_S, trust_env=False
        )
        if r.status_code != 200:
            # Faults come one after another and this instance was serving: a
            # refusal is the system's failure, not the soak's.
            self.fail(f"{kind} of {model}: {r.status_code} {r.text[:200]}")

    def fault_kill(self, rng, state) -> None:
        self._kill("kill", rng, state)

    def fault_kill_worker(self, rng, state) -> None:
        self._kill("kill-worker", rng, state)

    def _kill(self, kind: str, rng, state) -> None:
        model = rng.choice([m for m in MODELS if self.serving(state, m)])
        server, _ = state["servers"][model]
        pid = server if kind == "kill" else instance_of(state["books"], model)["pid"]
        if pid not in tree(server):  # never anything but a process serve started
            self.fail(f"the daemon says {model}'s worker is pid {pid}, not in its server's tree")
            return
        self.recovering[model] = (time.monotonic(), server)
        self.faults[kind] += 1
        self.event(kind, model=model, pid=pid)
        os.kill(pid, signal.SIGKILL)

    def fault_daemon(self, rng, state) -> None:
        daemon = self.daemon_process()
        if daemon is None:
            self.fail("no daemon among serve's children")
            return
        self.recovering["daemon"] = (time.monotonic(), daemon.pid)
        self.faults["daemon"] += 1
        self.event("daemon", pid=daemon.pid)
        daemon.kill()

    # -- watching --

    def monitor(self) -> None:
        """One round of the checks that hold at every moment, and of the
        recoveries that must come within ``RECOVER_S``."""
        self.sample_tree()
        books = self.books()
        if books is not None:
            with self.lock:
                self.counts["books checks"] += 1
            for problem in books_problems(books):
                self.fail(f"books: {problem}")
        elif "daemon" not in self.recovering:
            self.fail("the daemon did not answer status (no daemon fault under way)")
        if not self.recovering:
            return
        states, servers = self.router_states(), self.servers()
        for what, (since, old) in list(self.recovering.items()):
            if books is None:
                back = False
            elif what == "daemon":
                daemon = self.daemon_process()
                back = daemon is not None and daemon.pid != old
                back = back and all(instance_of(books, m) is not None for m in MODELS)
                if back:  # for the record: the end is compared with the start
                    self.event("daemon counts after its restart", **process_counts(daemon))
            else:
                back = servers.get(what, (old,))[0] != old
                back = back and states.get(what) in ("awake", "asleep", "waking", "sleeping")
                back = back and instance_of(books, what) is not None
            if back:
                del self.recovering[what]
                self.event("recovered", fault=what, seconds=round(time.monotonic() - since))
            elif time.monotonic() - since > RECOVER_S:
                del self.recovering[what]
                self.fail(f"{what} did not recover within {RECOVER_S} s of its fault")

    def wait_recovered(self) -> bool:
        """After the traffic: until every fault is recovered from and every
        model serves, and no dead instance is on the books."""
        deadline = time.monotonic() + RECOVER_S
        while time.monotonic() < deadline:
            self.monitor()
            state = self.state()
            if not self.recovering and all(self.serving(state, m) for m in MODELS):
                # and no instance but the live ones (a dead one's chunks are back)
                if len(state["books"]["instances"]) == len(MODELS):
                    self.event("quiet", states=state["router"])
                    return True
            time.sleep(MONITOR_S)
        self.fail(f"the system was not serving every model again {RECOVER_S} s after the end")
        return False

    def check_final_answers(self) -> None:
        """After every fault, each model still gives its solo answers."""
        client = self.client()
        try:
            for model in MODELS:
                for prompt in PROMPTS:
                    with self.lock:
                        self.counts["final checks"] += 1
                    try:
                        text = ask(client, model, prompt, stream=False)
                    except Exception as e:
                        self.fail(f"final answer of {model}: {describe(e)}")
                        continue
                    if text != self.solo[model, prompt]:
                        self.fail(f"final answer of {model} to {prompt!r}: {text!r}")
        finally:
            client.close()

    def settle(self) -> None:
        """The same quiet moment at start and end: past the keep-alive
        expiry, then one request per model (which drops the router's expired
        upstream connections), on a client closed afterwards."""
        time.sleep(SETTLE_S)
        client = self.client()
        try:
            for model in MODELS:
                try:
                    ask(client, model, PROMPTS[0], stream=False)
                except Exception as e:
                    self.fail(f"settling request to {model}: {describe(e)}")
        finally:
            client.close()

    def resources(self) -> dict:
        serve = psutil.Process(self.proc.pid)
        daemon = self.daemon_process()
        shape = {}
        for child in serve.children():
            try:
                role = role_of(child.cmdline())
                kids = [p for p in child.children(recursive=True) if alive(p)]
            except psutil.Error:
                continue
            shape[role] = shape.get(role, 0) + 1 + len(kids)
        return {
            "router": process_counts(serve),
            "daemon": process_counts(daemon) if daemon else None,
            "processes": dict(sorted(shape.items())),
        }

    def quiet_resources(self, start: dict | None) -> dict:
        """The counts at a quiet moment; at the end, re-read for up to
        ``QUIET_S`` while they are above the start's (closing takes time),
        then each one still above is a leak."""
        deadline = time.monotonic() + QUIET_S
        while True:
            now = self.resources()
            if start is None:
                return now
            leaks = self.leaks(start, now)
            if not leaks or time.monotonic() > deadline:
                for leak in leaks:
                    self.fail(f"leak: {leak}")
                return now
            time.sleep(MONITOR_S)

    def leaks(self, start: dict, end: dict) -> list[str]:
        out = []
        # A daemon started again after a fault holds what the first one held
        # (an fd per chunk, its connections): it is compared with the start too.
        for name in ("router", "daemon"):
            before, after = start[name], end[name]
            if before is None or after is None:
                out.append(f"no {name} process at the start or the end")
                continue
            if after["fds"] > before["fds"] + FD_SLACK:
                out.append(f"the {name} holds {after['fds']} fds, {before['fds']} at start")
            if after["threads"] > before["threads"] + THREAD_SLACK:
                out.append(
                    f"the {name} runs {after['threads']} threads, {before['threads']} at start"
                )
        if end["processes"] != start["processes"]:
            out.append(f"serve's processes: {end['processes']}, at start {start['processes']}")
        return out

    def check_orphans(self) -> None:
        """Every process ever seen in serve's tree is in it still, or gone."""
        current = set(tree(self.proc.pid))
        for pid, (created, name) in self.seen.items():
            if pid not in current and same_process_alive(pid, created):
                self.fail(f"leak: process {pid} ({name}) lives on outside serve's tree")

    # -- the end --

    def teardown(self) -> None:
        """SIGTERM serve; it must exit 0 and leave no process behind. If it
        does not, kill what is left: only processes this run started, by id."""
        if self.proc is None:
            return
        self.sample_tree()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                code = self.proc.wait(STOP_S)
                if code != 0:
                    self.fail(f"serve exited with {code} after SIGTERM")
            except subprocess.TimeoutExpired:
                self.fail(f"serve did not stop within {STOP_S} s of SIGTERM")
                self.proc.kill()
                self.proc.wait()
        else:
            self.fail(f"serve had exited with {self.proc.returncode} before the end")
        deadline = time.monotonic() + 60
        left = self.left_behind()
        while left and time.monotonic() < deadline:
            time.sleep(0.5)
            left = self.left_behind()
        for pid, name in left:
            self.fail(f"process {pid} ({name}) left behind after serve stopped")
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        if os.path.exists(self.socket):
            self.fail(f"the daemon's socket {self.socket} is left behind")
        if self.args.log_dir:  # else the logs are in it, and kept
            shutil.rmtree(self.tmp, ignore_errors=True)
        self.serve_log.close()
        self.event("serve stopped")

    def left_behind(self) -> list[tuple[int, str]]:
        return [
            (pid, name)
            for pid, (created, name) in self.seen.items()
            if same_process_alive(pid, created)
        ]

    def summary(self) -> dict:
        c = self.counts
        return {
            "ok": not self.failures and c["requests"] > 0,
            "minutes": self.args.minutes,
            "wall_seconds": round(time.monotonic() - self.t0),  # start and checks included
            "seed": self.seed,
            "models": list(MODELS),
            "pool": POOL,
            "concurrency": self.args.concurrency,
            "prompts": len(PROMPTS),
            "requests": {
                "sent": c["requests"],
                "served": c["served"],
                "streamed": c["streamed"],
                "retried": c["retried"],
                "lost": c["lost"],
                "wrong": c["wrong"],
                "retried_after": {
                    k.removeprefix("retried after "): v
                    for k, v in c.items()
                    if k.startswith("retried after ")
                },
            },
            "faults": {k: self.faults[k] for k in self.enabled},
            "not_injected": {
                k: NOT_SUPPORTED.get(k, "not in --faults") for k in FAULTS if k not in self.enabled
            },  # fmt: skip
            "checks": {"books": c["books checks"], "final answers": c["final checks"]},
            "resources": {"start": self.start_resources, "end": self.end_resources},
            "failures": [{"message": m, "times": n} for m, n in self.failures.items()],
            "events": self.events,
            "log_dir": str(self.logs),
        }

    # -- looking at the system --

    def client(self):
        import httpx
        import openai

        return openai.OpenAI(
            base_url=f"{self.url}/v1",
            api_key=self.key,
            max_retries=0,  # the soak retries itself, and counts it
            timeout=httpx.Timeout(READ_TIMEOUT_S, connect=30.0),
        )

    def router_states(self) -> dict[str, str]:
        import httpx

        try:
            r = httpx.get(
                f"{self.url}/v1/models",
                headers={"Authorization": f"Bearer {self.key}"},
                timeout=60,
                trust_env=False,
            )
            return {m["id"]: m["state"] for m in r.json()["data"]}
        except (httpx.HTTPError, ValueError, KeyError):
            return {}

    def books(self) -> dict | None:
        from vllm_mux.daemon.client import Client, DaemonError

        try:
            client = Client(self.socket, timeout=60)
        except DaemonError:
            return None
        try:
            return client.status()
        except DaemonError:
            return None
        finally:
            client.close()

    def servers(self) -> dict[str, tuple[int, int]]:
        """Each model's vLLM server among serve's children: (pid, port)."""
        found = {}
        for child in self.children():
            try:
                argv = child.cmdline()
            except psutil.Error:
                continue
            role = role_of(argv)
            if role in MODELS:
                ports = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--port"]
                found[role] = (child.pid, int(ports[-1]))  # serve puts its own last
        return found

    def daemon_process(self) -> "psutil.Process | None":
        for child in self.children():
            try:
                if role_of(child.cmdline()) == "daemon":
                    return child
            except psutil.Error:
                continue
        return None

    def children(self) -> list:
        try:
            return [p for p in psutil.Process(self.proc.pid).children() if alive(p)]
        except psutil.Error:
            return []

    def sample_tree(self) -> None:
        try:
            procs = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(True)]
        except psutil.Error:
            return
        for p in procs:
            if p.pid not in self.seen or self.seen[p.pid][0] != _created(p):
                try:
                    self.seen[p.pid] = (p.create_time(), " ".join(p.cmdline())[:120])
                except psutil.Error:
                    pass


# -- small pieces --


def ask(client, model: str, prompt: str, stream: bool) -> str:
    """A greedy chat answer, streamed or not."""
    kwargs = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
    }
    if not stream:
        return client.chat.completions.create(**kwargs).choices[0].message.content or ""
    with client.chat.completions.create(**kwargs, stream=True) as chunks:
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def retry_after(headers) -> float | None:
    """Seconds a 503 asks to wait (capped), or None if it does not say."""
    try:
        return min(float(headers.get("retry-after", "")), MAX_RETRY_WAIT_S)
    except ValueError:
        return None


def code_of(body) -> str:
    """The OpenAI error's code ('model_unavailable', ...), if the body has one."""
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict):
            return str(error.get("code") or error.get("type") or "")
    return ""


def describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e)[:300]}"


def instance_of(books: dict, model: str) -> dict | None:
    """The model's live, connected instance on the books (a killed one may
    linger there, disconnected, until its process is gone)."""
    live = [
        i
        for i in books["instances"]
        if i["model"] == model and i["state"] != "disconnected" and psutil.pid_exists(i["pid"])
    ]
    return live[-1] if live else None


def books_problems(status: dict) -> list[str]:
    """The one invariant (conftest's assert_books_balance), as messages."""
    problems = []
    held = sum(i["chunks"] for i in status["instances"])
    if not status["balanced"]:
        problems.append("the pool does not balance (a chunk free and held, or a count off)")
    if status["leased_chunks"] != held:
        problems.append(f"{status['leased_chunks']} chunks leased, instances hold {held}")
    if status["leased_chunks"] + status["free_chunks"] != status["total_chunks"]:
        problems.append(
            f"leased {status['leased_chunks']} + free {status['free_chunks']} != "
            f"total {status['total_chunks']}"
        )
    for i in status["instances"]:
        if i["state"] == "asleep" and i["chunks"]:
            problems.append(f"{i['model']} (pid {i['pid']}) is asleep holding {i['chunks']}")
    return problems


def role_of(argv: list[str]) -> str:
    """What one of serve's children is: 'daemon', a model's name, or its program."""
    if "vllm_mux.cli" in argv and "daemon" in argv:
        return "daemon"
    if "--served-model-name" in argv[:-1]:
        return argv[argv.index("--served-model-name") + 1]
    return os.path.basename(argv[0]) if argv else "?"


def tree(pid: int) -> list[int]:
    try:
        root = psutil.Process(pid)
        return [pid, *(p.pid for p in root.children(recursive=True))]
    except psutil.Error:
        return []


def alive(p) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _created(p) -> float:
    try:
        return p.create_time()
    except psutil.Error:
        return -1.0


def same_process_alive(pid: int, created: float) -> bool:
    """True if ``pid`` is still the process first seen (not a reused pid)."""
    try:
        p = psutil.Process(pid)
        return p.create_time() == created and alive(p)
    except psutil.Error:
        return False


def process_counts(p) -> dict | None:
    try:
        return {"pid": p.pid, "fds": p.num_fds(), "threads": p.num_threads()}
    except psutil.Error:
        return None


def print_table(s: dict) -> None:
    r = s["requests"]
    rows = [
        ("minutes of faults", s["minutes"]),
        ("seed", s["seed"]),
        ("models / pool", f"{len(s['models'])} on {s['pool']} (two fit at once)"),
        ("requests sent", r["sent"]),
        ("  served (= solo answer)", r["served"]),
        ("  streamed", r["streamed"]),
        ("  retried after 503", r["retried"]),
        ("  lost", r["lost"]),
    ]
    rows += [(f"fault: {k}", n) for k, n in s["faults"].items()]
    rows += [(f"fault: {k}", "not injected") for k in s["not_injected"]]
    rows += [("books checked", s["checks"]["books"])]
    rows += [("final answers checked", s["checks"]["final answers"])]
    rows += [("failures", sum(f["times"] for f in s["failures"]))]
    rows += [("result", "PASS" if s["ok"] else "FAIL")]
    width = max(len(k) for k, _ in rows)
    print()
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    for k, why in s["not_injected"].items():
        print(f"  ({k}: {why})")
    for f in s["failures"][:20]:
        print(f"  FAIL x{f['times']}: {f['message']}")
    print(f"logs: {s['log_dir']}")


def main(argv: list[str] | None = None) -> int:
    """``python -m vllm_mux.bench.soak``: the same as ``vllm-mux bench soak``."""
    parser = argparse.ArgumentParser(prog="vllm-mux bench soak", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
