"""The fleet simulator: its workloads, its books and its figures."""

import math
import statistics

import pytest

from vllm_mux.bench.simulate import (
    Costs,
    Model,
    Request,
    homes,
    one_model_per_device,
    percentile,
    read_trace,
    simulate,
    summary,
    synthetic,
    write_trace,
)

GB = 10**9
NAMES = ["a", "b", "c"]
# A GPU-like device: a 16 GB model wakes in about a second, a short request
# takes about half of one, sixteen run at once.
GPU = Costs(h2d_gb_s=20, wake_fixed_s=0.2, sleep_s=0.1, prefill_s_per_token=1e-4,
            decode_s_per_token=0.02, batch=16)  # fmt: skip


def short_requests(seed: int, rate: float = 10.0) -> list[Request]:
    return synthetic(NAMES, duration_s=120, rate_per_s=rate, zipf_s=0.5, prompt_tokens=100,
                     output_tokens=20, seed=seed)  # fmt: skip


def pool_for_one(trace, policy="batched"):
    """Three models of 16 GB on one device whose pool holds one of them."""
    models = [Model(n, 16 * GB) for n in NAMES]
    return simulate(trace, models, GPU, pool_bytes=20 * GB, policy=policy)


def test_the_same_seed_gives_the_same_run():
    assert short_requests(1) == short_requests(1)
    assert short_requests(1) != short_requests(2)
    assert pool_for_one(short_requests(1)) == pool_for_one(short_requests(1))


@pytest.mark.parametrize("policy", ["batched", "switch-per-request"])
def test_every_request_completes_once_in_order(policy):
    trace = short_requests(3)
    result = pool_for_one(trace, policy)
    assert [s.request for s in result.served] == trace
    for s in result.served:
        assert s.request.time <= s.admitted < s.first_token <= s.done < math.inf
    # One model awake at a time: turns on the device never overlap.
    turns = sorted(result.turns, key=lambda t: t.began)
    for before, after in zip(turns, turns[1:]):
        assert before.ended < after.began
    assert result.switches == len(turns) - 1  # all but the one awake at the start


def test_batched_switches_far_less_and_serves_more_within_the_slo():
    """Three models taking turns on a pool for one, short requests, ten a second."""
    for seed in range(3):
        trace = short_requests(seed)
        ours, theirs = pool_for_one(trace), pool_for_one(trace, "switch-per-request")
        assert ours.switches * 1.2 < theirs.switches
        assert ours.switching_s < theirs.switching_s
        good = [sum(s.ttft <= 2.0 for s in r.served) for r in (ours, theirs)]
        assert good[0] > 1.3 * good[1]  # 1.42-1.62x on these seeds


def test_one_model_per_device_never_switches():
    trace = short_requests(4, rate=3.0)
    models = [Model(n, 16 * GB) for n in NAMES]
    result = one_model_per_device(trace, models, GPU)
    assert result.switches == 0 and result.switching_s == 0 and result.devices == 3
    for s in result.served:
        assert s.wait == 0
        assert s.ttft >= s.request.prompt_tokens * GPU.prefill_s_per_token
    # Alone on its device, a request that finds a free slot starts at once.
    first = result.served[0]
    r = first.request
    assert first.ttft == pytest.approx(r.prompt_tokens * 1e-4 + 0.02)
    assert first.done - r.time == pytest.approx(r.prompt_tokens * 1e-4 + r.output_tokens * 0.02)


def test_busy_time_is_the_union_of_requests_running():
    models = [Model("a", 16 * GB)]
    # 1 s each (50 tokens at 0.02 s): the first two overlap by half, the third alone.
    trace = [Request(0.0, "a", 0, 50), Request(0.5, "a", 0, 50), Request(5.0, "a", 0, 50)]
    result = simulate(trace, models, GPU, pool_bytes=20 * GB)
    assert result.busy_s == pytest.approx(1.5 + 1.0)
    assert summary(result, 1.0)["utilisation"] == pytest.approx(2.5 / 6.0)


