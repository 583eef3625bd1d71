"""The ``vllm-mux serve`` config file: one YAML file for the device and every model.

In the spirit of llama-swap's single file::

    device: cpu
    device_memory: 2GiB
    host_memory: 8GiB              # copies of weights to wake from (default: half the RAM)
    port: 8000
    max_body: 32MiB                # the largest request body the router takes (audio: 25 MB)
    policy: switch-per-request     # who sleeps for whom (or batched)
    models:
      - name: smol
        source: smollm2            # a bundled model, or a model directory / id
        args: [--dtype, float32, --max-model-len, "2048"]
        idle_ttl: 300              # seconds without a request before it sleeps
        pinned: false              # never asked to sleep for another model
        preload: true              # start awake (the default); false: start asleep
        cpu_cores: "0-3"           # on cpu: VLLM_CPU_OMP_THREADS_BIND (else serve picks)
        quantum_s: 3               # the switch policy's knobs (daemon/policy.py says
        linger_s: 0                #   what each is for and why its default is what
        max_wait_s: 30             #   it is); batched reads them,
        priority: 0                #   switch-per-request does not

``preload: false`` starts a model asleep: serve puts it to sleep as soon as
its server is ready, again after each restart, and starts such models
before the others, so that those it preloads find the memory free. Its
first request then wakes it: from the host copy its start made if the host
budget (``host_memory``) had room for it, else cold, reloading its weights
from its files.
``pinned`` and ``vllm-mux pin`` both keep a model from being asked to
sleep; a pin by hand lasts while its server runs: a server serve restarts
takes the file's ``pinned`` again.

An invalid file is refused at start with its line and the reason. Sizes
take a unit (2GiB, 512MiB); a model's name is what clients send as
``model``: not empty, printable, at most 256 characters (the daemon's limit).
"""

import math
import re
from argparse import ArgumentTypeError
from dataclasses import dataclass, field

import yaml

from vllm_mux.daemon.policy import DEFAULT, KNOBS, POLICIES, knobs_from
from vllm_mux.daemon.protocol import MAX_NAME


class ConfigError(ValueError):
    """The config is invalid; the message names the file, line and reason."""


@dataclass
class Model:
    name: str
    source: str
    args: list[str] = field(default_factory=list)
    idle_ttl: float | None = None
    pinned: bool = False
    preload: bool = True  # start awake; False: serve puts it to sleep once it is ready
    # The cores its vLLM threads are bound to on cpu ("0-3", "0,2", "auto",
    # "nobind"); None: serve gives each model cores of its own (launch.cpu_binds).
    cpu_cores: str | None = None
    knobs: dict = field(default_factory=dict)  # the policy's, as set in the file


@dataclass
class Config:
    models: list[Model]
    device: str = "cpu"
    device_memory: str = "2GiB"
    chunk_size: str | None = None
    host_memory: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_body: str = "32MiB"  # a 25 MB audio upload (OpenAI's limit) and its form
    policy: str = DEFAULT


# Sizes may be ints in YAML (device_memory: 2048) only to be told to take a unit.
_TOP = {"device": str, "device_memory": (str, int), "chunk_size": (str, int), "host": str}
_TOP |= {"port": int, "host_memory": (str, int)}
_TOP |= {"api_key": str, "max_body": (str, int), "policy": str, "models": list}
_MODEL = {"name": str, "source": str, "args": (list, dict), "idle_ttl": (int, float)}
_MODEL |= {"pinned": bool, "preload": bool, "cpu_cores": str}
_MODEL |= {"quantum_s": (int, float), "linger_s": (int, float), "max_wait_s": (int, float)}
_MODEL |= {"priority": int}
# vLLM's VLLM_CPU_OMP_THREADS_BIND for one worker: "auto", "nobind" or a list of
# cpu ids and ranges.
CPU_CORES = re.compile(r"auto|nobind|\d+(-\d+)?(,\d+(-\d+)?)*")


def load(path: str) -> Config:
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror}") from None
    return parse(text, path)


