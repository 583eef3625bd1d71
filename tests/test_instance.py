"""An instance's sleep and wake against a real daemon, without vLLM: the
weights come back byte for byte at the same addresses, and a wake that fails
half way ends asleep holding nothing."""

import pytest
import torch

from conftest import LiveDaemon, assert_books_balance
from vllm_mux.daemon.client import Client
from vllm_mux.instance import Instance

CHUNK = 1 << 20


@pytest.fixture
def instance(tmp_path):
    daemon = LiveDaemon(str(tmp_path / "d.sock"), 16, CHUNK, wait_timeout=1)
    inst = Instance(daemon.path, "weights-only", key="k")
    yield inst, daemon.client()
    inst.client.close()
    daemon.stop()


def weights() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    # 5.5 chunks of float32 in odd sizes, and one transposed (strided) view
    shapes = [(300, 1000), (1000, 441), (7,), (512, 512)]
    tensors = [torch.randn(s, generator=g) for s in shapes]
    return tensors + [torch.randn(64, 32, generator=g).t()]


def held(watcher: Client) -> int:
    status = watcher.status()
    assert_books_balance(status)
    (me,) = status["instances"]
    return me["chunks"]


def test_wake_brings_every_byte_back_at_the_same_address(instance):
    inst, watcher = instance
    tensors = weights()
    expected = [t.clone() for t in tensors]
    inst.adopt_weights(tensors)
    kv = inst.alloc(inst.kv_cache, 3 * CHUNK // 2)
    pointers = [t.data_ptr() for t in tensors] + [kv.data_ptr()]
    awake = held(watcher)
    assert awake == inst.weights.size // CHUNK + 2
    for _ in range(3):
        inst.sleep()
        assert held(watcher) == 0
        inst.wake()
        kv.fill_(7)  # what a KV cache is: written to after every wake
        assert held(watcher) == awake
        assert [t.data_ptr() for t in tensors] + [kv.data_ptr()] == pointers
        for t, e in zip(tensors, expected):
            assert torch.equal(t, e)


def test_a_wake_that_fails_half_way_ends_asleep_holding_nothing(instance, monkeypatch):
    inst, watcher = instance
    tensors = weights()
    expected = [t.clone() for t in tensors]
    inst.adopt_weights(tensors)
    inst.sleep()

    maps = []
    real_map = inst.backend.map

    def third_map_fails(chunk, addr, prefault=True):
        maps.append(addr)
        if len(maps) == 3:
            raise OSError(12, "injected: no memory")
        real_map(chunk, addr, prefault)

    monkeypatch.setattr(inst.backend, "map", third_map_fails)
    with pytest.raises(OSError, match="injected"):
        inst.wake()
    assert inst.asleep and held(watcher) == 0
    assert inst.weights.mapped == inst.kv_cache.mapped == 0

    monkeypatch.setattr(inst.backend, "map", real_map)
    inst.wake()  # the next wake starts over
    for t, e in zip(tensors, expected):
        assert torch.equal(t, e)
    assert held(watcher) == inst.weights.size // CHUNK
