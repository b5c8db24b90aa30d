"""Shared fixtures: real local clusters on loopback that are always torn down."""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cli.cluster import LocalCluster

DATA = Path(__file__).resolve().parent.parent / "data"


def wait_for(
    predicate: Callable[[], Any], timeout: float, interval: float = 0.05, what: str = "condition",
    progress: Callable[[], Any] | None = None,
) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout`` seconds.

    With ``progress`` (a callable returning a comparable measure, e.g. results completed so far),
    ``timeout`` is the longest time allowed *without progress*: a loaded machine that keeps making
    progress is given the time it needs, and a stuck system still fails after ``timeout``.
    """
    deadline = time.monotonic() + timeout
    seen = progress() if progress is not None else None
    while True:
        value = predicate()
        if value:
            return value
        if progress is not None:
            now_seen = progress()
            if now_seen != seen:
                seen = now_seen
                deadline = time.monotonic() + timeout
        if time.monotonic() > deadline:
            idle = f" without progress (last: {seen!r})" if progress is not None else ""
            raise AssertionError(f"timed out after {timeout}s{idle} waiting for {what}")
        time.sleep(interval)  # polling another process's state: there is no event to wait on


@pytest.fixture
def make_cluster(tmp_path: Path) -> Iterator[Callable[..., LocalCluster]]:
    clusters: list[LocalCluster] = []

    def make(workers: int = 4, standby: bool = False, **kw: Any) -> LocalCluster:
        c = LocalCluster(workers=workers, standby=standby, data_dir=str(tmp_path / f"c{len(clusters)}"),
                         torch_threads=1, **kw)
        clusters.append(c)
        c.start(timeout=60)
        return c

    yield make
    for c in clusters:
        c.stop()
        leftovers = [p for p in c.procs if p.popen.poll() is None]
        assert not leftovers, f"processes left running: {leftovers}"


class _ServedFiles(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        data = self.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def http_files() -> Iterator[tuple[str, dict[str, bytes]]]:
    """A loopback HTTP server in a thread (downloads are tested against it, never the internet):
    ``(base_url, {path: bytes})``; the test fills the dict."""
    files: dict[str, bytes] = {}
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), type("Handler", (_ServedFiles,), {"files": files}))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", files
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)
