"""tools/check_upstream.py passes on the pinned vLLM and fails loudly otherwise."""

import subprocess
import sys
from pathlib import Path

import pytest

from vllm_mux.patches import cpu_worker

TOOL = Path(__file__).parents[1] / "tools" / "check_upstream.py"


def load_tool():
    import importlib.util

    spec = importlib.util.spec_from_file_location("check_upstream", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pinned_vllm_matches_every_patch():
    result = subprocess.run([sys.executable, str(TOOL)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "matches every patch" in result.stdout


def test_changed_upstream_source_fails(monkeypatch, capsys):
    target = "vllm.v1.worker.cpu_worker.CPUWorker.sleep"
    monkeypatch.setitem(cpu_worker.TARGETS, target, "0123456789abcdef")
    assert load_tool().main([]) == 1
    assert f"UPSTREAM MISMATCH: vllm_mux.patches.cpu_worker: {target} changed upstream" in (
        capsys.readouterr().err
    )


def test_vanished_upstream_symbol_fails(monkeypatch, capsys):
    monkeypatch.setitem(cpu_worker.TARGETS, "vllm.v1.worker.cpu_worker.CPUWorker.gone", "x")
    assert load_tool().main([]) == 1
    assert "CPUWorker.gone is gone" in capsys.readouterr().err


@pytest.mark.parametrize("installed", ["0.33.0", "0.31.1+cpu"])
def test_other_vllm_version_fails(monkeypatch, capsys, installed):
    tool = load_tool()
    monkeypatch.setattr(tool, "installed_vllm", lambda: installed)
    assert tool.main([]) == 1
    assert f"vLLM {installed} is installed; the patches are written for 0.32.0" in (
        capsys.readouterr().err
    )
