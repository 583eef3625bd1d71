"""The daemon: owns a device's memory pool and leases chunks to instances.

Its socket lives in a directory only its user can write: whoever could put a
socket of their own at that path would get instances' names and keys and hand
them memory of their choosing (the client also refuses a listener of another
user, see client.py). The daemon's books lie beside it (``<socket>.books``,
0600), for the daemon started after it (see server.py): the same directory
keeps them from other users.
"""

import os
import stat

TMP = "/tmp"  # where the fallback directory goes


def default_socket() -> str:
    """Where the daemon listens unless told otherwise: $VLLM_MUX_SOCKET, else
    vllm-mux.sock in $XDG_RUNTIME_DIR when that is the user's own 0700
    directory, else in /tmp/vllm-mux-<uid>/, which the daemon makes."""
    if path := os.environ.get("VLLM_MUX_SOCKET"):
        return path
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    private = os.path.isabs(runtime) and _private(runtime)
    return os.path.join(runtime if private else fallback_dir(), "vllm-mux.sock")


def fallback_dir() -> str:
    return os.path.join(TMP, f"vllm-mux-{os.geteuid()}")


def make_fallback_dir() -> None:
    """Make the fallback directory, 0700, unless it exists; refuse one that is
    not ours: another user may have made it first, or put a symlink there."""
    directory = fallback_dir()
    try:
        os.mkdir(directory, 0o700)
    except FileExistsError:
        pass
    if not _private(directory):
        raise RuntimeError(
            f"{directory} is not a private directory of this user (a directory, not a "
            f"symlink, of uid {os.geteuid()}, mode 0700): someone else may have made it; "
            "remove it, or choose another --socket"
        )


def _private(path: str) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o077
