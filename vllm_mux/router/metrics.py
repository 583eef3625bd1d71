"""The router's Prometheus metrics: what it measures itself, and the daemon's books.

Two kinds of metric, kept apart on purpose:

- what only the router sees (time to first token through the router, requests
  by status, requests held in the router) is recorded as requests pass;
- what the daemon knows (each model's state, wakes, sleeps, memory held) is
  read from the daemon's status at scrape time by a custom collector, so the
  counters are the daemon's own counts, exact, never a copy that drifts.

Wake and sleep durations are histograms the daemon keeps per instance (merged
here per model); the last wake's duration is also a gauge. The cost of a wake
as clients feel it is in the time-to-first-token histogram.

Restarts and the states "restarting" and "failed" are ``vllm-mux serve``'s
own word about the servers it supervises, read from the router's upstreams.

Names follow vLLM's (``vllm:...``) with a ``vllm_mux:`` prefix. Requests that
name no served model are counted under ``model=""``, so that a client cannot
grow the label set without bound.
"""

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

# (name as scraped, type, labels, meaning): the table the README shows.
METRICS = [
    ("vllm_mux:daemon_up", "gauge", "", "1 if the daemon answered (its status is read at most "
     "once a second), else 0"),
    ("vllm_mux:model_state", "gauge", "model, state",
     "1 for the model's current state, 0 for the others (starting, awake, sleeping, asleep, "
     "waking, disconnected, restarting, failed, unknown); \"starting\": not registered with "
     "the daemon yet, \"restarting\": its server exited and serve is starting it again, "
     "\"failed\": it failed to start three times in a row, \"unknown\": the daemon did not "
     "answer"),
    ("vllm_mux:instance_restarts_total", "counter", "model",
     "times serve started the model's server again after it exited"),
    ("vllm_mux:wakes_total", "counter", "model", "wakes, as counted by the daemon"),
    ("vllm_mux:sleeps_total", "counter", "model", "sleeps, as counted by the daemon"),
    ("vllm_mux:last_wake_seconds", "gauge", "model",
     "duration of the last wake as the instance measured it"),
    ("vllm_mux:wake_latency_seconds", "histogram", "model",
     "wakes by duration (lease, map, copy the weights in), as the instances measured them"),
    ("vllm_mux:sleep_latency_seconds", "histogram", "model",
     "sleeps by duration (unmap, hand the memory back), as the instances measured them"),
    ("vllm_mux:instance_bytes", "gauge", "model", "device memory the model's instances hold"),
    ("vllm_mux:pool_bytes_total", "gauge", "", "size of the daemon's pool"),
    ("vllm_mux:pool_bytes_free", "gauge", "", "free memory in the daemon's pool"),
    ("vllm_mux:requests_total", "counter", "model, status",
     "requests answered by the router (every endpoint it forwards), by HTTP status code"),
    ("vllm_mux:request_queue_length", "gauge", "model",
     "requests in the router for that model now (waiting for or streaming from the instance)"),
    ("vllm_mux:time_to_first_token_seconds", "histogram", "model",
     "from the request reaching the router to the first byte of a successful answer's body, "
     "streamed or not, for the endpoints that generate tokens (chat, completions, responses, "
     "messages, batched chat, generate, audio): includes any wake"),
]  # fmt: skip

STATES = (
    "starting", "awake", "sleeping", "asleep", "waking", "disconnected", "restarting", "failed",
    "unknown",
)  # fmt: skip

# vLLM's own buckets for time to first token, so the two histograms compare.
TTFT_BUCKETS = [
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
]  # fmt: skip

_HELP = {name: meaning for name, _, _, meaning in METRICS}


def _help(name: str) -> str:
    return _HELP.get(name) or _HELP[name + "_total"]


def model_states(upstreams: dict, status: dict | None) -> dict[str, str]:
    """Each model's state: serve's if it has one ("restarting", "failed"; see
    ``Upstream``), else the daemon's word for it, "starting" if the daemon
    does not know it yet, "unknown" if the daemon did not answer (``status``
    None). Models the daemon knows beyond ``upstreams`` are included."""
    if status is None:
        states = dict.fromkeys(upstreams, "unknown")
    else:
        states = dict.fromkeys(upstreams, "starting")
        for inst in status["instances"]:
            # A restarted instance may sit beside its disconnected predecessor:
            # the live one speaks for the model.
            if states.get(inst["model"], "disconnected") in ("starting", "disconnected"):
                states[inst["model"]] = inst["state"]
    for model, upstream in upstreams.items():
        if upstream.state is not None:
            states[model] = upstream.state
    return states


