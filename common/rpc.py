"""Blocking request/reply client over DEALER with timeouts, retries and coordinator failover.

A REQ socket gets stuck forever when a reply is lost (zguide "Lazy Pirate"); a DEALER with our own
request ids and a poll timeout never does. Stale replies (an earlier, timed-out request) are
recognised by their ``req`` id and dropped.
"""

from __future__ import annotations

import itertools
import logging
import time
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


class RpcClient:
    """Talk to one of several equivalent endpoints (the coordinators), switching on failure."""

    def __init__(self, endpoints: list[str], cfg: Config, ctx: zmq.Context | None = None) -> None:
        if not endpoints:
            raise ValueError("no endpoint to talk to")
        self.endpoints = list(endpoints)
        self.cfg = cfg
        self.ctx = ctx or zmq.Context.instance()
        self.current = _last_good.get(tuple(self.endpoints), 0)
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

    def call(self, msg: Message, timeout: float | None = None, retries: int | None = None) -> Message:
        """Send ``msg`` (its ``req`` is set here) and return the reply; raise RpcError/Unavailable."""
        timeout = self.cfg.request_timeout if timeout is None else timeout
        attempts = (self.cfg.request_retries if retries is None else retries) * len(self.endpoints)
        last = "no attempt"
        started = time.monotonic()
        for attempt in range(max(1, attempts)):
            # With a standby configured, the first round probes each endpoint briefly.
            wait = min(timeout, PROBE_TIMEOUT) if len(self.endpoints) > 1 and attempt < len(self.endpoints) else timeout
            req = next_req()
            msg.req = req  # type: ignore[attr-defined]
            sock = self._socket()
            try:
                sock.send(msg.encode(), flags=zmq.NOBLOCK)
            except zmq.ZMQError as exc:
                last = str(exc)
                self._switch()
                continue
            reply = self._wait(sock, req, wait)
            if reply is None:
                last = f"no reply from {self.endpoints[self.current]} within {wait:.1f}s"
                self._switch()
                continue
            if isinstance(reply, Error):
                if reply.code == ErrorCode.NOT_PRIMARY:
                    last = reply.message
                    self._switch()
                    time.sleep(0.05)  # client side only: give a takeover a moment
                    continue
                _last_good[tuple(self.endpoints)] = self.current
                raise RpcError(reply.code, reply.message)
            _last_good[tuple(self.endpoints)] = self.current
            return reply
        what = getattr(msg, "name", None) or msg.TYPE  # a Command by its name: "jobs", not "cmd"
        raise Unavailable(f"{what}: no answer from {', '.join(self.endpoints)} after {max(1, attempts)} attempts "
                          f"in {time.monotonic() - started:.1f}s (last: {last})")

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
