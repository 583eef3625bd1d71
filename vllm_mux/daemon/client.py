"""The client side of the daemon's socket, for instances and for `status`.

An instance outlives its daemon: when the daemon dies (a crash) or is stopped
(an upgrade), the instance's connections break, and ``reconnect`` tries again
until a daemon answers on the same socket, for RECONNECT_S seconds; only then
does the instance give up and stop (see instance.py and controller.py).
"""

import logging
import os
import socket
import threading
import time

from vllm_mux.daemon import protocol

log = logging.getLogger("vllm_mux.client")

# Seconds an instance tries to reach its daemon again before it stops:
# long enough for a restart, an upgrade or serve's backoff; $VLLM_MUX_RECONNECT_S.
RECONNECT_S = 600.0

# The requests whose replies bring fds: chunks, or a host copy.
_WITH_FDS = ("lease", "host_get", "host_filled", "host_adopt")


class DaemonError(RuntimeError):
    """The daemon refused a request, or cannot be reached. ``code``: why a
    user's control was refused (model_not_found, not_running, ambiguous,
    pinned, failed, timeout), else None."""

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        self.code = code


class Disconnected(DaemonError):
    """The connection to the daemon broke: the daemon may come back."""


class Unreachable(DaemonError):
    """Nothing listens at the socket: ``reason`` says why connect failed."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def reconnect_seconds() -> float:
    """RECONNECT_S, or $VLLM_MUX_RECONNECT_S: read once, when an instance starts,
    so that a bad value stops it there, not when the daemon goes away."""
    text = os.environ.get("VLLM_MUX_RECONNECT_S", "")
    try:
        seconds = float(text) if text else RECONNECT_S
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:
        raise ValueError(f"VLLM_MUX_RECONNECT_S is a number of seconds, not {text!r}")
    return seconds


class Client:
    def __init__(self, socket_path: str, timeout: float | None = 30.0):
        self.socket_path = socket_path
        self.closed = False
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(socket_path)
        except OSError as e:
            self.sock.close()
            raise Unreachable(
                f"no vllm-mux daemon is listening at {socket_path} ({e.strerror}); start one "
                "with `vllm-mux daemon --device-memory SIZE`, or unset VLLM_MUX_SOCKET to run "
                "plain vLLM",
                e.strerror,
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

    def call(self, op: str, fds: list[int] = (), **fields) -> tuple[dict, list[int]]:
        """The daemon's reply, and its fds: only the replies of _WITH_FDS have
        any; fds that come with another reply are closed here. ``fds`` go with the
        request (the caller still owns them)."""
        with self._lock:
            try:
                protocol.send(self.sock, {"op": op, **fields}, fds)
                reply, fds = protocol.recv(self.sock)
            except (OSError, protocol.ProtocolError) as e:
                raise Disconnected(f"lost the daemon at {self.socket_path}: {e}") from None
        if reply is None:
            raise Disconnected(f"the daemon at {self.socket_path} closed the connection")
        if op not in _WITH_FDS or not reply.get("ok"):
            protocol.close_fds(fds)
            fds = []
        if not reply.get("ok"):
            raise DaemonError(
                reply.get("error", "the daemon refused without a reason"), reply.get("code")
            )
        return reply, fds

    def hello(
        self,
        model: str,
        key: str = "",
        private_bytes: int = 0,
        state: str | None = None,
        held: list[int] = (),
        fds: list[int] = (),
    ) -> dict:
        """Register as an instance's worker; the reply names the device and
        chunk size. ``key`` joins it to its controller; ``private_bytes`` is the
        device memory it needs outside the pool, for the books to show.

        Saying hello again on a new connection, after the daemon restarted,
        ``held`` names the chunks the instance still holds and ``fds`` carries
        one descriptor for each (none where chunks travel as handles): the
        daemon takes them back onto its books."""
        fields = {"private_bytes": private_bytes} if private_bytes else {}
        if state is not None:
            fields["state"] = state
        if held:
            fields["held"] = list(held)
        reply = self.call("hello", fds, role="instance", model=model, key=key, **fields)
        return reply[0]

    def lease(self, chunks: int) -> tuple[list[int], list[int]]:
        """Lease ``chunks`` chunks: their ids and one fd for each."""
        ids, fds, _ = self.lease_back(chunks)
        return ids, fds

    def lease_back(
        self, chunks: int, want: list[int] = (), tgid: int | None = None
    ) -> tuple[list[int], list[int], set[int]]:
        """Lease ``chunks`` chunks: their ids, one fd for each (or, from a
        daemon on a device whose chunks travel as handles, one handle each:
        ``tgid`` is then the process to let import them), and the ids of
        those of ``want`` (chunks this instance slept on, in the order it
        wants them back) that come back untouched, at their place in the list."""
        fields = ({"want": list(want)} if want else {}) | ({"tgid": tgid} if tgid else {})
        reply, fds = self.call("lease", chunks=chunks, **fields)
        ids, intact = reply.get("ids"), reply.get("intact", [])
        tokens = fds
        if "handles" in reply:  # a device whose chunks travel as handles: no fds are due
            protocol.close_fds(fds)
            tokens, fds = reply["handles"], []
        if (
            not isinstance(ids, list)
            or not isinstance(tokens, list)
            or not all(type(t) is int for t in tokens)
            or len(ids) != len(tokens)
            or not isinstance(intact, list)
        ):
            protocol.close_fds(fds)
            raise DaemonError(f"a lease's reply came with {len(tokens)} chunks for ids {ids!r:.80}")
        return ids, tokens, set(intact)

    def release(self, ids: list[int], keep: bool = False) -> None:
        """Hand chunks back; ``keep``: they hold our bytes still (we sleep)."""
        self.call("release", ids=ids, **({"keep": True} if keep else {}))

    def host_get(self, digest: str, size: int, fill: bool, coldable: bool = True):
        """The host copy of the weights named ``digest``: (reply, fd). The fd
        maps it read-only, or, if the reply says ``fill``, it is new and ours
        to fill, then ``host_filled``. (reply, None) if it is ``absent``."""
        reply, fds = self.call("host_get", digest=digest, size=size, fill=fill, coldable=coldable)
        return reply, _one_fd(fds)

    def host_filled(self, digest: str) -> int:
        """The daemon seals our filled copy, checks it and hands it back: the fd."""
        reply, fds = self.call("host_filled", digest=digest)
        fd = _one_fd(fds)
        if fd is None:
            raise DaemonError("the daemon sealed the host copy but sent no fd")
        return fd

    def host_adopt(self, digest: str, size: int, fd: int, coldable: bool = True) -> int | None:
        """Hand our sealed host copy (``fd``, which we still own) to a daemon
        that started after it was made. If it has a copy of these bytes in
        other memory already, the fd of that one, to map instead of ours."""
        reply, fds = self.call("host_adopt", [fd], digest=digest, size=size, coldable=coldable)
        theirs = _one_fd(fds)
        if (theirs is None) == bool(reply.get("remap")):
            if theirs is not None:
                os.close(theirs)
            raise DaemonError("a host_adopt reply's remap and fd disagree")
        return theirs

    def host_release(self, digest: str) -> None:
        self.call("host_release", digest=digest)

    def set_state(self, state: str, **facts) -> None:
        self.call("state", state=state, **facts)

    def status(self) -> dict:
        return self.call("status")[0]

    # A user's controls over a model by its name. sleep and wake block until
    # it is asleep or awake: a wake may wait for others to sleep (up to the
    # daemon's --wait-timeout), then for its copy or reload, a sleep for its
    # requests in flight (each up to the daemon's SETTLE_S): the daemon bounds
    # the wait. pin and unpin answer within its ASK_TIMEOUT.

    def sleep(self, model: str) -> dict:
        """Put ``model`` to sleep once its requests in flight finish: the reply
        says its ``state``, whether it ``changed`` and the ``seconds`` it took;
        ``woke_for``, if requests woke it straight back: how many it serves."""
        return self.call("sleep", model=model)[0]

    def wake(self, model: str) -> dict:
        """Wake ``model``: the reply is ``sleep``'s."""
        return self.call("wake", model=model)[0]

    def pin(self, model: str) -> dict:
        """Pin ``model``: never asked to sleep for another model, never asleep
        when idle. The reply says ``pinned``, whether it ``changed``, and the
        ``state``, which a pin leaves as it is: "sleeping" if a sleep had
        reached the engine already (one that had not is called off)."""
        return self.call("pin", model=model)[0]

    def unpin(self, model: str) -> dict:
        """Let ``model`` sleep again: the reply is ``pin``'s."""
        return self.call("unpin", model=model)[0]

    def close(self) -> None:
        """Close the connection; a thread waiting on it (an instance's watcher)
        wakes up: shutdown() wakes it, close() alone would not."""
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def _one_fd(fds: list[int]) -> int | None:
    if len(fds) > 1:
        protocol.close_fds(fds)
        raise DaemonError(f"a host copy came with {len(fds)} fds, not one")
    return fds[0] if fds else None


