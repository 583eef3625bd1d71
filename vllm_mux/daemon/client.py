"""The client side of the daemon's socket, for instances and for `status`."""

import os
import socket
import threading

from vllm_mux.daemon import protocol


class DaemonError(RuntimeError):
    """The daemon refused a request, or cannot be reached."""


class Client:
    def __init__(self, socket_path: str, timeout: float | None = 30.0):
        self.socket_path = socket_path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(socket_path)
        except OSError as e:
            self.sock.close()
            raise DaemonError(
                f"no vllm-mux daemon is listening at {socket_path} ({e.strerror}); start one "
                "with `vllm-mux daemon --device-memory SIZE`, or unset VLLM_MUX_SOCKET to run "
                "plain vLLM"
            ) from None
        # Whoever listens gets the model's name and key and hands us the memory
        # we map weights into: only a daemon of our own user will do.
        _, uid = protocol.peer(self.sock)
        if uid != os.geteuid():
            self.sock.close()
            raise DaemonError(
                f"the process listening at {socket_path} is uid {uid}'s, not this user's "
                f"(uid {os.geteuid()}): it is not our daemon, so nothing was sent to it; "
                "another user may have taken that path: use a socket in a directory only "
                "you can write (the default is one)"
            )
        self._lock = threading.Lock()

    def call(self, op: str, **fields) -> tuple[dict, list[int]]:
        """The daemon's reply, and its fds: only a lease's reply has any;
        fds that come with another reply are closed here."""
        with self._lock:
            try:
                protocol.send(self.sock, {"op": op, **fields})
                reply, fds = protocol.recv(self.sock)
            except (OSError, protocol.ProtocolError) as e:
                raise DaemonError(f"lost the daemon at {self.socket_path}: {e}") from None
        if reply is None:
            raise DaemonError(f"the daemon at {self.socket_path} closed the connection")
        if op != "lease" or not reply.get("ok"):
            protocol.close_fds(fds)
            fds = []
        if not reply.get("ok"):
            raise DaemonError(reply.get("error", "the daemon refused without a reason"))
        return reply, fds

    def hello(self, model: str, key: str = "", private_bytes: int = 0) -> dict:
        """Register as an instance's worker; the reply names the device and
        chunk size. ``key`` joins it to its controller; ``private_bytes`` is the
        device memory it needs outside the pool, for the books to show."""
        fields = {"private_bytes": private_bytes} if private_bytes else {}
        return self.call("hello", role="instance", model=model, key=key, **fields)[0]

    def lease(self, chunks: int) -> tuple[list[int], list[int]]:
        """Lease ``chunks`` chunks: their ids and one fd for each."""
        reply, fds = self.call("lease", chunks=chunks)
        ids = reply.get("ids")
        if not isinstance(ids, list) or len(ids) != len(fds):
            protocol.close_fds(fds)
            raise DaemonError(f"a lease's reply came with {len(fds)} fds for ids {ids!r:.80}")
        return ids, fds

    def release(self, ids: list[int]) -> None:
        self.call("release", ids=ids)

    def set_state(self, state: str, **facts) -> None:
        self.call("state", state=state, **facts)

    def status(self) -> dict:
        return self.call("status")[0]

    def close(self) -> None:
        self.sock.close()
