"""The serve config: a valid file loads; an invalid one is refused with line and reason.
And the cores each model computes on when the file does not say."""

import os
import subprocess
import sys

import pytest

from vllm_mux.config import ConfigError, Model, parse
from vllm_mux.launch import cpu_binds, cpu_ids
from vllm_mux.serve import core_binds

GOOD = """\
device: cpu
device_memory: 2GiB
port: 8123
api_key: secret
max_body: 1MiB
models:
  - name: a
    source: smollm2
    args: [--max-model-len, 1024]
    idle_ttl: 30
    pinned: true
    cpu_cores: 0-3,8
  - name: b
    source: /models/b
    args: {max-model-len: 2048, enforce-eager: true, trust-remote-code: false}
    preload: false
"""


def test_a_valid_file_loads():
    config = parse(GOOD)
    assert (config.device, config.device_memory, config.port) == ("cpu", "2GiB", 8123)
    a, b = config.models
    assert (a.name, a.source, a.args, a.idle_ttl, a.pinned, a.cpu_cores) == (
        "a", "smollm2", ["--max-model-len", "1024"], 30, True, "0-3,8",
    )  # fmt: skip
    assert b.args == ["--max-model-len", "2048", "--enforce-eager"] and not b.pinned
    assert b.cpu_cores is None and config.max_body == "1MiB"
    assert (a.preload, b.preload) == (True, False)  # the default starts it awake


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
        ("api_key: ''\nmodels:\n  - {name: a, source: x}\n", 1, "api_key is empty"),
        ("max_body: lots\nmodels:\n  - {name: a, source: x}\n", 1, "max_body must be a size"),
        ("models:\n  - name: a\n    source: x\n    cpu_cores: 3\n", 4, "cpu_cores must be str"),
        ("models:\n  - name: a\n    source: x\n    cpu_cores: all\n", 4, 'like "0-3"'),
        ("models:\n  - name: a\n    source: x\n    preload: 1\n", 4, "preload must be bool"),
        (
            "models:\n  - name: a\n    source: x\n    pinned: true\n    preload: false\n",
            5,
            "a pinned model is never put to sleep, so it cannot start asleep",
        ),
        ("device_memory: lots\nmodels:\n  - {name: a, source: x}\n", 1, "device_memory must be"),
        ("chunk_size: '0'\nmodels:\n  - {name: a, source: x}\n", 1, "chunk_size must be a size"),
        ("host_memory: 8G!\nmodels:\n  - {name: a, source: x}\n", 1, "host_memory must be"),
        ("device: tpu\nmodels:\n  - {name: a, source: x}\n", 1, "unknown device 'tpu'"),
        ("port: 0\nmodels:\n  - {name: a, source: x}\n", 1, "port must be 1 to 65535, not 0"),
        ("device_memory: 2048\nmodels:\n  - {name: a, source: x}\n", 1, "write 2048MiB or 2048GiB"),
        (f"device_memory: '{'9' * 400}'\nmodels:\n  - {{name: a, source: x}}\n", 1, "than 1 PiB"),
        ("device: 'cpu:3'\nmodels:\n  - {name: a, source: x}\n", 1, "the cpu device is one"),
        ("models:\n  - {name: '', source: x}\n", 2, "models[].name is empty"),
        ('models:\n  - {name: "a\\nb", source: x}\n', 2, "'a\\nb' has a control character"),
        (f"models:\n  - {{name: {'a' * 257}, source: x}}\n", 2, "at most 256 characters, not 257"),
        ("models:\n  - {name: a, source: x, idle_ttl: .inf}\n", 2, "idle_ttl is a number of"),
        ("models:\n  - {name: a, source: x, idle_ttl: -1}\n", 2, "0 (never idle) or more"),
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


def test_serve_refuses_an_empty_api_key_before_starting_anything(tmp_path):
    """``--api-key ""`` (say, an unset variable) must not mean "accept an
    empty bearer"; it is refused with a message, and nothing is started."""
    sock = tmp_path / "mux.sock"
    result = subprocess.run(
        [sys.executable, "-m", "vllm_mux.cli", "serve", "--api-key", "", "--socket", str(sock)],
        capture_output=True,
        text=True,
        timeout=600,  # an import on a busy machine; nothing is started
    )
    assert result.returncode == 2
    assert "api_key is empty" in result.stderr
    assert not sock.exists()


@pytest.mark.parametrize(
    "count, cores, binds",
    [
        (1, 2, ["0"]),  # vLLM's own choice for one: a core left to the front ends
        (2, 2, ["0", "1"]),  # a core each, none left over
        (3, 2, ["0", "1", "0"]),  # too few: they wrap around, one thread each
        (2, 8, ["0,1,2", "3,4,5"]),
        (3, 16, ["0,1,2,3,4", "5,6,7,8,9", "10,11,12,13,14"]),
    ],
)
def test_cpu_binds_give_disjoint_cores_where_there_are_enough(count, cores, binds):
    assert cpu_binds(count, list(range(cores))) == binds
    named = [cpu_ids(b) for b in binds]
    if count <= cores:
        assert len(set().union(*named)) == sum(map(len, named))  # disjoint


def test_named_cores_are_kept_and_the_others_shared_out():
    allowed = sorted(os.sched_getaffinity(0))
    models = [Model("a", "x", cpu_cores=str(allowed[0])), Model("b", "x"), Model("c", "x")]
    binds = core_binds(models)
    assert binds["a"] == str(allowed[0])
    rest = allowed[1:] or allowed  # with one core, the others share it
    assert [binds["b"], binds["c"]] == cpu_binds(2, rest)
    models = [Model("a", "x", cpu_cores="nobind"), Model("b", "x")]
    assert core_binds(models) == {"a": "nobind", "b": cpu_binds(1, allowed)[0]}
