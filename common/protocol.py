"""The IDunno wire protocol: every message type, its fields and the one encoder/decoder.

Every frame is a msgpack map ``{"v": VERSION, "t": <type>, <field>: <value>, ...}``. Each message
type is a dataclass registered here; nothing else in the code base spells a type string.
:func:`decode` turns *any* malformed input (bad msgpack, wrong version, unknown type, missing or
extra field, wrong type, oversized frame) into :class:`ProtocolError`, so a daemon's loop needs a
single ``except ProtocolError`` to drop a peer's garbage and keep running.

See docs/protocol.md for the conversation diagrams.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgpack

# 6: a Task carries `acks` (the final ResultAcks for its worker, piggybacked: one frame per query
# instead of two), and Bundle (several Tasks, or several TaskResults, in one frame), issue #14;
# 5: results by position (TaskResult rows are [index, top5, error]; Task queries carry `index` and
# `source`), no `epoch`, StateUpdates (an iteration's ops in one frame), Heartbeat/Ready memory;
# 4: streamed partial TaskResults (`final`), the standby's snapshot as a chunked
# transfer (StateFetch/StateChunk replace StateSnapshot), WriteChunk carries the master's write
# `grant`, Task carries `weights`, Preload;
# 3: PutReplace (pipeline recovery); 2: Ready carries total `slots`. Nodes of different versions refuse each other.
VERSION = 6
DEFAULT_MAX_FRAME = 8 * 1024 * 1024


class ProtocolError(ValueError):
    """A frame that is not a valid message of this protocol version."""


class Topic:
    """PUB/SUB topics (first frame of every published message)."""

    HEARTBEAT = b"hb"
    VIEW = b"view"
    LOG = b"log"
    STATE = b"state"


class ErrorCode:
    BAD_REQUEST = "bad_request"
    NOT_FOUND = "not_found"
    NOT_PRIMARY = "not_primary"
    UNAVAILABLE = "unavailable"
    CONFLICT = "conflict"
    INTERNAL = "internal"


_REGISTRY: dict[str, type[Message]] = {}


@dataclass
class Message:
    """Base of every message; subclasses set TYPE and declare typed fields."""

    TYPE: ClassVar[str] = ""

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if cls.TYPE:
            if cls.TYPE in _REGISTRY:
                raise RuntimeError(f"duplicate message type {cls.TYPE}")
            _REGISTRY[cls.TYPE] = cls

    def encode(self) -> bytes:
        body = {name: getattr(self, name) for name in _schema(type(self)).fields}
        body["v"] = VERSION
        body["t"] = self.TYPE
        return msgpack.packb(body, use_bin_type=True)


def message(cls: type) -> type:
    """Decorator: make ``cls`` a registered dataclass message."""
    return dataclass(cls)


# --------------------------------------------------------------------------------------------
# validation


Validator = typing.Callable[[Any, str], None]
_VALIDATORS: dict[Any, Validator] = {}


def _validator(hint: Any) -> Validator:
    """The checker for one type hint, built once: decoding is on every hot path (each query)."""
    v = _VALIDATORS.get(hint)
    if v is None:
        v = _VALIDATORS[hint] = _compile(hint)
    return v


def _compile(hint: Any) -> Validator:
    """One checker per kind of hint: Any, a union, None, list[...], dict[..., ...], or a scalar type."""
    if hint is Any:
        return lambda value, path: None
    if hint is type(None):
        return _check_nil
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return _union_check(hint)
    if origin is list:
        return _list_check(hint)
    if origin is dict:
        return _dict_check(hint)
    return _scalar_check(hint)


def _check_nil(value: Any, path: str) -> None:
    if value is not None:
        raise ProtocolError(f"{path}: expected nil")


def _union_check(hint: Any) -> Validator:
    alts = [_validator(a) for a in typing.get_args(hint)]

    def check_union(value: Any, path: str) -> None:
        for alt in alts:
            try:
                alt(value, path)
                return
            except ProtocolError:
                pass
        raise ProtocolError(f"{path}: {value!r:.60} matches none of {hint}")

    return check_union


def _list_check(hint: Any) -> Validator:
    (item,) = typing.get_args(hint) or (Any,)
    check_item = None if item is Any else _validator(item)

    def check_list(value: Any, path: str) -> None:
        if not isinstance(value, list):
            raise ProtocolError(f"{path}: expected list, got {type(value).__name__}")
        if check_item is not None:
            for i, v in enumerate(value):
                check_item(v, f"{path}[{i}]")

    return check_list


def _dict_check(hint: Any) -> Validator:
    kt, vt = typing.get_args(hint) or (Any, Any)
    check_key, check_value = _validator(kt), _validator(vt)

    def check_dict(value: Any, path: str) -> None:
        if not isinstance(value, dict):
            raise ProtocolError(f"{path}: expected map, got {type(value).__name__}")
        for k, v in value.items():
            check_key(k, f"{path}.key")
            check_value(v, f"{path}[{k!r:.30}]")

    return check_dict


def _scalar_check(hint: Any) -> Validator:
    name = getattr(hint, "__name__", str(hint))  # bare list / dict too: any items will do
    if hint is float:
        def ok(value: Any) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool)
    elif hint is int:
        def ok(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)
    else:
        def ok(value: Any) -> bool:
            return isinstance(value, hint)

    def check_scalar(value: Any, path: str) -> None:
        if not ok(value):
            raise ProtocolError(f"{path}: expected {name}, got {type(value).__name__}")

    return check_scalar


@dataclass(frozen=True)
class _Schema:
    fields: tuple[str, ...]
    required: frozenset[str]
    checks: dict[str, Validator]


_SCHEMAS: dict[type, _Schema] = {}


def _schema(cls: type) -> _Schema:
    sch = _SCHEMAS.get(cls)
    if sch is None:
        hints = typing.get_type_hints(cls)
        fs = dataclasses.fields(cls)
        sch = _SCHEMAS[cls] = _Schema(
            fields=tuple(f.name for f in fs),
            required=frozenset(
                f.name for f in fs if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            ),
            checks={f.name: _validator(hints[f.name]) for f in fs},
        )
    return sch


def decode(frame: bytes, max_bytes: int = DEFAULT_MAX_FRAME) -> Message:
    """Decode and validate one frame; raise ProtocolError on anything unexpected."""
    if not isinstance(frame, (bytes, bytearray, memoryview)):
        raise ProtocolError("frame is not bytes")
    if len(frame) > max_bytes:
        raise ProtocolError(f"frame of {len(frame)} bytes exceeds limit {max_bytes}")
    try:
        body = msgpack.unpackb(
            frame,
            raw=False,
            strict_map_key=True,
            max_bin_len=max_bytes,
            max_str_len=max_bytes,
            max_array_len=1_000_000,
            max_map_len=100_000,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises many types (ExtraData, ValueError, ...)
        raise ProtocolError(f"not msgpack: {type(exc).__name__}: {exc}") from None
    if not isinstance(body, dict):
        raise ProtocolError("message is not a map")
    version = body.pop("v", None)
    mtype = body.pop("t", None)
    if type(version) is not int or version != VERSION:
        raise ProtocolError(f"unsupported protocol version {version!r} (want {VERSION})")
    cls = _REGISTRY.get(mtype) if isinstance(mtype, str) else None
    if cls is None:
        raise ProtocolError(f"unknown message type {mtype!r:.40}")
    sch = _schema(cls)
    missing = sch.required - body.keys()
    if missing:
        raise ProtocolError(f"{mtype}: missing fields {sorted(missing)}")
    extra = body.keys() - sch.checks.keys()
    if extra:
        raise ProtocolError(f"{mtype}: unexpected fields {sorted(map(str, extra))[:5]}")
    for name, value in body.items():
        sch.checks[name](value, f"{mtype}.{name}")
    return cls(**body)


def message_types() -> dict[str, type[Message]]:
    return dict(_REGISTRY)


# --------------------------------------------------------------------------------------------
# generic replies


@message
class Error(Message):
    TYPE = "error"
    req: int
    code: str
    message: str


@message
class Ok(Message):
    TYPE = "ok"
    req: int
    data: Any = None


# --------------------------------------------------------------------------------------------
# membership (worker/client <-> coordinator ROUTER, coordinator PUB)


@message
class Join(Message):
    """A node asks the coordinator (the introducer) to admit it; also sent on re-attach after failover."""

    TYPE = "join"
    node_id: str
    role: str  # "worker" | "standby"
    data_addr: str  # host:port of the node's SDFS data server ("" if none)
    store: list[list[Any]] = field(default_factory=list)  # [[name, version, size, checksum], ...]
    inflight: list[str] = field(default_factory=list)  # task ids the node holds (computing, or done and unacknowledged)


@message
class Welcome(Message):
    TYPE = "welcome"
    node_id: str
    term: int


@message
class Rejoin(Message):
    """Sent to a node the coordinator does not know (or declared failed): start a new incarnation."""

    TYPE = "rejoin"
    reason: str


@message
class Leave(Message):
    TYPE = "leave"
    node_id: str


@message
class Heartbeat(Message):
    """Worker -> coordinator liveness beacon, from the worker's own loop."""

    TYPE = "heartbeat"
    node_id: str
    busy: int = 0  # tasks in hand
    models: list[str] = field(default_factory=list)  # models loaded (the pools this worker serves)
    # Memory, all optional (0 / empty: not reported): the process's resident set now and at its
    # peak, its model memory budget (model_memory_mb or the machine's share) and, per loaded model,
    # its parameter and buffer MB as the worker's model cache counts them.
    rss_mb: int = 0
    peak_rss_mb: int = 0
    budget_mb: int = 0
    model_mb: dict[str, int] = field(default_factory=dict)


