"""Inference off the worker's loop thread: a fetch stage and a compute stage.

The fetcher takes tasks in arrival order, reads the inputs (from this node's own SDFS replicas
when it holds one, else from a peer through SDFS, with a local cache) and decodes them; the
compute stage runs the model. The queue between them holds one decoded batch, so the next batch
is ready the moment the current one finishes: the CPU never waits on the network or SDFS.
Finished tasks go back to the loop as encoded messages over an inproc PUSH socket, which wakes
the loop's poll (ZeroMQ sockets are not shared between threads).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

from common.config import Config
from common.modelnames import NOOP
from common.protocol import Task, TaskResult
from common.transport import make_socket
from sdfs.client import SdfsClient
from sdfs.store import LocalStore

log = logging.getLogger("idunno.worker.executor")


@dataclass
class Prepared:
    task: Task
    generation: int
    images: list[Any]  # PIL image or None for a failed input
    errors: list[str | None]


class _TorchFreeNoop:
    """``models.NoopClassifier``'s behaviour without importing ``models`` (which imports torch)."""

    def predict_batch(self, images: list[Any], topk: int = 5) -> list[list[tuple[str, float]]]:
        return [[(NOOP, 1.0)] for _ in images]


class Executor:
    def __init__(
        self,
        cfg: Config,
        node_id_fn,
        store: LocalStore,
        cache_dir: Path,
        coordinators_fn,
        results_endpoint: str,
        ctx: zmq.Context,
    ) -> None:
        self.cfg = cfg
        self.node_id_fn = node_id_fn
        self.store = store
        self.cache_dir = cache_dir
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.coordinators_fn = coordinators_fn
        self.results_endpoint = results_endpoint
        self.ctx = ctx
        self.tasks: queue.Queue[tuple[Task, int] | None] = queue.Queue()
        self.ready: queue.Queue[Prepared | None] = queue.Queue(maxsize=1)
        self.models: dict[str, Any] = {}
        self.model_errors: dict[str, str] = {}
        self.loaded: list[str] = []
        self.cost: dict[str, float] = {}  # seconds per image, per model, measured here (sizes streamed pieces)
        self.stop_event = threading.Event()
        self.threads = [
            threading.Thread(target=self._fetch_loop, name="fetch", daemon=True),
            threading.Thread(target=self._compute_loop, name="compute", daemon=True),
        ]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def stop(self) -> None:
        self.stop_event.set()
        self.tasks.put(None)
        try:
            self.ready.put_nowait(None)
        except queue.Full:
            pass

    def submit(self, task: Task, generation: int) -> None:
        self.tasks.put((task, generation))

    # -- fetch stage ---------------------------------------------------------------------------
    def _fetch_loop(self) -> None:
        client = SdfsClient(self.cfg, self.coordinators_fn(), self.ctx)
        try:
            while not self.stop_event.is_set():
                item = self.tasks.get()
                if item is None:
                    break
                task, gen = item
                decode = self._decodes(task.model)
                images, errors = [], []
                for q in task.queries:
                    try:
                        images.append(self._load(client, str(q.get("input")), int(q.get("version", 0)), decode))
                        errors.append(None)
                    except Exception as exc:
                        images.append(None)
                        errors.append(f"{type(exc).__name__}: {exc}")
                while not self.stop_event.is_set():
                    try:
                        self.ready.put(Prepared(task, gen, images, errors), timeout=0.5)
                        break
                    except queue.Full:
                        continue
        finally:
            client.close()

    def _decodes(self, model: str) -> bool:
        """Whether a task's inputs are decoded into images (not for noop, which takes any bytes)."""
        if not self.cfg.torch:
            return False  # nothing here could use an image; a real model's queries get the model error
        try:
            # Imported on the first task, not at thread start: torchvision would load while
            # the node serves its first SDFS puts (and the CLI never pays for it at import).
            from models import is_noop  # noqa: PLC0415

            return not is_noop(model)
        except Exception:  # a broken install: each query gets the import error as its result
            return True

    def _load(self, client: SdfsClient, name: str, version: int, decode: bool = True) -> Any:
        if version and self.store.has(name, version):
            data = self.store.path(name, version).read_bytes()  # our own verified replica
        else:
            cached = self.cache_dir / f"{urllib.parse.quote(name, safe='')}@{version}"
            if version and cached.exists():
                data = cached.read_bytes()
            else:
                versions = client.locate(name, 1)
                v = next((x for x in versions if not version or x["version"] == version), None)
                if v is None:  # asked for a version that has been pruned: take the newest
                    v = versions[0]
                data = client.get_bytes(name, v)
                tmp = cached.with_suffix(".part")
                tmp.write_bytes(data)
                tmp.replace(cached)
        if not decode:
            return data
        from models import decode_image  # noqa: PLC0415 - keep torch imports out of the loop thread's start-up

        return decode_image(data)

    # -- compute stage -------------------------------------------------------------------------
    def _model(self, name: str) -> Any:
        if name in self.models:
            return self.models[name]
        if name in self.model_errors:
            raise RuntimeError(self.model_errors[name])
        if not self.cfg.torch:  # a torch-free worker (bench/scale.py): noop only, never an import of torch
            if name.strip().lower() == NOOP:
                self.models[name] = _TorchFreeNoop()
                self.loaded.append(name)
                return self.models[name]
            self.model_errors[name] = (f"cannot load model {name!r}: this worker runs without torch "
                                       "(config torch = false / IDUNNO_TORCH=0) and serves only noop")
            raise RuntimeError(self.model_errors[name])
        try:
            from models import get_classifier, is_noop  # noqa: PLC0415

            weights = None if is_noop(name) else self._weights_from_sdfs(name)
            clf = get_classifier(name, weights_path=weights, num_threads=self.cfg.torch_threads)
        except Exception as exc:
            self.model_errors[name] = f"cannot load model {name!r}: {exc}"
            raise RuntimeError(self.model_errors[name]) from None
        self.models[name] = clf
        self.loaded.append(name)
        return clf

    def _weights_from_sdfs(self, name: str) -> str | None:
        """Fetch ``models/<name>.pth`` from SDFS if someone stored it there."""
        # Short timeouts: a missing weights file must not delay the model by the full retry budget.
        quick = self.cfg.replace(request_timeout=2.0, request_retries=1)
        client = SdfsClient(quick, self.coordinators_fn(), self.ctx)
        try:
            dest = self.cache_dir / f"weights-{name}.pth"
            client.get(f"models/{name}.pth", dest)
            log.info("loaded weights for %s from SDFS models/%s.pth", name, name)
            return str(dest)
        except Exception:
            return None
        finally:
            client.close()

    def _warm_up(self) -> None:
        """Load the preloaded models now, off the loop thread, so a job's first batch does not wait."""
        for name in filter(None, (m.strip() for m in self.cfg.preload_models.split(","))):
            try:
                self._model(name)
            except Exception as exc:  # the compute thread must survive it: tasks get the error instead
                log.warning("preloading %s failed: %s", name, exc)

    def _compute_loop(self) -> None:
        out = make_socket(self.ctx, zmq.PUSH, self.cfg.max_frame_bytes, secure=False)
        out.connect(self.results_endpoint)
        try:
            self._warm_up()
            while not self.stop_event.is_set():
                prep = self.ready.get()
                if prep is None:
                    break
                for msg in self._run(prep):
                    out.send_multipart([str(prep.generation).encode(), msg.encode()])
        finally:
            out.close(0)

    def _piece_size(self, model: str, remaining: int) -> int:
        """Images per streamed piece: about `stream_interval` of compute at this model's measured
        cost here. Small pieces cost throughput (AlexNet at batch 1 runs ~1.6x slower per image
        than at batch 8 on one thread), so a piece is never cut below what that interval holds."""
        cost = self.cost.get(model)
        if self.cfg.stream_interval <= 0:
            return remaining
        if cost is None:
            return 1  # the model's first piece here measures its cost on one image
        return max(1, min(remaining, int(self.cfg.stream_interval / max(cost, 1e-9))))

    def _run(self, prep: Prepared) -> Iterator[TaskResult]:
        """Run one task, yielding its results piece by piece; the last piece is marked final."""
        task = prep.task
        errors = list(prep.errors)
        preds: list[Any] = [None] * len(errors)
        clf = None
        try:
            clf = self._model(task.model)
        except Exception as exc:
            log.warning("task %s failed: %s", task.task_id, exc)
            errors = [e or str(exc) for e in errors]
        i, n = 0, len(task.queries)
        while True:
            t0 = time.perf_counter()
            size = self._piece_size(task.model, n - i) if clf is not None else n - i
            piece = range(i, min(n, i + size))
            ok = [k for k in piece if prep.images[k] is not None and errors[k] is None]
            if ok and clf is not None:
                try:
                    out = clf.predict_batch([prep.images[k] for k in ok])
                    for k, p in zip(ok, out, strict=True):
                        preds[k] = [[label, float(prob)] for label, prob in p]
                    elapsed = time.perf_counter() - t0
                    c = self.cost.get(task.model)
                    per = elapsed / len(ok)
                    self.cost[task.model] = per if c is None else 0.7 * c + 0.3 * per
                except Exception as exc:
                    log.warning("task %s failed: %s", task.task_id, exc)
                    for k in ok:
                        errors[k] = str(exc)
            elapsed = time.perf_counter() - t0
            i = piece.stop
            results = [
                {"qid": task.queries[k].get("qid"), "input": task.queries[k].get("input"),
                 "top5": preds[k] if errors[k] is None else None, "error": errors[k]}
                for k in piece
            ]
            yield TaskResult(task.task_id, task.job_id, self.node_id_fn(), elapsed, results, final=i >= n)
            if i >= n:
                return
