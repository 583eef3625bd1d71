"""A fleet of devices shared by many models, as a discrete-event simulation
driven by the daemon's own policy (vllm_mux/daemon/policy.py).

What it models, as the daemon and the controllers do it:

- each device is a pool of chunks with its lease queue; each model is one
  instance homed on one device (``homes``: the most requested model on device
  0, the next on device 1, and so on, back and forth, so that each device gets
  a similar share of the traffic); no replicas, no migration;
- a request to a model that is not awake waits at its controller; an asleep
  model with waiting requests asks its device for a lease; the policy picks
  the first waiter, which is granted once it fits, and otherwise asks the
  policy whom to ask to sleep, again at every event on the device, at the
  policy's ``retry_at`` and when a waiter passes its wait bound;
- a victim admits nothing more, finishes what it admitted, sleeps for
  ``sleep_s`` and then its chunks are free; a wake copies the weights at the
  host link's speed (plus a fixed cost) and admits every waiting request;
- an awake instance runs up to ``batch`` requests at once, each for
  ``prompt_tokens * prefill_s_per_token + output_tokens * decode_s_per_token``
  seconds, its first token after the prefill and one decode step; the rest
  wait in order.

What it does not model: instances awake on one device do not slow each other
down (each batch runs at the costs given); a wake's copy takes no compute;
nobody sleeps for being idle (``idle_ttl`` outlasts a trace). At the start each
device holds its most requested models awake while they fit, the rest asleep.

``vllm-mux bench simulate`` asks it the operator's question before buying
hardware: M models of a size with a popularity skew and a traffic, on G
devices of a memory size, per policy, against one model per device (vLLM as
shipped). Its costs come from flags, or from what ``bench switch`` or ``bench
trace`` measured. ``--validate`` plays a ``bench trace`` run's own trace
again with the costs that run measured, and says how far the simulated
goodput and p99 TTFT are from the measured ones.
"""

import csv
import heapq
import json
import math
import random
import statistics
import sys
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

from vllm_mux.daemon.policy import DEFAULT, POLICIES, Knobs, View


class Request(NamedTuple):
    time: float  # seconds from the trace's start
    model: str
    prompt_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class Model:
    name: str
    weight_bytes: int  # what a wake copies from the host
    kv_bytes: int = 0  # leased beside the weights, not copied
    knobs: Knobs = field(default_factory=Knobs)
    pinned: bool = False


@dataclass(frozen=True)
class Costs:
    """What switching and serving cost; ``bench switch`` measures them."""

    h2d_gb_s: float = 25.0  # host-to-device copy of the weights, GB/s
    wake_fixed_s: float = 0.05  # a wake's cost beside the copy: maps, the engine's resume
    sleep_s: float = 0.05  # unmap and hand back; no copy (the host copy never goes stale)
    prefill_s_per_token: float = 0.0002
    decode_s_per_token: float = 0.02
    batch: int = 16  # requests an instance runs at once
    request_s: float = 0.0
    """A request's cost beside its tokens (the HTTP round trip, scheduling,
    detokenizing): nothing next to the tokens on a GPU, most of a short
    request's time to first token on a 2-core CPU."""

    def wake_s(self, model: Model) -> float:
        return model.weight_bytes / (self.h2d_gb_s * 1e9) + self.wake_fixed_s


@dataclass(frozen=True)
class Served:
    request: Request
    admitted: float  # when it stopped waiting for its model to be awake
    first_token: float
    done: float

    @property
    def ttft(self) -> float:
        return self.first_token - self.request.time

    @property
    def wait(self) -> float:
        """Seconds it waited for a switch (zero if its model was awake)."""
        return self.admitted - self.request.time


@dataclass(frozen=True)
class Turn:
    """A model's time awake: from the end of its wake (0 for those awake at the
    start) to the start of its sleep (inf if it never slept)."""

    model: str
    device: int
    began: float
    ended: float