@message
class Pulse(Message):
    """Worker pulse sidecar -> every coordinator: the worker process is alive, running and not wedged.

    Sent from a separate process (``worker/pulse.py``) over a DEALER whose identity is the node id
    plus ``/pulse``, so GIL contention inside the worker never delays it. Not a failover vote.
    """

    TYPE = "pulse"
    node_id: str


@message
class CoordinatorHeartbeat(Message):
    """Published by every coordinator on Topic.HEARTBEAT; workers follow the highest-term primary."""

    TYPE = "coord_hb"
    addr: str
    role: str  # "primary" | "standby" | "probing"
    term: int
    view_seq: int
    state_seq: int


@message
class ViewRequest(Message):
    TYPE = "view_req"
    req: int


@message
class ViewSnapshot(Message):
    TYPE = "view_snapshot"
    req: int
    seq: int
    members: list[dict[str, Any]]


@message
class ViewUpdate(Message):
    """Published on Topic.VIEW; seq is contiguous so subscribers detect gaps and re-sync."""

    TYPE = "view_update"
    seq: int
    event: str  # "join" | "leave" | "fail"
    member: dict[str, Any]


@message
class LogRecord(Message):
    TYPE = "log"
    node: str
    ts: float
    level: str
    logger: str
    msg: str


# --------------------------------------------------------------------------------------------
# SDFS metadata (client -> coordinator)


