"""The ``vllm-mux`` command: daemon, serve, status (ps), sleep, wake, pin, unpin, model, bench.

Every mistake a user can make on it is answered in one line that says what
to do, never a traceback nor argparse's usage dump. Exit codes: 0 done; 1 it
could not be done (no daemon answers, the daemon refused a control, a server
or the daemon serve started failed); 2 the command, an argument or the config
is wrong, and nothing was started; 130 interrupted (Ctrl-C)."""

import argparse
import json
import logging
import math
import os
import re
import signal
import sys
import threading
import time
from decimal import Decimal

from vllm_mux.bench import gpu, pages, simulate, soak, tiers, trace
from vllm_mux.daemon import default_socket
from vllm_mux.daemon import policy as policies
from vllm_mux.memory import default_chunk_size

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
# The largest size taken: beyond any device's or host's memory, far below
# where arithmetic on it could overflow. A bigger one is a typo.
MAX_SIZE = 1 << 50  # 1 PiB


class _Parser(argparse.ArgumentParser):
    """argparse's, but a mistake is one line, with where to read more."""

    def error(self, message):
        self.exit(2, f"{self.prog}: {message} (see `{self.prog} --help`)\n")


class TooBig(argparse.ArgumentTypeError):
    """A size beyond MAX_SIZE."""


