"""``vllm-mux bench trace``: one multi-model trace through ``vllm-mux serve``, once per policy.

The question is what the switch policy buys when models take turns on a pool
that holds one of them. So the same trace is played, open loop, against one
``vllm-mux serve --policy NAME`` per policy named in ``--policies``, one after
the other in the same run: the bundled model under several names on a pool
that holds one (``POOL``), each request sent at its time in the trace whether
or not the ones before it are done, through the official ``openai`` client,
streamed so that its first token is timed. The trace is seeded and synthetic
(``simulate.synthetic``: Zipf popularity, Gamma arrivals whose coefficient of
variation is the burstiness) or a CSV file (``simulate.read_trace``).

Before the trace, each serve is warmed up and measured alone: two rounds of
one request per model, least requested first (the second round's are
switches: each finds its model asleep and the one before idle), so that the
most requested model is the one awake when the trace starts, as in the
simulator; then requests of two prompt sizes to the awake model. These give
the costs ``bench simulate --validate`` simulates the same trace with.

Per policy it reports completed requests/s and goodput (requests whose TTFT is
within ``--slo``), both over the time from the first arrival to the last
completion as the simulator counts them; TTFT percentiles (a request that
failed counts as never answered); switches per minute (the daemon's wake
counts, before and after); and the share of the run spent switching, twice:
the daemon's wake and sleep seconds over wall time (a wake's seconds include
its wait for the lease, so under ``batched`` the rest of the holder's quantum
counts too: an upper bound), and switches times the switch cost measured
alone. Then the issue's goal: ``batched``'s goodput at least twice
``switch-per-request``'s at an equal or lower p99 TTFT; said, not asserted.

Loopback only (a free port, a private socket in a 0700 temporary folder, a
random API key); serve's start and every request are bounded, and each serve
is stopped before the next starts.
"""

import asyncio
import json
import math
import os
import platform
import secrets
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from vllm_mux.bench.simulate import Request, percentile, read_trace, synthetic
from vllm_mux.daemon.policy import POLICIES, Knobs

# 32 chunks of 32 MiB: one SmolLM2 in float32 with serve's 256M KV cache on
# cpu (25 chunks), never two.
POOL = "1GiB"
SOURCE = "smollm2"
START_S = 1800  # serve starting every model one after the other on a busy 2-core machine
STOP_S = 180
CALIBRATION_PROMPTS = (16, 256)  # tokens: two sizes give a fixed cost and a per-token one
CALIBRATION_OUTPUT = 16
CALIBRATION_REPEATS = 3
# vLLM's max_num_seqs for an API server on cpu: what one instance runs at once.
BATCH = 128
KNOBS = ("quantum_s", "linger_s", "max_wait_s")


def add_arguments(p) -> None:
    p.add_argument(
        "--policies",
        default="switch-per-request,batched",
        help=f"comma-separated, among {', '.join(POLICIES)} (default: both, in this order)",
    )
    p.add_argument("--models", type=int, default=3, help="models, the bundled one under each name")
    p.add_argument("--duration", type=float, default=180.0, help="seconds of trace (default 180)")
    p.add_argument("--rate", type=float, default=1.0, help="requests/s, all models (default 1)")
    p.add_argument("--zipf", type=float, default=1.0, help="popularity skew (default 1)")
    p.add_argument("--cv", type=float, default=2.0, help="arrivals' burstiness: 1 Poisson (2)")
    p.add_argument("--prompt-tokens", type=float, default=32, help="mean (default 32)")
    p.add_argument("--output-tokens", type=float, default=8, help="mean (default 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trace", help="replay this CSV (time, model, prompt_tokens, output_tokens)")
    p.add_argument("--slo", type=float, default=2.0, help="TTFT within which a request is good")
    p.add_argument(
        "--grace", type=float, default=120.0, help="seconds after the last arrival to finish"
    )
    for knob in KNOBS:
        p.add_argument(
            f"--{knob.replace('_', '-')}",
            type=float,
            help=f"every model's {knob} (default: the policy's, {getattr(Knobs(), knob)})",
        )
    p.add_argument("--output", help="also write the results, trace and every TTFT as JSON here")
    p.add_argument("--log-dir", help="serve's logs (default: a new temporary folder, kept)")


