"""Wire protocol: every message round-trips and decode() turns every malformed frame into ProtocolError."""

from __future__ import annotations

import dataclasses
import time
import typing
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common import protocol
from common.protocol import (
    VERSION,
    Bundle,
    Command,
    Error,
    Heartbeat,
    Join,
    Message,
    ProtocolError,
    Task,
    TaskResult,
    WriteChunk,
    decode,
    message_types,
)

TYPES = message_types()


def _fields(cls: type[Message]) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def plausible(hint: Any) -> Any:
    """A valid value for a field type hint (containers get one plausible item so item checks run)."""
    if hint is Any:
        return None
    origin = typing.get_origin(hint)
    if origin is list:
        (item,) = typing.get_args(hint) or (Any,)
        return [plausible(item)]
    if origin is dict:
        _kt, vt = typing.get_args(hint) or (str, Any)
        return {"k": plausible(vt)}
    simple = {int: 1, str: "x", float: 1.5, bool: True, bytes: b"ab", list: [], dict: {}}
    if hint in simple:
        return simple[hint]
    raise AssertionError(f"no plausible value for {hint!r}; extend the test")


def wrong_values(hint: Any) -> list[Any]:
    """Values of the wrong type for a hint (empty for Any: everything is valid there)."""
    if hint is Any:
        return []
    origin = typing.get_origin(hint)
    if origin is list:
        (item,) = typing.get_args(hint) or (Any,)
        bad = [{"k": 1}, "x", 1, None]
        return bad + [[w] for w in wrong_values(item)[:2]]
    if origin is dict:
        _kt, vt = typing.get_args(hint) or (str, Any)
        return [[], "x", 1, None] + [{"k": w} for w in wrong_values(vt)[:2]]
    return {
        int: ["1", True, 1.5, None, b"1"],
        str: [1, b"x", True, None, ["x"]],
        float: ["1.5", True, None],
        bool: [1, "true", None],
        bytes: ["ab", 1, None, [1]],
    }[hint]


def _plausible_fields(cls: type[Message]) -> dict[str, Any]:
    body = {name: plausible(hint) for name, hint in _fields(cls).items()}
    if cls is Bundle:  # its parts are messages themselves: arbitrary bytes are not one
        body["parts"] = [sample(Task).encode(), sample(TaskResult).encode()]
    return body


def sample(cls: type[Message]) -> Message:
    return cls(**_plausible_fields(cls))


def raw(cls: type[Message], **changes: Any) -> dict[str, Any]:
    body = _plausible_fields(cls)
    body.update(changes)
    body["v"] = VERSION
    body["t"] = cls.TYPE
    return body


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def assert_rejected(frame: bytes, **kw: Any) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        decode(frame, **kw)
    assert type(info.value) is ProtocolError
    return info.value


# --------------------------------------------------------------------------------------------
# round trips


def test_registry_is_populated_and_consistent() -> None:
    assert len(TYPES) >= 30
    for tname, cls in TYPES.items():
        assert tname == cls.TYPE
        assert issubclass(cls, Message)
        assert not {"v", "t"} & {f.name for f in dataclasses.fields(cls)}, f"{tname} shadows an envelope key"


@pytest.mark.parametrize("tname", sorted(TYPES))
def test_every_message_type_round_trips(tname: str) -> None:
    msg = sample(TYPES[tname])
    frame = msg.encode()
    assert isinstance(frame, bytes)
    back = decode(frame)
    assert type(back) is type(msg)
    assert back == msg
    assert back.encode() == frame


@pytest.mark.parametrize("tname", sorted(TYPES))
def test_every_message_type_round_trips_with_empty_containers(tname: str) -> None:
    cls = TYPES[tname]
    values = {}
    for name, hint in _fields(cls).items():
        origin = typing.get_origin(hint) or hint
        values[name] = [] if origin is list else {} if origin is dict else plausible(hint)
    msg = cls(**values)
    assert decode(msg.encode()).encode() == msg.encode()  # (bytes: NaN != NaN)


def test_defaults_may_be_omitted_on_the_wire() -> None:
    frame = pack({"v": VERSION, "t": "heartbeat", "node_id": "h:1@1"})
    assert decode(frame) == Heartbeat("h:1@1", 0)
    frame = pack({"v": VERSION, "t": "join", "node_id": "n", "role": "worker", "data_addr": ""})
    assert decode(frame) == Join("n", "worker", "", [], [])


