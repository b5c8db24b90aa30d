"""Blocking request/reply client over DEALER with timeouts, retries and coordinator failover.

A REQ socket gets stuck forever when a reply is lost (zguide "Lazy Pirate"); a DEALER with our own
request ids and a poll timeout never does. Stale replies (an earlier, timed-out request) are
recognised by their ``req`` id and dropped.

The client remembers which coordinator last answered as primary: in this process (``_last_good``)
and, given a ``hint_file``, across processes (each CLI invocation is a new process), so calls after a
failover go straight to the new primary instead of waiting out the dead one first. A stale hint
costs one fallback to the other endpoint.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from common.config import Config
from common.protocol import Error, ErrorCode, Message, ProtocolError, decode
from common.transport import make_socket, tcp

log = logging.getLogger("idunno.rpc")

_req_ids = itertools.count(int(time.time() * 1000) % 1_000_000_000)
# Which endpoint of a group last answered as primary, so the next client in this process starts there.
_last_good: dict[tuple[str, ...], int] = {}
PROBE_TIMEOUT = 1.0  # a healthy coordinator answers in milliseconds; don't wait long on a dead one


class RpcError(RuntimeError):
    """The server answered with an error (code, message)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class Unavailable(RpcError):
    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.UNAVAILABLE, message)


def next_req() -> int:
    return next(_req_ids)


def read_hint(path: str | os.PathLike[str] | None, endpoints: list[str]) -> int | None:
    """Index in ``endpoints`` of the primary a previous process recorded in ``path`` (None if unknown)."""
    if not path:
        return None
    try:
        primary = json.loads(Path(path).read_text()).get("primary")
    except (OSError, ValueError, AttributeError):
        return None
    return endpoints.index(primary) if primary in endpoints else None


def write_hint(path: str | os.PathLike[str] | None, endpoints: list[str], primary: str) -> None:
    """Record ``primary`` in ``path`` atomically (write a temporary file, rename it over): a concurrent
    reader sees the old hint or the new one, never half of one. Only into an existing directory (the
    data directory of `idunno up`); a failure is not worth an error: the hint is only an optimisation."""
    if not path:
        return
    target = Path(path)
    if not target.parent.is_dir():
        return
    tmp = ""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".primary-", dir=target.parent)
        with os.fdopen(fd, "w") as fh:
            json.dump({"primary": primary, "coordinators": endpoints, "ts": time.time()}, fh)
        os.replace(tmp, target)
    except OSError as exc:
        log.debug("could not record the primary in %s: %s", target, exc)
        if tmp:
            Path(tmp).unlink(missing_ok=True)



@dataclass
class _CallState:
    """What one ``call`` learned about the endpoints so far."""

    silent: set[int] = field(default_factory=set)  # endpoints that did not answer during this call
    refused: set[int] = field(default_factory=set)  # endpoints that answered "not primary" during this call
    takeover_until: float | None = None  # keep asking until then while a takeover may be under way

