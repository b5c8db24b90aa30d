"""Process entry points of the daemons: logging, signals, the loop."""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path

from common.config import Config
from common.logstream import setup_logging

log = logging.getLogger("idunno")


def _on_term(stop: threading.Event) -> None:
    def handler(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def warn_if_insecure(cfg: Config) -> None:
    if not cfg.curve_dir:  # only reached with --insecure (resolve_config refuses otherwise)
        log.warning("--insecure: no encryption, no authentication; anyone who can reach this node's ports "
                    "can act as any node or client")


def run_coordinator(cfg: Config, addr: str, peer: str | None, standby: bool, data_dir: str | None,
                    scheduler: str = "fair-time", shell: bool = False) -> int:
    from broker.server import CoordinatorServer  # noqa: PLC0415

    setup_logging(f"coord-{addr}", [addr], cfg.log_level, cfg.max_frame_bytes)
    warn_if_insecure(cfg)
    server = CoordinatorServer(cfg, addr, peer=peer, standby=standby, data_dir=data_dir, scheduler=scheduler)
    if cfg.metrics_port:
        from broker.metrics import serve_metrics  # noqa: PLC0415

        serve_metrics(server, cfg.metrics_port, cfg.host)
    if shell:
        from cli.shell import coordinator_shell  # noqa: PLC0415

        t = threading.Thread(target=server.run, name="coordinator", daemon=True)
        t.start()
        try:
            coordinator_shell(cfg.replace(coordinator=addr, standby=peer or ""))
        finally:
            server.stop_event.set()
            t.join(timeout=3)
        return 0
    _on_term(server.stop_event)
    server.run()
    return 0


def worker_name(cfg: Config, name: str | None, port: int) -> str:
    """``--name``, else one from the address (stable only if the port is fixed), else from the pid."""
    from common.identity import default_node_name, validate_node_name  # noqa: PLC0415

    if name:
        return validate_node_name(name)
    if port:
        return default_node_name(cfg.host, port)
    return f"worker-{os.getpid()}"


def run_worker(cfg: Config, port: int, data_dir: str | None, name: str | None = None) -> int:
    # Cap torch's threads before it is imported anywhere: several workers share few cores.
    os.environ.setdefault("OMP_NUM_THREADS", str(cfg.torch_threads))
    from worker.worker import Worker  # noqa: PLC0415

    stable = bool(name or port)
    name = worker_name(cfg, name, port)
    # The data directory follows the name: a worker started again under its name finds its replicas.
    base = Path(data_dir or Path(cfg.data_dir) / name)
    w = Worker(cfg, base, port=port, name=name)
    setup_logging(name, cfg.coordinators, cfg.log_level, cfg.max_frame_bytes)
    if not stable:
        log.warning("worker started without --name or --port: its identity and data directory (%s) "
                    "will not be found again after a restart", base)
    warn_if_insecure(cfg)
    _on_term(w.stop_event)
    w.run()
    return 0