def parse_size(text: str) -> int:
    """'8GiB', '512M', '1.5g' or a plain number of bytes (binary units), up
    to MAX_SIZE."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r:.80} (try 8GiB or 512MiB)")
    n = Decimal(m[1]) * _UNITS[m[2]]
    if n > MAX_SIZE:
        shown = text.strip() if len(text.strip()) <= 40 else f"{text.strip()[:40]}..."
        raise TooBig(
            f"{shown} is more than 1 PiB, more memory than any machine has: check the number "
            "and its unit (8GiB, 512MiB)"
        )
    return int(n)


def _seconds(text: str) -> float:
    """A positive, finite number of seconds."""
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds < math.inf:
        raise argparse.ArgumentTypeError(f"not a number of seconds above 0: {text!r:.80}")
    return seconds


def _daemon(args) -> int:
    from vllm_mux.config import problem
    from vllm_mux.daemon.server import Daemon
    from vllm_mux.memory import backend

    logging.basicConfig(level=logging.INFO, format="%(asctime)s vllm-mux daemon: %(message)s")
    if reason := problem("device", args.device):
        print(f"vllm-mux daemon: {reason}", file=sys.stderr)
        return 2
    try:
        device = backend(args.device)
        args.chunk_size = args.chunk_size or default_chunk_size(args.device)
        daemon = Daemon(
            device,
            args.device,
            args.device_memory,
            args.chunk_size,
            args.socket,
            wait_timeout=args.wait_timeout,
            host_memory=args.host_memory,
            policy=args.policy,
        )
        daemon.listen()
    except (ValueError, ImportError, RuntimeError, OSError) as e:  # OSError: making the pool
        print(f"vllm-mux daemon: {e}", file=sys.stderr)
        return 2

    def stop(signum, frame):
        daemon.shutdown()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    logging.info(
        "pool of %d chunks of %d MiB on %s, listening at %s, books at %s",
        daemon.pool.total,
        args.chunk_size >> 20,
        args.device,
        args.socket,
        daemon.books_path,
    )
    logging.info(
        "host memory for copies of weights: %s (--host-memory); chunks in %s",
        _gib(daemon.host.budget),
        getattr(device, "pages_description", "device memory"),
    )
    serving = threading.Thread(target=daemon.serve_forever)
    serving.start()
    while serving.is_alive():
        serving.join(0.5)  # the main thread stays free for signals
    return 0


def _ask(socket_path: str, ask, timeout: float | None = 30.0):
    """``ask(client)`` on a connection to the daemon; None, said in one line,
    if the daemon is not there or refuses."""
    from vllm_mux.daemon.client import Client, DaemonError, Unreachable

    try:
        client = Client(socket_path, timeout)
        try:
            return ask(client)
        finally:
            client.close()
    except Unreachable as e:
        print(
            f"vllm-mux: no daemon answers at {socket_path} ({e.reason}): start one with "
            "`vllm-mux serve CONFIG` or `vllm-mux daemon --device-memory SIZE`, or pass "
            "--socket PATH where one listens",
            file=sys.stderr,
        )
    except DaemonError as e:
        print(f"vllm-mux: {e}", file=sys.stderr)
    return None


def _status(args) -> int:
    status = _ask(args.socket, lambda client: client.status())
    if status is None:
        return 1
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    size = status["chunk_size"]
    total, free = status["total_chunks"], status["free_chunks"]
    print(
        f"device {status['device']}: {_gib(total * size)} in {total} chunks of "
        f"{size / 2**20:g} MiB, {_gib(free * size)} free"
    )
    copies = status.get("host_copies", [])
    print(
        f"host: {_gib(status['host_budget'])} for copies of weights, {_gib(status['host_used'])} "
        f"in {len(copies)} (shared by {sum(len(c['users']) for c in copies)} instances)"
    )
    from vllm_mux.daemon.protocol import shown

    header = ("ID", "PID", "MODEL", "STATE", "CHUNKS", "RESIDENT", "MEMORY", "PRIVATE", "RUN")
    row = "{:>3}  {:>7}  {:<20} {:<12} {:>6} {:>8} {:>10} {:>10} {:>4} {:>4} {:>6}  {:<16} {}"
    print(row.format(*header, "WAIT", "WAKES", "LAST WAKE", "LAST ACTIVE"))
    now = time.time()
    for i in status["instances"]:
        wake = i.get("last_wake") or {}
        last_wake = f"{wake['seconds'] * 1000:.0f} ms" if wake else "-"
        if wake.get("tier"):
            last_wake += f" {wake['tier']}"
        state = i["state"] + (" pinned" if i.get("pinned") else "")
        if i["state"] == "asleep" and not i.get("host_copy"):
            state += " cold"  # its weights are in no host copy: a wake reloads them
        print(
            row.format(
                i["id"],
                i["pid"],
                shown(i["model"]),
                state,
                i["chunks"],
                i.get("resident_chunks", 0) if i["state"] == "asleep" else "-",
                _gib(i["bytes"]),
                _gib(i["private_bytes"]) if i.get("private_bytes") else "-",
                i.get("in_flight", 0),
                i.get("waiting", 0),
                i["wakes"],
                last_wake,
                f"{now - i['last_active']:.0f} s ago",
            )
        )
    return 0


def _control(args) -> int:
    """sleep, wake, pin or unpin a model by name: one line of outcome. A
    sleep or a wake has no timeout of our own: the daemon bounds each stretch
    of the wait (see server.py's _lead). A pin or an unpin is one question
    to the model's API server: the daemon answers within a few of its
    ASK_TIMEOUT (a question may wait for those in flight)."""
    from vllm_mux.daemon.client import outcome
    from vllm_mux.daemon.protocol import shown
    from vllm_mux.daemon.server import ASK_TIMEOUT

    name, op = args.name, args.command
    timeout = 3 * ASK_TIMEOUT if op in ("pin", "unpin") else None
    try:
        reply = _ask(args.socket, lambda client: getattr(client, op)(name), timeout=timeout)
    except KeyboardInterrupt:
        print(
            f"vllm-mux: interrupted; the daemon sees the {op} of {shown(name)} through",
            file=sys.stderr,
        )
        return 130
    if reply is None:
        return 1
    print(outcome(op, name, reply))
    return 0


def _socket(args) -> int:
    print(default_socket())
    return 0


def _model_path(args) -> int:
    from vllm_mux.models import model_path

    try:
        print(model_path(args.name))
    except ValueError as e:  # an unknown name: the message lists the known ones
        print(f"vllm-mux: {e}", file=sys.stderr)
        return 2
    return 0


def _serve(args) -> int:
    from vllm_mux.config import ConfigError, Model, load, name_problem
    from vllm_mux.serve import default_config, serve

    try:
        config = load(args.config) if args.config else default_config()
    except ConfigError as e:
        print(f"vllm-mux: invalid config: {e}", file=sys.stderr)
        return 2
    if args.model:
        config.models = []
        for spec in args.model:
            name, sep, source = spec.partition("=")
            if not sep or not name or not source:
                print(f"vllm-mux: --model takes NAME=SOURCE, not {spec!r}", file=sys.stderr)
                return 2
            if reason := name_problem(name):
                print(f"vllm-mux: --model {reason.removeprefix('models[].')}", file=sys.stderr)
                return 2
            config.models.append(Model(name, source))
    keys = ("device", "device_memory", "chunk_size", "host_memory", "host", "port", "api_key")
    for key in (*keys, "max_body", "policy"):
        if getattr(args, key) is not None:
            setattr(config, key, getattr(args, key))
    return serve(config, args.socket, args.log_dir)


def _bench(args) -> int:
    from vllm_mux.bench.switch import switch

    return switch(args)


def _bench_gpu(args) -> int:
    return gpu.run(args)


def _bench_soak(args) -> int:
    return soak.run(args)


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB"


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="vllm-mux", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("daemon", help="own a device's memory and lease it to vLLM instances")
    p.add_argument("--device", default="cpu", help="cpu, cuda[:N] or npu[:N] (default cpu)")
    p.add_argument("--device-memory", type=parse_size, required=True, help="pool size, e.g. 8GiB")
    p.add_argument(
        "--chunk-size", type=parse_size, help="default: 128MiB on cuda and npu, 32MiB on cpu"
    )
    p.add_argument("--socket", default=default_socket(), help="default: $VLLM_MUX_SOCKET")
    p.add_argument(
        "--host-memory",
        type=parse_size,
        help="host memory for the copies of weights sleeping models wake from (one per set of "
        "identical weights); beyond it the least recently used sleeping model goes cold and "
        "reloads from its files (default: half of the host's memory the pool leaves)",
    )
    p.add_argument(
        "--wait-timeout",
        type=_seconds,
        default=120.0,
        help="seconds a lease waits for other instances to sleep before it fails (default 120)",
    )
    p.add_argument(
        "--policy",
        default=policies.DEFAULT,
        choices=policies.POLICIES,
        help="who sleeps for whom and whose wake goes first: batched (a model that woke keeps "
        "the device for its quantum, no request waits past its bound) or switch-per-request "
        f"(the first waiter takes the device at once) (default {policies.DEFAULT})",
    )
    p.set_defaults(run=_daemon)

    p = sub.add_parser("serve", help="the daemon, a vLLM server per model, and one router port")
    p.add_argument("config", nargs="?", help="a YAML file (see vllm_mux/config.py)")
    p.add_argument("--model", action="append", metavar="NAME=SOURCE", help="instead of config")
    p.add_argument("--device")
    p.add_argument("--device-memory")
    p.add_argument("--chunk-size")
    p.add_argument("--host-memory", help="the daemon's --host-memory")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument(
        "--api-key",
        default=os.environ.get("VLLM_MUX_API_KEY"),
        help="default: $VLLM_MUX_API_KEY (a key on the command line shows in ps)",
    )
    p.add_argument(
        "--max-body",
        help="the largest request body the router takes (32MiB: a 25 MB audio file fits)",
    )
    p.add_argument("--policy", choices=policies.POLICIES, help="the daemon's --policy")
    p.add_argument("--socket", default=default_socket())
    p.add_argument("--log-dir", help="where each process logs (default: a temporary folder)")
    p.set_defaults(run=_serve)

    p = sub.add_parser("status", aliases=["ps"], help="the daemon's pool and instances")
    p.add_argument("--socket", default=default_socket())
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_status)

    for op, says in (
        ("sleep", "put a model to sleep (its requests in flight finish first)"),
        ("wake", "wake a model (others sleep if its memory is needed)"),
        ("pin", "keep a model from sleeping: never asked to for another, never when idle"),
        ("unpin", "let a pinned model sleep again"),
    ):
        p = sub.add_parser(op, help=says, description=says)
        p.add_argument("name", help="the model's served name (see `vllm-mux ps`)")
        p.add_argument("--socket", default=default_socket())
        p.set_defaults(run=_control)

    p = sub.add_parser("socket", help="print where the daemon listens by default")
    p.set_defaults(run=_socket)

    p = sub.add_parser("model", help="bundled models")
    msub = p.add_subparsers(dest="model_command", required=True)
    mp = msub.add_parser("path", help="print (and make, once) a bundled model's directory")
    mp.add_argument("name", nargs="?", default="smollm2")
    mp.set_defaults(run=_model_path)

    p = sub.add_parser("bench", help="measurements")
    bsub = p.add_subparsers(dest="bench_command", required=True)
    bp = bsub.add_parser("switch", help="sleep, wake and time-to-first-token of a real instance")
    bp.add_argument("--model", default="smollm2", help="a bundled model name or a directory")
    bp.add_argument("--cycles", type=int, default=10)
    bp.add_argument("--device-memory", default="1GiB", help="the pool (default: one SmolLM2)")
    bp.add_argument("--output", help="also write the results as JSON here")
    bp.set_defaults(run=_bench)
    bp = bsub.add_parser(
        "gpu", help="the GPU proof kit (scripts/gpu_check.sh); --device cpu for CI"
    )
    gpu.add_arguments(bp)
    bp.set_defaults(run=_bench_gpu)
    bp = bsub.add_parser(
        "soak", help="three models through serve under random faults; nothing may be lost"
    )
    soak.add_arguments(bp)
    bp.set_defaults(run=_bench_soak)
    bp = bsub.add_parser(
        "pages", help="a wake on each kind of page the cpu backend can get here (huge or not)"
    )
    pages.add_arguments(bp)
    bp.set_defaults(run=pages.cli)
    bp = bsub.add_parser(
        "tiers", help="warm, partial, host and cold wakes of a real instance against a restart"
    )
    tiers.add_arguments(bp)
    bp.set_defaults(run=tiers.run)
    bp = bsub.add_parser(
        "trace", help="a multi-model trace through serve, once per policy: goodput, TTFT, switches"
    )
    trace.add_arguments(bp)
    bp.set_defaults(run=trace.run)
    bp = bsub.add_parser(
        "simulate",
        help="a fleet of devices shared by many models, simulated on the daemon's policy; "
        "--validate against a bench trace run",
    )
    simulate.add_arguments(bp)
    bp.set_defaults(run=simulate.run)

    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:  # daemon and serve stop on SIGINT by their own handlers
        print("vllm-mux: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