def parse(text: str, path: str = "<config>") -> Config:
    try:
        root = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        line = e.problem_mark.line + 1 if e.problem_mark else "?"
        raise ConfigError(f"{path}:{line}: {e.problem}") from None

    def fail(node, reason: str):
        raise ConfigError(f"{path}:{node.start_mark.line + 1}: {reason}")

    if root is None:
        raise ConfigError(f"{path}:1: the file is empty")
    if not isinstance(root, yaml.MappingNode):
        fail(root, "the file must be a mapping (device, device_memory, models, ...)")
    nodes = {k.value: (k, v) for k, v in root.value}  # key -> (key node, value node)
    _check(nodes, data, _TOP, "", fail, root)
    if data.get("api_key") == "":
        fail(nodes["api_key"][1], EMPTY_KEY)
    for key, value in data.items():
        if reason := problem(key, value):
            fail(nodes[key][1], reason)
    if "models" not in data or not data["models"]:
        fail(root, "models: at least one model is needed")
    models, seen = [], set()
    for node, entry in zip(nodes["models"][1].value, data["models"]):
        if not isinstance(entry, dict):
            fail(node, "a model is a mapping with name and source")
        fields = {k.value: (k, v) for k, v in node.value}
        _check(fields, entry, _MODEL, "models[].", fail, node)
        for required in ("name", "source"):
            if required not in entry:
                fail(node, f"a model needs {required}")
        if reason := name_problem(entry["name"]):
            fail(fields["name"][1], reason)
        if entry["name"] in seen:
            fail(fields["name"][1], f"model name {entry['name']!r} is used twice")
        if "idle_ttl" in entry and not 0 <= entry["idle_ttl"] < math.inf:
            fail(
                fields["idle_ttl"][1],
                f"models[].idle_ttl is a number of seconds, 0 (never idle) or more, not "
                f"{entry['idle_ttl']!r}",
            )
        if "cpu_cores" in entry and not CPU_CORES.fullmatch(entry["cpu_cores"]):
            fail(
                fields["cpu_cores"][1],
                f'models[].cpu_cores must be like "0-3", "0,2", "auto" or "nobind", '
                f"not {entry['cpu_cores']!r}",
            )
        if entry.get("pinned") and entry.get("preload") is False:
            fail(fields["preload"][1], "a pinned model is never put to sleep, so it cannot "
                 "start asleep: drop pinned: true or preload: false")  # fmt: skip
        knobs = {k: v for k, v in entry.items() if k in KNOBS}
        for knob, value in knobs.items():
            try:
                knobs_from({knob: value})
            except ValueError as e:
                fail(fields[knob][1], f"models[].{e}")
        seen.add(entry["name"])
        args = entry.get("args", [])
        if isinstance(args, dict):  # {max-model-len: 2048, enforce-eager: true}
            args = [a for k, v in args.items() for a in _flag(k, v)]
        models.append(
            Model(entry["name"], entry["source"], [str(a) for a in args],
                  entry.get("idle_ttl"), entry.get("pinned", False), entry.get("preload", True),
                  entry.get("cpu_cores"), knobs)
        )  # fmt: skip
    top = {k: v for k, v in data.items() if k != "models"}
    return Config(models=models, **top)


# An empty key would look like protection and accept "Authorization: Bearer ".
EMPTY_KEY = "api_key is empty: give a key, or leave it out for no key"


SIZES = ("device_memory", "chunk_size", "host_memory", "max_body")


def problem(key: str, value) -> str | None:
    """Why ``value`` will not do for the top-level ``key`` (one of the sizes,
    the device, the port), or None: checked before anything starts, whether
    it came from the file or the command line (``--device-memory`` ...)."""
    from vllm_mux.cli import TooBig, parse_size
    from vllm_mux.memory import BACKENDS

    if key in SIZES and type(value) is int:
        return (
            f"{key} takes a unit: write {value}MiB or {value}GiB, not the bare number {value} "
            f"(or '{value}' in quotes for bytes)"
        )
    if key in SIZES:
        try:
            n = parse_size(value)
        except TooBig as e:
            return f"{key}: {e}"
        except ArgumentTypeError:
            n = None
        if n is None or (n == 0 and key != "host_memory"):
            return f"{key} must be a size like 2GiB or 512MiB, not {value!r}"
    if key == "device":
        kind, colon, index = value.partition(":")
        if kind not in BACKENDS or (colon and not index.isdigit()):
            known = ", ".join(BACKENDS)
            return f"unknown device {value!r}; known: {known} (cuda:N for GPU N, npu:N for NPU N)"
        if kind == "cpu" and colon and int(index) != 0:
            return f"device {value!r}: the cpu device is one, cpu (or cpu:0); cuda:N names GPU N"
    if key == "port" and not 0 < value < 65536:
        return f"port must be 1 to 65535, not {value}"
    if key == "policy" and value not in POLICIES:
        return f"unknown policy {value!r}; known: {', '.join(POLICIES)}"
    return None


def size(text: str) -> int | None:
    """'16MiB', '512K' or a number of bytes; None if it is not a size."""
    from vllm_mux.cli import parse_size

    try:
        return parse_size(text)
    except ArgumentTypeError:
        return None


def name_problem(name: str) -> str | None:
    """Why a model's name will not do, or None: the daemon takes at most
    MAX_NAME characters, and a control character would break the one line
    that each message and each row of `vllm-mux ps` is."""
    if not name:
        return "models[].name is empty: give the name clients send as model"
    if len(name) > MAX_NAME:
        return f"models[].name is at most {MAX_NAME} characters, not {len(name)}"
    if not name.isprintable():
        return f"models[].name {name!r:.80} has a control character: names are printable"
    return None


def _check(nodes: dict, data: dict, schema: dict, prefix: str, fail, parent) -> None:
    for key, value in data.items():
        if key not in schema:
            fail(nodes[key][0], f"unknown key {prefix}{key} (known: {', '.join(schema)})")
        want = schema[key]
        if not isinstance(value, want) or (want is int and isinstance(value, bool)):
            names = " or ".join(t.__name__ for t in (want if isinstance(want, tuple) else (want,)))
            fail(nodes[key][1], f"{prefix}{key} must be {names}, not {type(value).__name__}")


def _flag(key: str, value) -> list:
    flag = key if key.startswith("--") else f"--{key}"
    if value is True:
        return [flag]
    if value is False or value is None:
        return []
    return [flag, value]