def reconnect(socket_path: str, hello, seconds: float) -> Client:
    """A new connection on which ``hello(client)`` went through, tried again
    and again with a growing pause (0.1 s to 2 s) for ``seconds``: the daemon
    may be restarting, or not yet know the instance a controller belongs to.
    DaemonError with the last reason once the time is up."""
    deadline = time.monotonic() + seconds
    pause, said = 0.1, None
    while True:
        try:
            client = Client(socket_path, timeout=None)
        except DaemonError as e:
            reason, refused = e, False
        else:
            try:
                hello(client)
                return client
            except DaemonError as e:
                client.close()
                reason, refused = e, True
                if str(e) != said:  # a daemon that answers, and refuses: say why, once
                    log.warning("the daemon at %s refused to take us back: %s", socket_path, e)
                    said = str(e)
            except BaseException:
                client.close()
                raise
        if time.monotonic() + pause > deadline:
            if refused:  # it came back, and would not take us
                raise DaemonError(
                    f"the vllm-mux daemon at {socket_path} refused to take us back for "
                    f"{seconds:g} s ({reason})"
                )
            raise DaemonError(
                f"the vllm-mux daemon at {socket_path} did not come back in {seconds:g} s "
                f"({reason})"
            )
        time.sleep(pause)
        pause = min(2 * pause, 2.0)


