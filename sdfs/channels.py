"""The client's data connections: one DEALER socket per storage node address, made on first use.

Shared by uploads and downloads so that one client keeps one connection per node. A transfer that
gives up on a node resets its socket: replies to the abandoned requests may still arrive, and a
fresh socket cannot see them.
"""

from __future__ import annotations

import zmq

from common.config import Config
from common.security import DATA
from common.transport import make_socket, tcp


class DataChannels:
    def __init__(self, cfg: Config, ctx: zmq.Context) -> None:
        self.cfg = cfg
        self.ctx = ctx
        self.socks: dict[str, zmq.Socket] = {}

    def get(self, addr: str) -> zmq.Socket:
        sock = self.socks.get(addr)
        if sock is None:
            sock = make_socket(self.ctx, zmq.DEALER, self.cfg.max_frame_bytes, keys=self.cfg.curve_dir, peer=DATA,
                               plain=self.cfg.insecure)
            sock.connect(tcp(addr))
            self.socks[addr] = sock
        return sock

    def reset(self, addr: str) -> None:
        # Replies to abandoned requests may still arrive: a fresh socket cannot see them.
        sock = self.socks.pop(addr, None)
        if sock is not None:
            sock.close(0)

    def close(self) -> None:
        for s in self.socks.values():
            s.close(0)
        self.socks.clear()