def run(args) -> int:
    policies = [s.strip() for s in args.policies.split(",") if s.strip()]
    problem = arguments_problem(args, policies)
    if problem:
        print(f"vllm-mux bench trace: {problem}", file=sys.stderr)
        return 2
    try:
        models, trace = workload(args)
    except (ValueError, KeyError) as e:  # a CSV without a column, or a field that is no number
        print(f"vllm-mux bench trace: --trace {args.trace}: {e!r}", file=sys.stderr)
        return 2
    knobs = {k: getattr(args, k) for k in KNOBS if getattr(args, k) is not None}
    logs = Path(args.log_dir or tempfile.mkdtemp(prefix="vllm-mux-trace-logs-"))
    results = {
        "command": shlex.join(["vllm-mux", *sys.argv[1:]]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "source": SOURCE,
        "pool": POOL,
        "models": models,
        "knobs": asdict(Knobs()) | knobs,
        "slo_s": args.slo,
        "workload": {k: getattr(args, k) for k in ("duration", "rate", "zipf", "cv", "seed")}
        | {"prompt_tokens": args.prompt_tokens, "output_tokens": args.output_tokens}
        | {"trace_file": args.trace},
        "trace": [list(r) for r in trace],
        "runs": {},
    }
    print(f"vllm-mux bench trace: {len(trace)} requests for {len(models)} models, logs in {logs}")
    previous = signal.signal(signal.SIGTERM, _interrupted)  # stopped from outside: stop serve
    try:
        for policy in policies:
            (logs / policy).mkdir(parents=True, exist_ok=True)
            results["runs"][policy] = measure(policy, models, knobs, trace, args, logs / policy)
    except (RuntimeError, KeyboardInterrupt) as e:
        print(f"vllm-mux bench trace: stopped: {e or 'interrupted'}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    results["goal"] = goal({p: r["figures"] for p, r in results["runs"].items()})
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=1) + "\n")
    print_table(results)
    return 0 if all(r["figures"]["completed"] for r in results["runs"].values()) else 1


def _interrupted(signum, frame):
    raise KeyboardInterrupt


def arguments_problem(args, policies: list[str]) -> str | None:
    unknown = [p for p in policies if p not in POLICIES]
    if unknown or not policies:
        return f"--policies takes names among {', '.join(POLICIES)}, not {args.policies!r}"
    if args.trace and not os.path.isfile(args.trace):
        return f"--trace {args.trace}: no such file"
    numbers = ("duration", "rate", "cv", "prompt_tokens", "output_tokens", "slo", "grace")
    for name in numbers:
        if not getattr(args, name) > 0:
            return f"--{name.replace('_', '-')} must be above 0, not {getattr(args, name)}"
    if not 1 <= args.models <= 26:
        return f"--models takes 1 to 26, not {args.models}"
    for knob in KNOBS:
        if getattr(args, knob) is not None and getattr(args, knob) < 0:
            return f"--{knob.replace('_', '-')} must be 0 or more"
    return None


def workload(args) -> tuple[list[str], list[Request]]:
    """The models, most requested first as generated, and the trace."""
    if args.trace:
        trace = read_trace(args.trace)
        return sorted({r.model for r in trace}), trace
    models = [f"trace-{chr(ord('a') + k)}" for k in range(args.models)]
    trace = synthetic(
        models, duration_s=args.duration, rate_per_s=args.rate, zipf_s=args.zipf, cv=args.cv,
        prompt_tokens=args.prompt_tokens, output_tokens=args.output_tokens, seed=args.seed,
    )  # fmt: skip
    return models, trace


def prompt(key: str, tokens: int) -> str:
    """About ``tokens`` tokens for SmolLM2's tokenizer (" hello" is one), led
    by ``key`` so that no two prompts share a prefix the cache could serve."""
    return f"{key}:" + " hello" * max(1, tokens - 3)


def by_popularity(models: list[str], trace: list[Request]) -> list[str]:
    """Least requested first: the last one warmed up stays awake."""
    return sorted(models, key=lambda m: sum(r.model == m for r in trace))


