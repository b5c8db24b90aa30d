"""The worker's compute stage streams a batch's results in pieces sized by measured cost."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import zmq

from common.config import Config
from common.protocol import Task, decode
from sdfs.store import LocalStore, new_hasher
from worker.executor import FAST_PATH_BYTES, Executor, Prepared, WeightsSpec


class SlowModel:
    """A stand-in classifier that takes `per_image` seconds per image (the executor times it)."""

    def __init__(self, per_image: float) -> None:
        self.per_image = per_image
        self.calls: list[int] = []

    def predict_batch(self, images: list, topk: int = 5) -> list:
        self.calls.append(len(images))
        time.sleep(self.per_image * len(images))  # the compute being timed, not synchronisation
        return [[("label", 0.9)] for _ in images]


def _executor(tmp_path: Path, cfg: Config, model: object = None) -> Executor:
    ex = Executor(cfg, lambda: "w@1", LocalStore(tmp_path / "store"), tmp_path / "cache", lambda: [],
                  "inproc://unused", zmq.Context.instance())
    ex._model = lambda spec, preload=False: model  # the stand-in, whatever weights were chosen  # type: ignore
    return ex


SPEC = WeightsSpec("slow", ("slow", ""), label="seeded")


def _task(n: int) -> Task:
    return Task("t1.1-job1", "job1", "slow", 1, [{"index": i, "input": f"in/{i}", "version": 1}
                                                   for i in range(n)])


def test_pieces_follow_the_measured_cost_and_only_the_last_is_final(tmp_path):
    model = SlowModel(0.03)
    ex = _executor(tmp_path, Config(stream_interval=0.1), model)
    task = _task(8)
    pieces = [decode(m.encode()) for m in ex._run(Prepared(task, 0, ["img"] * 8, [None] * 8, SPEC))]
    # The first piece measures one image; then ~0.1 s of compute per piece (3 images at 0.03 s).
    assert model.calls[0] == 1 and all(1 <= c <= 4 for c in model.calls[1:]) and sum(model.calls) == 8
    assert [p.final for p in pieces] == [False] * (len(pieces) - 1) + [True]
    indexes = [r[0] for p in pieces for r in p.results]
    assert indexes == [q["index"] for q in task.queries]  # every query once, in order
    assert all(p.elapsed > 0 for p in pieces)


def test_a_cheap_model_sends_its_batch_in_one_piece_once_measured(tmp_path):
    ex = _executor(tmp_path, Config(stream_interval=0.25), SlowModel(0.001))
    ex.cost["slow"] = 0.001
    pieces = list(ex._run(Prepared(_task(8), 0, ["img"] * 8, [None] * 8, SPEC)))
    assert len(pieces) == 1 and pieces[0].final and len(pieces[0].results) == 8


def test_inputs_that_failed_to_load_and_a_broken_model_still_answer_every_query(tmp_path):
    ex = _executor(tmp_path, Config(stream_interval=0.0), SlowModel(0.0))
    errors = [None, "ImageDecodeError: corrupt", None]
    (piece,) = ex._run(Prepared(_task(3), 0, ["img", None, "img"], errors, SPEC))
    assert [r[2] for r in piece.results] == errors and piece.results[1][1] is None
    broken = WeightsSpec("broken", ("broken", ""), error="cannot load model 'broken': boom")
    ex._model = Executor._model.__get__(ex)  # the real one: it refuses a spec that carries an error
    task = Task("t1.2-job1", "job1", "broken", 1, _task(2).queries)
    (piece,) = ex._run(Prepared(task, 0, ["img", "img"], [None, None], broken))
    assert piece.final and all("boom" in r[2] for r in piece.results)


def test_a_preload_warms_the_model_up_on_the_compute_thread(tmp_path):
    class Warmable(SlowModel):
        warmed = 0

        def warm_up(self) -> None:
            self.warmed += 1

    model = Warmable(0.0)
    ex = _executor(tmp_path, Config(), model)
    ex._preload(Prepared(None, 0, [], [], SPEC))
    assert model.warmed == 1 and model.calls == []  # warmed, and no task's images were run


# -- the inline fast path (InlineNoop): noop on local inputs, on the loop thread -----------------


def _put(store: LocalStore, name: str, data: bytes) -> None:
    h = new_hasher()
    h.update(data)
    w = store.begin(name, 1, len(data), h.hexdigest())
    w.write(0, data)
    w.finish()


def test_noop_on_local_inputs_runs_inline_and_anything_else_goes_to_the_pipeline(tmp_path):
    ex = _executor(tmp_path, Config())
    _put(ex.store, "in/a.jpg", b"a" * 100)
    _put(ex.store, "in/b.jpg", b"b" * 100)
    shown: list[object] = []
    ex.preload = lambda model, weights="": shown.append(model)  # how noop is shown as loaded
    local = [{"index": 7, "input": "in/a.jpg", "version": 1}, {"index": 3, "input": "in/b.jpg", "version": 1}]
    result = ex.inline.run(Task("t1.1-job1", "job1", "Noop", 1, local))
    assert result is not None and result.final and result.node_id == "w@1"
    assert result.results == [[7, [["noop", 1.0]], None], [3, [["noop", 1.0]], None]]
    assert shown == ["noop"]  # once, on first use
    assert ex.inline.run(Task("t2.1-job1", "job1", "noop", 1, local[:1])) is not None and shown == ["noop"]
    # Not cheap, or not here: the pipeline's (a real model; a remote input; no exact version; too big).
    assert ex.inline.run(Task("t3.1-job2", "job2", "alexnet", 1, local)) is None
    remote = [*local, {"index": 1, "input": "in/elsewhere.jpg", "version": 1}]
    assert ex.inline.run(Task("t4.1-job1", "job1", "noop", 1, remote)) is None
    assert ex.inline.run(Task("t5.1-job1", "job1", "noop", 1, [{"index": 1, "input": "in/a.jpg"}])) is None
    _put(ex.store, "in/big.bin", b"x" * (FAST_PATH_BYTES + 1))
    big = [{"index": 0, "input": "in/big.bin", "version": 1}]
    assert ex.inline.run(Task("t6.1-job1", "job1", "noop", 1, big)) is None


# -- priority: inference runs below the loops and the CLI ------------------------------------------


def _nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def test_the_compute_thread_and_the_threads_it_starts_run_at_a_lower_priority(tmp_path):
    seen: dict[str, int] = {}
    done = threading.Event()

    class Probe(SlowModel):
        def warm_up(self) -> None:  # runs on the compute thread, as a preload's warm-up does
            seen["compute"] = _nice()
            child = threading.Thread(target=lambda: seen.setdefault("child", _nice()))  # as torch's pool
            child.start()
            child.join(10)
            done.set()

    base = _nice()
    for increment, expect in ((5, min(19, base + 5)), (0, base)):
        seen.clear()
        done.clear()
        ex = _executor(tmp_path / str(increment), Config(torch=False, compute_nice=increment), Probe(0.0))
        ex.threads[1].start()  # the compute thread alone
        ex.ready.put(Prepared(None, 0, [], [], SPEC))
        assert done.wait(10), "the compute thread never ran the preload"
        ex.ready.put(None)
        ex.threads[1].join(10)
        assert seen == {"compute": expect, "child": expect}
    assert _nice() == base  # the caller's thread is untouched
