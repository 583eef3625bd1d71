"""An instance's sleep and wake against a real daemon, without vLLM: the
weights come back byte for byte at the same addresses, and a wake that fails
half way ends asleep holding nothing."""

import os

import pytest
import torch

from conftest import LiveDaemon, assert_books_balance, take_chunks
from vllm_mux.daemon.client import Client, DaemonError
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


@pytest.mark.parametrize("piece_chunks", [256, 2], ids=["one piece", "pieces of 2 chunks"])
def test_a_wake_that_fails_half_way_ends_asleep_holding_nothing(
    instance, monkeypatch, piece_chunks
):
    inst, watcher = instance
    monkeypatch.setattr("vllm_mux.instance.WAKE_PIECE", piece_chunks * CHUNK)
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


def test_weights_copied_back_in_pieces_while_mapping(instance, monkeypatch):
    """The wake maps a piece, starts its copy, maps the next: every byte still
    comes back, whatever the piece size."""
    inst, watcher = instance
    monkeypatch.setattr("vllm_mux.instance.WAKE_PIECE", CHUNK)  # one chunk a piece
    tensors = weights()
    expected = [t.clone() for t in tensors]
    inst.adopt_weights(tensors)
    copies = []
    real_copy_in = inst.backend.copy_in
    monkeypatch.setattr(
        inst.backend,
        "copy_in",
        lambda addr, host: copies.append(host.numel()) or real_copy_in(addr, host),
    )
    inst.sleep()
    take_chunks(inst.socket_path, 16)  # every chunk: the sleeper's bytes are gone
    inst.wake()
    assert len(copies) == inst.weights.size // CHUNK and sum(copies) == inst.weights.used
    assert inst.last_wake["tier"] == "host" and inst.last_wake["chunks_kept"] == 0
    for t, e in zip(tensors, expected):
        assert torch.equal(t, e)
    assert held(watcher) == inst.weights.size // CHUNK


def test_a_second_adopt_moves_nothing_and_refreshes_the_host_copy(instance):
    """What a weight update does: tensors already in the arena stay where they
    are, and the host copy takes their new bytes, so a wake restores those."""
    inst, watcher = instance
    tensors = weights()
    inst.adopt_weights(tensors)
    pointers, used = [t.data_ptr() for t in tensors], inst.weights.used
    tensors[0].fill_(3.5)  # an update written in place
    inst.refresh_weights(tensors)
    assert inst.loaded["moved"] == 0 and inst.weights.used == used
    assert [t.data_ptr() for t in tensors] == pointers
    inst.sleep()
    with pytest.raises(RuntimeError, match="cannot change while asleep"):
        inst.refresh_weights(tensors)
    inst.wake()
    assert bool((tensors[0] == 3.5).all())
    assert held(watcher) == inst.weights.size // CHUNK


def test_an_instance_refuses_a_daemon_on_another_device(tmp_path, monkeypatch):
    from vllm_mux.memory import cpu

    daemon = LiveDaemon(str(tmp_path / "d.sock"), 4, CHUNK)
    other = cpu.Backend()
    other.identity = "GPU-00000000-0000-0000-0000-000000000000"  # not the daemon's device
    monkeypatch.setattr("vllm_mux.instance.make_backend", lambda device: other)
    try:
        with pytest.raises(RuntimeError, match="pool is on cpu .* computes on GPU-0000"):
            Instance(daemon.path, "elsewhere")
        status = daemon.status()
        assert_books_balance(status)
        assert status["free_chunks"] == 4 and status["device_identity"] == "cpu"
    finally:
        daemon.stop()


def test_the_private_budget_is_on_the_books(tmp_path):
    daemon = LiveDaemon(str(tmp_path / "d.sock"), 4, CHUNK)
    try:
        inst = Instance(daemon.path, "budgeted", private_bytes=3 << 30)
        (me,) = daemon.status()["instances"]
        assert me["private_bytes"] == 3 << 30
        inst.client.close()
        client = Client(daemon.path)
        with pytest.raises(DaemonError, match="private_bytes is a non-negative integer"):
            client.call("hello", role="instance", model="m", private_bytes=-1)
        client.close()
    finally:
        daemon.stop()


def open_fds() -> int:
    """Chunk fds open in this process (the daemon's, served from here, and
    ours): others (an earlier test's daemon closing its pidfds as its threads
    wind down) come and go on their own."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += "vllm-mux-chunk" in os.readlink(f"/proc/self/fd/{fd}")
        except FileNotFoundError:  # the listing's own fd
            pass
    return count


@pytest.mark.parametrize("fails, at", [("import", 2), ("copy", 1)])
def test_a_wake_whose_import_or_copy_fails_leaks_no_chunk_or_fd(instance, monkeypatch, fails, at):
    """Every chunk received is released and every fd closed, whichever step
    of the wake fails: on CUDA an open fd or handle pins the memory."""
    inst, watcher = instance
    monkeypatch.setattr("vllm_mux.instance.WAKE_PIECE", 2 * CHUNK)  # several pieces
    tensors = weights()
    expected = [t.clone() for t in tensors]
    inst.adopt_weights(tensors)
    inst.sleep()
    take_chunks(inst.socket_path, 16)  # the wake must copy
    before = open_fds()
    calls = []
    name = "import_" if fails == "import" else "copy_in"
    real = getattr(inst.backend, name)

    def fails_once(*args):
        calls.append(1)
        if len(calls) == at:
            if fails == "import":
                import os

                os.close(args[0])  # import_ owns its fd, failing or not
            raise OSError(5, f"injected: {fails} failed")
        return real(*args)

    monkeypatch.setattr(inst.backend, name, fails_once)
    with pytest.raises(OSError, match="injected"):
        inst.wake()
    assert inst.asleep and held(watcher) == 0
    assert open_fds() == before, "a received fd or a chunk's fd stayed open"
    monkeypatch.setattr(inst.backend, name, real)
    inst.wake()
    for t, e in zip(tensors, expected):
        assert torch.equal(t, e)
    assert held(watcher) == inst.weights.size // CHUNK
