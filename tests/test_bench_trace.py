"""``bench trace`` without vLLM: its workload, its pacing and timing against a
fake OpenAI server, and its arithmetic; ``bench simulate``'s command line."""

import argparse
import asyncio
import dataclasses
import json
import math

import httpx
import openai
import pytest

from vllm_mux.bench import simulate, trace
from vllm_mux.bench.simulate import Costs, Model, Request, summary, write_trace
from vllm_mux.daemon.policy import Knobs


def trace_args(*argv):
    p = argparse.ArgumentParser()
    trace.add_arguments(p)
    return p.parse_args(argv)


def simulate_main(argv):
    p = argparse.ArgumentParser()
    simulate.add_arguments(p)
    return simulate.run(p.parse_args(argv))


# -- the workload --


def test_the_workload_is_seeded_and_a_file_replays_it(tmp_path):
    models, one = trace.workload(trace_args("--seed", "3", "--duration", "60"))
    assert models == ["trace-a", "trace-b", "trace-c"]
    assert trace.workload(trace_args("--seed", "3", "--duration", "60")) == (models, one)
    assert trace.workload(trace_args("--seed", "4", "--duration", "60"))[1] != one
    assert one and all(0 <= r.time < 60 and r.model in models for r in one)
    path = tmp_path / "trace.csv"
    write_trace(str(path), one)
    assert trace.workload(trace_args("--trace", str(path))) == (models, one)
    # Least requested first: the last one warmed up is the one awake at the start.
    counts = [sum(r.model == m for r in one) for m in trace.by_popularity(models, one)]
    assert counts == sorted(counts)


def test_argument_errors_are_one_line(capsys, tmp_path):
    (tmp_path / "bad.csv").write_text("time,model\n1,a\n")
    for argv in (
        ["--policies", "fifo"],
        ["--rate", "0"],
        ["--models", "0"],
        ["--trace", "/nonexistent.csv"],
        ["--trace", str(tmp_path / "bad.csv")],
        ["--quantum-s", "-1"],
    ):
        assert trace.run(trace_args(*argv)) == 2
        err = capsys.readouterr().err
        assert err.startswith("vllm-mux bench trace: ") and err.count("\n") == 1, err


# -- pacing and timing, against a fake OpenAI server --


class FakeServer:
    """Streams ``max_tokens`` completion chunks, the first after
    ``first_s(body)`` seconds and the others ``token_s`` apart; answers 500 for
    the models in ``broken``."""

    def __init__(self, first_s, token_s=0.01, broken=()):
        self.first_s, self.token_s, self.broken = first_s, token_s, broken
        self.calls = []  # (loop time, body)

    def client(self):
        return openai.AsyncOpenAI(
            base_url="http://fake/v1", api_key="k", max_retries=0,
            http_client=httpx.AsyncClient(transport=httpx.MockTransport(self.handle)),
        )  # fmt: skip

    async def handle(self, request):
        body = json.loads(await request.aread())
        self.calls.append((asyncio.get_running_loop().time(), body))
        if body["model"] in self.broken:
            return httpx.Response(500, json={"error": {"message": "broken", "code": "x"}})
        return httpx.Response(
            200, headers={"content-type": "text/event-stream"}, content=self.events(body)
        )

    async def events(self, body):
        def event(**fields):
            chunk = {"id": "c", "object": "text_completion", "created": 0, "model": body["model"]}
            return f"data: {json.dumps(chunk | fields)}\n\n".encode()

        await asyncio.sleep(self.first_s(body))
        for k in range(body["max_tokens"]):
            if k:
                await asyncio.sleep(self.token_s)
            yield event(choices=[{"index": 0, "text": " x", "finish_reason": None}])
        words = len(body["prompt"].split())
        usage = {"prompt_tokens": words, "completion_tokens": body["max_tokens"]}
        yield event(choices=[], usage=usage | {"total_tokens": words + body["max_tokens"]})
        yield b"data: [DONE]\n\n"