def measure(policy, models, knobs, trace, args, logs: Path) -> dict:
    serve = Serve(policy, models, knobs, logs)
    try:
        serve.wait_ready()
        return asyncio.run(serve_trace(serve, models, knobs, trace, args.grace, args.slo))
    finally:
        serve.stop()


async def serve_trace(serve, models, knobs, trace, grace_s: float, slo_s: float) -> dict:
    client = serve.client(grace_s)
    pause = knobs.get("linger_s", Knobs().linger_s) + 0.5
    try:
        costs = await calibrate(client, by_popularity(models, trace), pause)
        before, start = serve.status(), time.monotonic()
        costs["sleep_s"] = _mean(before, "sleep_latency")
        print(f"vllm-mux bench trace: {serve.policy}: calibrated {costs}", flush=True)
        records = await drive(client, trace, grace_s)
        done = sum("error" not in r for r in records)
        print(f"vllm-mux bench trace: {serve.policy}: {done} of {len(records)} served", flush=True)
        after, wall = serve.status(), time.monotonic() - start
    finally:
        await client.close()
    figures = report(trace, records, before, after, wall, slo_s, costs.get("switch_s"))
    awake = max(i["chunks"] for i in before["instances"])
    pool = {"chunk_bytes": before["chunk_size"], "total_chunks": before["total_chunks"]}
    return {
        "figures": figures,
        "costs": costs,
        "pool": pool | {"model_chunks": awake},
        "requests": records,
        "log_dir": str(serve.logs),
    }


# -- the requests --


async def timed(client, model: str, text: str, max_tokens: int) -> dict:
    """One streamed greedy completion of exactly ``max_tokens`` tokens: when its
    first token and its end came (the loop's clock), and the tokens counted."""
    loop = asyncio.get_running_loop()
    first, usage = None, None
    stream = await client.completions.create(
        model=model, prompt=text, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )  # fmt: skip
    async for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].text:
            first = loop.time()
        usage = chunk.usage or usage
    if first is None:
        raise RuntimeError("the stream ended without a token")
    out = {"first": first, "done": loop.time()}
    if usage:
        out |= {"prompt_tokens": usage.prompt_tokens, "output_tokens": usage.completion_tokens}
    return out


async def drive(client, trace: list[Request], grace_s: float) -> list[dict]:
    """Send each request at its time in the trace, none waiting on another;
    what is not done ``grace_s`` after the last arrival is cancelled. One record
    per request, times in seconds from the trace's start."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    records = [{} for _ in trace]

    async def one(index: int, r: Request) -> None:
        await asyncio.sleep(t0 + r.time - loop.time())
        record = records[index]
        record["sent_s"] = loop.time() - t0
        try:
            got = await timed(client, r.model, prompt(str(index), r.prompt_tokens), r.output_tokens)
        except Exception as e:  # any failure is a request not served; say which
            record["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            return
        first, done = got.pop("first") - t0, got.pop("done") - t0
        record.update(first_token_s=first, done_s=done, ttft_s=first - r.time, **got)

    tasks = [asyncio.create_task(one(i, r)) for i, r in enumerate(trace)]
    last = trace[-1].time if trace else 0.0
    _, pending = await asyncio.wait(tasks, timeout=last + grace_s) if tasks else (set(), set())
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    for record, task in zip(records, tasks):
        if task in pending:
            record["error"] = f"not done {grace_s:g} s after the last arrival"
    return records


async def calibrate(client, models: list[str], pause_s: float = 0.0) -> dict:
    """Warm every model up, time switches between idle models, then time the
    last one (it stays awake) alone: the costs the simulator needs. ``models``
    least requested first. Each switch comes ``pause_s`` after the request
    before it ended: past the linger, so that what it times is the switch,
    not a policy's wait."""
    loop = asyncio.get_running_loop()
    short, long = CALIBRATION_PROMPTS
    sent = iter(range(1 << 30))

    async def one(model: str, tokens: int) -> tuple[float, dict]:
        start = loop.time()
        got = await timed(client, model, prompt(f"c{next(sent)}", tokens), CALIBRATION_OUTPUT)
        return got["first"] - start, got

    switches, awake, decode = [], {short: [], long: []}, []
    for warm in (True, False):
        for model in models:
            await asyncio.sleep(pause_s)
            ttft, _ = await one(model, short)
            if not warm and len(models) > 1:
                switches.append(ttft)
    for _ in range(CALIBRATION_REPEATS):
        for tokens in (short, long):
            ttft, got = await one(models[-1], tokens)
            awake[tokens].append(ttft)
            decode.append((got["done"] - got["first"]) / (CALIBRATION_OUTPUT - 1))
    a_short, a_long = statistics.median(awake[short]), statistics.median(awake[long])
    prefill = max(0.0, (a_long - a_short) / (long - short))
    costs = {
        "ttft_awake_s": a_short,
        "prefill_s_per_token": prefill,
        "decode_s_per_token": statistics.median(decode),
        "batch": BATCH,
    }
    costs["request_s"] = max(0.0, a_short - short * prefill - costs["decode_s_per_token"])
    if switches:
        costs["ttft_switch_s"] = statistics.median(switches)
        costs["switch_s"] = costs["ttft_switch_s"] - a_short
    return costs