class RpcClient:
    """Talk to one of several equivalent endpoints (the coordinators), switching on failure."""

    def __init__(self, endpoints: list[str], cfg: Config, ctx: zmq.Context | None = None,
                 hint_file: str | os.PathLike[str] | None = None) -> None:
        if not endpoints:
            raise ValueError("no endpoint to talk to")
        self.endpoints = list(endpoints)
        self.cfg = cfg
        self.ctx = ctx or zmq.Context.instance()
        self.hint_file = hint_file
        known = _last_good.get(tuple(self.endpoints))
        self.hinted = read_hint(hint_file, self.endpoints) if known is None else known
        self.current = known if known is not None else (self.hinted or 0)
        self.sock: zmq.Socket | None = None

    def _socket(self) -> zmq.Socket:
        if self.sock is None:
            self.sock = make_socket(self.ctx, zmq.DEALER, self.cfg.max_frame_bytes, keys=self.cfg.curve_dir,
                                    plain=self.cfg.insecure)
            self.sock.connect(tcp(self.endpoints[self.current]))
        return self.sock

    def _switch(self) -> None:
        if self.sock is not None:
            self.sock.close(0)
            self.sock = None
        self.current = (self.current + 1) % len(self.endpoints)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close(0)
            self.sock = None

    def _answered(self) -> None:
        """The current endpoint answered as primary: start there next time, in this process and the next."""
        _last_good[tuple(self.endpoints)] = self.current
        if self.hint_file and self.hinted != self.current and len(self.endpoints) > 1:
            write_hint(self.hint_file, self.endpoints, self.endpoints[self.current])
            self.hinted = self.current

    def call(self, msg: Message, timeout: float | None = None, retries: int | None = None) -> Message:
        """Send ``msg`` (its ``req`` is set here) and return the reply; raise RpcError/Unavailable."""
        timeout = self.cfg.request_timeout if timeout is None else timeout
        attempts = max(1, (self.cfg.request_retries if retries is None else retries) * len(self.endpoints))
        last = "no attempt"
        started = time.monotonic()
        st = _CallState()
        attempt = 0
        while attempt < attempts:
            # With a standby configured, the first round probes each endpoint briefly.
            wait = min(timeout, PROBE_TIMEOUT) if len(self.endpoints) > 1 and attempt < len(self.endpoints) else timeout
            req = next_req()
            msg.req = req  # type: ignore[attr-defined]
            sock = self._socket()
            try:
                sock.send(msg.encode(), flags=zmq.NOBLOCK)
            except zmq.ZMQError as exc:
                last = str(exc)
                attempt += 1
                self._switch()
                continue
            reply = self._wait(sock, req, wait)
            if reply is None:
                last = f"no reply from {self.endpoints[self.current]} within {wait:.1f}s"
                st.silent.add(self.current)
                attempt += 1
                self._switch()
                continue
            if isinstance(reply, Error) and reply.code == ErrorCode.NOT_PRIMARY:
                last = reply.message
                attempt += self._after_not_primary(st)
                continue
            self._answered()
            if isinstance(reply, Error):
                raise RpcError(reply.code, reply.message)
            return reply
        what = getattr(msg, "name", None) or msg.TYPE  # a Command by its name: "jobs", not "cmd"
        raise Unavailable(f"{what}: no answer from {', '.join(self.endpoints)} after {attempts} attempts "
                          f"in {time.monotonic() - started:.1f}s (last: {last})")

    def _after_not_primary(self, st: _CallState) -> int:
        """The current endpoint answered "not primary": pick whom to ask next. Returns 1 when that
        used up an attempt, 0 when a takeover (or a start-up election) is under way and the same
        round is asked again shortly instead of waiting out a dead primary once more."""
        now = time.monotonic()
        st.refused.add(self.current)
        others = [i for i in range(len(self.endpoints)) if i != self.current and i not in st.silent]
        # Every other coordinator is silent, or all of them say "not primary" (both just
        # started and still probing for each other): a takeover or an election is under way.
        electing = len(st.refused) == len(self.endpoints)
        if (not others or electing) and len(self.endpoints) > 1:
            if st.takeover_until is None:
                st.takeover_until = now + 2 * self.cfg.failover_timeout + self.cfg.failure_max_timeout
            if now < st.takeover_until:
                time.sleep(0.05)  # client side only
                if electing:
                    self._switch()  # ask each in turn: whichever wins answers
                return 0
            st.silent.clear()  # it is not taking over: try the others again
        self._switch()
        time.sleep(0.05)  # client side only: give a takeover a moment
        return 1

    def _wait(self, sock: zmq.Socket, req: int, timeout: float) -> Message | None:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not sock.poll(int(left * 1000) + 1):
                return None
            frame = sock.recv()
            try:
                reply = decode(frame, self.cfg.max_frame_bytes)
            except ProtocolError as exc:
                log.warning("malformed reply dropped: %s", exc)
                continue
            if getattr(reply, "req", None) == req:
                return reply
            # a reply to an earlier timed-out request: ignore


def ok_data(reply: Message) -> Any:
    return getattr(reply, "data", None)
