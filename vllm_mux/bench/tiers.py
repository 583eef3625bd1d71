"""``vllm-mux bench tiers``: warm, partial, host and cold wakes against a restart, in one run.

One daemon and real vLLM servers (``vllm_mux.launch``), all on the same
model except the one that makes it cold. The subject, ``smol``, is the model
(by default the bundled SmolLM2, float32, eager, the CPU arguments of
``launch.CPU_ARGS``). The pool holds exactly one subject (weights and KV
cache), and the host budget one copy of its weights but not also the
other weights. Before each measured wake the subject is put to sleep
(``POST /sleep`` on its loopback port) and the tier is arranged; then one
streamed request wakes it, and the bench records the request's
time-to-first-token and the wake's own facts, which the instance reports to
the daemon (``status()``'s ``last_wake``: seconds, tier, copied bytes,
chunks kept, reload seconds). Every other instance is put to sleep by hand
before the subject's wake, so no wake waits for arbitration.

The takers of the partial and host arrangements have the subject's weights,
so they share its host copy and need no host memory of their own; the only
other weights, the tiny model's, come last, because each time they need a
copy while the subject sleeps the subject goes cold.

- ``warm``: nobody runs while it sleeps: its chunks come back untouched;
- ``partial``: ``smol-part``, the same model under another name with a
  small KV cache (so it needs fewer chunks than the pool), serves a
  request meanwhile: its lease takes part of the subject's chunks (the
  daemon takes a sleeper's KV-cache chunks, then weights, from the end);
  the rest of the subject's chunks come back, the lost ones are copied
  from the shared host copy;
- ``host``: ``smol-host``, the same model under another name, as large as
  the subject, takes all of its chunks: the wake copies every byte from
  the host copy that the three share (one copy, same bytes);
- ``cold``: ``tiny``, a tiny random model with other weights, is started
  (later, serves a request) while every user of that copy sleeps: its copy
  does not fit beside the subject's, so the daemon drops the subject's, and
  its lease takes some of the subject's chunks; the wake reloads from the
  model's files with vLLM's loader (and takes a copy again, which in turn
  makes ``tiny`` cold for the next round);
- ``awake``: the same request on the subject awake: the baseline;
- ``restart``: the peer, what users do today: stop the subject's server,
  start plain vLLM on the same model (the other servers are stopped first,
  untimed), time until its first token.

Each wake is checked: the tier the instance reports against the one
arranged, and what the daemon's books showed beforehand (the subject's
resident chunks, its host copy). A tier that is not the one arranged is
reported as it is, flagged, and the command exits 1. Results: a markdown
table (printed, and written beside ``--out``) and JSON (``--out``).
"""

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import struct
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from vllm_mux.bench.switch import ttft
from vllm_mux.daemon.client import Client
from vllm_mux.launch import CPU_ARGS, VllmServer, start_daemon