# -- the figures --


def report(trace, records, before, after, wall_s, slo_s, switch_s=None) -> dict:
    """The figures of one policy's run, from its requests and the daemon's
    status before and after (``wall_s`` apart)."""
    ttfts = [math.inf if "error" in r else r["ttft_s"] for r in records]
    completed = [r for r in records if "error" not in r]
    first = trace[0].time if trace else 0.0
    span = max((r["done_s"] for r in completed), default=first) - first or math.nan
    good = sum(t <= slo_s for t in ttfts)
    wakes, switching = daemon_delta(before, after)
    figures = {
        "requests": len(records),
        "completed": len(completed),
        "completed_per_s": len(completed) / span,
        "goodput_per_s": good / span,
        "slo_attainment": good / len(records) if records else math.nan,
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p95_s": percentile(ttfts, 95),
        "ttft_p99_s": percentile(ttfts, 99),
        "switches": wakes,
        "switches_per_min": wakes / wall_s * 60,
        "switching_fraction": switching / wall_s,
        "span_s": span,
        "wall_s": wall_s,
    }
    if switch_s is not None:
        figures["switching_fraction_alone"] = wakes * switch_s / wall_s
    return figures


def daemon_delta(before: dict, after: dict) -> tuple[int, float]:
    """Wakes, and wake plus sleep seconds, between two daemon statuses (an
    instance that joined in between counts from zero)."""
    prior = {i["id"]: i for i in before["instances"]}
    wakes, seconds = 0, 0.0
    for inst in after["instances"]:
        was = prior.get(inst["id"])
        wakes += inst["wakes"] - (was["wakes"] if was else 0)
        for h in ("wake_latency", "sleep_latency"):
            seconds += inst[h]["sum"] - (was[h]["sum"] if was else 0.0)
    return wakes, seconds


def _mean(status: dict, histogram: str) -> float | None:
    count = sum(i[histogram]["count"] for i in status["instances"])
    return sum(i[histogram]["sum"] for i in status["instances"]) / count if count else None


def goal(figures: dict[str, dict]) -> dict | None:
    """The issue's goal, when both policies ran: batched's goodput at least
    twice switch-per-request's, at an equal or lower p99 TTFT."""
    if not {"batched", "switch-per-request"} <= figures.keys():
        return None
    ours, theirs = figures["batched"], figures["switch-per-request"]
    ratio = ours["goodput_per_s"] / theirs["goodput_per_s"] if theirs["goodput_per_s"] else math.inf
    p99 = ours["ttft_p99_s"] <= theirs["ttft_p99_s"]
    return {"goodput_ratio": ratio, "p99_not_higher": p99, "holds": ratio >= 2 and p99}


