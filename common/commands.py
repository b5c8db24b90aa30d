"""The coordinator's command table: names, arguments and help, shared by the server and every client.

The coordinator implements one handler per entry (a test checks that none is missing); the shell
uses the table for autocomplete and ``help``; ``idunno ctl`` for argument parsing.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Arg:
    name: str
    kind: type = str
    required: bool = True
    help: str = ""
    default: object = None
    option: bool = False  # written ``--name VALUE`` (``--name`` alone for a bool); otherwise positional
    metavar: str = "N"

    def usage(self) -> str:
        if self.option:
            text = f"--{self.name}" if self.kind is bool else f"--{self.name} {self.metavar}"
        else:
            text = f"<{self.name}>" if self.required else f"[{self.name}]"
            return text
        return text if self.required else f"[{text}]"


@dataclass(frozen=True)
class CommandSpec:
    name: str
    help: str
    args: tuple[Arg, ...] = ()

    def usage(self) -> str:
        return " ".join([self.name, *(a.usage() for a in self.args)])


JOB = Arg("job", help="job id (see `jobs`)")
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
                Arg("batch", int, False, "queries per batch (default: the cluster's default_batch_size)", 0,
                    option=True),
                Arg("weight", float, False, "share relative to other jobs", 1.0, option=True, metavar="W"),
                Arg("start", bool, False, "start right away (a job submitted while others run starts anyway)",
                    False, option=True),
            ),
        ),
        CommandSpec("jobs", "list jobs with state and progress"),
        CommandSpec("query_rate", "images/s over the last window and count since start", (OPT_JOB,)),
        CommandSpec("query_time", "query latency: avg, std, median, p90, p95, p99", (OPT_JOB,)),
        CommandSpec("set_batch_size", "change a job's batch size (takes effect live)", (JOB, Arg("n", int))),
        CommandSpec(
            "results",
            "results of a job: per input top-5, worker, latency, completion time, times dispatched",
            (
                JOB,
                Arg("limit", int, False, "at most this many", 0, option=True),
                Arg("after", int, False, "in completion order, skipping the first N (a cursor: the reply's `next`)",
                    None, option=True),
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

# Commands run by the client itself (on top of the coordinator's): parsed and described like the rest.
CLIENT_COMMANDS: dict[str, CommandSpec] = {
    c.name: c
    for c in [
        CommandSpec(
            "wait",
            "wait until a job is finished (done, or cancelled with nothing left in flight); exit 1 on timeout",
            (JOB, Arg("timeout", float, False, "give up after this many seconds (default: no limit)", 0.0,
                      option=True, metavar="SECONDS")),
        ),
    ]
}

CLIENT_ONLY = {"help": "help [command]: describe commands", "quit": "leave the shell"}