def test_models_are_spread_by_popularity():
    models = [Model(n, GB) for n in "abcdef"]
    trace = [Request(0.0, n, 1, 1) for k, n in enumerate("fedcba") for _ in range(6 - k)]
    # Most requested first: f e d c b a, dealt 0 1 2 2 1 0.
    assert homes(models, trace, 3) == {"f": 0, "e": 1, "d": 2, "c": 2, "b": 1, "a": 0}


def test_a_fleet_of_devices():
    trace = synthetic([f"m{k}" for k in range(8)], duration_s=60, rate_per_s=8, seed=5)
    models = [Model(f"m{k}", 16 * GB) for k in range(8)]
    result = simulate(trace, models, GPU, devices=4, pool_bytes=40 * GB)
    assert result.devices == 4 and len(result.served) == len(trace)
    assert {t.device for t in result.turns} == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="needs"):
        simulate(trace, models, GPU, devices=4, pool_bytes=10 * GB)


def test_synthetic_popularity_and_burstiness():
    def gaps_cv(trace, model):
        times = [r.time for r in trace if r.model == model]
        gaps = [b - a for a, b in zip(times, times[1:])]
        return statistics.pstdev(gaps) / statistics.mean(gaps)

    models = [f"m{k}" for k in range(4)]
    smooth = synthetic(models, duration_s=2000, rate_per_s=4, zipf_s=1.0, cv=0.5, seed=0)
    bursty = synthetic(models, duration_s=2000, rate_per_s=4, zipf_s=1.0, cv=3.0, seed=0)
    counts = [sum(r.model == m for r in smooth) for m in models]
    assert counts == sorted(counts, reverse=True)
    assert counts[0] / counts[1] == pytest.approx(2, rel=0.15)  # Zipf, s = 1
    assert len(smooth) / 2000 == pytest.approx(4, rel=0.1)
    assert gaps_cv(smooth, "m0") == pytest.approx(0.5, rel=0.2)
    assert gaps_cv(bursty, "m0") == pytest.approx(3.0, rel=0.3)
    assert all(r.prompt_tokens >= 1 and r.output_tokens >= 1 for r in bursty)
    assert statistics.mean(r.output_tokens for r in smooth) == pytest.approx(64, rel=0.1)
    assert [r.time for r in smooth] == sorted(r.time for r in smooth)


def test_read_trace(tmp_path):
    path = tmp_path / "trace.csv"
    path.write_text("model,time,prompt_tokens,output_tokens,note\nb,1.5,10,3,x\na,0.25,7,1,y\n")
    assert read_trace(str(path)) == [Request(0.25, "a", 7, 1), Request(1.5, "b", 10, 3)]
    trace = short_requests(7)
    write_trace(str(path), trace)
    assert read_trace(str(path)) == trace  # every float back exactly


def test_a_request_costs_its_fixed_part_too():
    """``request_s`` comes before the first token and holds the request's slot."""
    costs = Costs(prefill_s_per_token=1e-3, decode_s_per_token=0.05, batch=1, request_s=0.1)
    trace = [Request(0.0, "a", 100, 4), Request(0.0, "a", 100, 4)]
    first, second = simulate(trace, [Model("a", GB)], costs, pool_bytes=2 * GB).served
    assert first.ttft == pytest.approx(0.1 + 0.1 + 0.05)
    assert first.done == pytest.approx(0.1 + 0.1 + 4 * 0.05)
    assert second.ttft == pytest.approx(first.done + 0.25)  # one at a time


def test_summary():
    assert percentile([3, 1, 2, 4], 50) == 2 and percentile([3, 1, 2, 4], 99) == 4
    assert math.isnan(percentile([], 50))
    trace = short_requests(6, rate=3.0)
    result = pool_for_one(trace)
    figures = summary(result, slo_s=2.0)
    within = sum(s.ttft <= 2.0 for s in result.served)
    assert figures["requests"] == len(trace)
    assert figures["goodput_per_s"] == pytest.approx(within / result.span_s)
    assert figures["slo_attainment"] == pytest.approx(within / len(trace))
    assert figures["switches_per_min"] == pytest.approx(result.switches / result.span_s * 60)
    assert 0 < figures["switching_fraction"] < 1
    assert figures["ttft_p50_s"] <= figures["ttft_p95_s"] <= figures["ttft_p99_s"]
