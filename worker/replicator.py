"""Re-replication on the worker: a few threads pull the replicas the coordinator asks for (``Replicate``).

Each thread has its own SDFS client and hands its ``Stored`` report back to the worker's loop through
the loop's inproc inbox, tagged with the incarnation (generation) it was made for.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

import zmq

from common.config import Config
from common.protocol import Replicate, Stored
from common.transport import make_socket
from sdfs.client import SdfsClient
from sdfs.store import LocalStore

log = logging.getLogger("idunno.worker")

REPLICATION_THREADS = 4


class Replicator:
    def __init__(self, cfg: Config, coordinators: list[str], store: LocalStore, ctx: zmq.Context, inbox: str,
                 node_id: Callable[[], str], generation: Callable[[], int]) -> None:
        self.cfg = cfg
        self.coordinators = coordinators
        self.store = store
        self.ctx = ctx
        self.inbox = inbox
        self.node_id = node_id
        self.generation = generation
        self.queue: queue.Queue[Replicate | None] = queue.Queue()
        # A few pullers, so one slow or dead source does not hold up every other repair.
        self.threads = [threading.Thread(target=self._loop, name=f"replicate-{i}", daemon=True)
                        for i in range(REPLICATION_THREADS)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def submit(self, m: Replicate) -> None:
        self.queue.put(m)

    def stop(self) -> None:
        for _ in self.threads:
            self.queue.put(None)

    def _loop(self) -> None:
        client = SdfsClient(self.cfg, list(self.coordinators), self.ctx)
        out = make_socket(self.ctx, zmq.PUSH, self.cfg.max_frame_bytes, secure=False)
        out.connect(self.inbox)
        try:
            while (m := self.queue.get()) is not None:
                node_id = self.node_id()
                try:
                    if not self.store.has(m.name, m.version):
                        client.pull_replica(m.sources, m.name, m.version, m.size, m.checksum, self.store)
                    reply = Stored(node_id, m.name, m.version, m.size, m.checksum)
                except Exception as exc:
                    log.warning("re-replication of %s v%d failed: %s", m.name, m.version, exc)
                    reply = Stored(node_id, m.name, m.version, m.size, m.checksum, ok=False, error=str(exc))
                out.send_multipart([str(self.generation()).encode(), reply.encode()])
        finally:
            client.close()
            out.close(0)
