"""The shared worker methods' rules, on a stand-in worker (no vLLM engine):
every method that touches the weights is refused while asleep, an update
refreshes the host copy, no sleep in the middle of an update session, and
LoRA is refused at load."""

import pytest
import torch

from vllm_mux import worker


class FakeInstance:
    def __init__(self):
        self.asleep, self.refreshed, self.slept = False, 0, 0

    def refresh_weights(self, tensors, buffers=()):
        assert tensors, "the model's tensors are handed over"
        self.refreshed += 1

    def adopt_weights(self, tensors):
        pass


class FakeBackend:
    def __init__(self, inst):
        self.inst = inst

    def suspend(self, level):
        self.inst.asleep = True
        self.inst.slept += 1


def fake_worker_class():
    calls = []

    class Worker:
        lora_config = None
        _weight_update_active = False
        model_runner = type("Runner", (), {"get_model": lambda self: torch.nn.Linear(2, 2)})()

        def get_draft_model(self):
            return None

        def load_model(self, *, load_dummy_weights=False):
            calls.append("load_model")

    for name in worker.GUARDED:
        setattr(Worker, name, lambda self, *a, _n=name, **k: calls.append(_n) or _n)
    worker.install(Worker)
    return Worker, calls


@pytest.fixture
def fake(monkeypatch):
    inst = FakeInstance()
    monkeypatch.setattr(worker, "_instance", inst)
    cls, calls = fake_worker_class()
    w = cls()
    w.sleep_mode_backend = FakeBackend(inst)
    return w, inst, calls


def test_every_touch_of_the_weights_is_refused_while_asleep(fake):
    w, inst, calls = fake
    inst.asleep = True
    for name in worker.GUARDED:
        with pytest.raises(RuntimeError, match="refused: this instance is asleep"):
            getattr(w, name)()
    assert calls == [] and inst.refreshed == 0


def test_updates_refresh_the_host_copy_and_reads_do_not(fake):
    w, inst, calls = fake
    for name, refresh in worker.GUARDED.items():
        before = inst.refreshed
        assert getattr(w, name)() == name  # upstream ran and its result came back
        assert inst.refreshed == before + refresh, name
    assert calls == list(worker.GUARDED)


def test_no_sleep_in_the_middle_of_a_weight_update(fake):
    w, inst, _ = fake
    w._weight_update_active = True
    with pytest.raises(RuntimeError, match="middle of a weight update"):
        w.sleep()
    assert not inst.asleep and inst.slept == 0
    w._weight_update_active = False
    w.sleep()
    assert inst.asleep and inst.slept == 1


def test_lora_is_refused_at_load(fake):
    w, _, calls = fake
    w.lora_config = object()
    with pytest.raises(ValueError, match="--enable-lora is not supported"):
        w.load_model()
    assert calls == []


def test_an_update_that_fails_half_way_still_refreshes_the_host_copy(monkeypatch):
    """An upstream reload that wrote some layers and then raised: the host
    copy must take the bytes the model now serves, or a wake would restore
    the old ones under the new (review finding)."""
    inst = FakeInstance()
    monkeypatch.setattr(worker, "_instance", inst)
    cls, _ = fake_worker_class()

    def half_way(self, *args, **kwargs):
        raise RuntimeError("injected: failed after writing some weights")

    monkeypatch.setattr(cls, "reload_weights", half_way)
    worker.install(cls)
    with pytest.raises(RuntimeError, match="injected"):
        cls().reload_weights()
    assert inst.refreshed == 1
