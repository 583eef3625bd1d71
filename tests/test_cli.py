"""The ``vllm-mux daemon`` command refuses bad input with one clear line, not a traceback."""

import importlib.util
import subprocess
import sys

import pytest


def daemon(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vllm_mux.cli", "daemon", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    "args, says",
    [
        (["--device", "gpu", "--device-memory", "1GiB"], "unknown device 'gpu'; known: cpu, cuda"),
        (["--device-memory", "1MiB"], "smaller than one chunk (33554432)"),
        (["--device-memory", "1GiB", "--chunk-size", "12345"], "not a multiple of the device"),
    ],
)
def test_bad_daemon_arguments_get_one_clear_line(args, says, tmp_path):
    done = daemon(*args, "--socket", str(tmp_path / "d.sock"))
    assert done.returncode == 2
    assert says in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "d.sock").exists()


@pytest.mark.skipif(
    importlib.util.find_spec("cuda") is not None, reason="cuda-bindings is installed here"
)
def test_cuda_without_cuda_bindings_says_what_to_install(tmp_path):
    done = daemon("--device", "cuda", "--device-memory", "1GiB", "--socket", str(tmp_path / "s"))
    assert done.returncode == 2 and "pip install vllm-mux[cuda]" in done.stderr
    assert "Traceback" not in done.stderr
