"""Runtime patches of upstream vLLM, one file each, applied by the plugin.

Each patch module names the upstream symbols it replaces in ``TARGETS``
(dotted path -> sha256 of that symbol's source in the pinned vLLM) and says
in its docstring why, how, and what upstream change would let us delete it.
``tools/check_upstream.py`` recomputes the hashes and fails when upstream
moved under us.
"""

import hashlib
import importlib
import inspect

VLLM_VERSION = "0.32.0"

# Module names, in the order they are applied.
PATCHES = [
    "cpu_sleep_mode",
    "cpu_gemm",
    "cpu_worker",
    "gpu_worker",
    "idle_spin",
    "async_llm",
    "engine_core",
]


def modules():
    return [importlib.import_module(f"{__name__}.{name}") for name in PATCHES]


def apply() -> None:
    for module in modules():
        module.apply()


def resolve(path: str):
    """The object at a dotted path such as ``pkg.module.Class.method``."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(path)


def source_hash(obj) -> str:
    return hashlib.sha256(inspect.getsource(obj).encode()).hexdigest()[:16]
