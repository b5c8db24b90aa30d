"""Fairness benchmark: equal query rates for two jobs of very different cost, and how fast they get there.

Cluster with >= 4 workers, both models preloaded (IDUNNO_PRELOAD_MODELS). The 100 test images are
put under several prefixes so that both jobs (same inputs) have work for the whole run. Job A is
started; once it has results, job B is submitted and joins at once. Measured:

* B's submit -> first dispatch and -> first result (``timeline`` spans);
* the rate gap ``rate_gap([rA, rB])`` over the coordinator's 10 s windows (``timeline`` rate series,
  1 s grid), max and median over ``--duration`` seconds after a warm-up (the first ``--warmup``
  seconds after B's first result are skipped);
* re-convergence after B was added: first time the gap stays < 5 % for 5 s (note: with 10 s rate
  windows this cannot be much less than 10 s);
* then one worker is SIGKILLed: time until the gap is back (and stays for 5 s) within 5 %.

Second job's first result (issues #14, #15), each case on a fresh cluster of its own: job A runs; job B
is submitted with ``Client.submit(..., start=True)`` as a user would, (warm) with B's model preloaded
on the workers (``IDUNNO_PRELOAD_MODELS``) and (cold) without: then the coordinator's preload on
submit (warm start) loads it on the workers of B's pool. Measured: at the coordinator, B's
``submitted`` -> first dispatch -> first result (``jobs`` / ``timeline``); as seen by the CLI, a loop
of ``idunno ctl --json completed JOB`` processes started right after the submit returns: submit ->
the end of the first one that shows a result; when the job stopped showing as ``loading``
(``ctl jobs``); and the workers' model loads (``loaded ... in Ns`` log lines). Goal (issue #14):
<= 1 s after submit when the model is loaded.

Baseline (same run): a second cluster whose coordinators run ``--scheduler round-robin`` (every
dispatch is charged 1, whatever its size), the same two jobs for ``--baseline-duration`` seconds.
Round-robin equalizes *batches*, fair-time equalizes *images*: with equal batch sizes the two are the
same policy, so by default the jobs use different batch sizes (``--batches 8,4``) to show the
difference; pass ``--batches 8,8`` to check that they then agree.

    .venv/bin/python bench/fairness.py [--quick] [--workers 4] [--models alexnet,resnet50]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

from benchlib import (
    ROOT,
    Series,
    cli_env,
    console,
    first_stable,
    grid,
    headline,
    load_seconds,
    model_loads,
    put_copies,
    ratio,
    running,
    table,
    temp_dir,
    wait_models,
    wait_until,
)

from broker.stats import rate_gap
from cli.cluster import LocalCluster, Proc
from idunno.client import Client

BAND = 0.05
HOLD = 5.0
T0 = time.monotonic()


def log(msg: str) -> None:
    console.print(f"[{time.monotonic() - T0:5.1f}s] {msg}", highlight=False)


class RoundRobinCluster(LocalCluster):
    """The same local cluster, with ``--scheduler round-robin`` on its coordinators only."""

    def _spawn(self, role: str, args: list[str], name: str) -> Proc:
        if args and args[0] == "coordinator":
            args = [*args, "--scheduler", "round-robin"]
        return super()._spawn(role, args, name)


def completed(cluster: LocalCluster, job: str) -> int:
    return cluster.ctl("completed", job=job, timeout=5.0)[job]["completed"]


def run_pair(cluster: LocalCluster, models: list[str], batches: list[int], copies: int, workers: int,
             warmup: float, duration: float, recover: float, kill: bool) -> dict[str, Any]:
    """Start both jobs as described in the module doc; return the raw measurements."""
    wait_models(cluster, models, workers)
    log(f"    {workers} workers up, {' and '.join(models)} loaded")
    n_inputs, put_s = put_copies(cluster, copies)
    log(f"    {n_inputs} inputs put in {put_s:.1f}s")
    a = cluster.ctl("submit", model=models[0], inputs="copies/", batch=batches[0], start=True)["job_id"]
    wait_until(lambda: completed(cluster, a) > 0, 120, 0.05, f"first result of {a}")
    t_sub_b = time.time()
    b = cluster.ctl("submit", model=models[1], inputs="copies/", batch=batches[1])["job_id"]
    wait_until(lambda: completed(cluster, b) > 0, 120, 0.02, f"first result of {b}")
    t_first_seen = time.time()
    log(f"    {a} and {b} running; measuring for {warmup + duration:.0f}s")
    time.sleep(max(0.0, t_first_seen + warmup + duration - time.time()))
    t_kill = None
    killed = ""
    if kill:
        victim = cluster.worker_procs()[0]
        killed = victim.addr
        t_kill = time.time()
        cluster.kill(victim)
        log(f"    SIGKILLed worker {killed}; observing for {recover:.0f}s")
        time.sleep(recover)
    t_end = time.time()
    tl = cluster.ctl("timeline", timeout=30.0)
    state = cluster.ctl("completed", timeout=5.0)
    return {"a": a, "b": b, "t_sub_b": t_sub_b, "t_kill": t_kill, "t_end": t_end, "killed": killed,
            "timeline": tl, "completed": state, "n_inputs": n_inputs}


def analyse(raw: dict[str, Any], warmup: float, duration: float) -> dict[str, Any]:
    jobs = raw["timeline"]["jobs"]
    a, b = raw["a"], raw["b"]
    sa, sb = Series(jobs[a]["rates"]), Series(jobs[b]["rates"])
    spans_b = jobs[b]["spans"]
    first_dispatch = min(s[1] for s in spans_b)
    first_result = min(s[2] for s in spans_b)
    t_sub_b = raw["t_sub_b"]
    w0, w1 = first_result + warmup, first_result + warmup + duration
    ts = grid(w0, min(w1, raw["t_kill"] or raw["t_end"], sa.end, sb.end))
    gaps = [rate_gap([sa(t), sb(t)]) for t in ts]
    out: dict[str, Any] = {
        "dispatch_delay": first_dispatch - t_sub_b,
        "result_delay": first_result - t_sub_b,
        "gap_max": max(gaps) if gaps else math.nan,
        "gap_median": statistics.median(gaps) if gaps else math.nan,
        "rate_a": statistics.fmean(sa(t) for t in ts) if ts else math.nan,
        "rate_b": statistics.fmean(sb(t) for t in ts) if ts else math.nan,
        "window": (w0, w1),
        "samples": len(ts),
    }
    # Re-convergence after B was added.
    end = raw["t_kill"] or raw["t_end"]
    tsc = grid(t_sub_b, min(end, sa.end, sb.end))
    ok = [rate_gap([sa(t), sb(t)]) < BAND for t in tsc]
    t_conv = first_stable(tsc, ok, HOLD)
    out["converge"] = t_conv - t_sub_b if t_conv is not None else None
    # After the worker kill.
    if raw["t_kill"] is not None:
        tk = raw["t_kill"]
        tsk = grid(tk, min(raw["t_end"], sa.end, sb.end))
        gk = [rate_gap([sa(t), sb(t)]) for t in tsk]
        t_rec = first_stable(tsk, [g < BAND for g in gk], HOLD)
        out["kill_gap_max"] = max(gk) if gk else math.nan
        out["recover"] = t_rec - tk if t_rec is not None else None
        left = next((t for t, g in zip(tsk, gk, strict=True) if g >= BAND), None)
        out["left_band"] = left is not None
        before = sa(tk) + sb(tk)
        after = sa(tsk[-1]) + sb(tsk[-1]) if tsk else math.nan
        out["total_before"], out["total_after"] = before, after
    # The rate table: every 5 s from B's submit.
    rows = []
    t = t_sub_b
    stop = min(raw["t_end"], sa.end, sb.end)
    while t <= stop:
        mark = ""
        if abs(t - first_result) < 2.5:
            mark = "B first result"
        if w0 <= t <= w1:
            mark = mark or "measured"
        if raw["t_kill"] is not None and t >= raw["t_kill"]:
            mark = "after kill" if t - raw["t_kill"] >= 2.5 else "worker killed"
        rows.append([f"{t - t_sub_b:+.0f}", sa(t), sb(t), rate_gap([sa(t), sb(t)]) * 100, mark])
        t += 5.0
    out["rows"] = rows
    pending = {j: raw["completed"][j]["total"] - raw["completed"][j]["completed"] for j in (a, b)}
    out["ran_out"] = [j for j, p in pending.items() if p == 0]
    out["completed"] = {j: raw["completed"][j]["completed"] for j in (a, b)}
    return out


class CliWatch(threading.Thread):
    """A user's shell loop: ``idunno ctl --json completed JOB`` processes one after the other until
    one shows a result. ``seen`` is the wall time that process ended (its output was on screen)."""

    def __init__(self, cluster: LocalCluster, job: str, timeout: float) -> None:
        super().__init__(daemon=True)
        self.argv = [sys.executable, "-m", "cli.main", "ctl", "--json", "completed", job]
        self.env, self.job, self.timeout = cli_env(cluster), job, timeout
        self.seen: float | None = None
        self.walls: list[float] = []
        self.error = ""

    def run(self) -> None:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            t0 = time.time()
            r = subprocess.run(self.argv, env=self.env, cwd=ROOT, capture_output=True, text=True, timeout=60)
            t1 = time.time()
            self.walls.append(t1 - t0)
            if r.returncode != 0:
                self.error = r.stderr.strip()[-300:]
                return
            if json.loads(r.stdout)[self.job]["completed"] > 0:
                self.seen = t1
                return


def measure_b(cluster: LocalCluster, client: Client, model: str, batch: int) -> dict[str, Any]:
    """Submit job B (job A running) and time its first result at the coordinator and through the CLI."""
    loads_before = len(model_loads(cluster).get(model, []))
    t_sub = time.time()
    b = client.submit(model, "copies/", batch=batch, start=True).id
    watch = CliWatch(cluster, b, 180.0)
    watch.start()
    t_ready = None  # when `ctl jobs` stopped showing B as loading (polled here, cheaply)
    while watch.is_alive():
        if t_ready is None and not next(j for j in cluster.ctl("jobs", timeout=5.0) if j["job_id"] == b)["loading"]:
            t_ready = time.time()
        watch.join(0.05)
    if watch.seen is None:
        raise RuntimeError(f"the CLI never showed a result of {b}: {watch.error or 'timed out'}")
    job = next(j for j in cluster.ctl("jobs", timeout=5.0) if j["job_id"] == b)
    spans = cluster.ctl("timeline", job=b, timeout=30.0)["jobs"][b]["spans"]
    first = min(spans, key=lambda s: s[2])
    return {"job": b, "dispatch": min(s[1] for s in spans) - job["submitted"],
            "result": first[2] - job["submitted"], "first_task": first[2] - first[1],
            "cli": watch.seen - t_sub, "cli_polls": len(watch.walls), "cli_wall": statistics.median(watch.walls),
            "ready": (t_ready - t_sub) if t_ready is not None else None,
            "loads_after_submit": model_loads(cluster).get(model, [])[loads_before:]}


def first_result_case(name: str, models: list[str], batches: list[int], workers: int, preload: list[str],
                      copies: int, repeat: int) -> dict[str, Any]:
    """One case of B's first result (module doc) on a fresh cluster, ``repeat`` times (B is cancelled
    after each); returns the measurements."""
    log(f"first result, {name}: {workers} workers, preloaded at start: {', '.join(preload)}")
    with temp_dir(f"idunno-bench-first-{name}-") as tmp:
        cluster = LocalCluster(workers=workers, standby=True, data_dir=str(tmp),
                               env={"IDUNNO_PRELOAD_MODELS": ",".join(preload)})
        with running(cluster, timeout=120), Client(cluster.coordinator, cluster.standby_addr,
                                                   data_dir=cluster.data_dir, curve_dir=cluster.curve_dir,
                                                   timeout=10.0) as client:
            wait_models(cluster, preload, workers)
            put_copies(cluster, copies)
            # An untimed CLI call first, so the bytecode cache is warm as on a user's machine.
            subprocess.run([sys.executable, "-m", "cli.main", "ctl", "--json", "jobs"], env=cli_env(cluster),
                           cwd=ROOT, capture_output=True, check=True)
            a = client.submit(models[0], "copies/", batch=batches[0], start=True).id
            wait_until(lambda: completed(cluster, a) > 0, 120, 0.05, f"first result of {a}")
            runs = []
            for k in range(repeat):
                if k:
                    time.sleep(2.0)  # A alone again for a moment, as before the first B
                runs.append(measure_b(cluster, client, models[1], batches[1]))
                log(f"    {runs[-1]['job']}: first result {runs[-1]['result']:.2f} s at the coordinator, "
                    f"{runs[-1]['cli']:.2f} s seen by the CLI")
                if k < repeat - 1:
                    cluster.ctl("cancel", job=runs[-1]["job"])
            per_job = load_seconds(cluster)
    return {"runs": runs, "loads_per_job": {m: per_job.get(m, 0.0) for m in models}}


def first_result_tables(cases: dict[str, dict[str, Any]], models: list[str]) -> None:
    rows = []
    for name, case in cases.items():
        runs = case["runs"]

        def med(key: str, runs: list[dict[str, Any]] = runs) -> Any:
            vals = [r[key] for r in runs if r[key] is not None]
            return statistics.median(vals) if vals else None

        lds = [x for r in runs for x in r["loads_after_submit"]]
        res, cli = [r["result"] for r in runs], [r["cli"] for r in runs]
        rows.append([name, len(runs), med("dispatch"), med("first_task"), med("result"), max(res), med("cli"),
                     max(cli), med("cli_wall"), med("ready"), f"{len(lds)} x {max(lds):.1f}" if lds else "none",
                     "yes" if med("result") <= 1.0 else "NO", "yes" if med("cli") <= 1.0 else "NO"])
    table(f"job B ({models[1]}) first result after submit, job A ({models[0]}) running (medians over the runs); "
          f"goal <= 1 s when the model is loaded",
          ["case", "runs", "coord: submit->1st dispatch (s)", "coord: 1st task dispatch->result (s)",
           "coord: submit->1st result (s)", "max", "CLI: submit->result shown (s)", "max",
           "CLI process wall (s)", "submit->not `loading` (s)", "B model loads after submit (workers x max s)",
           "coord <= 1 s", "CLI <= 1 s"], rows,
          caption=f"load average: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    table("seconds in model loads per job (summed over the workers' `loaded ... in Ns` lines)",
          ["case", *(f"{m}" for m in models)],
          [[name, *(r["loads_per_job"][m] for m in models)] for name, r in cases.items()])


def first_headline(cases: dict[str, dict[str, Any]], models: list[str]) -> str:
    warm, cold = (c["runs"] for c in cases.values())
    lds = [x for r in cold for x in r["loads_after_submit"]]

    def med(runs: list[dict[str, Any]], key: str) -> float:
        return statistics.median(r[key] for r in runs)

    return (f"{models[1]} first result after submit, model preloaded: {med(warm, 'result'):.2f} s at the "
            f"coordinator, {med(warm, 'cli'):.2f} s seen by the CLI (medians of {len(warm)}; goal <= 1 s); not "
            f"preloaded: {med(cold, 'result'):.2f} s / {med(cold, 'cli'):.2f} s, of which model load "
            f"{max(lds) if lds else 0.0:.1f} s")


def first_result(models: list[str], batches: list[int], workers: int, copies: int,
                 repeat: int) -> dict[str, dict[str, Any]]:
    """Warm ``repeat`` times on one cluster; cold once (after it the model is loaded)."""
    return {
        "warm: B's model preloaded": first_result_case("warm", models, batches, workers, models, copies, repeat),
        "cold: B's model loads on submit": first_result_case("cold", models, batches, workers, models[:1], copies, 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: mobilenet_v3_small,alexnet, 5 s measured, short warm-up and baseline")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--models", default=None, help="job A,job B (default alexnet,resnet50)")
    ap.add_argument("--batches", default="8,4", help="batch sizes of job A,job B (default 8,4)")
    ap.add_argument("--duration", type=float, default=None, help="measured seconds after warm-up (default 60)")
    ap.add_argument("--warmup", type=float, default=None, help="skipped seconds after B's first result (default 15)")
    ap.add_argument("--recover", type=float, default=None, help="seconds observed after the worker kill (default 30)")
    ap.add_argument("--baseline-duration", type=float, default=None, help="round-robin measured seconds (default 30)")
    ap.add_argument("--copies", type=int, default=None, help="copies of the 100 images (default 18, quick 10)")
    ap.add_argument("--baseline-copies", type=int, default=None, help="same for round-robin (default 14, quick 8)")
    ap.add_argument("--first-only", action="store_true",
                    help="only job B's first result after submit (warm and cold), on clusters of their own")
    ap.add_argument("--first-copies", type=int, default=None,
                    help="copies of the 100 images for the first-result cases (default 4, quick 2)")
    ap.add_argument("--first-repeat", type=int, default=None,
                    help="job B's submitted (and cancelled) this many times in the warm case (default 5, quick 2)")
    args = ap.parse_args()
    q = args.quick
    default_models = "mobilenet_v3_small,alexnet" if q else "alexnet,resnet50"
    models = [m.strip() for m in (args.models or default_models).split(",")]
    batches = [int(x) for x in args.batches.split(",")]
    if len(models) != 2 or len(batches) != 2:
        raise SystemExit("--models and --batches take exactly two values")
    duration = args.duration or (5.0 if q else 60.0)
    warmup = args.warmup if args.warmup is not None else (2.0 if q else 15.0)
    recover = args.recover or (6.0 if q else 30.0)
    base_duration = args.baseline_duration or (4.0 if q else 30.0)
    # Both jobs use the same inputs: enough that neither runs out (checked afterwards). Round-robin
    # serves the cheap job faster, so its shorter run needs nearly as many.
    copies = args.copies or (10 if q else 18)
    base_copies = args.baseline_copies or (8 if q else 14)

    first_copies = args.first_copies or (2 if q else 4)
    first_repeat = args.first_repeat or (2 if q else 5)
    if args.first_only:
        cases = first_result(models, batches, args.workers, first_copies, first_repeat)
        first_result_tables(cases, models)
        headline(first_headline(cases, models))
        return 0

    results = {}
    for name, cls, dur, kill, n_copies in (("fair-time", LocalCluster, duration, True, copies),
                                           ("round-robin", RoundRobinCluster, base_duration, False, base_copies)):
        log(f"{name}: {args.workers} workers, jobs {models[0]} (batch {batches[0]}) and "
            f"{models[1]} (batch {batches[1]})")
        with temp_dir(f"idunno-bench-fairness-{name}-") as tmp:
            cluster = cls(workers=args.workers, standby=True, data_dir=str(tmp),
                          env={"IDUNNO_PRELOAD_MODELS": ",".join(models)})
            with running(cluster, timeout=120):
                raw = run_pair(cluster, models, batches, n_copies, args.workers, warmup, dur, recover, kill)
        res = analyse(raw, warmup, dur)
        res["raw"] = raw
        results[name] = res
        if res["ran_out"]:
            console.print(f"[red]warning: {', '.join(res['ran_out'])} ran out of inputs; use more --copies[/]")
    cases = first_result(models, batches, args.workers, first_copies, first_repeat)

    fair, rr = results["fair-time"], results["round-robin"]
    table(
        f"fair-time: rates (images/s over the last 10 s) from B's submit; A = {models[0]}, B = {models[1]}",
        ["t (s)", f"A {models[0]}", f"B {models[1]}", "gap %", ""],
        fair["rows"],
    )
    table(
        "round-robin baseline: rates from B's submit",
        ["t (s)", f"A {models[0]}", f"B {models[1]}", "gap %", ""],
        rr["rows"],
    )
    rows = []
    for name, r in results.items():
        rows.append([name, r["samples"], r["rate_a"], r["rate_b"], r["gap_median"] * 100, r["gap_max"] * 100,
                     r["dispatch_delay"], r["result_delay"], r["converge"]])
    table(
        f"rate gap over 10 s windows after a {warmup:.0f} s warm-up (1 s grid), and job B's start",
        ["scheduler", "samples", f"A {models[0]} img/s", f"B {models[1]} img/s", "gap median %", "gap max %",
         "B submit->1st dispatch (s)", "B submit->1st result (s)", "gap < 5% for 5 s after (s)"],
        rows,
    )
    first_result_tables(cases, models)
    rec = fair.get("recover")
    table(
        f"fair-time: SIGKILL of worker {fair['raw']['killed']} after the measured period",
        ["metric", "value"],
        [
            ["max gap after the kill (%)", fair["kill_gap_max"] * 100],
            ["gap left the 5 % band", "yes" if fair["left_band"] else "no"],
            ["kill -> gap < 5 % for 5 s (s)", rec if rec is not None else f"not within {recover:.0f} s"],
            ["total rate at the kill (img/s)", fair["total_before"]],
            [f"total rate {recover:.0f} s later (img/s)", fair["total_after"]],
        ],
    )
    gap_ratio = fair["gap_median"] / rr["gap_median"] if rr["gap_median"] > 0 else math.inf
    rec_s = f"{rec:.1f}s" if rec is not None else f">{recover:.0f}s"
    headline(f"rate gap fair-time {fair['gap_median'] * 100:.1f}% (max {fair['gap_max'] * 100:.1f}%) vs round-robin "
             f"{rr['gap_median'] * 100:.1f}% (max {rr['gap_max'] * 100:.1f}%) = {ratio(gap_ratio)} (medians, "
             f"{models[0]} b{batches[0]} + {models[1]} b{batches[1]}); B first dispatch "
             f"{fair['dispatch_delay'] * 1000:.0f} ms after submit; within 5% again {rec_s} after a worker kill; "
             + first_headline(cases, models))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
