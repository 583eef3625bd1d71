"""The wire: one JSON object per message over SOCK_SEQPACKET, chunks as fds.

Seqpacket keeps datagram boundaries, so a message that fits in one datagram
needs no framing of our own. A datagram is at most PART bytes, far below a
socket's send buffer (about 208 KiB; a larger datagram fails with EMSGSIZE):
a longer message goes as datagrams that start with b"+" and carry a piece of
it each, then one with the rest. File descriptors ride with SCM_RIGHTS; the
kernel passes at most 253 per datagram, so a long list of fds follows its
message in batches of FD_BATCH, each an empty JSON object ``{}`` carrying fds,
and the message says how many in "nfds".

Every fd received is handed to the caller or closed, whatever goes wrong.
"""

import os
import socket
import struct

import msgspec

PART = 64 << 10  # bytes of one datagram
MAX_MESSAGE = 16 << 20  # bytes of one message, all its datagrams together
FD_BATCH = 250
MAX_NAME = 256  # characters of a model's name or an instance's key
_MORE = b"+"  # a datagram that starts so is a piece of a longer message


class ProtocolError(Exception):
    """The peer sent something that is not a message of this protocol."""


def send(sock: socket.socket, message: dict, fds: list[int] = ()) -> None:
    fds = list(fds)
    body = msgspec.json.encode({**message, "nfds": len(fds)} if fds else message)
    if len(body) > MAX_MESSAGE:
        raise ProtocolError(f"a message of {len(body)} bytes; at most {MAX_MESSAGE} go")
    rest, piece = memoryview(body), PART - len(_MORE)
    while len(rest) > PART:
        sock.sendmsg([_MORE, rest[:piece]])
        rest = rest[piece:]
    socket.send_fds(sock, [rest], fds[:FD_BATCH])
    for i in range(FD_BATCH, len(fds), FD_BATCH):
        socket.send_fds(sock, [b"{}"], fds[i : i + FD_BATCH])


def recv(sock: socket.socket) -> tuple[dict | None, list[int]]:
    """The next message and its fds, or (None, []) once the peer has closed."""
    fds: list[int] = []
    try:
        data = _recv_one(sock, fds)
        if not data:
            if fds:  # the end of the connection carries no fds
                raise ProtocolError("an empty message")
            return None, []
        pieces, size = [], 0
        while data.startswith(_MORE):
            pieces.append(data[len(_MORE) :])
            size += len(data)
            if size > MAX_MESSAGE:
                raise ProtocolError(f"a message of more than {MAX_MESSAGE} bytes")
            data = _recv_one(sock, fds)
            if not data:
                raise ProtocolError("the connection closed in the middle of a message")
        message = _decode(b"".join([*pieces, data]))
        want = message.pop("nfds", 0)
        if type(want) is not int or want < 0:
            raise ProtocolError("nfds must be a non-negative integer")
        while len(fds) < want:
            if _recv_one(sock, fds) != b"{}":
                raise ProtocolError(f"a message's fds come in empty objects; {want} were due")
        return message, fds
    except BaseException:
        close_fds(fds)
        raise


def peer(sock: socket.socket) -> tuple[int, int]:
    """The pid and uid of the process at the other end, from the kernel
    (SO_PEERCRED, as of its connect or listen): what a peer says of itself is
    not to be trusted."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _ = struct.unpack("3i", creds)
    return pid, uid


def shown(name: str) -> str:
    """A model's name for a message of one line: as it is if printable, else
    quoted with its control characters escaped; cut at MAX_NAME."""
    name = name if name.isprintable() else repr(name)
    return name[:MAX_NAME] + ("..." if len(name) > MAX_NAME else "")


def close_fds(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def _recv_one(sock: socket.socket, fds: list[int]) -> bytes:
    """One datagram; its fds join ``fds`` before anything can go wrong."""
    data, got, flags, _ = socket.recv_fds(sock, PART, FD_BATCH)
    fds += got
    if flags & socket.MSG_TRUNC:
        raise ProtocolError(f"a datagram of more than {PART} bytes")
    if flags & socket.MSG_CTRUNC:
        raise ProtocolError(f"more than {FD_BATCH} fds in one datagram")
    return data


def _decode(data: bytes) -> dict:
    try:
        message = msgspec.json.decode(data)
    except msgspec.DecodeError as e:
        raise ProtocolError(f"not JSON: {e}") from None
    except RecursionError:  # msgspec's own limit on nesting
        raise ProtocolError("not JSON this daemon reads: nested too deeply") from None
    if not isinstance(message, dict):
        raise ProtocolError("a message must be a JSON object")
    return message
