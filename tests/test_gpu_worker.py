"""The CUDA worker patch's memory rules, without a GPU: the private budget an
instance needs beside the pool, checked at start with a clear error, and the
sleep-mode backend it registers. (Its GPU path runs in the proof kit,
scripts/gpu_check.sh, which needs no vLLM; vLLM's own GPU worker has not run.)"""

from types import SimpleNamespace

import pytest

from vllm_mux.patches import gpu_worker

GiB = 1 << 30


def snapshot(free: int):
    return SimpleNamespace(free_memory=free, total_memory=80 * GiB, device_="cuda:0")


def test_the_default_private_budget_is_checked_against_free_memory(monkeypatch):
    monkeypatch.delenv("VLLM_MUX_PRIVATE_MEMORY", raising=False)
    assert gpu_worker.request_memory(snapshot(5 * GiB), None) == 4 * GiB
    with pytest.raises(ValueError, match=r"has 3\.00 GiB free .* needs 4\.00 GiB") as e:
        gpu_worker.request_memory(snapshot(3 * GiB), None)
    assert "smaller --device-memory" in str(e.value)


def test_the_budget_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("VLLM_MUX_PRIVATE_MEMORY", "1.5GiB")
    assert gpu_worker.request_memory(snapshot(2 * GiB), None) == int(1.5 * GiB)
    monkeypatch.setenv("VLLM_MUX_PRIVATE_MEMORY", "lots")
    with pytest.raises(ValueError, match="VLLM_MUX_PRIVATE_MEMORY='lots' is not a size"):
        gpu_worker.request_memory(snapshot(2 * GiB), None)


def test_the_plugin_registers_a_sleep_mode_backend_vllm_resolves():
    from vllm.device_allocator.sleep_mode_backend import SleepModeBackendFactory

    from vllm_mux import worker

    worker.register()
    worker.register()  # a second plugin load in the same process is harmless
    config = SimpleNamespace(sleep_mode_backend="vllm_mux")
    backend = SleepModeBackendFactory.create_backend(config)
    assert isinstance(backend, worker.SleepMode) and backend.state() == "RUNNING"
    assert backend.preserves_compiled_artifacts()


def test_the_patch_leaves_other_platforms_alone():
    from vllm.v1.worker import gpu_worker as upstream

    before = upstream.request_memory
    gpu_worker.apply()  # this machine's platform is CPU: nothing to patch
    assert upstream.request_memory is before
