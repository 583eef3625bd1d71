"""The serve config: a valid file loads; an invalid one is refused with line and reason."""

import subprocess
import sys

import pytest

from vllm_mux.config import ConfigError, parse

GOOD = """\
device: cpu
device_memory: 2GiB
port: 8123
api_key: secret
models:
  - name: a
    source: smollm2
    args: [--max-model-len, 1024]
    idle_ttl: 30
    pinned: true
  - name: b
    source: /models/b
    args: {max-model-len: 2048, enforce-eager: true, trust-remote-code: false}
"""


def test_a_valid_file_loads():
    config = parse(GOOD)
    assert (config.device, config.device_memory, config.port) == ("cpu", "2GiB", 8123)
    a, b = config.models
    assert (a.name, a.source, a.args, a.idle_ttl, a.pinned) == (
        "a", "smollm2", ["--max-model-len", "1024"], 30, True,
    )  # fmt: skip
    assert b.args == ["--max-model-len", "2048", "--enforce-eager"] and not b.pinned


@pytest.mark.parametrize(
    "text, line, reason",
    [
        ("models:\n  - name: a\n    source: x\n  colour: red\n", 4, "expected"),
        ("device: cpu\nmodel:\n  - name: a\n", 2, "unknown key model"),
        ("port: eighty\nmodels:\n  - {name: a, source: x}\n", 1, "port must be int, not str"),
        ("models:\n  - name: a\n    source: x\n    idle_ttl: soon\n", 4, "idle_ttl must be"),
        ("models:\n  - name: a\n    source: x\n    pinned: 1\n", 4, "pinned must be bool"),
        ("models:\n  - name: a\n", 2, "a model needs source"),
        ("models:\n  - {name: a, source: x}\n  - {name: a, source: y}\n", 3, "used twice"),
        ("models:\n  - name: a\n    source: x\n    gpu: 1\n", 4, "unknown key models[].gpu"),
        ("device: cpu\n", 1, "at least one model"),
        ("", 1, "empty"),
        ("- a\n- b\n", 1, "must be a mapping"),
    ],
)
def test_an_invalid_file_names_line_and_reason(text, line, reason):
    with pytest.raises(ConfigError) as e:
        parse(text, "mux.yaml")
    assert str(e.value).startswith(f"mux.yaml:{line}: "), str(e.value)
    assert reason in str(e.value)


def test_serve_refuses_an_invalid_file_before_starting_anything(tmp_path):
    path = tmp_path / "mux.yaml"
    path.write_text("models:\n  - name: a\n    source: x\n    pinned: maybe\n")
    result = subprocess.run(
        [sys.executable, "-m", "vllm_mux.cli", "serve", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert f"invalid config: {path}:4: models[].pinned must be bool, not str" in result.stderr