@message
class PutBegin(Message):
    """Ask the master for versions and replica placements for one or many files (batched for put -r)."""

    TYPE = "put_begin"
    req: int
    files: list[dict[str, Any]]  # {"name": str, "size": int, "checksum": str}


@message
class PutPlan(Message):
    TYPE = "put_plan"
    req: int
    plans: list[dict[str, Any]]  # {"put_id","name","version","replicas":[{"node_id","addr"}],"quorum"}


@message
class PutCommit(Message):
    TYPE = "put_commit"
    req: int
    commits: list[dict[str, Any]]  # {"put_id": str, "stored": [node_id, ...]}


@message
class PutReplace(Message):
    """Pipeline recovery: ask for a replacement target for puts whose chosen replica did not store.

    Each entry is ``{"put_id": str, "exclude": [node_id, ...], "count": int}`` (the nodes already tried,
    how many new targets are wanted). The reply is a PutPlan whose ``replicas`` list only the new
    targets (possibly none, when no other live node is left).
    """

    TYPE = "put_replace"
    req: int
    puts: list[dict[str, Any]]


@message
class Locate(Message):
    """Ask for the newest ``count`` versions of a file (count=1 for get)."""

    TYPE = "locate"
    req: int
    name: str
    count: int = 1


@message
class Located(Message):
    TYPE = "located"
    req: int
    name: str
    versions: list[dict[str, Any]]  # newest first: {"version","size","checksum","mtime","replicas"}


