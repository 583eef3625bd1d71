"""The client side of the daemon's socket, for instances and for `status`."""

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
        self._lock = threading.Lock()

    def call(self, op: str, **fields) -> tuple[dict, list[int]]:
        with self._lock:
            try:
                protocol.send(self.sock, {"op": op, **fields})
                reply, fds = protocol.recv(self.sock)
            except OSError as e:
                raise DaemonError(f"lost the daemon at {self.socket_path}: {e}") from None
        if reply is None:
            raise DaemonError(f"the daemon at {self.socket_path} closed the connection")
        if not reply.get("ok"):
            raise DaemonError(reply.get("error", "the daemon refused without a reason"))
        return reply, fds

    def hello(self, model: str, key: str = "") -> dict:
        """Register as an instance's worker; the reply names the device and
        chunk size. ``key`` joins it to its controller."""
        return self.call("hello", role="instance", model=model, key=key)[0]

    def lease(self, chunks: int) -> tuple[list[int], list[int]]:
        """Lease ``chunks`` chunks: their ids and one fd for each."""
        reply, fds = self.call("lease", chunks=chunks)
        return reply["ids"], fds

    def release(self, ids: list[int]) -> None:
        self.call("release", ids=ids)

    def set_state(self, state: str, **facts) -> None:
        self.call("state", state=state, **facts)

    def status(self) -> dict:
        return self.call("status")[0]

    def close(self) -> None:
        self.sock.close()
