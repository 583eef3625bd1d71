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

# Module names, in the order they are applied: CPU and CUDA, on vLLM 0.32.
PATCHES = [
    "cpu_sleep_mode",
    "cpu_gemm",
    "cpu_worker",
    "gpu_worker",
    "idle_spin",
    "async_llm",
    "engine_core",
]

# Ascend NPUs: vllm-ascend 0.23.0.post1 on vLLM 0.23.0 (no vllm-ascend release
# pairs with vLLM 0.32). The engine-side patches whose targets differ in vLLM
# 0.23 have files of their own (``*_v023``).
NPU_VLLM_VERSION = "0.23.0"
NPU_VLLM_ASCEND_VERSION = "0.23.0.post1"
NPU_PATCHES = [
    "npu_worker",
    "idle_spin_v023",
    "async_llm_v023",
    "engine_core_v023",
]

# What tools/check_upstream.py checks per platform: the patches, the upstream
# distributions they are written for (top-level package -> (distribution,
# version)), and whether that upstream can be imported here to hash it (npu:
# no; vllm_ascend needs an NPU to import, so its sources are read instead).
PLATFORMS = {
    "cpu": {"patches": PATCHES, "versions": {"vllm": ("vllm", VLLM_VERSION)}, "importable": True},
    "cuda": {"patches": PATCHES, "versions": {"vllm": ("vllm", VLLM_VERSION)}, "importable": True},
    "npu": {
        "patches": NPU_PATCHES,
        "versions": {
            "vllm": ("vllm", NPU_VLLM_VERSION),
            "vllm_ascend": ("vllm-ascend", NPU_VLLM_ASCEND_VERSION),
        },
        "importable": False,
    },
}


def modules(names=None):
    return [importlib.import_module(f"{__name__}.{name}") for name in (names or PATCHES)]


def on_npu() -> bool:
    """Whether this vLLM process runs on an Ascend NPU. vLLM picks the
    platform; only where vllm-ascend is installed does that import it."""
    from vllm.platforms import current_platform

    return current_platform.device_type == "npu"


def apply() -> None:
    for module in modules(NPU_PATCHES if on_npu() else PATCHES):
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
