"""The coordinator's command table: names, arguments and help, shared by the server and every client.

The coordinator implements one handler per entry (a test checks that none is missing); the shell
uses the table for autocomplete and ``help``; ``idunno ctl`` for argument parsing.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from typing import Any

# The largest integer any command takes: counts far beyond anything real, and well inside the
# wire's (msgpack) and the coordinator's range, so no number can overflow on the way.
MAX_INT = 2**31 - 1
AUTO = "auto"  # `--batch auto`: the largest batch whose predicted compute stays under the latency target


@dataclass(frozen=True)
class Arg:
    name: str
    kind: type = str
    required: bool = True
    help: str = ""
    lo: float | None = None  # inclusive bounds of a numeric argument (ints are also capped at MAX_INT)
    hi: float | None = None
    option: bool = False  # written ``--name VALUE`` (``--name`` alone for a bool); otherwise positional
    metavar: str = "N"
    auto: bool = False  # an int argument that also takes the word "auto" (a batch size chosen by the cluster)

    def usage(self) -> str:
        if self.option:
            flag = "--" + self.name.replace("_", "-")  # the parser takes either spelling
            text = flag if self.kind is bool else f"{flag} {self.metavar}"
        else:
            text = f"<{self.name}>" if self.required else f"[{self.name}]"
            return text
        return text if self.required else f"[{text}]"

    def check(self, value: Any) -> Any:
        """The value if it has this argument's type and range, else ValueError with a clear message.

        Strict: an int is not a bool, a float is finite (an int is accepted and converted), a bool
        is a bool. The same check runs at the client's edge and in the coordinator's handlers.
        """
        if self.kind is bool:
            if not isinstance(value, bool):
                raise ValueError(f"{self.name} must be true or false, not {value!r:.40}")
            return value
        if self.kind is int:
            if self.auto and value == AUTO:
                return value
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{self.name} must be an integer{' or auto' if self.auto else ''}, not {value!r:.40}")
            hi = MAX_INT if self.hi is None else self.hi
        elif self.kind is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{self.name} must be a finite number, not {value!r:.40}")
            value, hi = float(value), self.hi
        else:
            if not isinstance(value, self.kind):
                raise ValueError(f"{self.name} must be {self.kind.__name__}, not {type(value).__name__}")
            return value
        if self.lo is not None and value < self.lo:
            raise ValueError(f"{self.name} must be at least {_num(self.lo)}, not {_num(value)}")
        if hi is not None and value > hi:
            raise ValueError(f"{self.name} must be at most {_num(hi)}, not {_num(value)}")
        return value


def _num(x: float) -> str:
    text = f"{x:g}" if isinstance(x, float) else str(x)
    return text if len(text) <= 24 else f"{text[:10]}...({len(text)} digits)"


@dataclass(frozen=True)
class CommandSpec:
    name: str
    help: str
    args: tuple[Arg, ...] = ()
    # Not idempotent (it creates something): the client tags each call with a request id that its
    # retries repeat, so a retry after a lost or late reply (or a failover) returns the first result.
    once: bool = False

    def usage(self) -> str:
        return " ".join([self.name, *(a.usage() for a in self.args)])


JOB = Arg("job", help="job id (see `jobs`)")
REQUEST_ID = Arg("request_id", str, False, "any id up to 64 characters: the same command again with the same id "
                 "returns the first one's result (set automatically; retries repeat it)", option=True,
                 metavar="ID")
OPT_JOB = Arg("job", required=False, help="job id; all jobs when omitted")

COMMANDS: dict[str, CommandSpec] = {
    c.name: c
    for c in [
        CommandSpec("info", "SDFS metadata summary: files, versions, bytes, replication state"),
        CommandSpec("pending", "queries not processed yet, per job", (OPT_JOB,)),
        CommandSpec("completed", "completed queries, per job", (OPT_JOB,)),
        CommandSpec("start", "start every queued job"),
        CommandSpec(
            "submit",
            "add a job: model over an SDFS glob/prefix of images",
            (
                Arg("model", help="torchvision classifier name, e.g. alexnet, resnet50"),
                Arg("inputs", help="SDFS glob or prefix, e.g. 'data/*.jpg'"),
                Arg("batch", int, False, "queries per batch, or auto (default: the cluster's default_batch_size)",
                    lo=1, option=True, auto=True),
                Arg("latency_target", float, False, "with --batch auto: seconds of compute per batch (default: "
                    "the cluster's default_latency_target)", lo=0.01, hi=3600, option=True, metavar="S"),
                Arg("weight", float, False, "share relative to other jobs", lo=0.001, hi=1000, option=True,
                    metavar="W"),
                Arg("start", bool, False, "start right away (a job submitted while others run starts anyway)",
                    option=True),
                Arg("weights", str, False, "pin the job to this SDFS checkpoint (default: models/<model>.pth, "
                    "see docs/models.md)", option=True, metavar="SDFS_NAME"),
                REQUEST_ID,
            ),
            once=True,
        ),
        CommandSpec("jobs", "list jobs with state and progress"),
        CommandSpec("query_rate", "images/s over the last window and count since start", (OPT_JOB,)),
        CommandSpec("query_time", "query latency: avg, std, median, p90, p95, p99", (OPT_JOB,)),
        CommandSpec("set_batch_size", "change a job's batch size, or auto (takes effect live)",
                    (JOB, Arg("n", int, lo=1, auto=True),
                     Arg("latency_target", float, False, "with auto: seconds of compute per batch", lo=0.01,
                         hi=3600, option=True, metavar="S"))),
        CommandSpec(
            "results",
            "results of a job: per input top-5, worker, latency, completion time, times dispatched",
            (
                JOB,
                Arg("limit", int, False, "at most this many (0: all)", lo=0, option=True),
                Arg("after", int, False, "in completion order, skipping the first N (a cursor: the reply's `next`)",
                    lo=0, option=True),
            ),
        ),
        CommandSpec("cancel", "cancel a job: pending queries are dropped, in-flight ones finish, results are kept",
                    (JOB,)),
        CommandSpec("vm_info", "which worker runs which queries of which job now"),
        CommandSpec("members", "membership table"),
        CommandSpec("timeline", "per-job rate series, latencies and worker spans (used by report)", (OPT_JOB,)),
        CommandSpec("status", "everything at once (used by top, metrics and report)"),
    ]
}


def _spec(command: str) -> CommandSpec:
    return COMMANDS[command] if command in COMMANDS else CLIENT_COMMANDS[command]


def arg_spec(command: str, name: str) -> Arg:
    """The declared argument ``name`` of ``command`` (KeyError if there is none)."""
    for a in _spec(command).args:
        if a.name == name:
            return a
    raise KeyError(name)


def with_request_id(command: str, args: dict[str, Any]) -> dict[str, Any]:
    """``args`` with a fresh request id when ``command`` is not idempotent and the caller set none."""
    spec = COMMANDS.get(command)
    if spec is not None and spec.once and not args.get("request_id"):
        args = {**args, "request_id": uuid.uuid4().hex}
    return args


def check_args(command: str, args: dict[str, Any]) -> dict[str, Any]:
    """Check every given argument of ``command`` against its declared type and range (ValueError).

    ``None`` means "not given" and is left for the handler's default.
    """
    spec = _spec(command)
    known = {a.name: a for a in spec.args}
    for name, value in args.items():
        if value is None:
            continue
        arg = known.get(name)
        if arg is None:
            raise ValueError(f"{command} has no argument {name!r}; usage: {spec.usage()}")
        args[name] = arg.check(value)
    return args


# Commands run by the client itself (on top of the coordinator's): parsed and described like the rest.
CLIENT_COMMANDS: dict[str, CommandSpec] = {
    c.name: c
    for c in [
        CommandSpec(
            "wait",
            "wait until a job is finished (done, or cancelled with nothing left in flight); exit 1 on timeout",
            (JOB, Arg("timeout", float, False, "give up after this many seconds (default: no limit)",
                      lo=0, option=True, metavar="SECONDS")),
        ),
    ]
}

CLIENT_ONLY = {"help": "help [command]: describe commands", "quit": "leave the shell"}