@message
class Delete(Message):
    TYPE = "delete"
    req: int
    name: str


@message
class ListFiles(Message):
    TYPE = "ls"
    req: int
    pattern: str


@message
class ReportBad(Message):
    """A reader found a replica whose data fails its checksum (answered with Ok)."""

    TYPE = "report_bad"
    node_id: str
    name: str
    version: int
    req: int = 0


# master -> worker (over the worker's control DEALER)


@message
class Replicate(Message):
    TYPE = "replicate"
    name: str
    version: int
    size: int
    checksum: str
    sources: list[str]  # data addrs to fetch from, in preference order


@message
class Drop(Message):
    TYPE = "drop"
    name: str
    version: int  # 0 = every version


@message
class Stored(Message):
    """Worker -> master: a replica is complete and verified (after Replicate)."""

    TYPE = "stored"
    node_id: str
    name: str
    version: int
    size: int
    checksum: str
    ok: bool = True
    error: str = ""


# --------------------------------------------------------------------------------------------
# SDFS data plane (client/peer -> worker data ROUTER)


@message
class WriteChunk(Message):
    TYPE = "write"
    req: int
    name: str
    version: int
    offset: int
    data: bytes
    size: int  # total size
    checksum: str
    last: bool
    # The master's write grant for exactly (name, version, size, checksum), from the PutPlan; needed on
    # the first chunk when the cluster has keys (common/security.py), so nobody plants a version.
    grant: str = ""


@message
class WriteAck(Message):
    TYPE = "write_ack"
    req: int
    offset: int
    done: bool
    ok: bool
    error: str = ""


@message
class ReadChunk(Message):
    TYPE = "read"
    req: int
    name: str
    version: int
    offset: int
    length: int


@message
class ChunkData(Message):
    TYPE = "chunk"
    req: int
    offset: int
    data: bytes
    eof: bool


@message
class StoreList(Message):
    TYPE = "store_list"
    req: int


# --------------------------------------------------------------------------------------------
# inference (worker <-> coordinator)


@message
class Ready(Message):
    """Worker offers ``slots`` task slots in total (Majordomo READY, with credit-based flow control).

    Absolute, not free slots: the coordinator subtracts the tasks it knows the worker holds, so a
    repeated or delayed Ready can never overcommit the worker.
    """

    TYPE = "ready"
    node_id: str
    slots: int
    models: list[str] = field(default_factory=list)  # models already loaded
    budget_mb: int = 0  # as Heartbeat.budget_mb
    model_mb: dict[str, int] = field(default_factory=dict)  # as Heartbeat.model_mb


@message
class Task(Message):
    TYPE = "task"
    task_id: str
    job_id: str
    model: str
    term: int
    # {"index": int (the query's position in its job), "input": str, "version": int}, and "source":
    # the version's view as Locate gives it (its live replicas) when the worker holds no replica.
    queries: list[dict[str, Any]]
    weights: str = ""  # the job's pinned SDFS checkpoint (submit --weights); "" = the model's default weights
    # Task ids whose final results the coordinator has taken in: each is a ResultAck(task_id,
    # final=True) carried by this Task instead of a frame of its own (the worker handles them first,
    # and whether or not it runs the task).
    acks: list[str] = field(default_factory=list)


@message
class TaskResult(Message):
    TYPE = "result"
    task_id: str
    job_id: str
    node_id: str
    elapsed: float  # seconds of compute for the queries in `results`
    # One [index, top5 ([[label, prob]] or None), error (str or None)] per query answered: the index
    # is the Task query's, so the coordinator zips each answer with its query by position in the job.
    results: list[list[Any]]
    # False: more of this task's queries follow (results stream while a batch computes, so rates
    # and first results move at image granularity); True: the task is over and its slot is free.
    final: bool = True