def test_float_field_accepts_an_int() -> None:
    frame = pack(raw(TYPES["log"], ts=3))
    assert decode(frame).ts == 3


def test_binary_payload_survives_exactly() -> None:
    data = bytes(range(256)) * 4
    msg = WriteChunk(7, "data/img_001.jpg", 2, 1024, data, 4096, "ab" * 32, False)
    assert decode(msg.encode()).data == data


# --------------------------------------------------------------------------------------------
# rejections


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_never_escape_as_anything_but_protocol_error(frame: bytes) -> None:
    try:
        msg = decode(frame)
    except ProtocolError:
        return
    assert isinstance(msg, Message)  # vanishingly unlikely, but then it must be a real message


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_after_a_valid_header_are_rejected(tail: bytes) -> None:
    # A map header promising 4 entries, then "v": 1, "t": "heartbeat", then noise.
    frame = b"\x84" + pack("v") + pack(VERSION) + pack("t") + pack("heartbeat") + tail
    try:
        msg = decode(frame)
    except ProtocolError:
        return
    assert isinstance(msg, Message)


@pytest.mark.parametrize("tname", ["write", "join", "put_plan", "heartbeat", "ok", "state_chunk"])
def test_every_prefix_of_a_valid_frame_is_rejected(tname: str) -> None:
    frame = sample(TYPES[tname]).encode()
    for n in range(len(frame)):
        assert_rejected(frame[:n])
    decode(frame)  # the whole frame is fine


def test_trailing_garbage_is_rejected() -> None:
    frame = sample(Error).encode()
    assert_rejected(frame + b"\x00")
    assert_rejected(frame + frame)


@pytest.mark.parametrize("obj", [None, 1, -1, 1.5, True, "heartbeat", b"bin", [], [1, 2], [{"v": 1}]])
def test_non_map_msgpack_is_rejected(obj: Any) -> None:
    err = assert_rejected(pack(obj))
    assert "map" in str(err)


def test_non_bytes_frame_is_rejected() -> None:
    for frame in ("text", None, 12, [b"x"]):
        assert_rejected(frame)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "version",
    [
        None,
        0,
        VERSION - 1,
        VERSION + 1,
        str(VERSION),
        VERSION + 0.0001,
        bytes([VERSION]),
        pytest.param(True, id="bool-true"),
        pytest.param(float(VERSION), id="float-version"),
    ],
)
def test_wrong_version_is_rejected(version: Any) -> None:
    body = raw(Error)
    if version is None:
        del body["v"]
    else:
        body["v"] = version
    err = assert_rejected(pack(body))
    assert "version" in str(err)


@pytest.mark.parametrize("mtype", [None, "", "nope", "Error", "ERROR", 1, b"error", ["error"], "error\x00"])
def test_unknown_type_is_rejected(mtype: Any) -> None:
    body = raw(Error)
    if mtype is None:
        del body["t"]
    else:
        body["t"] = mtype
    err = assert_rejected(pack(body))
    assert "unknown message type" in str(err)


