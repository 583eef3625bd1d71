"""``vllm-mux bench gpu``: the GPU proof kit. No vLLM needed, nothing downloaded.

On one NVIDIA GPU (``scripts/gpu_check.sh`` runs it on a bare machine with
torch and cuda-bindings) it proves, in a few minutes:

1. the cuda backend's tests pass; the real daemon starts with ``--device
   cuda``; two processes exchange chunks (one writes, the other maps the same
   chunks afterwards and reads what was written);
2. a random Llama-style model loads straight into leased memory through the
   same code the vLLM patch uses (``Instance.loading``), with a KV-like
   buffer from the allocation context (``Instance.allocations``) and one
   captured CUDA graph of a decode step; then ``--cycles`` sleep/wake cycles,
   another process overwriting every freed chunk between them, and after
   every wake the weights equal the loaded bytes, every data pointer is the
   same and the graph's greedy tokens are the same;
3. a wake of ``--wake-bytes`` (16.4 GB: Qwen3-8B in bf16) with a KV cache of
   ``--kv-bytes`` through leased chunks against a plain pinned host-to-device
   copy of the same weights, in the same process, for each ``--chunk-sizes``;
   sleep time (weights and KV cache unmapped); map time per GiB;
4. the device memory a sleeping instance and the daemon still hold.

On CPU (``--device cpu``, small sizes, no graph) the same code runs in CI so
the kit never rots. Results: ``results.json`` and ``results.md`` in ``--out``.
Each step runs in its own process, so one step's memory never counts in
another's figures; the phase subcommands are for the kit itself.
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vllm_mux.bench import take

ROOT = Path(__file__).resolve().parents[2]
GiB = 1 << 30

# (hidden, layers, heads, intermediate, vocab): "full" is about 3.4 GB in bf16.
SIZES = {"full": (4096, 6, 32, 14336, 32000), "small": (64, 2, 4, 128, 256)}
PROMPT = [1, 17, 42, 7, 99, 3, 55, 12]
NEW_TOKENS = 16
MAX_LEN = 64


# -- the model: plain torch, graph-capturable (no host syncs, static shapes) --


def build_model(size: str, device: str, dtype, via=None):
    """The model, initialised in ``via`` (a wider dtype) and then converted to
    ``dtype`` when given: what loading a checkpoint of another precision does,
    freeing the wide copies as it goes."""
    import torch
    from torch import nn

    hidden, layers, heads, inter, vocab = SIZES[size]
    final, dtype = dtype, via or dtype  # the classes below are made in ``dtype``

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn_norm = nn.Parameter(torch.ones(hidden, device=device, dtype=dtype))
            self.qkv = nn.Linear(hidden, 3 * hidden, bias=False, device=device, dtype=dtype)
            self.o = nn.Linear(hidden, hidden, bias=False, device=device, dtype=dtype)
            self.mlp_norm = nn.Parameter(torch.ones(hidden, device=device, dtype=dtype))
            self.gate_up = nn.Linear(hidden, 2 * inter, bias=False, device=device, dtype=dtype)
            self.down = nn.Linear(inter, hidden, bias=False, device=device, dtype=dtype)

    class Llama(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(vocab, hidden, device=device, dtype=dtype)
            self.blocks = nn.ModuleList(Block() for _ in range(layers))
            self.norm = nn.Parameter(torch.ones(hidden, device=device, dtype=dtype))
            self.head = nn.Linear(hidden, vocab, bias=False, device=device, dtype=dtype)
            self.register_buffer("positions", torch.arange(MAX_LEN, device=device))

        def step(self, kv, token, pos):
            """One decode step: write this token's K and V at ``pos`` of the KV
            buffer, attend over positions <= pos, return the greedy next token."""
            h, d = heads, hidden // heads
            x = self.embed(token)  # (1, hidden)
            hidden_mask = self.positions > pos  # positions not written by this sequence
            for i, b in enumerate(self.blocks):
                q, k, v = b.qkv(_rms(x, b.attn_norm)).view(3, h, d)
                kv[i, 0].index_copy_(0, pos, k.unsqueeze(0))
                kv[i, 1].index_copy_(0, pos, v.unsqueeze(0))
                scores = torch.einsum("hd,lhd->hl", q, kv[i, 0]) / d**0.5
                probs = torch.softmax(scores.float().masked_fill(hidden_mask, -torch.inf), -1)
                values = kv[i, 1].masked_fill(hidden_mask[:, None, None], 0)
                x = x + b.o(torch.einsum("hl,lhd->hd", probs.to(x.dtype), values).reshape(1, -1))
                gate, up = b.gate_up(_rms(x, b.mlp_norm)).chunk(2, -1)
                x = x + b.down(torch.nn.functional.silu(gate) * up)
            return self.head(_rms(x, self.norm)).argmax(-1)

    torch.manual_seed(0)
    model = Llama()
    for block in model.blocks:  # one layer at a time, as a loader converts
        block.to(final)
    return model.to(final), (layers, 2, MAX_LEN, heads, hidden // heads)


def _rms(x, weight):
    import torch

    return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(
        x.dtype
    ) * weight


class Decoder:
    """Greedy decoding by replaying one captured graph of a decode step (CUDA),
    or by calling the step eagerly (CPU, which has no graphs)."""

    def __init__(self, model, kv, device: str):
        import torch

        self.token = torch.zeros(1, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.out = torch.zeros(1, dtype=torch.long, device=device)
        self.run = lambda: self.out.copy_(model.step(kv, self.token, self.pos))
        self.graph = None
        if device.startswith("cuda"):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    self.run()
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.run()

    def generate(self) -> list[int]:
        seq = list(PROMPT)
        for i in range(len(PROMPT) + NEW_TOKENS - 1):
            self.token.fill_(seq[i])
            self.pos.fill_(i)
            if self.graph:
                self.graph.replay()
            else:
                self.run()
            if i >= len(PROMPT) - 1:
                seq.append(int(self.out.item()))
        return seq[len(PROMPT) :]


# -- phases, each in its own process --


def _arena_of(client, backend, n: int):
    from vllm_mux.memory.arena import Arena

    chunk = client.hello("kit-exchange")["chunk_size"]
    ids, fds = client.lease(n)
    arena = Arena(backend, n * chunk, chunk)
    arena.map([backend.import_(fd, chunk) for fd in fds])
    return arena, ids, chunk


def phase_exchange(args) -> dict:
    """Writer: lease every free chunk, write a pattern keyed by chunk id, give
    them back. Reader (a later process): lease them all, check the patterns."""
    import torch

    from vllm_mux.daemon.client import Client
    from vllm_mux.memory import backend as make_backend

    client = Client(args.socket)
    backend = make_backend(args.device)
    n = client.status()["free_chunks"]
    arena, ids, chunk = _arena_of(client, backend, n)
    head = 1 << 20  # a position-dependent pattern over each chunk's first MiB
    bad = 0
    for i, chunk_id in enumerate(ids):
        t = backend.tensor(arena.base + i * chunk, chunk)
        pattern = (torch.arange(head, device=t.device) * 7 + chunk_id) % 251
        if args.role == "write":
            t.fill_(chunk_id % 256)
            t[:head].copy_(pattern)
        else:
            ok = torch.equal(t[:head], pattern.to(torch.uint8))
            ok = ok and bool((t[head:] == chunk_id % 256).all())
            bad += not ok
    backend.synchronize()
    arena.unmap()
    client.release(ids)
    client.close()
    return {"chunks": n, "mismatched_chunks": bad}


def phase_scribble(args) -> None:
    """Overwrite every free chunk with NaN bytes each time a line comes in."""
    from vllm_mux.daemon.client import Client
    from vllm_mux.memory import backend as make_backend
    from vllm_mux.memory.arena import Arena

    client = Client(args.socket)
    backend = make_backend(args.device)
    chunk = client.hello("kit-scribbler")["chunk_size"]
    arena = Arena(backend, client.status()["total_chunks"] * chunk, chunk)
    for _ in sys.stdin:
        n = client.status()["free_chunks"]
        if not n:
            print(0, flush=True)
            continue
        ids, fds = client.lease(n)
        arena.map([backend.import_(fd, chunk) for fd in fds])
        backend.tensor(arena.base, arena.mapped).fill_(0xFF)
        arena.unmap()  # synchronizes first
        client.release(ids)
        print(n, flush=True)


def phase_model(args) -> dict:
    import torch

    from vllm_mux.instance import Instance

    cuda = args.device.startswith("cuda")
    device = args.device if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    inst = Instance(args.socket, "kit-llama")
    started = time.perf_counter()
    with inst.loading():  # made in float32 and converted, as a bf16 load of an fp32 file
        model, kv_shape = build_model(args.size, device, dtype, torch.float32 if cuda else None)
    inst.adopt_weights([*model.parameters(), *model.buffers()])
    load_s = time.perf_counter() - started
    with inst.allocations():
        kv = torch.zeros(kv_shape, dtype=dtype, device=device)
    reference = inst.weights.view().clone()  # the loaded bytes, in private memory
    tensors = [*model.parameters(), *model.buffers(), kv]
    pointers = [t.data_ptr() for t in tensors]
    decoder = Decoder(model, kv, device)
    expected = decoder.generate()

    scribbler = subprocess.Popen(
        [sys.executable, "-m", "vllm_mux.bench.gpu", "scribble", "--socket", args.socket]
        + ["--device", args.device],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    sleeps, wakes, failures, asleep_memory = [], [], [], {}
    scribbled = 0
    for cycle in range(args.cycles):
        sleeps.append(inst.sleep())
        if cycle == 0:
            asleep_memory = _device_memory(args.device)
        scribbler.stdin.write("go\n")
        scribbler.stdin.flush()
        scribbled += int(scribbler.stdout.readline())
        wakes.append(inst.wake())
        failures += _check(inst, f"cycle {cycle}", "host", tensors, pointers, reference)
        if (got := decoder.generate()) != expected:
            failures.append(f"cycle {cycle}: tokens {got} != {expected}")
    scribbler.stdin.close()
    scribbler.wait()
    inst.sleep()  # and a warm wake: nobody took its chunks
    inst.wake()
    failures += _check(inst, "warm wake", "warm", tensors, pointers, reference)
    if inst.last_wake["copied_bytes"] or not inst.kv_intact:
        failures.append(f"warm wake: copied or lost the KV cache: {inst.last_wake}")
    if (got := decoder.generate()) != expected:
        failures.append(f"warm wake: tokens {got} != {expected}")
    inst.sleep()
    books = inst.client.status()
    (me,) = [i for i in books["instances"] if i["model"] == "kit-llama"]
    balanced = books["leased_chunks"] + books["free_chunks"] == books["total_chunks"]
    if not (books["balanced"] and balanced and me["chunks"] == 0):
        failures.append(f"the books do not balance after the cycles: {books}")
    copies = books["host_copies"]
    if not (books["host_balanced"] and len(copies) == 1 and copies[0]["users"] == [me["id"]]):
        failures.append(f"the host copy is not on the books as this instance's one: {copies}")
    inst.client.close()
    return {
        "pid": os.getpid(),
        "load_seconds": load_s,
        "graph_captured": decoder.graph is not None,
        "cycles": args.cycles,
        "failures": failures,
        "tokens": expected,
        "bytes_overwritten_by_other_process": scribbled * inst.chunk_size,
        "reference_bytes": reference.numel(),  # private: subtract from the asleep figures
        "weights": inst.loaded,
        "kv_bytes": kv.numel() * kv.element_size(),
        "sleep_ms_median": statistics.median(sleeps) * 1e3,
        "sleep_ms_max": max(sleeps) * 1e3,
        "wake_ms_median": statistics.median(wakes) * 1e3,
        "warm_wake_ms": inst.last_wake["seconds"] * 1e3,
        "asleep": asleep_memory,
    }


def _check(inst, when: str, tier: str, tensors, pointers, reference) -> list[str]:
    """What must hold after every wake, as failures."""
    import torch

    failures = []
    if inst.last_wake.get("tier") != tier:
        failures.append(f"{when}: woke from {inst.last_wake.get('tier')}, not {tier}")
    if [t.data_ptr() for t in tensors] != pointers:
        failures.append(f"{when}: a data pointer moved")
    if not torch.equal(inst.weights.view(), reference):
        failures.append(f"{when}: the weights differ from the loaded bytes")
    return failures


def phase_wake(args) -> dict:
    """A wake of ``--wake-bytes`` against a plain copy of the same bytes from
    the same page-locked host buffer into ordinary device memory."""
    import torch

    from vllm_mux.instance import Instance

    cuda = args.device.startswith("cuda")
    device = args.device if cuda else "cpu"
    inst = Instance(args.socket, "kit-wake")
    piece = 1 << 30  # tensors of 1 GiB, like the large matrices of an 8B model
    with inst.loading():
        tensors = [
            torch.empty(min(piece, args.wake_bytes - off), dtype=torch.uint8, device=device)
            for off in range(0, args.wake_bytes, piece)
        ]
        for t in tensors:
            t.random_(0, 256)
    inst.adopt_weights(tensors)
    with inst.allocations():  # a KV cache: unmapped by every sleep, mapped by every wake
        kv = torch.zeros(args.kv_bytes, dtype=torch.uint8, device=device)
    rounds, tiers = [], []
    total = inst.client.status()["total_chunks"]
    half = inst.weights.size // inst.chunk_size // 2
    for _ in range(args.rounds):
        times = {}
        for tier, taken in (("warm", 0), ("partial", total - half), ("host", total)):
            sleep_s = inst.sleep()
            if taken:
                take(args.socket, taken)
            times[tier] = inst.wake()
            tiers.append((tier, inst.last_wake["tier"], inst.last_wake["copied_bytes"]))
        map_s = inst.last_wake["map_seconds"]
        rounds.append(
            {
                "sleep": sleep_s,
                "wake": times["host"],
                "warm": times["warm"],
                "partial": times["partial"],
                "map": map_s,
                "plain": inst.plain_copy(),
            }
        )
    inst.sleep()
    inst.client.close()
    med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    nbytes = inst.loaded["arena_bytes"]
    partial_copied = statistics.median(c for want, _, c in tiers if want == "partial")
    return {
        "tiers_as_arranged": all(want == got for want, got, _ in tiers),
        "tiers": tiers,
        "warm_wake_ms": med["warm"] * 1e3,
        "partial_wake_ms": med["partial"] * 1e3,
        "partial_copied_bytes": partial_copied,
        "bytes": nbytes,
        "kv_bytes": kv.numel(),
        "chunk_size": inst.chunk_size,
        "rounds": args.rounds,
        "sleep_ms": med["sleep"] * 1e3,
        "wake_ms": med["wake"] * 1e3,
        "plain_copy_ms": med["plain"] * 1e3,
        "wake_gbps": nbytes / med["wake"] / 1e9,
        "plain_copy_gbps": nbytes / med["plain"] / 1e9,
        "wake_vs_plain_copy": med["plain"] / med["wake"],
        "map_ms_per_gib": med["map"] * 1e3 / (nbytes / GiB),
    }


def _device_memory(device: str) -> dict:
    """What this device says is in use: the whole device, this process and the
    daemon (nvidia-smi's per-process figures), and torch's view of this process."""
    if not device.startswith("cuda"):
        return {"note": "host memory: see the cpu tests' RSS checks"}
    import torch

    free, total = torch.cuda.mem_get_info()
    facts = {
        "device_used_bytes": total - free,
        "device_total_bytes": total,
        "torch_reserved_bytes": torch.cuda.memory_reserved(),
        "torch_allocated_bytes": torch.cuda.memory_allocated(),
    }
    if shutil.which("nvidia-smi"):
        out = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
        ).stdout
        facts["nvidia_smi_mib_by_pid"] = {
            int(p): int(m) for p, m in (line.split(",") for line in out.splitlines() if "," in line)
        }
    return facts


# -- the orchestrator --


def _phase(name: str, args, extra=()) -> dict:
    cmd = [sys.executable, "-m", "vllm_mux.bench.gpu", name, "--socket", args.socket]
    cmd += ["--device", args.device, "--size", args.size, *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.phase_timeout)
    if done.returncode != 0:
        return {"error": f"exit {done.returncode}", "stderr_tail": done.stderr[-3000:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


class _Daemon:
    def __init__(self, args, pool: int, chunk: int, log: Path):
        if os.path.exists(args.socket):
            os.unlink(args.socket)
        self.log = open(log, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vllm_mux.cli", "daemon", "--device", args.device]
            + ["--device-memory", str(pool), "--chunk-size", str(chunk)]
            + ["--socket", args.socket],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 120
        while not os.path.exists(args.socket):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the daemon did not start: see {log}")
            time.sleep(0.1)
        time.sleep(0.2)  # listening follows the bind at once

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self.log.close()


def orchestrate(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p
    )
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # same kernels each replay
    cuda = args.device.startswith("cuda")
    args.socket = str(Path(tempfile.mkdtemp(prefix="vllm-mux-kit-")) / "daemon.sock")
    settings = {k: v for k, v in vars(args).items() if not callable(v)}
    results: dict = {"machine": _machine(args.device), "args": settings}
    started = time.perf_counter()

    if cuda:
        tests = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
            + ["--noconftest", "tests/test_cuda_backend.py", "tests/test_heap.py"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=args.phase_timeout,
        )
        results["backend_tests"] = {
            "exit": tests.returncode,
            "summary": (tests.stdout.strip().splitlines() or [""])[-1],
        }
        (out / "backend_tests.log").write_text(tests.stdout + tests.stderr)

    for i, chunk in enumerate(args.chunk_sizes):
        need = args.wake_bytes + args.kv_bytes + 2 * max(args.chunk_sizes)
        pool = -(-need // chunk) * chunk
        daemon = _Daemon(args, pool, chunk, out / f"daemon-{chunk >> 20}MiB.log")
        try:
            if i == 0:
                results["exchange"] = {
                    "write": _phase("exchange", args, ["--role", "write"]),
                    "read": _phase("exchange", args, ["--role", "read"]),
                }
                results["model"] = _phase("model", args, ["--cycles", str(args.cycles)])
                results["daemon_memory"] = _device_memory(args.device)
                results["daemon_memory"]["daemon_pid"] = daemon.proc.pid
            results.setdefault("wake", []).append(
                _phase(
                    "wake",
                    args,
                    ["--wake-bytes", str(args.wake_bytes), "--kv-bytes", str(args.kv_bytes)]
                    + ["--rounds", str(args.rounds)],
                )
            )
        finally:
            daemon.stop()
    results["seconds"] = time.perf_counter() - started
    results["verdict"] = _verdict(results, cuda)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(_markdown(results))
    print(_markdown(results))
    return 0 if not results["verdict"]["failed"] else 1


def _verdict(r: dict, cuda: bool) -> dict:
    """Which checks passed, which failed, and the goals, met or not."""
    failed, goals = [], {}
    if cuda and r["backend_tests"]["exit"] != 0:
        failed.append("cuda backend tests")
    ex = r["exchange"]
    if any("error" in v for v in ex.values()) or ex["read"].get("mismatched_chunks"):
        failed.append("chunk exchange between processes")
    m = r["model"]
    if "error" in m or m["failures"]:
        failed.append("sleep/wake cycles of the model")
    if cuda and not m.get("graph_captured"):
        failed.append("CUDA graph capture")
    for w in r["wake"]:
        if "error" in w:
            failed.append(f"wake benchmark ({w})")
        else:
            if not w["tiers_as_arranged"]:
                failed.append(f"wake tiers not as arranged: {w['tiers']}")
            key = f"chunk {w['chunk_size'] >> 20} MiB"
            goals[key] = {
                "wake/plain copy >= 0.90": w["wake_vs_plain_copy"] >= 0.90,
                "sleep <= 10 ms": w["sleep_ms"] <= 10,
            }
    return {"failed": failed, "goals": goals}


def _machine(device: str) -> dict:
    import torch

    facts = {
        "host": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
    }
    if device.startswith("cuda"):
        facts["gpu"] = torch.cuda.get_device_name()
        if shutil.which("nvidia-smi"):
            facts["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
            ).stdout.strip()
    return facts


def _markdown(r: dict) -> str:
    lines = [f"# vllm-mux GPU proof kit: {r['machine'].get('gpu', r['args']['device'])}", ""]
    lines += [f"machine: `{json.dumps(r['machine'])}`", ""]
    lines += [f"failed: {', '.join(r['verdict']['failed']) or 'nothing'}", ""]
    lines += ["| check | result |", "|---|---|"]
    if "backend_tests" in r:
        lines.append(f"| cuda backend tests | {r['backend_tests']['summary']} |")
    ex = r["exchange"]
    lines.append(f"| exchange: chunks written / read / mismatched | {_ex(ex)} |")
    m = r["model"]
    if "error" in m:
        lines.append(f"| model | ERROR {m['error']}: {m['stderr_tail'][-300:]!r} |")
    else:
        w = m["weights"]
        lines += [
            f"| model: weights bytes / arena bytes / heap holes | {w['tensor_bytes']} / "
            f"{w['arena_bytes']} / {w['heap_hole_bytes']} (moved after load: {w['moved']}) |",
            f"| model: graph captured | {m['graph_captured']} |",
            f"| model: cycles, failures | {m['cycles']}, {len(m['failures'])} "
            f"{'; '.join(m['failures'][:3])} |",
            "| model: bytes overwritten by another process | "
            f"{m['bytes_overwritten_by_other_process']} |",
            f"| model: sleep ms median / max, wake ms median (host), warm wake ms | "
            f"{m['sleep_ms_median']:.2f} / {m['sleep_ms_max']:.2f}, {m['wake_ms_median']:.1f}, "
            f"{m['warm_wake_ms']:.1f} |",
            f"| memory while asleep (this process) | {json.dumps(m['asleep'])} |",
        ]
        smi = m["asleep"].get("nvidia_smi_mib_by_pid", {})
        if str(m["pid"]) in smi or m["pid"] in smi:
            mib = smi.get(m["pid"], smi.get(str(m["pid"])))
            lines.append(
                "| asleep: this process's device memory (nvidia-smi), less the kit's "
                f"reference copy of the weights | {mib - m['reference_bytes'] / 2**20:.0f} MiB |"
            )
    lines.append(f"| memory with the daemon's pool held | {json.dumps(r['daemon_memory'])} |")
    for w in r["wake"]:
        if "error" in w:
            lines.append(f"| wake | ERROR {w['error']}: {w['stderr_tail'][-300:]!r} |")
            continue
        lines += [
            f"| wake of {w['bytes'] / 1e9:.2f} GB (+ {w['kv_bytes'] / 2**30:.2f} GiB of KV "
            f"mapped), chunk {w['chunk_size'] >> 20} MiB: "
            f"wake / plain copy ms | {w['wake_ms']:.1f} / {w['plain_copy_ms']:.1f} "
            f"(ratio {w['wake_vs_plain_copy']:.3f}; {w['wake_gbps']:.1f} vs "
            f"{w['plain_copy_gbps']:.1f} GB/s) |",
            f"| sleep ms (weights and KV), map ms per GiB (chunk {w['chunk_size'] >> 20} MiB) | "
            f"{w['sleep_ms']:.2f}, {w['map_ms_per_gib']:.2f} |",
            f"| warm wake (nothing taken) / partial wake ({w['partial_copied_bytes'] / 1e9:.2f} "
            f"GB copied) / host wake ms | {w['warm_wake_ms']:.1f} / {w['partial_wake_ms']:.1f} / "
            f"{w['wake_ms']:.1f} |",
        ]
    lines += ["", f"goals: `{json.dumps(r['verdict']['goals'])}`", f"took {r['seconds']:.0f} s", ""]
    return "\n".join(lines)


def _ex(ex: dict) -> str:
    if any("error" in v for v in ex.values()):
        return f"ERROR {json.dumps(ex)[-400:]}"
    return f"{ex['write']['chunks']} / {ex['read']['chunks']} / {ex['read']['mismatched_chunks']}"


def _size(text: str) -> int:
    from vllm_mux.cli import parse_size

    return parse_size(text)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (small, for CI)")
    p.add_argument("--size", choices=sorted(SIZES), default=None, help="model size")
    p.add_argument("--cycles", type=int, default=50)
    p.add_argument("--wake-bytes", type=_size, default=None, help="default 16.4 GB (cpu: 64 MiB)")
    p.add_argument("--kv-bytes", type=_size, default=None, help="default 8 GiB (cpu: 16 MiB)")
    p.add_argument("--chunk-sizes", type=_size, nargs="+", default=None)
    p.add_argument("--rounds", type=int, default=5, help="wakes timed per chunk size")
    p.add_argument("--phase-timeout", type=float, default=300)
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu-check-out")


def run(args) -> int:
    from vllm_mux.memory import default_chunk_size

    cuda = args.device.startswith("cuda")
    args.size = args.size or ("full" if cuda else "small")
    args.wake_bytes = args.wake_bytes or (16_400_000_000 if cuda else 64 << 20)
    args.kv_bytes = args.kv_bytes or ((8 << 30) if cuda else 16 << 20)
    args.chunk_sizes = args.chunk_sizes or (
        [default_chunk_size(args.device)] if cuda else [2 << 20]
    )
    return orchestrate(args)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m vllm_mux.bench.gpu")
    sub = parser.add_subparsers(dest="phase")
    for name in ("exchange", "scribble", "model", "wake"):
        p = sub.add_parser(name)
        p.add_argument("--socket", required=True)
        p.add_argument("--device", default="cuda")
        p.add_argument("--size", default="small")
        p.add_argument("--role", choices=("write", "read"))
        p.add_argument("--cycles", type=int, default=50)
        p.add_argument("--wake-bytes", type=int, default=64 << 20)
        p.add_argument("--kv-bytes", type=int, default=16 << 20)
        p.add_argument("--rounds", type=int, default=5)
    add_arguments(parser)
    args = parser.parse_args()
    if args.phase is None:
        return run(args)
    if args.phase == "scribble":
        phase_scribble(args)
        return 0
    result = {"exchange": phase_exchange, "model": phase_model, "wake": phase_wake}[args.phase](
        args
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
