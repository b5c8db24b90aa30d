"""ZeroMQ socket helpers: every socket gets the same safety options in one place."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import zmq

from common import security
from common.protocol import Message, ProtocolError, decode

log = logging.getLogger("idunno.transport")


def make_socket(
    ctx: zmq.Context, kind: int, max_frame: int, identity: bytes | None = None, server: bool = False,
    secure: bool = True, keys: str = "", peer: str = security.COORDINATOR, domain: str = "", plain: bool = False,
) -> zmq.Socket:
    """A socket with the project's safety options; ``server`` for bound TCP sockets, ``secure=False``
    for inproc pipes inside one process (CURVE, when enabled, applies to every TCP socket).

    CURVE: ``keys`` is the client's key directory (``Config.curve_dir``; default: this process's
    own keys; ``plain``: an --insecure cluster), ``peer`` which kind of server it connects to (a
    coordinator or ``security.DATA``),
    ``domain`` the ZAP domain of a server socket (``security.NODES``: coordinators and workers only).
    """
    sock = ctx.socket(kind)
    if secure:
        security.apply(sock, server, None if server else security.select(keys, plain), peer, domain)
    sock.setsockopt(zmq.LINGER, 0)  # shutdown never hangs on unsent messages
    sock.setsockopt(zmq.MAXMSGSIZE, max_frame + 1024)  # libzmq drops peers that send larger frames
    if identity is not None:
        sock.setsockopt(zmq.IDENTITY, identity)
    if kind == zmq.ROUTER:
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a send to a vanished peer raises instead of vanishing
    return sock


def tcp(addr: str) -> str:
    return addr if addr.startswith(("tcp://", "ipc://", "inproc://")) else f"tcp://{addr}"


def bind(sock: zmq.Socket, host: str, port: int = 0) -> int:
    """Bind to host:port (0 = a free port) and return the port actually bound."""
    if port:
        sock.bind(f"tcp://{host}:{port}")
        return port
    sock.bind(f"tcp://{host}:*")
    return int(sock.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1])


def host_port(addr: str) -> tuple[str, int]:
    host, sep, port = addr.removeprefix("tcp://").rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"address must be host:port, got {addr!r}")
    return host, int(port)


def offset_addr(addr: str, delta: int) -> str:
    """Derived endpoints: a coordinator's PUB is control port + 1, its log PULL is + 2."""
    host, port = host_port(addr)
    return f"{host}:{port + delta}"


def try_decode(frame: bytes, max_frame: int, source: str = "") -> Message | None:
    """Decode or log-and-drop: the one place a daemon's loop turns garbage into None."""
    try:
        return decode(frame, max_frame)
    except ProtocolError as exc:
        log.warning("dropped malformed frame from %s: %s", source or "peer", exc)
        return None


def drain_published(sub: zmq.Socket, max_frame: int, source: str, limit: int) -> Iterator[Message]:
    """The messages waiting on a SUB socket ([topic, payload] frames), decoded; a bad one is logged
    and skipped. At most ``limit`` frames per call, so a publisher that never pauses cannot hold the
    caller's loop (it drains again on its next iteration)."""
    for _ in range(limit):
        try:
            frames = sub.recv_multipart(flags=zmq.NOBLOCK)
        except zmq.Again:
            return
        if len(frames) != 2:
            continue
        msg = try_decode(frames[1], max_frame, source)
        if msg is not None:
            yield msg


def router_send(sock: zmq.Socket, identity: bytes, msg: Message) -> bool:
    """Send to a ROUTER peer; False (and a log line) if the peer is gone or the queue is full."""
    try:
        sock.send_multipart([identity, msg.encode()], flags=zmq.NOBLOCK)
        return True
    except zmq.ZMQError as exc:
        log.debug("send %s to %r failed: %s", msg.TYPE, identity, exc)
        return False

