"""The NPU worker patch, as far as a machine without an NPU can test it
honestly: it imports without vllm_ascend, does nothing off the NPU platform,
and its pure pieces (the NZ refusal, the KV budget) behave. Its targets are
checked against vllm-ascend's sources in tests/test_check_upstream.py.
Nothing here runs on an NPU, or pretends to."""

import sys

import pytest

from vllm_mux.patches import NPU_PATCHES, PLATFORMS, modules, npu_worker


def test_imports_and_apply_is_a_no_op_off_npu():
    assert "vllm_ascend" not in sys.modules and "torch_npu" not in sys.modules
    from vllm.platforms import current_platform

    assert current_platform.device_type != "npu"
    assert npu_worker.apply() is None
    assert "vllm_ascend" not in sys.modules and "torch_npu" not in sys.modules


def test_on_npu_apply_reaches_vllm_ascend(monkeypatch):
    """Only the platform guard keeps apply() from vllm_ascend: on "npu" it
    imports torch_npu and vllm_ascend, which are not installed here."""
    from vllm.platforms import current_platform

    monkeypatch.setattr(type(current_platform), "device_type", "npu")
    with pytest.raises(ModuleNotFoundError, match="torch_npu|vllm_ascend"):
        npu_worker.apply()


def test_npu_patch_modules_import_on_vllm_032_too():
    """The npu list's modules import anywhere (none imports vllm_mux.worker,
    which needs vLLM 0.32's sleep-mode registry), and each names targets."""
    assert PLATFORMS["npu"]["patches"] is NPU_PATCHES
    for module in modules(NPU_PATCHES):
        assert module.TARGETS and callable(module.apply)


@pytest.mark.parametrize(
    "mode, quantized, is_310p, refused",
    [
        (0, False, False, False),
        (0, True, False, False),
        (1, False, False, False),  # the default: BF16/FP16 weights stay ND
        (1, True, False, True),  # quantized weights go NZ by default
        (2, False, False, True),
        (2, True, False, True),
        (0, False, True, True),  # 310P casts whatever the mode
    ],
)
def test_nz_config_refusal(mode, quantized, is_310p, refused):
    why = npu_worker.nz_config_refusal(mode, quantized, is_310p)
    assert (why is not None) == refused
    if refused:
        assert why.startswith("vllm-mux: ") and "FRACTAL_NZ" in why


def test_nz_config_refusal_says_how_to_turn_it_off():
    why = npu_worker.nz_config_refusal(2, False, False)
    assert '"weight_nz_mode": 0' in why and "VLLM_ASCEND_ENABLE_NZ=0" in why


def test_base_formats_pass():
    npu_worker.refuse_formats({"a.weight": 2, "b.weight": 0, "c.bias": 1, "d": 30})
    npu_worker.refuse_formats({})


def test_nz_weights_are_refused_by_name():
    formats = {"embed.weight": 2, "layers.0.mlp.w13_weight": 29, "layers.0.wd_qkv": 29}
    with pytest.raises(ValueError, match="2 weights are in FRACTAL_NZ format") as e:
        npu_worker.refuse_formats(formats)
    assert "layers.0.mlp.w13_weight (format 29)" in str(e.value)
    assert "embed.weight" not in str(e.value)
    assert '"weight_nz_mode": 0' in str(e.value)


def test_other_private_formats_are_refused_and_listing_is_bounded():
    formats = {f"w{i}": 29 for i in range(7)} | {"conv": 3}  # NC1HWC0
    with pytest.raises(ValueError, match="8 weights are in a private NPU format") as e:
        npu_worker.refuse_formats(formats)
    assert "and 3 more" in str(e.value)


def test_kv_budget_from_the_pool():
    gib = 1 << 30
    assert npu_worker.kv_cache_budget(40 * gib, 16 * gib, 0.9) == int(0.9 * 40 * gib) - 16 * gib
    assert npu_worker.kv_cache_budget(40 * gib, 16 * gib, 0.9, explicit=3 * gib) == 3 * gib


def test_kv_budget_refuses_no_room():
    gib = 1 << 30
    with pytest.raises(ValueError, match="leaves no room for a KV cache"):
        npu_worker.kv_cache_budget(16 * gib, 16 * gib, 0.9)


def test_kv_budget_matches_the_shared_workers_arithmetic():
    """The same arithmetic as vllm_mux.worker.kv_cache_budget (vLLM 0.32)."""
    from types import SimpleNamespace

    from vllm_mux import worker

    gib = 1 << 30
    arena = SimpleNamespace(capacity=40 * gib, mapped=15 * gib)
    fake = SimpleNamespace(
        cache_config=SimpleNamespace(kv_cache_memory_bytes=None, gpu_memory_utilization=0.8)
    )
    saved = worker._instance
    worker._instance = SimpleNamespace(weights=arena)
    try:
        assert worker.kv_cache_budget(fake) == npu_worker.kv_cache_budget(40 * gib, 15 * gib, 0.8)
    finally:
        worker._instance = saved


def test_private_budget_check():
    gib = 1 << 30
    assert npu_worker.check_private(5 * gib, 4 * gib, "npu:0") == 4 * gib
    with pytest.raises(ValueError, match="npu:0 has 3.00 GiB free beside the daemon's pool"):
        npu_worker.check_private(3 * gib, 4 * gib, "npu:0")