@pytest.mark.parametrize("tname", sorted(TYPES))
def test_missing_required_field_is_rejected(tname: str) -> None:
    cls = TYPES[tname]
    required = [
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    for name in required:
        body = raw(cls)
        del body[name]
        err = assert_rejected(pack(body))
        assert name in str(err)


@pytest.mark.parametrize("tname", sorted(TYPES))
def test_extra_field_is_rejected(tname: str) -> None:
    body = raw(TYPES[tname], surprise=1)
    err = assert_rejected(pack(body))
    assert "surprise" in str(err)


def test_extra_binary_key_is_rejected() -> None:
    body = raw(Error)
    body[b"req"] = 1  # a bin key that looks like a field name is still not the field
    assert_rejected(pack(body))


@pytest.mark.parametrize("tname", sorted(TYPES))
def test_wrong_field_types_are_rejected(tname: str) -> None:
    cls = TYPES[tname]
    checked = 0
    for name, hint in _fields(cls).items():
        for bad in wrong_values(hint):
            with pytest.raises(ProtocolError) as info:
                decode(pack(raw(cls, **{name: bad})))
            assert f"{tname}.{name}" in str(info.value), (name, bad, str(info.value))
            checked += 1
    if any(hint is not Any for hint in _fields(cls).values()):
        assert checked > 0


def test_specific_wrong_types() -> None:
    assert_rejected(pack(raw(Error, code=1)))  # int where str
    assert_rejected(pack(raw(Error, req=True)))  # bool where int
    assert_rejected(pack(raw(WriteChunk, data="ab")))  # str where bytes
    assert_rejected(pack(raw(WriteChunk, last=1)))  # int where bool
    assert_rejected(pack(raw(Join, inflight=["t1", 2])))  # list item of the wrong type
    assert_rejected(pack(raw(Join, store=[["a", 1, 2, "c"], "not a list"])))
    assert_rejected(pack(raw(TYPES["put_begin"], files=[{"name": "a"}, 5])))


@pytest.fixture(scope="module")
def huge_frame() -> bytes:
    return b"\x00" * (100 * 1024 * 1024)


def test_oversized_frame_is_rejected_without_unpacking(huge_frame: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = protocol.msgpack.unpackb

    def spy(*a: Any, **kw: Any) -> Any:
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(protocol.msgpack, "unpackb", spy)
    start = time.perf_counter()
    err = assert_rejected(huge_frame)
    elapsed = time.perf_counter() - start
    assert "exceeds limit" in str(err)
    assert calls == []
    assert elapsed < 0.5
    assert_rejected(memoryview(huge_frame))
    assert calls == []
    # The limit is the caller's: a smaller one rejects a normal frame, one byte over is too much.
    frame = sample(Error).encode()
    assert_rejected(frame, max_bytes=len(frame) - 1)
    assert decode(frame, max_bytes=len(frame)) == sample(Error)


@pytest.mark.parametrize(
    "header",
    [
        b"\xc6\xff\xff\xff\xff",  # bin32 claiming 4 GB
        b"\xc5\xff\xff",  # bin16 claiming 64 KB (more than the frame holds)
        b"\xdb\xff\xff\xff\xff",  # str32 claiming 4 GB
        b"\xdd\xff\xff\xff\xff",  # array32 claiming 4 G items
        b"\xdf\xff\xff\xff\xff",  # map32 claiming 4 G entries
        b"\xc9\xff\xff\xff\xff\x01",  # ext32 claiming 4 GB
    ],
)
def test_huge_declared_lengths_are_rejected_fast(header: bytes) -> None:
    start = time.perf_counter()
    assert_rejected(header)
    assert_rejected(header + b"\x00" * 64)
    # nested inside an otherwise valid WriteChunk frame, in the "data" field
    body = raw(WriteChunk)
    del body["data"]
    prefix = bytes([0x80 | (len(body) + 1)]) + b"".join(pack(k) + pack(v) for k, v in body.items()) + pack("data")
    assert_rejected(prefix + header + b"\x00" * 16)
    assert time.perf_counter() - start < 0.5


def test_deep_nesting_is_rejected_or_decoded_never_crashes() -> None:
    depth = 100_000
    body = b"\x81" + pack("k") + b"\x91" * depth + b"\xc0"
    envelope = {"v": VERSION, "t": "cmd", "req": 1, "name": "x"}
    frame = b"\x85" + b"".join(pack(k) + pack(v) for k, v in envelope.items()) + pack("args") + body
    try:
        msg = decode(frame)
    except ProtocolError:
        return
    assert isinstance(msg, Command)


@pytest.mark.parametrize(
    "frame",
    [
        b"\x81\x01\x01",  # {1: 1}
        b"\x81\xc0\x01",  # {nil: 1}
        b"\x81\xc3\x01",  # {true: 1}
        b"\x81\x91\x01\x01",  # {[1]: 1}
        b"\x81\x80\x01",  # {{}: 1}
        b"\x81\xcb\x3f\xf8\x00\x00\x00\x00\x00\x00\x01",  # {1.5: 1}
    ],
)
def test_maps_with_non_string_keys_are_rejected(frame: bytes) -> None:
    assert_rejected(frame)
    # the same key next to a valid envelope
    envelope = raw(Error)
    full = bytes([0x80 | (len(envelope) + 1)]) + frame[1:] + b"".join(pack(k) + pack(v) for k, v in envelope.items())
    assert_rejected(full)


def test_nested_map_with_non_string_key_is_rejected() -> None:
    body = {k: v for k, v in raw(Command).items() if k != "args"}
    frame = bytes([0x80 | (len(body) + 1)]) + b"".join(pack(k) + pack(v) for k, v in body.items())
    assert_rejected(frame + pack("args") + b"\x81\x01\x01")  # args = {1: 1}
    assert_rejected(pack(raw(Command, args={b"bin": 1})))  # bin key where str keys are declared


# --------------------------------------------------------------------------------------------
# properties

scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text() | st.binary()
objects = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=30,
)


@settings(max_examples=500, deadline=None)
@given(objects)
def test_any_msgpack_object_decodes_to_a_message_or_protocol_error(obj: Any) -> None:
    try:
        msg = decode(pack(obj))
    except ProtocolError:
        return
    assert isinstance(msg, Message)


field_names = st.sampled_from(sorted({f.name for cls in TYPES.values() for f in dataclasses.fields(cls)}))


@st.composite
def envelopes(draw: st.DrawFn) -> dict[str, Any]:
    """Near-valid frames: the right envelope, a real type and field names mixed with random values."""
    cls = draw(st.sampled_from(sorted(TYPES.values(), key=lambda c: c.TYPE)))
    body: dict[str, Any] = {}
    for name, hint in _fields(cls).items():
        choice = draw(st.integers(0, 3))
        if choice == 0:
            body[name] = plausible(hint)
        elif choice in (1, 2):
            body[name] = draw(objects)
        # choice 3: omitted
    extra = draw(st.dictionaries(field_names | st.text(max_size=6), objects, max_size=2))
    body.update(extra)
    body["v"] = VERSION
    body["t"] = cls.TYPE
    return body


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(envelopes())
def test_near_valid_frames_decode_to_a_valid_message_or_protocol_error(body: dict[str, Any]) -> None:
    try:
        msg = decode(pack(body))
    except ProtocolError:
        return
    assert type(msg) is TYPES[body["t"]]
    # Whatever decode accepted re-encodes to an equivalent, still-valid frame.
    assert decode(msg.encode()).encode() == msg.encode()  # (bytes: NaN != NaN)


def test_a_bundle_with_a_malformed_or_unbundled_part_is_a_protocol_error() -> None:
    good = Task("t1.1-job1", "job1", "noop", 1, [{"index": 0}], acks=["t0.1-job1"]).encode()
    assert [type(m) for m in decode(Bundle.of([decode(good), decode(good)]).encode()).messages] == [Task, Task]
    for part in (b"\xc1", good[:-1], Command(1, "jobs").encode(), Bundle([good]).encode(),
                 Heartbeat("h:1@1").encode()):
        assert_rejected(pack({"v": VERSION, "t": Bundle.TYPE, "parts": [good, part]}))


def test_drain_published_yields_good_frames_skips_bad_ones_and_stops_at_its_limit() -> None:
    import zmq

    from common.transport import drain_published

    ctx = zmq.Context.instance()
    # A PAIR stands in for PUB/SUB (same frames, no slow-joiner drops to race with).
    pub, sub = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    try:
        pub.bind("inproc://drain-published")
        sub.connect("inproc://drain-published")
        good = [Heartbeat(f"h:{i}@1", i).encode() for i in range(3)]
        frames = [[b"t", good[0]], [b"t", b"\xc1garbage"], [b"only-one-frame"], [b"t", good[1]], [b"t", good[2]]]
        for f in frames:
            pub.send_multipart(f)
        assert sub.poll(2000)
        first = list(drain_published(sub, 1 << 20, "test", limit=4))  # 4 frames: 2 bad, 2 good
        assert [m.node_id for m in first] == ["h:0@1", "h:1@1"]
        assert sub.poll(2000)
        assert [m.node_id for m in drain_published(sub, 1 << 20, "test", limit=4)] == ["h:2@1"]
        assert list(drain_published(sub, 1 << 20, "test", limit=4)) == []  # nothing waiting: returns
    finally:
        pub.close(0)
        sub.close(0)