def test_requests_go_at_their_times_none_waiting_on_another():
    delays = {"slow": 0.6, "fast": 0.05, "stuck": 30.0}
    fake = FakeServer(lambda body: delays[body["model"]], broken=("broken",))
    requests = [
        Request(0.0, "slow", 20, 4),
        Request(0.1, "fast", 10, 3),
        Request(0.2, "broken", 10, 3),
        Request(0.3, "fast", 5, 1),
        Request(0.35, "stuck", 5, 1),
    ]

    async def go():
        client = fake.client()
        try:
            t0 = asyncio.get_running_loop().time()
            return t0, await trace.drive(client, requests, grace_s=1.0)
        finally:
            await client.close()

    t0, records = asyncio.run(go())
    slow, fast, broken, fast2, stuck = records
    # Open loop: each sent at its time though the slow one is not done.
    for r, rec in zip(requests, records):
        assert rec["sent_s"] == pytest.approx(r.time, abs=0.05)
    arrivals = {body["prompt"]: at - t0 for at, body in fake.calls}
    assert arrivals[trace.prompt("1", 10)] == pytest.approx(0.1, abs=0.05)
    assert slow["ttft_s"] == pytest.approx(0.6, abs=0.08)
    assert fast["ttft_s"] == pytest.approx(0.05, abs=0.05)
    assert fast2["ttft_s"] == pytest.approx(0.05, abs=0.05)
    assert slow["done_s"] - slow["first_token_s"] == pytest.approx(3 * 0.01, abs=0.05)
    assert slow["first_token_s"] == pytest.approx(slow["ttft_s"])  # the slow one came at 0
    assert (slow["output_tokens"], fast["output_tokens"], fast2["output_tokens"]) == (4, 3, 1)
    assert "500" in broken["error"] and "ttft_s" not in broken
    assert stuck["error"] == "not done 1 s after the last arrival" and "ttft_s" not in stuck
    # What each asked for: its own prompt of about its tokens, exactly its output.
    bodies = {body["prompt"].split(":")[0]: body for _, body in fake.calls}
    assert bodies["0"]["max_tokens"] == 4 and bodies["0"]["stream"] is True
    assert bodies["0"]["ignore_eos"] is True and bodies["0"]["temperature"] == 0
    assert len(bodies["0"]["prompt"].split()) == 20 - 3 + 1


def test_calibration_recovers_the_costs():
    """Time to first token 0.05 s + 0.4 ms per prompt word, 10 ms per token
    after it; a model's first request after another model's takes 0.3 s more."""
    last = [None]

    def first_s(body):
        switch = 0.3 if last[0] not in (None, body["model"]) else 0.0
        last[0] = body["model"]
        return switch + 0.05 + 4e-4 * len(body["prompt"].split())

    fake = FakeServer(first_s, token_s=0.01)

    async def go():
        client = fake.client()
        try:
            return await trace.calibrate(client, ["rare", "common"])
        finally:
            await client.close()

    costs = asyncio.run(go())
    assert costs["prefill_s_per_token"] == pytest.approx(4e-4, rel=0.3)
    assert costs["decode_s_per_token"] == pytest.approx(0.01, rel=0.3)
    assert costs["switch_s"] == pytest.approx(0.3, abs=0.05)
    assert costs["ttft_awake_s"] == pytest.approx(0.05 + 4e-4 * 14, abs=0.03)
    assert [body["model"] for _, body in fake.calls[:4]] == ["rare", "common"] * 2
    assert all(body["model"] == "common" for _, body in fake.calls[4:])  # it stays awake


# -- the figures --


def status(*instances):
    def latency(total):
        return {"sum": total, "count": 0}

    return {
        "instances": [
            {"id": i, "wakes": w, "wake_latency": latency(ws), "sleep_latency": latency(ss)}
            for i, w, ws, ss in instances
        ]
    }


