"""Log stream: every daemon's ``logging`` records also go to the coordinators over ZeroMQ.

A handler queues records (logging may be called from any thread; ZeroMQ sockets are not thread
safe) and one background thread PUSHes them to the coordinators' log PULL ports. PUSH hands each
record to one connected coordinator (round robin), which republishes it on its PUB socket under
Topic.LOG; ``idunno logs`` therefore subscribes to every coordinator.
"""

from __future__ import annotations

import logging
import queue
import sys
import threading

import zmq

from common.protocol import LogRecord
from common.transport import make_socket, offset_addr, tcp

LOG_PORT_OFFSET = 2
PUB_PORT_OFFSET = 1
# A record's text is cut to 4,000 characters by the sender, so a real record frame stays well below
# this. The coordinator's log PULL socket refuses larger frames at the transport (ZMQ_MAXMSGSIZE), so
# a hostile pusher cannot make it buffer or decode megabytes of "log".
MAX_LOG_FRAME = 32 * 1024


class ZmqLogHandler(logging.Handler):
    def __init__(self, node: str, coordinators: list[str], max_frame: int, capacity: int = 10_000) -> None:
        super().__init__()
        self.node = node
        self.queue: queue.Queue[LogRecord | None] = queue.Queue(maxsize=capacity)
        self._coordinators = coordinators
        self._max_frame = max_frame
        self._thread = threading.Thread(target=self._pump, name="log-pump", daemon=True)
        self._thread.start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = LogRecord(
                node=self.node,
                ts=record.created,
                level=record.levelname,
                logger=record.name,
                msg=self.format(record)[:4000],
            )
            self.queue.put_nowait(msg)
        except queue.Full:
            pass  # never block the caller for logging; drop under overload
        except Exception:
            self.handleError(record)

    def _pump(self) -> None:
        ctx = zmq.Context.instance()
        sock = make_socket(ctx, zmq.PUSH, self._max_frame)
        sock.setsockopt(zmq.SNDHWM, 1000)
        for addr in self._coordinators:
            sock.connect(tcp(offset_addr(addr, LOG_PORT_OFFSET)))
        try:
            while True:
                item = self.queue.get()
                if item is None:
                    break
                try:
                    sock.send(item.encode(), flags=zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass  # no coordinator reachable right now: logs are best effort
        finally:
            sock.close(0)

    def close(self) -> None:
        try:
            self.queue.put_nowait(None)
        except queue.Full:
            pass
        super().close()


def setup_logging(node: str, coordinators: list[str], level: str, max_frame: int, stream: bool = True) -> None:
    """Configure the root logger: stderr (human) plus the ZeroMQ log stream."""
    root = logging.getLogger()
    root.setLevel(level.upper())
    for h in list(root.handlers):
        root.removeHandler(h)
    fmt = logging.Formatter(f"%(asctime)s {node} %(levelname)s %(name)s: %(message)s")
    err = logging.StreamHandler(sys.stderr)
    err.setFormatter(fmt)
    root.addHandler(err)
    if stream and coordinators:
        zh = ZmqLogHandler(node, coordinators, max_frame)
        zh.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(zh)