@dataclass(frozen=True)
class Result:
    served: tuple[Served, ...]  # in the trace's order
    turns: tuple[Turn, ...]  # in the order they began
    switches: int  # wakes, not counting the start
    switching_s: float  # device time spent waking and sleeping, all devices together
    busy_s: float  # device time with a request running, all devices together
    devices: int
    span_s: float  # from the first arrival to the last completion
    decisions: tuple[tuple[float, str, str], ...]
    """What the policy had the devices do, in order: (time, "sleep", model) when
    a model is asked to sleep, (time, "wake", model) when its lease is granted;
    what the daemon would do, for comparing the two drivers."""


@dataclass
class _Instance:
    id: int
    model: Model
    device: int
    need: int  # chunks it holds when awake
    state: str = "asleep"
    chunks: int = 0
    draining: bool = False
    waiting: deque = field(default_factory=deque)  # request indices, in arrival order
    queued: deque = field(default_factory=deque)  # admitted, not started
    running: int = 0
    turn_began: float = 0.0
    last_active: float = 0.0
    turn: int | None = None  # its entry in the turns while awake
    asked: float | None = None  # when it asked for the lease it waits for

    @property
    def in_flight(self) -> int:
        return self.running + len(self.queued)


@dataclass
class _Device:
    free: int
    instances: list[_Instance] = field(default_factory=list)
    waiters: list[int] = field(default_factory=list)  # instance ids, in the order they asked
    retries: set[float] = field(default_factory=set)
    running: int = 0  # requests running on it, whichever model they are for
    busy_since: float = 0.0


def homes(models: Sequence[Model], trace: Sequence[Request], devices: int) -> dict[str, int]:
    """Each model's device: by number of requests, most first, dealt back and forth
    (0, 1, ..., G-1, G-1, ..., 0, 0, ...) so that each device gets a similar share."""
    counts = Counter(r.model for r in trace)
    ranked = sorted(models, key=lambda m: -counts[m.name])  # stable: ties keep the given order
    out = {}
    for k, m in enumerate(ranked):
        lap, pos = divmod(k, devices)
        out[m.name] = pos if lap % 2 == 0 else devices - 1 - pos
    return out


def simulate(
    trace: Iterable[Request],
    models: Sequence[Model],
    costs: Costs,
    *,
    devices: int = 1,
    pool_bytes: int,
    chunk_bytes: int = 128 << 20,
    policy: str = DEFAULT,
) -> Result:
    """Serve ``trace`` on ``devices`` devices of ``pool_bytes`` each under ``policy``."""
    return _Simulation(sorted(trace, key=lambda r: r.time), models, costs, devices, pool_bytes,
                       chunk_bytes, POLICIES[policy]).run()  # fmt: skip


def one_model_per_device(trace: Iterable[Request], models: Sequence[Model], costs: Costs) -> Result:
    """vLLM as shipped: each model awake on a device of its own, never switching."""
    pool = max(m.weight_bytes + m.kv_bytes for m in models)
    return simulate(trace, models, costs, devices=len(models), pool_bytes=pool, chunk_bytes=1)


