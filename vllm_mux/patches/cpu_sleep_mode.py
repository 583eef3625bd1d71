"""Accept ``--enable-sleep-mode`` on the CPU platform.

Target: ``vllm.platforms.interface.Platform.is_sleep_mode_available``, which
``vllm.config.model.ModelConfig.__post_init__`` consults and which answers
False for CPU, so upstream refuses ``--enable-sleep-mode`` there.
Why: with the daemon configured, CPU instances sleep and wake through leased
memory (see ``cpu_worker``), so the flag means something on CPU.
How: ``CpuPlatform.is_sleep_mode_available`` answers True; every other
platform is untouched.
Upstream: sleep mode on CPU does not exist upstream (``CPUWorker.sleep`` is a
no-op with a warning). Delete this once ``CpuPlatform`` supports a
sleep-mode backend (RFC vllm-project/vllm#34303).
"""

# Upstream symbols this patch replaces or relies on -> sha256 of their source.
TARGETS = {
    "vllm.platforms.interface.Platform.is_sleep_mode_available": "bd559732376e8351",
    "vllm.config.model.ModelConfig.__post_init__": "3c7065f1d756e05e",
}


def apply() -> None:
    from vllm.platforms.cpu import CpuPlatform

    CpuPlatform.is_sleep_mode_available = lambda self: True