def outcome(op: str, name: str, reply: dict) -> str:
    """A control's reply (sleep, wake, pin, unpin) in one line, for people."""
    name = protocol.shown(name)
    state, already = reply["state"], "" if reply["changed"] else " already"
    if op == "pin" and state == "sleeping":
        return (
            f"{name} is pinned{already}, but was going to sleep already (the engine had been "
            f"told): it sleeps now; once a request or `vllm-mux wake {name}` wakes it, it stays "
            "awake"
        )
    if op == "pin":
        return (
            f"{name} is pinned{already}; it is {state} (a pin changes no state): never asked to "
            f"sleep for another model, never asleep when idle, until `vllm-mux unpin {name}` "
            "or its server restarts"
        )
    if op == "unpin":
        return (
            f"{name} is unpinned{already}; it is {state}, and sleeps when idle or when another "
            "model needs the memory"
        )
    if not reply["changed"]:
        return f"{name} is {state} already"
    verb = "slept" if op == "sleep" else "woke"
    if "woke_for" in reply:
        return (
            f"{name} slept in {reply['seconds']:.2f} s, but requests waited for it and woke it "
            f"again: it is {state}, serving {reply['woke_for']}"
        )
    return f"{name} is {state} ({verb} in {reply['seconds']:.2f} s)"