class _Simulation:
    def __init__(self, trace, models, costs, devices, pool_bytes, chunk_bytes, policy):
        self.trace, self.costs, self.policy = trace, costs, policy
        self.devices = [_Device(pool_bytes // chunk_bytes) for _ in range(devices)]
        home = homes(models, trace, devices)
        counts = Counter(r.model for r in trace)
        self.turns: list[list] = []  # model, device, began, ended
        self.instances: list[_Instance] = []
        self.by_model: dict[str, _Instance] = {}
        for m in sorted(models, key=lambda m: -counts[m.name]):
            need = math.ceil((m.weight_bytes + m.kv_bytes) / chunk_bytes)
            device = self.devices[home[m.name]]
            if need > pool_bytes // chunk_bytes:
                raise ValueError(f"{m.name} needs {need} chunks; a device's pool has fewer")
            inst = _Instance(len(self.instances), m, home[m.name], need)
            if need <= device.free:  # started awake while it fits
                inst.state, inst.chunks = "awake", need
                device.free -= need
                inst.turn = len(self.turns)
                self.turns.append([m.name, home[m.name], 0.0, math.inf])
            device.instances.append(inst)
            self.instances.append(inst)
            self.by_model[m.name] = inst
        self.events: list = []
        self.seq = 0
        self.admitted = [math.nan] * len(trace)
        self.first_token = [math.nan] * len(trace)
        self.done = [math.nan] * len(trace)
        self.switches = 0
        self.switching_s = 0.0
        self.busy_s = 0.0
        self.decisions: list[tuple[float, str, str]] = []

    def run(self) -> Result:
        for index, request in enumerate(self.trace):
            if request.model not in self.by_model:
                raise ValueError(f"the trace asks for {request.model!r}, which is not a model")
            self._at(request.time, self._arrive, index)
        while self.events:
            now, _, handler, arg = heapq.heappop(self.events)
            handler(now, arg)
        served = tuple(
            Served(r, self.admitted[i], self.first_token[i], self.done[i])
            for i, r in enumerate(self.trace)
        )
        span = max(self.done, default=0.0) - (self.trace[0].time if self.trace else 0.0)
        turns = tuple(Turn(*t) for t in self.turns)
        return Result(served, turns, self.switches, self.switching_s, self.busy_s,
                      len(self.devices), span, tuple(self.decisions))  # fmt: skip

    def _at(self, time: float, handler, arg) -> None:
        self.seq += 1  # ties go in the order they were scheduled
        heapq.heappush(self.events, (time, self.seq, handler, arg))

    # -- requests --

    def _arrive(self, now: float, index: int) -> None:
        inst = self.by_model[self.trace[index].model]
        if inst.state == "awake" and not inst.draining:
            self._admit(inst, index, now)
        else:
            inst.waiting.append(index)
            if inst.state == "asleep" and len(inst.waiting) == 1:  # its first: wake it
                self._ask_lease(inst, now)
        self._arbitrate(inst.device, now)

    def _admit(self, inst: _Instance, index: int, now: float) -> None:
        self.admitted[index] = now
        inst.queued.append(index)
        self._start(inst, now)

    def _start(self, inst: _Instance, now: float) -> None:
        device = self.devices[inst.device]
        while inst.running < self.costs.batch and inst.queued:
            index = inst.queued.popleft()
            request = self.trace[index]
            prefill = self.costs.request_s + request.prompt_tokens * self.costs.prefill_s_per_token
            decode = self.costs.decode_s_per_token
            self.first_token[index] = now + prefill + decode
            inst.running += 1
            if not device.running:
                device.busy_since = now
            device.running += 1
            self._at(now + prefill + request.output_tokens * decode, self._finish, index)

    def _finish(self, now: float, index: int) -> None:
        self.done[index] = now
        inst = self.by_model[self.trace[index].model]
        inst.running -= 1
        inst.last_active = now
        device = self.devices[inst.device]
        device.running -= 1
        if not device.running:
            self.busy_s += now - device.busy_since
        self._start(inst, now)
        if inst.draining and not inst.in_flight:
            self._begin_sleep(inst, now)
        self._arbitrate(inst.device, now)

    # -- sleep and wake --

    def _ask_lease(self, inst: _Instance, now: float) -> None:
        inst.asked = now
        self.devices[inst.device].waiters.append(inst.id)

    def _drain(self, inst: _Instance, now: float) -> None:
        inst.draining = True
        if not inst.in_flight:
            self._begin_sleep(inst, now)

    def _begin_sleep(self, inst: _Instance, now: float) -> None:
        inst.state = "sleeping"
        self.turns[inst.turn][3] = now
        self.switching_s += self.costs.sleep_s
        self._at(now + self.costs.sleep_s, self._slept, inst)

    def _slept(self, now: float, inst: _Instance) -> None:
        inst.state, inst.draining = "asleep", False
        self.devices[inst.device].free += inst.chunks
        inst.chunks = 0
        if inst.waiting:  # requests came while it drained: they wake it again
            self._ask_lease(inst, now)
        self._arbitrate(inst.device, now)

    def _woke(self, now: float, inst: _Instance) -> None:
        inst.state = "awake"
        inst.turn_began = inst.last_active = now
        inst.turn = len(self.turns)
        self.turns.append([inst.model.name, inst.device, now, math.inf])
        while inst.waiting:
            self._admit(inst, inst.waiting.popleft(), now)
        self._arbitrate(inst.device, now)

    def _retry(self, now: float, device: int) -> None:
        self.devices[device].retries.discard(now)
        self._arbitrate(device, now)

    # -- the policy --

    def _view(self, inst: _Instance) -> View:
        # The wait bound runs from the lease's asking, as in the daemon, which
        # knows no request's arrival: one that came while its model drained
        # waited for that drain and sleep first.
        return View(
            inst.id, inst.model.name, inst.state, inst.chunks, inst.model.pinned,
            inst.model.knobs, inst.draining, inst.in_flight, len(inst.waiting), inst.asked,
            inst.turn_began, inst.last_active,
        )  # fmt: skip

    def _arbitrate(self, d: int, now: float) -> None:
        """What the daemon's lease loop does for its first waiter: grant while
        the first fits, else ask the policy whom to put to sleep."""
        device = self.devices[d]
        while device.waiters:
            views = {inst.id: self._view(inst) for inst in device.instances}
            first = self.instances[
                self.policy.next_to_wake([views[i] for i in device.waiters], now)
            ]
            if first.need <= device.free:
                self._grant(first, now)
                continue
            decision = self.policy.victims(
                views[first.id], first.need, device.free, list(views.values()), now
            )
            for i in decision.sleep:
                self.decisions.append((now, "sleep", self.instances[i].model.name))
                self._drain(self.instances[i], now)
            # Held up by protections: a later waiter that fits takes the free chunks.
            fits = [i for i in device.waiters if self.instances[i].need <= device.free]
            if decision.held and fits:
                self._grant(self.instances[fits[0]], now)
                continue
            # Again when a protection lapses, or a waiter passes its bound (and
            # may go first): the daemon, which asks every quarter second, would.
            deadlines = (views[i].deadline for i in device.waiters)
            times = [t for t in (decision.retry_at, *deadlines) if t is not None and t > now]
            retry = min(times, default=None)
            if retry is not None and retry not in device.retries:
                device.retries.add(retry)
                self._at(retry, self._retry, d)
            return

    def _grant(self, inst: _Instance, now: float) -> None:
        device = self.devices[inst.device]
        device.waiters.remove(inst.id)
        inst.asked = None
        device.free -= inst.need
        inst.state, inst.chunks = "waking", inst.need
        self.decisions.append((now, "wake", inst.model.name))
        wake = self.costs.wake_s(inst.model)
        self.switches += 1
        self.switching_s += wake
        self._at(now + wake, self._woke, inst)


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank ``q``-th percentile (0 < q <= 100); nan for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def summary(result: Result, slo_s: float) -> dict:
    """The figures a policy is judged by, for a time-to-first-token SLO of ``slo_s``."""
    ttfts = [s.ttft for s in result.served]
    good = sum(t <= slo_s for t in ttfts)
    span = result.span_s or math.nan
    return {
        "requests": len(ttfts),
        "completed_per_s": len(ttfts) / span,
        "goodput_per_s": good / span,  # requests within the SLO, per second
        "slo_attainment": good / len(ttfts) if ttfts else math.nan,
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p95_s": percentile(ttfts, 95),
        "ttft_p99_s": percentile(ttfts, 99),
        "switches_per_min": result.switches / span * 60,
        "switching_fraction": result.switching_s / (result.devices * span),
        "utilisation": result.busy_s / (result.devices * span),  # time with a request running
    }


# -- workloads --


def synthetic(
    models: Sequence[str],
    *,
    duration_s: float,
    rate_per_s: float,
    zipf_s: float = 1.0,
    cv: float = 1.0,
    prompt_tokens: float = 256,
    output_tokens: float = 64,
    length_sigma: float = 0.5,
    seed: int = 0,
) -> list[Request]:
    """A seeded multi-model workload: ``rate_per_s`` requests a second in all,
    the k-th model getting a share proportional to 1/k**zipf_s; each model's
    arrivals a Gamma renewal process with coefficient of variation ``cv`` (1:
    Poisson; above 1: bursty); prompt and output lengths log-normal around the
    given means."""
    if cv <= 0:
        raise ValueError(f"the coefficient of variation must be positive, not {cv}")
    rng = random.Random(seed)
    weights = [1 / (k + 1) ** zipf_s for k in range(len(models))]
    shape = 1 / cv**2

    def length(mean: float) -> int:
        return max(1, round(rng.lognormvariate(math.log(mean) - length_sigma**2 / 2, length_sigma)))

    trace = []
    for name, weight in zip(models, weights):
        rate = rate_per_s * weight / sum(weights)
        t = rng.gammavariate(shape, 1 / (rate * shape))
        while t < duration_s:
            trace.append(Request(t, name, length(prompt_tokens), length(output_tokens)))
            t += rng.gammavariate(shape, 1 / (rate * shape))
    return sorted(trace, key=lambda r: r.time)


def read_trace(path: str) -> list[Request]:
    """A trace file: CSV with a header naming time (seconds), model,
    prompt_tokens, output_tokens; any other columns are ignored."""
    with open(path, newline="") as f:
        trace = [
            Request(float(row["time"]), row["model"], int(row["prompt_tokens"]),
                    int(row["output_tokens"]))
            for row in csv.DictReader(f)
        ]  # fmt: skip
    return sorted(trace, key=lambda r: r.time)


def write_trace(path: str, trace: Iterable[Request]) -> None:
    """The CSV ``read_trace`` reads back, exactly (floats in full)."""
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(Request._fields)
        out.writerows(trace)


# -- the command: vllm-mux bench simulate --

GB = 10**9
COST_FLAGS = {  # flag: (Costs field, factor from the flag's unit)
    "wake_gbps": ("h2d_gb_s", 1.0),
    "wake_fixed_ms": ("wake_fixed_s", 1e-3),
    "sleep_ms": ("sleep_s", 1e-3),
    "request_ms": ("request_s", 1e-3),
    "prefill_ms_per_token": ("prefill_s_per_token", 1e-3),
    "decode_ms_per_token": ("decode_s_per_token", 1e-3),
    "batch": ("batch", 1),
}


def add_arguments(p) -> None:
    p.add_argument(
        "--policies",
        default=",".join(POLICIES),
        help=f"comma-separated, among {', '.join(POLICIES)} (default: all)",
    )
    p.add_argument("--slo", type=float, default=2.0, help="TTFT within which a request is good")
    p.add_argument("--output", help="also write the figures as JSON here")
    p.add_argument(
        "--validate",
        metavar="FILE",
        help="simulate the trace of a `bench trace --output` FILE with the costs it measured "
        "(flags override them) and compare with what it measured",
    )
    w = p.add_argument_group("the fleet and its traffic (synthetic unless --trace)")
    w.add_argument("--models", type=int, default=100, help="M models (default 100)")
    w.add_argument("--model-gb", type=float, default=16.0, help="each model's weights (16)")
    w.add_argument("--kv-gb", type=float, default=4.0, help="each model's KV cache (4)")
    w.add_argument("--zipf", type=float, default=1.0, help="popularity: k-th model ~ 1/k**s (1)")
    w.add_argument("--rate", type=float, default=20.0, help="requests/s, all models (20)")
    w.add_argument("--cv", type=float, default=1.0, help="arrivals' burstiness: 1 Poisson (1)")
    w.add_argument("--prompt-tokens", type=float, default=256, help="mean (256)")
    w.add_argument("--output-tokens", type=float, default=64, help="mean (64)")
    w.add_argument("--duration", type=float, default=600.0, help="seconds of traffic (600)")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--trace", help="replay this CSV (time, model, prompt_tokens, output_tokens)")
    w.add_argument("--devices", type=int, default=16, help="G devices (default 16)")
    w.add_argument("--device-gb", type=float, default=80.0, help="each device's pool (80)")
    k = p.add_argument_group("every model's knobs (default: the policy's)")
    for knob in ("quantum_s", "linger_s", "max_wait_s"):
        k.add_argument(f"--{knob.replace('_', '-')}", type=float)
    c = p.add_argument_group(
        "costs (default: a GPU-like device, below; --costs FILE: a `bench switch` or "
        "`bench trace` --output; flags override either)"
    )
    c.add_argument("--costs", metavar="FILE")
    d = Costs()
    c.add_argument("--wake-gbps", type=float, help=f"weights copied per second ({d.h2d_gb_s})")
    c.add_argument(
        "--wake-fixed-ms", type=float, help=f"a wake beside its copy ({d.wake_fixed_s * 1e3:g})"
    )
    c.add_argument("--sleep-ms", type=float, help=f"a sleep ({d.sleep_s * 1e3:g})")
    c.add_argument(
        "--request-ms", type=float, help=f"a request beside its tokens ({d.request_s * 1e3:g})"
    )
    c.add_argument("--prefill-ms-per-token", type=float, help=f"({d.prefill_s_per_token * 1e3:g})")
    c.add_argument("--decode-ms-per-token", type=float, help=f"({d.decode_s_per_token * 1e3:g})")
    c.add_argument("--batch", type=int, help=f"requests a model runs at once ({d.batch})")


def run(args) -> int:
    try:
        return validate(args) if args.validate else fleet(args)
    except (ValueError, OSError) as e:  # the user's: a flag, a file, a model that does not fit
        print(f"vllm-mux bench simulate: {e}", file=sys.stderr)
        return 2


def fleet(args) -> int:
    """The operator's question: M models on G devices, per policy, and what
    one model per device needs for the same SLO attainment."""
    policies = _policies(args.policies)
    numbers = ("model_gb", "rate", "cv", "prompt_tokens", "output_tokens", "duration", "slo")
    for name in numbers:
        if not getattr(args, name) > 0:
            raise ValueError(
                f"--{name.replace('_', '-')} must be above 0, not {getattr(args, name)}"
            )
    if args.models < 1 or args.devices < 1 or args.kv_gb < 0:
        raise ValueError("--models and --devices must be 1 or more, --kv-gb 0 or more")
    if args.model_gb + args.kv_gb > args.device_gb:
        raise ValueError(f"a model ({args.model_gb:g} GB + {args.kv_gb:g} GB of KV cache) does "
                         f"not fit a device of {args.device_gb:g} GB")  # fmt: skip
    costs = _costs(args, _costs_file(args.costs) if args.costs else Costs())
    if args.trace:
        trace = read_trace(args.trace)
        names = sorted({r.model for r in trace})
    else:
        names = [f"m{k}" for k in range(args.models)]
        trace = synthetic(
            names, duration_s=args.duration, rate_per_s=args.rate, zipf_s=args.zipf, cv=args.cv,
            prompt_tokens=args.prompt_tokens, output_tokens=args.output_tokens, seed=args.seed,
        )  # fmt: skip
    knobs = _knobs(args, {})
    models = [Model(n, round(args.model_gb * GB), round(args.kv_gb * GB), knobs) for n in names]
    rows = {}
    for policy in policies:
        result = simulate(trace, models, costs, devices=args.devices,
                          pool_bytes=round(args.device_gb * GB), policy=policy)  # fmt: skip
        rows[policy] = summary(result, args.slo) | {"devices": args.devices}
    alone = summary(one_model_per_device(trace, models, costs), args.slo)
    rows["one model per device"] = alone | {"devices": len(models)}
    print(f"{len(trace)} requests for {len(models)} models of {args.model_gb:g} GB "
          f"(+{args.kv_gb:g} GB KV), {args.devices} devices of {args.device_gb:g} GB, "
          f"TTFT SLO {args.slo:g} s; costs {costs}")  # fmt: skip
    _print_fleet(rows)
    best = max(rows[p]["slo_attainment"] for p in policies)
    print(
        f"one model per device (vLLM as shipped) needs {len(models)} devices, one per model "
        f"whatever its traffic, not {args.devices}; there its SLO attainment is "
        f"{alone['slo_attainment']:.1%} against {best:.1%} here"
        + ("" if alone["slo_attainment"] >= best else " (more would take replicas, not modelled)")
    )
    if args.output:
        Path(args.output).write_text(json.dumps({"costs": asdict(costs), "rows": rows}, indent=1))
    return 0


def validate(args) -> int:
    """The live trace again, simulated with the costs measured in its run."""
    data = _read_json(args.validate)
    try:
        trace = [Request(*r) for r in data["trace"]]
        runs, names, slo = data["runs"], data["models"], data["slo_s"]
        pool = next(iter(runs.values()))["pool"]
        knobs = _knobs(args, data["knobs"])
        costs = _costs(args, _measured(data))
    except (KeyError, TypeError, StopIteration) as e:
        raise ValueError(f"{args.validate} is not a `bench trace --output` file ({e!r})") from None
    chunk = pool["chunk_bytes"]
    models = [Model(n, pool["model_chunks"] * chunk, knobs=knobs) for n in names]
    print(f"{args.validate}: {len(trace)} requests, {len(names)} models; costs {costs}")
    rows = {}
    for policy, measured in runs.items():
        result = simulate(trace, models, costs, pool_bytes=pool["total_chunks"] * chunk,
                          chunk_bytes=chunk, policy=policy)  # fmt: skip
        simulated = summary(result, slo)
        rows[policy] = {
            key: {"measured": measured["figures"][key], "simulated": simulated[key],
                  "error": _error(simulated[key], measured["figures"][key])}
            for key in ("goodput_per_s", "ttft_p99_s", "completed_per_s", "switches_per_min")
        }  # fmt: skip
    _print_validation(rows)
    worst = max(abs(r[k]["error"]) for r in rows.values() for k in ("goodput_per_s", "ttft_p99_s"))
    print(f"largest error of goodput and p99 TTFT: {worst:.1%} (the target: within 20%)")
    if args.output:
        Path(args.output).write_text(json.dumps({"costs": asdict(costs), "rows": rows}, indent=1))
    return 0


def _error(simulated: float, measured: float) -> float:
    """Relative error; nan when the measured figure is 0 or not finite."""
    if not measured or not math.isfinite(measured):
        return math.nan
    return (simulated - measured) / measured


def _policies(text: str) -> list[str]:
    policies = [s.strip() for s in text.split(",") if s.strip()]
    if not policies or any(p not in POLICIES for p in policies):
        raise ValueError(f"--policies takes names among {', '.join(POLICIES)}, not {text!r}")
    return policies


def _knobs(args, base: dict) -> Knobs:
    given = {k: getattr(args, k) for k in ("quantum_s", "linger_s", "max_wait_s")}
    return Knobs(**base | {k: v for k, v in given.items() if v is not None})


def _costs(args, base: Costs) -> Costs:
    given = {field: getattr(args, flag) * factor for flag, (field, factor) in COST_FLAGS.items()
             if getattr(args, flag) is not None}  # fmt: skip
    costs = replace(base, **given)
    positive = ("h2d_gb_s", "decode_s_per_token", "batch")
    some = ("wake_fixed_s", "sleep_s", "request_s", "prefill_s_per_token")
    if any(not getattr(costs, f) > 0 for f in positive) or any(getattr(costs, f) < 0 for f in some):
        raise ValueError(f"costs must be positive (wake GB/s, decode, batch) or 0 or more: {costs}")
    return costs


def _read_json(path: str) -> dict:
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not an object")
    return data


def _costs_file(path: str) -> Costs:
    """Costs from a ``bench switch --output`` or ``bench trace --output`` file."""
    data = _read_json(path)
    try:
        return _measured(data) if "runs" in data else _switch_costs(data)
    except (KeyError, TypeError, ZeroDivisionError) as e:
        raise ValueError(f"{path}: no {e} among its costs") from None


def _switch_costs(s: dict) -> Costs:
    """From ``bench switch``: the wake's copy at the speed the instance measured
    (lease, map and copy), the engine's resume beside it, a sleep through HTTP,
    decode from tokens/s; its prompt is a few tokens, so the rest of the awake
    time to first token is the request's own cost."""
    decode = 1 / s["tokens_per_s_mux"]
    return Costs(
        h2d_gb_s=s["wake_gbps"],
        wake_fixed_s=max(0.0, s["wake_ms_http"] - s["wake_ms_instance"]) / 1e3,
        sleep_s=s["sleep_ms_http"] / 1e3,
        prefill_s_per_token=0.0,
        decode_s_per_token=decode,
        request_s=max(0.0, s["ttft_awake_ms"] / 1e3 - decode),
    )


def _measured(data: dict) -> Costs:
    """From ``bench trace``: the medians of its runs' calibrations. A switch as
    its requests saw it (time to first token of a request to a sleeping model,
    the awake one idle, less that of an awake one) is a sleep and a wake: the
    wake is the rest, whatever it copied, so the copy is not scaled by size."""
    calibrations = [r["costs"] for r in data["runs"].values()]

    def median(key):
        values = [c[key] for c in calibrations if c.get(key) is not None]
        if not values:
            raise KeyError(key)
        return statistics.median(values)

    sleep = median("sleep_s")
    return Costs(
        h2d_gb_s=math.inf,
        wake_fixed_s=max(0.0, median("switch_s") - sleep),
        sleep_s=sleep,
        prefill_s_per_token=median("prefill_s_per_token"),
        decode_s_per_token=median("decode_s_per_token"),
        batch=round(median("batch")),
        request_s=median("request_s"),
    )


def _print_fleet(rows: dict) -> None:
    columns = [("devices", "{:d}"), ("slo_attainment", "{:.1%}"), ("goodput_per_s", "{:.2f}"),
               ("utilisation", "{:.1%}"), ("switches_per_min", "{:.1f}"),
               ("switching_fraction", "{:.1%}"), ("ttft_p99_s", "{:.3f}")]  # fmt: skip
    width = max(len(k) for k in rows)
    print(f"{'':<{width}}  " + "  ".join(f"{c:>18}" for c, _ in columns))
    for name, row in rows.items():
        print(f"{name:<{width}}  " + "  ".join(f"{f.format(row[c]):>18}" for c, f in columns))


def _print_validation(rows: dict) -> None:
    print(f"{'':<20}  {'figure':<18}  {'measured':>10}  {'simulated':>10}  {'error':>8}")
    for policy, figures in rows.items():
        for key, v in figures.items():
            print(f"{policy:<20}  {key:<18}  {v['measured']:>10.3f}  {v['simulated']:>10.3f}  "
                  f"{v['error']:>8.1%}")  # fmt: skip
