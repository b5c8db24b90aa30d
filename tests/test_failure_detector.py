"""The φ-accrual failure detector, in virtual time."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st
from simcluster import MemoryNet

from broker.coordinator import Coordinator
from common.config import Config
from common.failure_detector import DetectorParams, PhiAccrual
from common.identity import PULSE_SUFFIX
from common.membership import Member, MemberRegistry
from common.protocol import Join, Pulse, decode

PARAMS = Config().detector_params()


def beat(fd: PhiAccrual, t: float, intervals: list[float]) -> float:
    for dt in intervals:
        t += dt
        assert not fd.failed(t), f"false failure at t={t:.2f} after a {dt:.2f}s interval"
        fd.heartbeat(t)
    return t


def test_a_steady_peer_is_detected_as_fast_as_the_old_fixed_timeout() -> None:
    fd = PhiAccrual(PARAMS, 0.0)
    t = beat(fd, 0.0, [0.5] * 50)
    # Quiet network: the floor (heartbeat_interval x liveness) decides, ≤ 2 s after the last beat.
    assert PARAMS.min_timeout <= fd.timeout() <= 2.0
    assert not fd.failed(t + PARAMS.min_timeout)
    assert fd.failed(t + 2.0)


def test_a_peer_on_a_busy_machine_is_not_failed_and_still_detected_within_the_ceiling() -> None:
    rng = random.Random(7)
    fd = PhiAccrual(PARAMS, 0.0)
    # Heartbeats every 0.5 s that a loaded scheduler delays by up to a second, now and then two.
    intervals = [0.5 + rng.choice([0.0, 0.0, 0.1, 0.3, 0.6, 1.0]) * rng.random() * 2 for _ in range(2000)]
    t = beat(fd, 0.0, intervals)
    assert fd.timeout() > PARAMS.min_timeout, "the detector did not adapt to the jitter"
    assert fd.failed(t + PARAMS.max_timeout + 1e-6), "detection must stay bounded"


def test_the_fixed_timeout_baseline_fails_the_same_busy_peer() -> None:
    """What the adaptive detector is for: a fixed 1.5 s timeout declares a late but live peer failed."""
    fd = PhiAccrual(DetectorParams.fixed(1.5), 0.0)
    t = 0.0
    for dt in [0.5] * 10 + [1.7]:
        t += dt
        if fd.failed(t):
            break
        fd.heartbeat(t)
    else:
        pytest.fail("a 1.7 s gap should trip a fixed 1.5 s timeout")


def test_timeout_grows_with_variance_and_shrinks_back() -> None:
    fd = PhiAccrual(PARAMS, 0.0)
    t = beat(fd, 0.0, [0.5] * 100)
    calm = fd.timeout()
    t = beat(fd, t, [0.3, 1.2] * 50)
    assert fd.timeout() > calm
    beat(fd, t, [0.5] * PARAMS.window)  # the window forgets the busy spell
    assert fd.timeout() == pytest.approx(calm)


def test_excuse_moves_the_deadline_until_the_next_heartbeat() -> None:
    fd = PhiAccrual(PARAMS, 0.0)
    t = beat(fd, 0.0, [0.5] * 20)
    before = fd.deadline()
    fd.excuse(3.0)
    assert fd.deadline() == pytest.approx(before + 3.0)
    assert not fd.failed(before + 1.0)
    n = len(fd.intervals)
    fd.heartbeat(t + 3.5)
    assert fd.excused == 0.0
    assert fd.max_gap == pytest.approx(0.5)  # the excused part is not counted as the peer's silence
    assert len(fd.intervals) == n  # nor learned as the peer's rhythm


def test_phi_rises_with_silence() -> None:
    fd = PhiAccrual(PARAMS, 0.0)
    t = beat(fd, 0.0, [0.5] * 20)
    values = [fd.phi(t + dt) for dt in (0.1, 0.5, 1.0, 1.5, 3.0)]
    assert values == sorted(values) and values[0] < 1 and values[-1] > PARAMS.phi


@given(st.lists(st.floats(min_value=0.0, max_value=30.0, allow_nan=False), min_size=1, max_size=300))
def test_timeout_always_within_floor_and_ceiling(intervals: list[float]) -> None:
    fd = PhiAccrual(PARAMS, 0.0)
    t = 0.0
    for dt in intervals:
        t += dt
        fd.heartbeat(t)
        assert PARAMS.min_timeout <= fd.timeout() <= PARAMS.max_timeout


def test_registry_uses_one_detector_per_member_and_excuses_its_own_stall() -> None:
    reg = MemberRegistry(PARAMS)
    reg.join(Member("a@1", "worker", "a:1"), now=0.0)
    reg.join(Member("b@1", "worker", "b:1"), now=0.0)
    for i in range(1, 21):
        reg.heartbeat("a@1", i * 0.5)
        reg.heartbeat("b@1", i * 0.5)
    assert reg.expire(10.0 + PARAMS.min_timeout) == []
    reg.excuse_all(5.0)  # the coordinator loop itself was frozen for 5 s
    assert reg.expire(10.0 + 5.0 + PARAMS.min_timeout) == []
    reg.heartbeat("a@1", 16.0)
    failed = reg.expire(16.0 + PARAMS.min_timeout)  # b: 10 + 5 s excused + ~1.6 s; a beat at 16.0
    assert [e.member.node_id for e in failed] == ["b@1"]


def test_pulses_from_the_sidecar_keep_a_member_alive_and_forged_ones_do_not() -> None:
    core = Coordinator(Config(), "sim:1", MemoryNet())
    for node in ("a:1@1", "b:1@1"):
        core.handle(node.encode(), decode(Join(node, "worker", node.split("@")[0]).encode()), 0.0)
    # The loops of both workers are starved (no Heartbeat); a's sidecar pulses, b gets forged pulses
    # (a's sidecar vouching for b, and b's plain identity) that must not count.
    t = 0.0
    while t < 10.0:
        t += 0.5
        core.handle(f"a:1@1{PULSE_SUFFIX}".encode(), decode(Pulse("a:1@1").encode()), t)
        core.handle(f"a:1@1{PULSE_SUFFIX}".encode(), decode(Pulse("b:1@1").encode()), t)
        core.handle(b"b:1@1", decode(Pulse("b:1@1").encode()), t)
        core.tick(t)
    assert core.registry.is_alive("a:1@1")
    assert not core.registry.is_alive("b:1@1")