TIERS = ("warm", "partial", "host", "cold")
SUBJECT, PART, HOST, TINY = "smol", "smol-part", "smol-host", "tiny"
DTYPE_BYTES = 4  # CPU_ARGS serve float32
# What the weights arena holds beyond the files' tensors (the rotary cache,
# alignment): 2.1 MB for SmolLM2; a pool sized on it is checked after the load.
ARENA_SLACK = 4 << 20
# The partial taker's --max-model-len, and the tokens its KV cache is sized
# for (vLLM refuses a KV cache smaller than one sequence of max-model-len).
PART_MAX_LEN = 1024
PART_TOKENS = 1100
STATE_WAIT_S = 120  # an instance's state or wake facts, on a busy 2-core machine


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", help="a bundled model name or a directory")
    p.add_argument("--cycles", type=int, default=3, help="wakes measured per tier (default 3)")
    p.add_argument(
        "--device-memory",
        help="the pool; default: exactly one instance of the model (weights and KV cache)",
    )
    p.add_argument(
        "--host-memory",
        help="the daemon's host budget; default: one copy of the model's weights, "
        "with no room for the tiny model's beside it",
    )
    p.add_argument(
        "--out",
        "--output",
        dest="out",
        help="write the results as JSON here, and the table beside it (.md)",
    )
    p.add_argument("--log-dir", help="the servers' and daemon's logs (default: a temporary folder)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="vllm-mux bench tiers", description=__doc__.split("\n")[0]
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


# -- sizes --


def tensor_elements(model_dir) -> tuple[int, int]:
    """Elements and tensors in a model directory's safetensors files (their
    headers only)."""
    numel = count = 0
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        for name, entry in header.items():
            if name != "__metadata__":
                numel += math.prod(entry["shape"])
                count += 1
    if not count:
        raise FileNotFoundError(f"no safetensors weights in {model_dir}")
    return numel, count


def weights_bytes(model_dir) -> int:
    """The bytes of a model's weights when served in float32."""
    return tensor_elements(model_dir)[0] * DTYPE_BYTES


def chunks(nbytes: int, chunk_size: int) -> int:
    return -(-nbytes // chunk_size)


def kv_cache_bytes(args=CPU_ARGS) -> int:
    """``--kv-cache-memory-bytes`` among vLLM arguments, read as vLLM reads it
    (k, m, g: powers of 1000; K, M, G: of 1024)."""
    text = args[list(args).index("--kv-cache-memory-bytes") + 1]
    units = {"k": 10**3, "m": 10**6, "g": 10**9, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if text[-1:] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def kv_bytes_per_token(model_dir) -> int:
    """Bytes of KV cache one token takes in float32, from the model's config."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    kv_heads = config.get("num_key_value_heads") or heads
    return 2 * config["num_hidden_layers"] * kv_heads * head_dim * DTYPE_BYTES


def plan(model_bytes: int, tiny_bytes: int, chunk_size: int, kv_per_token: int) -> dict:
    """The pool, the host budget and the partial taker's KV cache, from the
    sizes: the pool holds one subject (weights and KV cache); the budget
    holds the subject's copy but not the tiny model's beside it; the partial
    taker (the same weights, a KV cache for PART_MAX_LEN tokens) needs fewer
    chunks than the pool, so that its lease takes the subject's KV chunks and
    some, not all, of its weights chunks (a sleeper's chunks go from the end
    of its list: the KV cache's first)."""
    weights = chunks(model_bytes + ARENA_SLACK, chunk_size)
    kv = chunks(kv_cache_bytes(), chunk_size)
    part_kv = chunks(PART_TOKENS * kv_per_token, chunk_size)
    return {
        "chunk_size": chunk_size,
        "subject_chunks": weights + kv,
        "subject_weights_chunks": weights,
        "pool_bytes": (weights + kv) * chunk_size,
        "host_budget": model_bytes + max(ARENA_SLACK, tiny_bytes // 2),
        "part_kv_bytes": part_kv * chunk_size,
        "part_chunks": weights + part_kv,
        "part_expected_kept_weights_chunks": max(0, kv - part_kv),
    }


def make_tiny_model(
    source: str, out: Path, hidden: int = 128, heads: int = 2, layers: int = 2, seed: int = 0
) -> str:
    """A tiny random Llama with ``source``'s tokenizer: other weights, few
    bytes, one loader. head_dim 64: the CPU attention kernels need >= 32."""
    import torch
    from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM

    vocab = AutoConfig.from_pretrained(source).vocab_size
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    LlamaForCausalLM(config).to(torch.float32).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (Path(source) / name).exists():
            shutil.copy(Path(source) / name, out / name)
    return str(out)


# -- the daemon's view --


def daemon_status(sock: str) -> dict:
    """A fresh connection each time: an idle one is closed after the hello timeout."""
    client = Client(sock)
    try:
        return client.status()
    finally:
        client.close()


def instance_status(status: dict, name: str) -> dict:
    (found,) = [i for i in status["instances"] if i["model"] == name]
    return found


def books_balance(status: dict) -> bool:
    """The one invariant, and the host tier's: leased + free = total, a
    sleeper holds nothing, host used + free = budget."""
    held = sum(i["chunks"] for i in status["instances"])
    return bool(
        status["balanced"]
        and status["host_balanced"]
        and status["leased_chunks"] == held
        and status["leased_chunks"] + status["free_chunks"] == status["total_chunks"]
        and all(i["chunks"] == 0 for i in status["instances"] if i["state"] == "asleep")
        and status["host_used"] <= status["host_budget"]
    )


def wait_state(sock: str, name: str, predicate, what: str) -> dict:
    deadline = time.monotonic() + STATE_WAIT_S
    while True:
        me = instance_status(daemon_status(sock), name)
        if predicate(me):
            return me
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name} never got {what}: {json.dumps(me)[:2000]}")
        time.sleep(0.05)


def put_to_sleep(sock: str, server: VllmServer) -> None:
    """``POST /sleep`` on its loopback port, unless it sleeps already."""
    if instance_status(daemon_status(sock), server.name)["state"] != "asleep":
        server.sleep()
    wait_state(sock, server.name, lambda i: i["state"] == "asleep", "asleep")


def measure_wake(sock: str, server: VllmServer, arranged: str) -> dict:
    """One request to a sleeping instance: its TTFT and the wake's facts."""
    before = instance_status(daemon_status(sock), server.name)
    if before["state"] != "asleep":
        raise RuntimeError(f"{server.name} is {before['state']}, not asleep, before its wake")
    first = ttft(server)
    after = wait_state(
        sock,
        server.name,
        lambda i: i["wakes"] > before["wakes"] and i["state"] == "awake",
        "its wake's facts",
    )
    facts = after["last_wake"]
    return {
        "arranged": arranged,
        "tier": facts.get("tier"),
        "as_arranged": facts.get("tier") == arranged,
        "wakes_counted": after["wakes"] - before["wakes"],
        "resident_chunks_before": before["resident_chunks"],
        "host_copy_before": bool(before["host_copy"]),
        "ttft_s": first,
        "wake_s": facts.get("seconds"),
        "map_s": facts.get("map_seconds"),
        "copy_wait_s": facts.get("copy_wait_seconds"),
        "copied_bytes": facts.get("copied_bytes"),
        "chunks_kept": facts.get("chunks_kept"),
        "chunks": facts.get("chunks"),
        "weights_bytes": facts.get("bytes"),
        "kv_intact": facts.get("kv_intact"),
        "reload_s": facts.get("reload_seconds"),
        "same_bytes": facts.get("same_bytes"),
    }


# -- the run --


class Run:
    def __init__(self, args, model: str, work: Path):
        self.args, self.model, self.work = args, model, work
        self.sock = str(work / "mux.sock")
        self.servers: list[VllmServer] = []
        self.wakes: list[dict] = []
        self.books: list[bool] = []
        self.events: list[str] = []

    def server(self, name: str, model: str, extra=(), plain=False) -> VllmServer:
        args = [*CPU_ARGS, *extra] if plain else [*CPU_ARGS, "--enable-sleep-mode", *extra]
        s = VllmServer(
            model,
            self.work / f"{name}{len(self.servers)}.log",
            name=name,
            socket_path=None if plain else self.sock,
            args=args,
        )
        self.servers.append(s)
        return s

    def log(self, text: str) -> None:
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
        self.events.append(f"{time.strftime('%H:%M:%S')} [load {load}] {text}")
        print(f"[tiers] {text} [load {load}]", flush=True)

    def check_books(self) -> None:
        self.books.append(books_balance(daemon_status(self.sock)))

    def wake(self, server: VllmServer, arranged: str) -> dict:
        record = measure_wake(self.sock, server, arranged)
        self.wakes.append(record)
        self.log(
            f"{arranged}: tier {record['tier']}, wake {record['wake_s']:.3f} s, "
            f"TTFT {record['ttft_s'] * 1e3:.0f} ms, copied {record['copied_bytes']} B"
        )
        self.check_books()
        return record

    def other_serves(self, taker: VllmServer) -> None:
        """The subject asleep, ``taker`` serves a request (waking it, which
        takes the subject's chunks), then sleeps."""
        subject = self.subject
        put_to_sleep(self.sock, subject)
        ttft(taker)
        put_to_sleep(self.sock, taker)

    def start(self, server: VllmServer) -> float:
        started = time.perf_counter()
        server.wait_ready(poll=0.1)
        ttft(server, max_tokens=8)  # its first request
        return time.perf_counter() - started

    def go(self, plan_: dict, tiny: str) -> dict:
        cycles = self.args.cycles
        self.subject = subject = self.server(SUBJECT, self.model)
        self.log(f"starting {SUBJECT}")
        starts = {SUBJECT: self.start(subject)}
        status = daemon_status(self.sock)
        me = instance_status(status, SUBJECT)
        pool_for_one = me["chunks"] == status["total_chunks"]
        self.log(f"{SUBJECT} holds {me['chunks']} of {status['total_chunks']} chunks")
        for _ in range(2):
            ttft(subject, max_tokens=8)  # warm up
        awake = [ttft(subject) for _ in range(max(3, cycles))]

        # warm: nobody runs while it sleeps.
        for _ in range(cycles):
            put_to_sleep(self.sock, subject)
            self.wake(subject, "warm")

        # partial: the same model with a small KV cache takes part of its chunks.
        kv = ["--kv-cache-memory-bytes", str(plan_["part_kv_bytes"])]
        kv += ["--max-model-len", str(PART_MAX_LEN)]
        part = self.server(PART, self.model, kv)
        self.log(f"starting {PART}")
        put_to_sleep(self.sock, subject)
        starts[PART] = self.start(part)
        for _ in range(cycles):
            self.other_serves(part)
            self.wake(subject, "partial")

        # host: the same model, as large as the subject, takes all of its chunks.
        host = self.server(HOST, self.model)
        self.log(f"starting {HOST}")
        put_to_sleep(self.sock, subject)
        starts[HOST] = self.start(host)
        for _ in range(cycles):
            self.other_serves(host)
            self.wake(subject, "host")

        # cold: other weights need a host copy while every user of the subject's sleeps.
        for server in (part, host):
            put_to_sleep(self.sock, server)
        small = self.server(TINY, tiny)
        self.log(f"starting {TINY}")
        put_to_sleep(self.sock, subject)
        starts[TINY] = self.start(small)
        for k in range(cycles):
            if k:
                self.other_serves(small)
            else:
                put_to_sleep(self.sock, small)
            self.wake(subject, "cold")
        final = daemon_status(self.sock)

        # restart: what users do today.
        for server in (part, host, small):
            server.stop()
        self.log("restart: stopping the subject, starting plain vLLM")
        started = time.perf_counter()
        subject.stop()
        plain = self.server(SUBJECT, self.model, plain=True)  # the same request
        plain.wait_ready(poll=0.05)
        restart = time.perf_counter() - started + ttft(plain)
        self.log(f"restart: {restart:.1f} s to the first token")
        return {
            "starts_s": starts,
            "awake_ttft_s": awake,
            "restart_ttft_s": restart,
            "pool_for_one": pool_for_one,
            "final_status": final,
        }

    def stop(self) -> None:
        for s in self.servers:
            s.stop()


def summarize(wakes: list[dict], awake: list[float], restart: float) -> dict:
    """Per tier arranged: the tiers reported, and medians of the figures."""
    med = statistics.median
    rows = {}
    for arranged in TIERS:
        mine = [w for w in wakes if w["arranged"] == arranged]
        if not mine:
            continue
        reloads = [w["reload_s"] for w in mine if w["reload_s"] is not None]
        ttft_s = med(w["ttft_s"] for w in mine)
        rows[arranged] = {
            "tiers_reported": dict(Counter(str(w["tier"]) for w in mine)),
            "as_arranged": all(w["as_arranged"] for w in mine),
            "wakes": len(mine),
            "wake_s": med(w["wake_s"] for w in mine),
            "copied_bytes": med(w["copied_bytes"] for w in mine),
            "chunks_kept": med(w["chunks_kept"] for w in mine),
            "chunks": mine[0]["chunks"],
            "reload_s": med(reloads) if reloads else None,
            "ttft_s": ttft_s,
            "restart_vs_ttft": restart / ttft_s,
        }
    awake_s = med(awake)
    rows["awake"] = {"ttft_s": awake_s, "restart_vs_ttft": restart / awake_s}
    rows["restart"] = {"ttft_s": restart, "restart_vs_ttft": 1.0}
    return rows


def table(rows: dict) -> str:
    """The markdown table of ``summarize``'s rows."""
    head = (
        "| wake | tier reported | as arranged | wake s | copied MiB | chunks kept "
        "| reload s | TTFT ms | restart / TTFT |"
    )
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]

    def num(v, fmt):
        return "–" if v is None else format(v, fmt)

    for name in ("awake", *TIERS, "restart"):
        r = rows.get(name)
        if r is None:
            continue
        if name in TIERS:
            reported = ", ".join(f"{t} ×{n}" for t, n in r["tiers_reported"].items())
            cells = [
                name,
                reported,
                "yes" if r["as_arranged"] else "**no**",
                num(r["wake_s"], ".3f"),
                num(r["copied_bytes"] / (1 << 20), ".0f"),
                f"{r['chunks_kept']:g}/{r['chunks']}",
                num(r["reload_s"], ".2f"),
            ]
        else:
            label = "awake (baseline)" if name == "awake" else "restart vLLM (peer)"
            cells = [label, "–", "–", "–", "–", "–", "–"]
        cells += [num(r["ttft_s"] * 1e3, ",.0f"), num(r["restart_vs_ttft"], ",.1f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine() -> dict:
    """This machine, and what else runs on it (another session's vLLM tests)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "machine": f"{cpu}, {os.cpu_count()} cores, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / (1 << 30):.0f} GiB",
        "cpus_usable": len(os.sched_getaffinity(0)),
        "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "vllm_servers_running": vllm_servers(),
        "python": platform.python_version(),
    }


def vllm_servers() -> int:
    """vLLM API servers running on this machine (any user's, any session's)."""
    count = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                count += b"vllm.entrypoints.openai.api_server" in f.read()
        except OSError:
            pass
    return count


def run(args) -> int:
    if args.cycles < 1:
        print("vllm-mux bench tiers: --cycles is at least 1", file=sys.stderr)
        return 2
    model = args.model
    if not os.path.isdir(model):
        from vllm_mux.models import model_path

        model = str(model_path(model))
    from vllm_mux.memory import default_chunk_size

    work = Path(args.log_dir or tempfile.mkdtemp(prefix="vllm-mux-tiers-"))
    work.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    machine_start = machine()
    tiny = make_tiny_model(model, work / "tiny-model")
    chunk_size = default_chunk_size("cpu")
    sizes = plan(weights_bytes(model), weights_bytes(tiny), chunk_size, kv_bytes_per_token(model))
    pool = args.device_memory or str(sizes["pool_bytes"])
    budget = args.host_memory or str(sizes["host_budget"])
    print(f"[tiers] logs in {work}; pool {pool} bytes, host budget {budget} bytes", flush=True)
    bench = Run(args, model, work)
    daemon = start_daemon(bench.sock, pool, work / "daemon.log", args=["--host-memory", budget])
    try:
        got = bench.go(sizes, tiny)
    finally:
        bench.stop()
        daemon.stop()
    machine_end = machine()  # ours are stopped: any vLLM server left is someone else's
    rows = summarize(bench.wakes, got["awake_ttft_s"], got["restart_ttft_s"])
    final = got.pop("final_status")
    ok = all(r.get("as_arranged", True) for r in rows.values()) and all(bench.books)
    results = {
        "ok": ok,
        "model": model,
        "cycles": args.cycles,
        **machine_start,
        "end": {
            k: v for k, v in machine_end.items() if k in ("loadavg_1_5_15", "vllm_servers_running")
        },
        "seconds": time.perf_counter() - began,
        "device": final["device"],
        "plan": sizes,
        "device_memory": int(pool) if pool.isdigit() else pool,
        "host_memory": int(budget) if budget.isdigit() else budget,
        "pool_for_one": got["pool_for_one"],
        "books_balanced": all(bench.books),
        "books_checks": len(bench.books),
        "starts_s": got["starts_s"],
        "awake_ttft_s": got["awake_ttft_s"],
        "restart_ttft_s": got["restart_ttft_s"],
        "rows": rows,
        "wakes": bench.wakes,
        "host_copies_end": final["host_copies"],
        "events": bench.events,
        "logs": str(work),
    }
    text = table(rows)
    print(text)
    if not got["pool_for_one"]:
        print(
            "[tiers] the pool is not exactly one subject: host and partial may not be as arranged"
        )
    for name, r in rows.items():
        if not r.get("as_arranged", True):
            print(f"[tiers] {name}: arranged {name}, reported {r['tiers_reported']}")
    if args.out:
        out = Path(args.out)
        out.write_text(json.dumps(results, indent=2) + "\n")
        out.with_suffix(".md").write_text(text + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
