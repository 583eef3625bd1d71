"""One minute of `vllm-mux bench soak`: three models through serve on a pool
that holds two, random requests, sleeps, wakes and killed instances, and
nothing lost. The soak checks its invariants itself (the books, the answers,
fds, threads and processes, a clean stop) and exits 1 if any failed; this
test runs it as CI would and reads its summary."""

import json
import signal
import subprocess
import sys

import pytest

from vllm_mux.bench.soak import MODELS, NOT_SUPPORTED, SUPPORTED

pytestmark = pytest.mark.vllm


# A passing run takes about 4 minutes on a busy 2-core machine; a failing one
# ends on the soak's own bounds (a lost request, a model that never comes
# back), which are longer than pytest's default.
@pytest.mark.timeout(2400)
def test_one_minute_of_faults_loses_nothing(tmp_path):
    out = tmp_path / "soak.json"
    argv = [sys.executable, "-m", "vllm_mux.bench.soak", "--minutes", "1", "--seed", "8"]
    argv += ["--output", str(out), "--log-dir", str(tmp_path / "logs")]
    with open(tmp_path / "soak.log", "w") as log:
        soak = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        try:
            code = soak.wait()
        finally:
            if soak.poll() is None:  # the test was stopped: the soak stops serve first
                soak.send_signal(signal.SIGTERM)
                try:
                    soak.wait(300)
                except subprocess.TimeoutExpired:
                    soak.kill()
                    soak.wait()
    report = (tmp_path / "soak.log").read_text()[-8000:]
    assert code == 0, report
    summary = json.loads(out.read_text())
    assert summary["ok"] and summary["failures"] == [], report

    requests = summary["requests"]
    assert requests["served"] > 0, report
    assert requests["lost"] == 0 and requests["wrong"] == 0, report
    assert requests["sent"] == requests["served"], report

    # Every fault the system survives was injected; the others are reported.
    assert set(summary["faults"]) == set(SUPPORTED)
    assert all(n >= 1 for n in summary["faults"].values()), summary["faults"]
    assert set(summary["not_injected"]) == set(NOT_SUPPORTED)

    # The books were read during the faults, and every model answered after them.
    assert summary["checks"]["books"] > 0
    assert summary["checks"]["final answers"] == len(MODELS) * summary["prompts"]
    start, end = summary["resources"]["start"], summary["resources"]["end"]
    assert end["processes"] == start["processes"], (start, end)
