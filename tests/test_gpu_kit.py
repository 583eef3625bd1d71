"""The GPU proof kit runs in CI at a small size on the cpu backend, so it never
rots: the daemon, two processes exchanging chunks, a model loaded through the
instance's loading path, sleep/wake cycles with another process overwriting
the freed chunks, and the wake against a plain copy, all ending in its report."""

import json
import subprocess
import sys


def test_the_kit_runs_on_cpu_and_every_check_passes(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "vllm_mux.cli", "bench", "gpu", "--device", "cpu"]
        + ["--cycles", "4", "--rounds", "2", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    r = json.loads((tmp_path / "results.json").read_text())
    assert r["verdict"]["failed"] == []
    assert r["exchange"]["write"]["chunks"] == r["exchange"]["read"]["chunks"] > 0
    assert r["exchange"]["read"]["mismatched_chunks"] == 0
    m = r["model"]
    # failures include the books: balanced, and the sleeping instance holds nothing
    assert m["cycles"] == 4 and m["failures"] == [] and len(m["tokens"]) == 16
    assert m["bytes_overwritten_by_other_process"] > 4 * m["weights"]["arena_bytes"]
    assert m["weights"]["moved"] == m["weights"]["tensors"], "on CPU every tensor is moved in"
    (wake,) = r["wake"]
    assert wake["bytes"] == 64 << 20 and wake["wake_ms"] > 0 and wake["plain_copy_ms"] > 0
    # Each round woke warm (nothing taken), partial and from the host, as arranged.
    assert wake["tiers_as_arranged"] and {t[1] for t in wake["tiers"]} == {
        "warm",
        "partial",
        "host",
    }
    assert 0 < wake["partial_copied_bytes"] < wake["bytes"]
    assert "| model: cycles, failures | 4, 0" in (tmp_path / "results.md").read_text()