class Metrics:
    """One app's metrics, in a registry of its own (never the global one)."""

    def __init__(self, upstreams, read_status: Callable[[], dict | None], queued: dict[str, int]):
        """``upstreams``: each model's ``Upstream``, read at scrape time;
        ``read_status``: the daemon's status as last read (not blocking)."""
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "vllm_mux:requests",
            _help("vllm_mux:requests"),
            ["model", "status"],
            registry=self.registry,
        )
        self.ttft = Histogram(
            "vllm_mux:time_to_first_token_seconds",
            _help("vllm_mux:time_to_first_token_seconds"),
            ["model"],
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_DaemonCollector(upstreams, read_status, queued))

    def count(self, model: str, status: int) -> None:
        self.requests.labels(model, str(status)).inc()

    def first_byte(self, model: str, started: float) -> None:
        """``started`` is the request's ``time.perf_counter()`` on arrival."""
        self.ttft.labels(model).observe(time.perf_counter() - started)


class _DaemonCollector:
    """Reads the daemon's status at scrape time (the router's, at most a second old)."""

    def __init__(self, upstreams: dict, read_status, queued: dict[str, int]):
        self.upstreams, self.read_status, self.queued = upstreams, read_status, queued

    def collect(self) -> Iterator[Metric]:
        name = "vllm_mux:request_queue_length"
        queue = GaugeMetricFamily(name, _help(name), labels=["model"])
        restarts = CounterMetricFamily(
            "vllm_mux:instance_restarts", _help("vllm_mux:instance_restarts"), labels=["model"]
        )
        for model, upstream in self.upstreams.items():
            queue.add_metric([model], self.queued.get(model, 0))
            restarts.add_metric([model], upstream.restarts)
        yield from (queue, restarts)

        status = self.read_status()
        yield GaugeMetricFamily(
            "vllm_mux:daemon_up", _help("vllm_mux:daemon_up"), value=int(status is not None)
        )
        states = model_states(self.upstreams, status)
        state = GaugeMetricFamily(
            "vllm_mux:model_state", _help("vllm_mux:model_state"), labels=["model", "state"]
        )
        for model, current in states.items():
            for s in STATES if current in STATES else (*STATES, current):
                state.add_metric([model, s], int(s == current))
        yield state
        if status is None:
            return

        def family(kind, name):
            return kind(name, _help(name), labels=["model"])

        wakes = family(CounterMetricFamily, "vllm_mux:wakes")
        sleeps = family(CounterMetricFamily, "vllm_mux:sleeps")
        held = family(GaugeMetricFamily, "vllm_mux:instance_bytes")
        last_wake = family(GaugeMetricFamily, "vllm_mux:last_wake_seconds")
        # Sums over a model's instances: an instance that died still holds its
        # memory until its process is gone, and should be seen doing so.
        sums = {m: [0, 0, 0] for m in states}
        wake_seconds = {}
        for inst in status["instances"]:
            s = sums[inst["model"]]
            s[0] += inst["wakes"]
            s[1] += inst["sleeps"]
            s[2] += inst["bytes"]
            if inst["state"] != "disconnected" and inst.get("last_wake"):
                wake_seconds.setdefault(inst["model"], inst["last_wake"]["seconds"])
        for model, (w, s, b) in sums.items():
            wakes.add_metric([model], w)
            sleeps.add_metric([model], s)
            held.add_metric([model], b)
        for model, seconds in wake_seconds.items():
            last_wake.add_metric([model], seconds)
        yield from (wakes, sleeps, held, last_wake)

        for kind in ("wake", "sleep"):
            name = f"vllm_mux:{kind}_latency_seconds"
            histogram = HistogramMetricFamily(name, _help(name), labels=["model"])
            merged = {}
            for inst in status["instances"]:
                h = inst.get(f"{kind}_latency")
                if not h:
                    continue
                m = merged.setdefault(inst["model"], {"le": h["le"], "counts": [0] * len(h["le"])})
                m["counts"] = [a + b for a, b in zip(m["counts"], h["counts"])]
                m["sum"] = m.get("sum", 0.0) + h["sum"]
                m["count"] = m.get("count", 0) + h["count"]
            for model, h in merged.items():
                buckets = [(str(le), c) for le, c in zip(h["le"], h["counts"])]
                histogram.add_metric([model], [*buckets, ("+Inf", h["count"])], h["sum"])
            yield histogram

        size = status["chunk_size"]
        yield GaugeMetricFamily(
            "vllm_mux:pool_bytes_total",
            _help("vllm_mux:pool_bytes_total"),
            value=status["total_chunks"] * size,
        )
        yield GaugeMetricFamily(
            "vllm_mux:pool_bytes_free",
            _help("vllm_mux:pool_bytes_free"),
            value=status["free_chunks"] * size,
        )