def print_table(results: dict) -> None:
    runs = results["runs"]
    rows = [
        ("requests", "requests", "{:d}"),
        ("completed", "completed", "{:d}"),
        ("completed requests/s", "completed_per_s", "{:.3f}"),
        (f"goodput/s (TTFT <= {results['slo_s']:g} s)", "goodput_per_s", "{:.3f}"),
        ("SLO attainment", "slo_attainment", "{:.1%}"),
        ("TTFT p50 s", "ttft_p50_s", "{:.3f}"),
        ("TTFT p95 s", "ttft_p95_s", "{:.3f}"),
        ("TTFT p99 s", "ttft_p99_s", "{:.3f}"),
        ("switches", "switches", "{:d}"),
        ("switches/min", "switches_per_min", "{:.1f}"),
        ("switching, daemon's wake+sleep s", "switching_fraction", "{:.1%}"),
        ("switching, switches x cost alone", "switching_fraction_alone", "{:.1%}"),
    ]
    width = max(len(r[0]) for r in rows)
    print()
    print(f"{'':<{width}}  " + "  ".join(f"{p:>18}" for p in runs))
    for label, key, form in rows:
        cells = [r["figures"].get(key) for r in runs.values()]
        text = ["-" if v is None else form.format(v) for v in cells]
        print(f"{label:<{width}}  " + "  ".join(f"{t:>18}" for t in text))
    g = results["goal"]
    if g:
        says = "holds" if g["holds"] else "does not hold"
        print(f"goal (batched goodput >= 2x switch-per-request's at an equal or lower p99 TTFT): "
              f"{says}: {g['goodput_ratio']:.2f}x, p99 {'not ' if g['p99_not_higher'] else ''}"
              f"higher")  # fmt: skip


# -- serve --


class Serve:
    """One ``vllm-mux serve --policy NAME`` on a free loopback port, with a
    private socket and a random API key, from a config file in a 0700 folder."""

    def __init__(self, policy: str, models: list[str], knobs: dict, logs: Path):
        import yaml

        from vllm_mux.launch import free_port

        self.policy, self.logs = policy, logs
        self.tmp = Path(tempfile.mkdtemp(prefix="vllm-mux-trace-"))
        self.socket = str(self.tmp / "mux.sock")
        self.key = secrets.token_hex(16)
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        config = {"device": "cpu", "device_memory": POOL, "host": "127.0.0.1", "port": port}
        # idle_ttl 0: nobody sleeps for being idle, as in the simulator.
        config["models"] = [{"name": m, "source": SOURCE, "idle_ttl": 0, **knobs} for m in models]
        path = self.tmp / "mux.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        argv = [sys.executable, "-m", "vllm_mux.cli", "serve", str(path), "--policy", policy]
        argv += ["--socket", self.socket, "--log-dir", str(logs)]
        self.log = open(logs / "serve.log", "wb")
        self.proc = subprocess.Popen(
            argv,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "VLLM_MUX_API_KEY": self.key},  # not on the command line
            start_new_session=True,
        )
        print(f"vllm-mux bench trace: {policy}: serve started (pid {self.proc.pid})", flush=True)

    def wait_ready(self) -> None:
        import httpx

        deadline = time.monotonic() + START_S
        headers = {"Authorization": f"Bearer {self.key}"}
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited with {self.proc.returncode}; see {self.logs}")
            try:
                r = httpx.get(f"{self.url}/v1/models", headers=headers, timeout=30)
                states = {m["id"]: m["state"] for m in r.json()["data"]}
                if states and all(s in ("awake", "asleep") for s in states.values()):
                    return
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            time.sleep(2)
        raise RuntimeError(f"serve's models did not all start within {START_S} s")

    def client(self, timeout_s: float):
        import httpx
        import openai

        return openai.AsyncOpenAI(
            base_url=f"{self.url}/v1",
            api_key=self.key,
            max_retries=0,  # a request that fails counts as failed
            timeout=httpx.Timeout(timeout_s, connect=30.0),
        )

    def status(self) -> dict:
        from vllm_mux.daemon.client import Client

        client = Client(self.socket, timeout=60)
        try:
            return client.status()
        finally:
            client.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_S)
            except subprocess.TimeoutExpired:
                print(f"vllm-mux bench trace: serve did not stop in {STOP_S} s; killed")
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        shutil.rmtree(self.tmp, ignore_errors=True)
