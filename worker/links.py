"""The worker's sockets: a DEALER per coordinator (identity = node id), a SUB to every coordinator's PUB
(heartbeats, membership view), an inproc PULL inbox where the executor and the replication threads hand
back finished work, and one poller over all of them."""

from __future__ import annotations

import logging
import uuid

import zmq

from common.config import Config
from common.logstream import PUB_PORT_OFFSET
from common.protocol import Message, Topic
from common.transport import make_socket, offset_addr, tcp

log = logging.getLogger("idunno.worker")


class CoordinatorLinks:
    """The worker's sockets; DEALERs to the coordinators are made on first use, under the current node id."""

    def __init__(self, ctx: zmq.Context, cfg: Config, node_id: str, coordinators: list[str]) -> None:
        self.ctx = ctx
        self.cfg = cfg
        self.node_id = node_id
        self.sub = make_socket(ctx, zmq.SUB, cfg.max_frame_bytes)
        for topic in (Topic.HEARTBEAT, Topic.VIEW):
            self.sub.setsockopt(zmq.SUBSCRIBE, topic)
        for a in coordinators:
            self.sub.connect(tcp(offset_addr(a, PUB_PORT_OFFSET)))
        self.inbox_endpoint = f"inproc://worker-{uuid.uuid4().hex}"
        self.inbox = make_socket(ctx, zmq.PULL, cfg.max_frame_bytes, secure=False)
        self.inbox.bind(self.inbox_endpoint)
        self.always = (self.sub, self.inbox)  # polled with the links
        self.links: dict[str, zmq.Socket] = {}
        self._rebuild_poller()

    def _rebuild_poller(self) -> None:
        self.poller = zmq.Poller()
        for s in (*self.always, *self.links.values()):
            self.poller.register(s, zmq.POLLIN)

    def link(self, addr: str) -> zmq.Socket:
        sock = self.links.get(addr)
        if sock is None:
            sock = make_socket(self.ctx, zmq.DEALER, self.cfg.max_frame_bytes, identity=self.node_id.encode())
            sock.setsockopt(zmq.SNDHWM, 10_000)
            sock.connect(tcp(addr))
            self.links[addr] = sock
            self._rebuild_poller()
        return sock

    def send(self, addr: str | None, msg: Message) -> bool:
        if addr is None:
            return False
        try:
            self.link(addr).send(msg.encode(), flags=zmq.NOBLOCK)
            return True
        except zmq.ZMQError as exc:
            log.debug("send %s to %s failed: %s", msg.TYPE, addr, exc)
            return False

    def addr_of(self, sock: zmq.Socket) -> str | None:
        return next((a for a, s in self.links.items() if s is sock), None)

    def renew(self, node_id: str) -> None:
        """A new incarnation: new identity, so new sockets (the old ones are closed)."""
        for s in self.links.values():
            s.close(0)
        self.links = {}
        self.node_id = node_id
        self._rebuild_poller()

    def poll(self, timeout_ms: int) -> list[tuple[zmq.Socket, int]]:
        return self.poller.poll(timeout_ms)

    def close(self) -> None:
        for s in (*self.always, *self.links.values()):
            s.close(0)