@message
class ResultAck(Message):
    TYPE = "result_ack"
    task_id: str
    final: bool = True  # only the ack of a final result lets the worker forget the task's results


# models (coordinator -> worker), see docs/models.md


@message
class Preload(Message):
    """Load this model (with these weights) now: a job that needs it was submitted (warm start), or
    the coordinator put this worker in the model's pool.

    A hint: the worker loads it off its loop, within its memory budget, and answers nothing; the
    model then shows in its Heartbeat/Ready ``models``.
    """

    TYPE = "preload"
    model: str
    weights: str = ""  # as Task.weights


# --------------------------------------------------------------------------------------------
# control commands (shell / idunno ctl -> coordinator)


@message
class Command(Message):
    TYPE = "cmd"
    req: int
    name: str
    args: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# coordinator state replication (primary -> standby, zguide Clone)


@message
class StateRequest(Message):
    """Standby -> primary: start a snapshot transfer with id ``req`` (supersedes the sender's earlier one)."""

    TYPE = "state_req"
    req: int


@message
class StateFetch(Message):
    """Standby -> primary: send chunk ``index`` of transfer ``req``; chunks below ``have`` arrived
    (the primary frees them). The standby keeps at most ``transfer_window`` fetches outstanding."""

    TYPE = "state_fetch"
    req: int
    index: int
    have: int


@message
class StateChunk(Message):
    """Primary -> standby: bytes [index * chunk_bytes, ...) of the msgpack record stream (see
    broker/snapshot.py); ``last`` marks the final chunk."""

    TYPE = "state_chunk"
    req: int
    index: int
    data: bytes
    last: bool


@message
class StateUpdate(Message):
    TYPE = "state_update"
    seq: int
    term: int
    op: str
    data: dict[str, Any]


@message
class StateUpdates(Message):
    """The ops the primary journalled in one loop iteration, in one PUB frame (issue #14): op ``i``
    is ``StateUpdate(first + i, term, ops[i], data[i])``, applied by the standby one by one."""

    TYPE = "state_updates"
    first: int
    term: int
    ops: list[str]
    data: list[dict[str, Any]]

    def __post_init__(self) -> None:
        if len(self.ops) != len(self.data):
            raise ProtocolError(f"state_updates: {len(self.ops)} ops but {len(self.data)} data")

    def updates(self) -> list[StateUpdate]:
        pairs = zip(self.ops, self.data, strict=True)
        return [StateUpdate(self.first + i, self.term, op, d) for i, (op, d) in enumerate(pairs)]


# --------------------------------------------------------------------------------------------
# several inference messages in one frame (coordinator <-> worker)


@message
class Bundle(Message):
    """Several messages of the inference conversation for one peer in one frame (issue #14): the
    Tasks one dispatch pass gives a worker, or the TaskResults a worker finished in one turn of its
    loop. Each part is an encoded message of a type in ``BUNDLED`` (never a Bundle), handled as if it
    had come in a frame of its own, in order. Decoding checks every part: any malformed part, or a
    part of another type, makes the whole frame a ProtocolError."""

    TYPE = "bundle"
    parts: list[bytes]

    def __post_init__(self) -> None:
        self.messages: list[Message] = []
        for i, part in enumerate(self.parts):
            msg = decode(part)
            if type(msg) not in BUNDLED:
                raise ProtocolError(f"bundle.parts[{i}]: a {msg.TYPE} cannot be bundled")
            self.messages.append(msg)

    @classmethod
    def of(cls, messages: list[Message]) -> Bundle:
        """The bundle of ``messages`` (already valid: not decoded again)."""
        b = cls.__new__(cls)
        b.parts = [m.encode() for m in messages]
        b.messages = list(messages)
        return b


BUNDLED: frozenset[type[Message]] = frozenset({Task, TaskResult, ResultAck})