def test_the_report_arithmetic():
    requests = [Request(float(t), "a", 1, 1) for t in range(10, 20)]
    ttfts = [0.1, 0.2, 0.3, 0.4, 0.5, 1.0, 1.5, 2.5, 3.0]  # and one that failed
    records = [{"ttft_s": t, "done_s": 10 + k + t + 0.5} for k, t in enumerate(ttfts)]
    records.append({"error": "boom"})
    before = status((1, 3, 1.0, 0.5), (2, 0, 0.0, 0.0))
    # Between: 1 wakes twice (2.0 s), 2 sleeps (0.25 s), 3 joins and wakes once (0.5 s, 0.25 s).
    after = status((1, 5, 3.0, 0.5), (2, 0, 0.0, 0.25), (3, 1, 0.5, 0.25))
    f = trace.report(requests, records, before, after, wall_s=30.0, slo_s=1.0, switch_s=0.2)
    span = 10 + 8 + 3.0 + 0.5 - 10  # the first arrival to the last completion
    assert f["span_s"] == pytest.approx(span)
    assert (f["requests"], f["completed"]) == (10, 9)
    assert f["completed_per_s"] == pytest.approx(9 / span)
    assert f["goodput_per_s"] == pytest.approx(6 / span)  # TTFT <= 1 s
    assert f["slo_attainment"] == pytest.approx(0.6)
    # Nearest rank, the failed one never answered.
    assert (f["ttft_p50_s"], f["ttft_p95_s"], f["ttft_p99_s"]) == (0.5, math.inf, math.inf)
    assert f["switches"] == 3
    assert f["switches_per_min"] == pytest.approx(3 / 30 * 60)
    assert f["switching_fraction"] == pytest.approx((2.0 + 0.25 + 0.5 + 0.25) / 30)
    assert f["switching_fraction_alone"] == pytest.approx(3 * 0.2 / 30)


def test_the_goal_is_said_not_asserted():
    def figures(goodput, p99):
        return {"goodput_per_s": goodput, "ttft_p99_s": p99}

    assert trace.goal({"batched": figures(1.0, 2.0)}) is None
    holds = trace.goal({"switch-per-request": figures(0.5, 3.0), "batched": figures(1.0, 3.0)})
    assert holds == {"goodput_ratio": 2.0, "p99_not_higher": True, "holds": True}
    slower = trace.goal({"switch-per-request": figures(0.5, 2.0), "batched": figures(1.5, 3.0)})
    assert slower["goodput_ratio"] == 3.0 and not slower["holds"]
    short = trace.goal({"switch-per-request": figures(0.5, 2.0), "batched": figures(0.9, 1.0)})
    assert not short["holds"] and short["p99_not_higher"]


# -- bench simulate's command line --


