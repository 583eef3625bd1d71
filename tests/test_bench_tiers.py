"""`vllm-mux bench tiers`: its pieces without vLLM (sizes, the wake facts it
reads from a live daemon, the summary and table), and one end-to-end run on
the bundled model (marked vllm: about 2.5 minutes on an idle 2-core machine)."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import LiveDaemon, take_chunks
from vllm_mux.bench import tiers
from vllm_mux.instance import Instance

CHUNK = 1 << 20
POOL = 16  # chunks


def test_tensor_elements_reads_the_safetensors_headers(tmp_path):
    from safetensors.torch import save_file

    save_file(
        {"a": torch.zeros(3, 5), "b": torch.zeros(7, dtype=torch.bfloat16)},
        tmp_path / "x.safetensors",
    )
    assert tiers.tensor_elements(tmp_path) == (22, 2)
    assert tiers.weights_bytes(tmp_path) == 22 * 4  # served in float32
    with pytest.raises(FileNotFoundError):
        tiers.tensor_elements(tmp_path / "nothing")


def test_kv_cache_bytes_reads_vllms_units():
    assert tiers.kv_cache_bytes() == 256 << 20  # CPU_ARGS' 256M: binary, as vLLM reads it
    assert tiers.kv_cache_bytes(["--kv-cache-memory-bytes", "64m"]) == 64_000_000
    assert tiers.kv_cache_bytes(["-x", "--kv-cache-memory-bytes", "1.5K"]) == 1536
    assert tiers.kv_cache_bytes(["--kv-cache-memory-bytes", "4096"]) == 4096


def test_the_plan_for_the_bundled_model_makes_each_tier_possible(model_dir):
    model = tiers.weights_bytes(model_dir)
    tiny = 51_000_000  # the tiny random model's weights, about
    per_token = tiers.kv_bytes_per_token(model_dir)
    assert per_token == 2 * 30 * 3 * 64 * 4  # SmolLM2-135M: 30 layers, 3 KV heads of 64
    p = tiers.plan(model, tiny, 32 << 20, per_token)
    # The pool is one subject: 17 chunks of weights, 8 of KV cache (256 MiB).
    assert (p["subject_weights_chunks"], p["subject_chunks"]) == (17, 25)
    assert p["pool_bytes"] == 25 * (32 << 20)
    # The budget holds the subject's copy (its arena is 2.1 MB over the
    # files' tensors), not the tiny model's beside it.
    assert model + (3 << 20) <= p["host_budget"] < model + tiny
    # The partial taker's KV cache holds its max-model-len, and it needs
    # fewer chunks than the pool: it takes some of the subject's weights.
    assert p["part_kv_bytes"] >= tiers.PART_MAX_LEN * per_token
    assert p["subject_weights_chunks"] < p["part_chunks"] < p["subject_chunks"]
    assert 0 < p["part_expected_kept_weights_chunks"] < p["subject_weights_chunks"]


class FakeServer:
    """What measure_wake needs of a server: its name; its request is a wake."""

    def __init__(self, inst: Instance):
        self.name, self.inst = inst.model, inst


def fake_ttft(server, max_tokens: int = 1) -> float:
    server.inst.wake()  # what the engine does when a request finds it asleep
    return 0.01


def test_measure_wake_reads_the_instances_wake_facts_and_the_books(tmp_path, monkeypatch):
    monkeypatch.setattr(tiers, "ttft", fake_ttft)
    daemon = LiveDaemon(str(tmp_path / "d.sock"), POOL, CHUNK, wait_timeout=2)
    try:
        inst = Instance(daemon.path, "m", key="m")
        g = torch.Generator().manual_seed(0)
        inst.adopt_weights([torch.randn(s, generator=g) for s in [(300, 1000), (1000, 441)]])
        inst.alloc(inst.kv_cache, CHUNK)
        server = FakeServer(inst)
        n = inst.weights.size // CHUNK + 1

        with pytest.raises(RuntimeError, match="not asleep"):
            tiers.measure_wake(daemon.path, server, "warm")

        inst.sleep()
        warm = tiers.measure_wake(daemon.path, server, "warm")
        assert warm["tier"] == "warm" and warm["as_arranged"] and warm["wakes_counted"] == 1
        assert warm["resident_chunks_before"] == n and warm["host_copy_before"]
        assert warm["copied_bytes"] == 0 and warm["chunks_kept"] == n == warm["chunks"]
        assert warm["ttft_s"] == 0.01 and warm["wake_s"] > 0 and warm["reload_s"] is None

        inst.sleep()
        take_chunks(daemon.path, POOL - n + 2)  # the free chunks and 2 of ours
        # Arranged as host, it is partial: reported as it is, not as arranged.
        got = tiers.measure_wake(daemon.path, server, "host")
        assert got["tier"] == "partial" and not got["as_arranged"]
        assert got["arranged"] == "host" and got["resident_chunks_before"] == n - 2
        assert 0 < got["copied_bytes"] <= 2 * CHUNK
        assert tiers.books_balance(daemon.status())
        inst.client.close()
    finally:
        daemon.stop()


def record(arranged, tier, wake_s, ttft_s, copied=0, kept=25, reload_s=None) -> dict:
    return {
        "arranged": arranged,
        "tier": tier,
        "as_arranged": tier == arranged,
        "wake_s": wake_s,
        "ttft_s": ttft_s,
        "copied_bytes": copied,
        "chunks_kept": kept,
        "chunks": 25,
        "reload_s": reload_s,
    }


def test_the_summary_and_table_show_medians_ratios_and_a_tier_not_arranged():
    wakes = [
        record("warm", "warm", 0.02, 0.2),
        record("warm", "warm", 0.04, 0.4),
        record("warm", "warm", 0.03, 0.3),
        record("host", "host", 0.1, 0.25, copied=512 << 20, kept=0),
        record("cold", "partial", 0.2, 0.5, copied=256 << 20, kept=10),  # not as arranged
        record("cold", "cold", 1.5, 2.0, kept=15, reload_s=0.4),
    ]
    rows = tiers.summarize(wakes, awake=[0.1, 0.2, 0.15], restart=30.0)
    assert rows["warm"]["wake_s"] == 0.03 and rows["warm"]["ttft_s"] == 0.3
    assert rows["warm"]["restart_vs_ttft"] == pytest.approx(100.0)
    assert rows["warm"]["tiers_reported"] == {"warm": 3} and rows["warm"]["as_arranged"]
    assert rows["cold"]["tiers_reported"] == {"partial": 1, "cold": 1}
    assert not rows["cold"]["as_arranged"] and rows["cold"]["reload_s"] == 0.4
    assert rows["awake"]["ttft_s"] == 0.15 and rows["awake"]["restart_vs_ttft"] == 200.0
    assert rows["restart"] == {"ttft_s": 30.0, "restart_vs_ttft": 1.0}
    assert "partial" not in rows  # none arranged, none shown

    text = tiers.table(rows)
    lines = text.splitlines()
    assert lines[0].startswith("| wake | tier reported | as arranged")
    assert [line.split(" | ")[0] for line in lines[2:]] == [
        "| awake (baseline)",
        "| warm",
        "| host",
        "| cold",
        "| restart vLLM (peer)",
    ]
    (cold,) = [line for line in lines if line.startswith("| cold")]
    assert "partial ×1, cold ×1" in cold and "**no**" in cold and "0.40" in cold
    (host,) = [line for line in lines if line.startswith("| host")]
    assert "| 512 |" in host and "| 0/25 |" in host and "| 120.0 |" in host


def test_cycles_must_be_positive(capsys):
    assert tiers.main(["--cycles", "0"]) == 2
    assert "--cycles" in capsys.readouterr().err


@pytest.mark.vllm
@pytest.mark.timeout(1800)
def test_one_run_measures_every_tier_as_arranged_against_a_restart(tmp_path, model_dir):
    out = tmp_path / "tiers.json"
    argv = [sys.executable, "-m", "vllm_mux.bench.tiers", "--cycles", "1"]
    argv += ["--out", str(out), "--log-dir", str(tmp_path / "logs")]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=1700)
    report = (done.stdout + done.stderr)[-6000:]
    assert done.returncode == 0, report
    results = json.loads(out.read_text())
    assert results["ok"] and results["pool_for_one"] and results["books_balanced"], report
    rows = results["rows"]
    for tier in tiers.TIERS:
        assert rows[tier]["tiers_reported"] == {tier: 1}, (tier, rows[tier])
    by_tier = {w["arranged"]: w for w in results["wakes"]}
    assert by_tier["warm"]["copied_bytes"] == 0 and by_tier["warm"]["kv_intact"]
    weights = by_tier["host"]["weights_bytes"]
    assert 0 < by_tier["partial"]["copied_bytes"] < weights == by_tier["host"]["copied_bytes"]
    assert not by_tier["cold"]["host_copy_before"] and by_tier["cold"]["reload_s"] > 0
    # Every wake, even the cold one, beats restarting vLLM.
    for name in (*tiers.TIERS, "awake"):
        assert rows[name]["restart_vs_ttft"] > 1, (name, rows[name])
    assert out.with_suffix(".md").read_text().startswith("| wake |")
