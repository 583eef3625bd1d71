"""The wire: one JSON object per SOCK_SEQPACKET message, chunks as fds.

Seqpacket keeps message boundaries, so no framing of our own; file descriptors
ride on the message with SCM_RIGHTS. The kernel passes at most 253 fds per
message, so a long list of fds follows its message in batches of FD_BATCH,
each an empty JSON object ``{}`` carrying fds.
"""

import socket

import msgspec

MAX_MESSAGE = 1 << 20
FD_BATCH = 250


class ProtocolError(Exception):
    """The peer sent something that is not a message of this protocol."""


def send(sock: socket.socket, message: dict, fds: list[int] = ()) -> None:
    fds = list(fds)
    body = msgspec.json.encode({**message, "nfds": len(fds)} if fds else message)
    socket.send_fds(sock, [body], fds[:FD_BATCH])
    for i in range(FD_BATCH, len(fds), FD_BATCH):
        socket.send_fds(sock, [b"{}"], fds[i : i + FD_BATCH])


def recv(sock: socket.socket) -> tuple[dict | None, list[int]]:
    """The next message and its fds, or (None, []) once the peer has closed."""
    data, fds = _recv_one(sock)
    if not data:
        return None, []
    try:
        message = msgspec.json.decode(data)
    except msgspec.DecodeError as e:
        _close(fds)
        raise ProtocolError(f"not JSON: {e}") from None
    if not isinstance(message, dict):
        _close(fds)
        raise ProtocolError("a message must be a JSON object")
    want = message.pop("nfds", 0)
    if type(want) is not int or want < 0:
        _close(fds)
        raise ProtocolError("nfds must be a non-negative integer")
    while len(fds) < want:
        more, extra = _recv_one(sock)
        if not more:
            _close(fds)
            raise ProtocolError("connection closed in the middle of a message's fds")
        fds += extra
    return message, fds


def _recv_one(sock: socket.socket) -> tuple[bytes, list[int]]:
    data, fds, flags, _ = socket.recv_fds(sock, MAX_MESSAGE, FD_BATCH)
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        _close(fds)
        raise ProtocolError("message too large")
    return data, list(fds)


def _close(fds: list[int]) -> None:
    import os

    for fd in fds:
        os.close(fd)
