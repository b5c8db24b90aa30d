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


@dataclass(frozen=True)
class CommandSpec:
    name: str
    help: str
    args: tuple[Arg, ...] = ()

    def usage(self) -> str:
        parts = [self.name]
        for a in self.args:
            parts.append(f"<{a.name}>" if a.required else f"[{a.name}]")
        return " ".join(parts)


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
                Arg("batch", int, False, "queries per batch", 0),
                Arg("weight", float, False, "share relative to other jobs", 1.0),
                Arg("start", bool, False, "start right away", False),
            ),
        ),
        CommandSpec("jobs", "list jobs with state and progress"),
        CommandSpec("query_rate", "images/s over the last window and count since start", (OPT_JOB,)),
        CommandSpec("query_time", "query latency: avg, std, median, p90, p95, p99", (OPT_JOB,)),
        CommandSpec("set_batch_size", "change a job's batch size (takes effect live)", (JOB, Arg("n", int))),
        CommandSpec("results", "results of a job", (JOB, Arg("limit", int, False, "at most this many", 0))),
        CommandSpec("vm_info", "which worker runs which queries of which job now"),
        CommandSpec("members", "membership table"),
        CommandSpec("timeline", "per-job rate series, latencies and worker spans (used by report)", (OPT_JOB,)),
        CommandSpec("status", "everything at once (used by top, metrics and report)"),
    ]
}

CLIENT_ONLY = {"help": "help [command]: describe commands", "quit": "leave the shell"}
