"""The client remembers the primary (in-process and in a hint file across processes) and rides out a
takeover on the live coordinator instead of waiting out the dead one again."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable

import pytest
import zmq

from common import rpc
from common.config import Config
from common.protocol import Command, Error, ErrorCode, Message, Ok, decode
from common.rpc import RpcClient, read_hint, write_hint
from common.transport import bind, make_socket


class FakeCoordinator:
    """A ROUTER on loopback that answers every request with ``answer(req)`` (None: stays silent)."""

    def __init__(self, ctx: zmq.Context, answer: Callable[[int], Message | None]) -> None:
        self.sock = make_socket(ctx, zmq.ROUTER, 1 << 20, server=True)
        self.addr = f"127.0.0.1:{bind(self.sock, '127.0.0.1')}"
        self.answer = answer
        self.requests = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stop.is_set():
            if not self.sock.poll(20):
                continue
            ident, frame = self.sock.recv_multipart()
            self.requests += 1
            reply = self.answer(decode(frame).req)
            if reply is not None:
                self.sock.send_multipart([ident, reply.encode()])

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close(0)


@pytest.fixture
def ctx():
    c = zmq.Context()
    yield c
    c.term()


@pytest.fixture
def fakes(ctx):
    made: list[FakeCoordinator] = []

    def make(answer: Callable[[int], Message | None]) -> FakeCoordinator:
        made.append(FakeCoordinator(ctx, answer))
        return made[-1]

    yield make
    for f in made:
        f.close()


def new_process() -> None:
    rpc._last_good.clear()  # what a new CLI process starts with


def timed_call(client: RpcClient) -> float:
    t0 = time.monotonic()
    client.call(Command(0, "jobs"), timeout=2.0)
    return time.monotonic() - t0


def test_a_new_process_goes_straight_to_the_primary_a_previous_one_found(ctx, fakes, tmp_path):
    dead = fakes(lambda req: None)
    primary = fakes(lambda req: Ok(req, []))
    cfg = Config(coordinator=dead.addr, standby=primary.addr)
    hint = tmp_path / "primary.json"
    new_process()
    first = RpcClient(cfg.coordinators, cfg, ctx, hint_file=hint)
    assert timed_call(first) >= rpc.PROBE_TIMEOUT  # waited out the dead one once
    first.close()
    assert json.loads(hint.read_text())["primary"] == primary.addr
    new_process()
    second = RpcClient(cfg.coordinators, cfg, ctx, hint_file=hint)
    took = timed_call(second)
    second.close()
    assert took < 0.5 * rpc.PROBE_TIMEOUT, f"a later call still paid {took:.2f}s for the dead primary"
    assert dead.requests == 1


def test_a_stale_hint_costs_one_fallback(ctx, fakes, tmp_path):
    standby = fakes(lambda req: Error(req, ErrorCode.NOT_PRIMARY, "standby"))
    primary = fakes(lambda req: Ok(req, []))
    cfg = Config(coordinator=primary.addr, standby=standby.addr)
    hint = tmp_path / "primary.json"
    write_hint(hint, cfg.coordinators, standby.addr)
    assert read_hint(hint, cfg.coordinators) == 1
    new_process()
    client = RpcClient(cfg.coordinators, cfg, ctx, hint_file=hint)
    assert timed_call(client) < 0.5
    client.close()
    assert standby.requests == 1 and read_hint(hint, cfg.coordinators) == 0


def test_garbage_or_foreign_hints_are_ignored(tmp_path):
    hint = tmp_path / "primary.json"
    hint.write_text("{not json")
    assert read_hint(hint, ["a:1", "b:2"]) is None
    hint.write_text(json.dumps({"primary": "elsewhere:9"}))
    assert read_hint(hint, ["a:1", "b:2"]) is None
    write_hint(tmp_path / "missing-dir" / "primary.json", ["a:1"], "a:1")  # no directory: no hint, no error
    assert not (tmp_path / "missing-dir").exists()


def test_during_a_takeover_the_client_waits_on_the_live_standby_not_the_dead_primary(ctx, fakes):
    promoted_at = time.monotonic() + 1.5

    def standby_answer(req: int) -> Message:
        if time.monotonic() < promoted_at:
            return Error(req, ErrorCode.NOT_PRIMARY, "standby, not primary")
        return Ok(req, ["job1"])

    dead = fakes(lambda req: None)
    standby = fakes(standby_answer)
    cfg = Config(coordinator=dead.addr, standby=standby.addr)
    new_process()
    client = RpcClient(cfg.coordinators, cfg, ctx)
    t0 = time.monotonic()
    reply = client.call(Command(0, "jobs"), timeout=2.0)
    took = time.monotonic() - t0
    client.close()
    assert reply.data == ["job1"]
    # Promotion came 1.5 s in; going back to the silent primary would have added a full probe timeout.
    assert took < 1.5 + 0.5, f"answered {took:.2f}s after the call"
    assert dead.requests == 1 and standby.requests > 3
