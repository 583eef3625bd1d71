"""What a launched vLLM instance is given, without starting vLLM."""

import subprocess

from vllm_mux import launch


def test_every_instance_gets_a_key_of_its_own(monkeypatch, tmp_path):
    """The key joins an instance's worker and controller at the daemon. One
    inherited from the launcher's environment (a test, or a shell, that set
    VLLM_MUX_INSTANCE) would give every instance the same: their controllers
    then replace each other at the daemon for ever, and no model can be asked
    to sleep (seen in CI)."""
    monkeypatch.setenv("VLLM_MUX_INSTANCE", "inherited")
    envs = []

    class Spawned:
        pid = 0

        def __init__(self, argv, env, **kwargs):
            envs.append(env)

    monkeypatch.setattr(subprocess, "Popen", Spawned)
    for name in ("a", "b"):
        launch.VllmServer("model", tmp_path / f"{name}.log", name=name, socket_path="/x.sock")
    keys = [env["VLLM_MUX_INSTANCE"] for env in envs]
    assert len(set(keys)) == 2 and "inherited" not in keys