def test_simulate_argument_errors_are_one_line(capsys, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    for argv in (
        ["--devices", "0"],
        ["--model-gb", "90"],
        ["--rate", "-1"],
        ["--policies", "fifo"],
        ["--decode-ms-per-token", "0"],
        ["--costs", str(bad)],
        ["--costs", str(tmp_path / "missing.json")],
        ["--validate", str(bad)],
    ):
        assert simulate_main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("vllm-mux bench simulate: ") and err.count("\n") == 1, (argv, err)
    wrong = tmp_path / "wrong.json"
    wrong.write_text('{"runs": {}}')
    assert simulate_main(["--validate", str(wrong)]) == 2
    assert "not a `bench trace --output` file" in capsys.readouterr().err


def test_simulate_a_small_fleet(capsys, tmp_path):
    out = tmp_path / "fleet.json"
    argv = ["--models", "6", "--devices", "2", "--device-gb", "40", "--rate", "2"]
    argv += ["--duration", "60", "--output", str(out)]
    assert simulate_main(argv) == 0
    text = capsys.readouterr().out
    assert "needs 6 devices, one per model" in text
    rows = json.loads(out.read_text())["rows"]
    assert rows.keys() == {"switch-per-request", "batched", "one model per device"}
    assert rows["batched"]["devices"] == 2 and rows["one model per device"]["devices"] == 6
    assert rows["one model per device"]["switches_per_min"] == 0


def test_costs_from_a_switch_file(tmp_path):
    path = tmp_path / "switch.json"
    path.write_text(json.dumps({
        "wake_gbps": 4.0, "wake_ms_http": 140.0, "wake_ms_instance": 110.0,
        "sleep_ms_http": 50.0, "tokens_per_s_mux": 20.0, "ttft_awake_ms": 135.0,
    }))  # fmt: skip
    costs = simulate._costs_file(str(path))
    assert costs.h2d_gb_s == 4.0
    assert costs.wake_fixed_s == pytest.approx(0.03) and costs.sleep_s == pytest.approx(0.05)
    assert costs.decode_s_per_token == pytest.approx(0.05)
    assert costs.request_s == pytest.approx(0.135 - 0.05)


def fake_trace_file(path, costs: Costs, slo=1.0, off=1.0):
    """A ``bench trace --output`` whose measured figures are what the simulator
    gives with ``costs`` (scaled by ``off``), and whose calibration says ``costs``."""
    names = ["a", "b", "c"]
    requests = simulate.synthetic(names, duration_s=60, rate_per_s=2, zipf_s=0.5, cv=2,
                                  prompt_tokens=32, output_tokens=8, seed=1)  # fmt: skip
    pool = {"chunk_bytes": 32 << 20, "total_chunks": 32, "model_chunks": 25}
    models = [Model(n, 25 * (32 << 20)) for n in names]
    runs = {}
    for policy in ("switch-per-request", "batched"):
        result = simulate.simulate(requests, models, costs, pool_bytes=32 * (32 << 20),
                                   chunk_bytes=32 << 20, policy=policy)  # fmt: skip
        figures = {k: v * off for k, v in summary(result, slo).items()}
        calibration = {
            "switch_s": costs.wake_fixed_s + costs.sleep_s, "sleep_s": costs.sleep_s,
            "request_s": costs.request_s, "prefill_s_per_token": costs.prefill_s_per_token,
            "decode_s_per_token": costs.decode_s_per_token, "batch": costs.batch,
        }  # fmt: skip
        runs[policy] = {"figures": figures, "costs": calibration, "pool": pool}
    knobs = dataclasses.asdict(Knobs())  # the defaults the figures were simulated with
    data = {"models": names, "slo_s": slo, "knobs": knobs, "runs": runs}
    path.write_text(json.dumps(data | {"trace": [list(r) for r in requests]}))


def test_validate_compares_the_simulation_with_the_measurement(capsys, tmp_path):
    costs = Costs(h2d_gb_s=math.inf, wake_fixed_s=0.15, sleep_s=0.05, prefill_s_per_token=1e-3,
                  decode_s_per_token=0.05, batch=128, request_s=0.1)  # fmt: skip
    exact, off = tmp_path / "exact.json", tmp_path / "off.json"
    fake_trace_file(exact, costs)
    fake_trace_file(off, costs, off=1.25)
    out = tmp_path / "validation.json"
    assert simulate_main(["--validate", str(exact), "--output", str(out)]) == 0
    assert "largest error of goodput and p99 TTFT: 0.0%" in capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved["costs"] == pytest.approx(costs.__dict__)
    assert simulate_main(["--validate", str(off)]) == 0
    assert "largest error of goodput and p99 TTFT: 20.0%" in capsys.readouterr().out
    # A flag overrides a measured cost: a slower decode, another simulation.
    assert simulate_main(["--validate", str(exact), "--decode-ms-per-token", "80"]) == 0
    assert "largest error of goodput and p99 TTFT: 0.0%" not in capsys.readouterr().out
