"""Inference off the worker's loop thread: a fetch stage and a compute stage.

The fetcher takes tasks in arrival order, reads the inputs (from this node's own SDFS replicas
when it holds one, else from a peer through SDFS, with a local cache) and decodes them; the
compute stage runs the model. The queue between them holds one decoded batch, so the next batch
is ready the moment the current one finishes: the CPU never waits on the network or SDFS.
Finished tasks go back to the loop as encoded messages over an inproc PUSH socket, which wakes
the loop's poll (ZeroMQ sockets are not shared between threads).

Models (docs/models.md): the fetch stage also decides which weights a batch runs with (the job's
pinned SDFS checkpoint, else ``models/<name>.pth`` in SDFS, else the torch hub cache, else seeded
weights), re-checking SDFS every ``weights_check_interval`` so a new or deleted file is seen, and
downloads the file. The compute stage keeps loaded models in a :class:`models.ModelCache` within
``model_memory_mb``, least recently used evicted first. A ``Preload`` hint loads a model the same
way before a job's first batch.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

from common.config import Config
from common.modelnames import NOOP, is_noop
from common.protocol import ErrorCode, Task, TaskResult
from common.rpc import RpcError
from common.transport import make_socket
from sdfs.client import SdfsClient
from sdfs.store import LocalStore

log = logging.getLogger("idunno.worker.executor")

MB = 1024 * 1024
# Share of this machine's memory the workers on it may fill with models when model_memory_mb is 0:
# the rest is for activations, decoded images, SDFS buffers and the other processes.
MODEL_MEMORY_SHARE = 0.5
# The worker's inline fast path (Executor.run_inline) reads at most this much of a noop task's local
# inputs on its loop thread: a batch of 1-32 test JPEGs (~10-200 KB each) is a few hundred µs of reads.
FAST_PATH_BYTES = 4 * MB


def machine_memory_bytes() -> int:
    """Physical memory, or the cgroup's limit when it is lower (a container)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit():
            total = min(total, int(limit))
    except OSError:
        pass
    return total


def default_model_memory(workers_on_host: int) -> int:
    return int(machine_memory_bytes() * MODEL_MEMORY_SHARE / max(1, workers_on_host))


def weights_sdfs_name(model: str) -> str:
    """Where a model's default weights live in SDFS (``idunno models put/pull``)."""
    return f"models/{model}.pth"


def lower_thread_priority(increment: int) -> None:
    """Raise the calling thread's nice value by ``increment`` (Linux keeps nice per thread, and the
    threads it starts later, torch's among them, inherit it). Never fatal: where the platform has
    no per-thread priority the thread keeps the process's."""
    if increment <= 0:
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + increment))
    except (AttributeError, OSError) as exc:
        log.debug("thread %s keeps its priority: %s", threading.current_thread().name, exc)


@dataclass(frozen=True)
class WeightsSpec:
    """Which weights a batch runs with: decided in the fetch stage, loaded in the compute stage."""

    model: str  # resolved torchvision name
    slot: tuple[str, str]  # (model, pinned SDFS name or ""): a new key for a slot replaces the old model
    key: tuple[Any, ...] = ()  # the model and the exact weights (SDFS name, version, checksum; hub file; seed)
    path: str | None = None
    label: str = ""  # "sdfs:models/alexnet.pth v3", "hub-cache:...", "seeded"
    error: str | None = None


@dataclass
class Prepared:
    task: Task | None  # None: a preload (nothing to answer)
    generation: int
    images: list[Any]  # PIL image or None for a failed input
    errors: list[str | None]
    weights: WeightsSpec | None = None  # None for noop


@dataclass(frozen=True)
class PreloadItem:
    model: str
    weights: str = ""


class WeightsResolver:
    """Pinned checkpoint, then ``models/<name>.pth`` in SDFS, then the hub cache, then seeded weights.

    SDFS is asked (Locate) at most every ``weights_check_interval`` per file, so a changed or deleted
    file is seen within that interval at the cost of one small request per interval. Downloaded files
    are kept per version and checksum in ``cache_dir``; a replica this node stores is read in place.
    """

    def __init__(self, cfg: Config, store: LocalStore, cache_dir: Path) -> None:
        self.cfg = cfg
        self.store = store
        self.dir = cache_dir / "weights"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.seen: dict[str, tuple[float, dict[str, Any] | None]] = {}  # sdfs name -> (checked at, newest version)
        # Slots whose SDFS file was deleted, for the compute stage to unload (a queue: two threads).
        self.gone: queue.SimpleQueue[tuple[str, str]] = queue.SimpleQueue()

    def _locate(self, quick: SdfsClient, name: str) -> dict[str, Any] | None:
        now = time.monotonic()
        last = self.seen.get(name)
        if last is not None and now - last[0] < self.cfg.weights_check_interval:
            return last[1]
        try:
            found: dict[str, Any] | None = quick.locate(name, 1)[0]
        except RpcError as exc:
            if exc.code != ErrorCode.NOT_FOUND:
                # SDFS did not answer (a failover): keep what we knew, ask again next interval.
                log.info("cannot check %s in SDFS: %s", name, exc)
                found = last[1] if last is not None else None
            else:
                found = None
        except Exception as exc:  # noqa: BLE001 - a lookup must never kill the fetch stage
            log.info("cannot check %s in SDFS: %s", name, exc)
            found = last[1] if last is not None else None
        if last is not None and last[1] is not None and found is None:
            log.info("weights %s were deleted from SDFS", name)
        self.seen[name] = (now, found)
        return found

    def _fetch(self, client: SdfsClient, name: str, v: dict[str, Any]) -> str:
        version, checksum = int(v["version"]), str(v.get("checksum", ""))
        if self.store.has(name, version):
            return str(self.store.path(name, version))  # our own verified replica
        stem = urllib.parse.quote(name, safe="")
        dest = self.dir / f"{stem}@{version}-{checksum[:16]}.pth"
        if not dest.exists():
            tmp = self.dir / f".{stem}.download"
            got = client.get(name, tmp, wait=0.0)  # the fetch thread: a lost file fails its batch at once
            if int(got["version"]) != version or str(got.get("checksum", "")) != checksum:
                self.seen.pop(name, None)  # a newer version arrived meanwhile: file it under its own key
                dest = self.dir / f"{stem}@{got['version']}-{str(got.get('checksum', ''))[:16]}.pth"
            tmp.replace(dest)
            # Keep the two newest: a batch prepared against the previous version may still load it.
            older = sorted(self.dir.glob(f"{stem}@*.pth"), key=lambda p: p.stat().st_mtime)[:-2]
            for p in older:
                p.unlink(missing_ok=True)
        return str(dest)

    def resolve(self, quick: SdfsClient, client: SdfsClient, model: str, pinned: str = "") -> WeightsSpec:
        from models import registry  # noqa: PLC0415 - torchvision: off the loop thread's start-up

        try:
            name = registry.resolve_name(model)
        except ValueError as exc:
            return WeightsSpec(model, (model, pinned), error=str(exc))
        slot = (name, pinned)
        sdfs_name = pinned or weights_sdfs_name(name)
        had = self.seen.get(sdfs_name)
        found = self._locate(quick, sdfs_name)
        if found is not None:
            try:
                path = self._fetch(client, sdfs_name, found)
            except Exception as exc:  # noqa: BLE001 - the batch gets the error; the next one tries again
                self.seen.pop(sdfs_name, None)
                return WeightsSpec(name, slot, error=f"cannot fetch weights {sdfs_name} v{found['version']} "
                                                     f"from SDFS: {exc}")
            key = (name, "sdfs", sdfs_name, int(found["version"]), str(found.get("checksum", "")))
            return WeightsSpec(name, slot, key, path, f"sdfs:{sdfs_name} v{found['version']}")
        if had is not None and had[1] is not None:
            self.gone.put(slot)
        if pinned:
            return WeightsSpec(name, slot, error=f"pinned weights {pinned!r} not found in SDFS")
        hub = registry.hub_cache_path(registry.default_weights(name))
        try:
            st = os.stat(hub)
            return WeightsSpec(name, slot, (name, "hub", hub, st.st_mtime_ns, st.st_size), hub, f"hub-cache:{hub}")
        except OSError:
            return WeightsSpec(name, slot, (name, "seeded", 0), None, "seeded")


class _TorchFreeNoop:
    """``models.NoopClassifier``'s behaviour without importing ``models`` (which imports torch)."""

    def predict_batch(self, images: list[Any], topk: int = 5) -> list[list[tuple[str, float]]]:
        return [[(NOOP, 1.0)] for _ in images]


def cached_input(cache_dir: Path, name: str, version: int) -> Path:
    """Where a worker caches an input it read from a peer (the pipeline writes it, the inline path reads it)."""
    return cache_dir / f"{urllib.parse.quote(name, safe='')}@{version}"


class InlineNoop:
    """The fast path for cheap work, run on the worker's loop thread (``run``): a ``noop`` task whose
    inputs are all on this node (its own replicas or the input cache), at most ``FAST_PATH_BYTES``
    in all. Such a task costs a few file reads and no compute, while the executor's two thread hops
    and its inproc socket cost most of a query's time (issue #14).

    Only noop qualifies, by name, never by a measured cost: a real model's batch may take seconds
    and the loop must keep heartbeats flowing; a remote input may wait on a peer.
    """

    def __init__(self, store: LocalStore, cache_dir: Path, node_id_fn: Callable[[], str],
                 first_use: Callable[[], None]) -> None:
        self.store, self.cache_dir, self.node_id_fn = store, cache_dir, node_id_fn
        self.first_use: Callable[[], None] | None = first_use  # shows noop as loaded, the pipeline's way

    def run(self, task: Task) -> TaskResult | None:
        """The task's result, or None: not cheap (another model, a remote input, big files)."""
        if not is_noop(task.model):
            return None
        paths: list[Path] = []
        total = 0
        for q in task.queries:
            path = self._local_path(q.get("input"), q.get("version"))
            try:
                total += path.stat().st_size if path is not None else FAST_PATH_BYTES + 1
            except OSError:
                return None  # gone since: the pipeline reads it (or says why it cannot)
            if total > FAST_PATH_BYTES:
                return None
            paths.append(path)
        t0 = time.perf_counter()
        results: list[list[Any]] = []
        for q, path in zip(task.queries, paths, strict=True):
            try:
                path.read_bytes()  # noop takes any bytes, but a query whose input is unreadable gets the error
                results.append([q.get("index"), [[NOOP, 1.0]], None])
            except OSError as exc:
                results.append([q.get("index"), None, f"{type(exc).__name__}: {exc}"])
        if self.first_use is not None:
            self.first_use, first = None, self.first_use
            first()
        return TaskResult(task.task_id, task.job_id, self.node_id_fn(), time.perf_counter() - t0, results)

    def _local_path(self, name: Any, version: Any) -> Path | None:
        """Where this node keeps ``name`` at ``version`` (a verified replica, else the input cache),
        or None: not here, or not an exact version."""
        if not isinstance(name, str) or type(version) is not int or version < 1:
            return None
        if self.store.has(name, version):
            return self.store.path(name, version)
        cached = cached_input(self.cache_dir, name, version)
        return cached if cached.exists() else None


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
        host_workers_fn: Callable[[], int] | None = None,
    ) -> None:
        self.cfg = cfg
        self.node_id_fn = node_id_fn
        self.store = store
        self.cache_dir = cache_dir
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.coordinators_fn = coordinators_fn
        self.results_endpoint = results_endpoint
        self.ctx = ctx
        self.tasks: queue.Queue[tuple[Task | PreloadItem, int] | None] = queue.Queue()
        self.ready: queue.Queue[Prepared | None] = queue.Queue(maxsize=1)
        self.host_workers_fn = host_workers_fn or (lambda: 1)
        self.resolver = WeightsResolver(cfg, store, cache_dir)
        self.inline = InlineNoop(store, cache_dir, node_id_fn, lambda: self.preload(NOOP))
        self._cache: Any = None  # models.ModelCache, built by the compute thread (torch loads there)
        self.loaded: list[str] = []  # models loaded now; read by the loop thread (Heartbeat, Ready)
        self.model_mb: dict[str, int] = {}  # their sizes as the cache counts them (same: replaced whole)
        self._noop_used = False  # noop has nothing to load, but it is served (and shown) once asked for
        self.cost: dict[str, float] = {}  # seconds per image, per model, measured here (sizes streamed pieces)
        self.stop_event = threading.Event()
        self.threads = [
            threading.Thread(target=self._fetch_loop, name="fetch", daemon=True),
            threading.Thread(target=self._compute_loop, name="compute", daemon=True),
        ]

    def start(self) -> None:
        for t in self.threads:
            t.start()
        # Loaded at start (cfg.preload_models), the same way as a Preload hint.
        for name in filter(None, (m.strip() for m in self.cfg.preload_models.split(","))):
            self.preload(name)

    def budget_bytes(self) -> int:
        """The model memory budget: model_memory_mb, or this machine's share for each of its workers."""
        if self.cfg.model_memory_mb > 0:
            return self.cfg.model_memory_mb * MB
        return default_model_memory(self.host_workers_fn())

    @property
    def cache(self) -> Any:
        if self._cache is None:
            from models import ModelCache  # noqa: PLC0415

            self._cache = ModelCache(self.budget_bytes, max_models=self.cfg.pool_max_models)
        return self._cache

    def preload(self, model: str, weights: str = "") -> None:
        """Load ``model`` (with the pinned ``weights``, if any) before a task needs it: a warm start."""
        self.tasks.put((PreloadItem(model, weights), 0))

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
        lower_thread_priority(self.cfg.compute_nice)  # decoding images is inference work too
        client = SdfsClient(self.cfg, self.coordinators_fn(), self.ctx)
        # Weights lookups use short timeouts: an unanswered check keeps the weights known so far.
        quick = SdfsClient(self.cfg.replace(request_timeout=2.0, request_retries=1), self.coordinators_fn(), self.ctx)
        try:
            while not self.stop_event.is_set():
                item = self.tasks.get()
                if item is None:
                    break
                task, gen = item
                decode = self._decodes(task.model)
                spec = self._resolve(quick, client, task) if decode else None
                if isinstance(task, PreloadItem):
                    self._hand_over(Prepared(None, gen, [], [], spec))
                    continue
                images, errors = [], []
                for q in task.queries:
                    try:
                        images.append(self._load(client, str(q.get("input")), int(q.get("version", 0)), decode,
                                                 q.get("source")))
                        errors.append(None)
                    except Exception as exc:
                        images.append(None)
                        errors.append(f"{type(exc).__name__}: {exc}")
                self._hand_over(Prepared(task, gen, images, errors, spec))
        finally:
            client.close()
            quick.close()

    def _resolve(self, quick: SdfsClient, client: SdfsClient, task: Task | PreloadItem) -> WeightsSpec:
        try:
            return self.resolver.resolve(quick, client, task.model, task.weights)
        except Exception as exc:  # noqa: BLE001 - a broken install: the batch gets the error, the stage lives
            return WeightsSpec(task.model, (task.model, task.weights), error=f"cannot choose weights: {exc}")

    def _hand_over(self, prep: Prepared) -> None:
        while not self.stop_event.is_set():
            try:
                self.ready.put(prep, timeout=0.5)
                return
            except queue.Full:
                continue

    def _decodes(self, model: str) -> bool:
        """Whether a task's inputs are decoded into images: not for noop, which takes any bytes, and
        not on a torch-free worker, which has no use for an image (a real model's queries get the
        model error). A broken install shows in ``_load``'s import: each query gets it as its result."""
        return self.cfg.torch and not is_noop(model)

    def _load(self, client: SdfsClient, name: str, version: int, decode: bool = True, source: Any = None) -> Any:
        if version and self.store.has(name, version):
            data = self.store.path(name, version).read_bytes()  # our own verified replica
        else:
            cached = cached_input(self.cache_dir, name, version)
            if version and cached.exists():
                data = cached.read_bytes()
            else:
                data = self._read_remote(client, name, version, source)
                tmp = cached.with_suffix(".part")
                tmp.write_bytes(data)
                tmp.replace(cached)
        if not decode:
            return data
        from models import decode_image  # noqa: PLC0415 - keep torch imports out of the loop thread's start-up

        return decode_image(data)

    @staticmethod
    def _read_remote(client: SdfsClient, name: str, version: int, source: Any) -> bytes:
        """Read an input from a peer: from the replicas the Task named (no Locate to the coordinator),
        else, or if none of them serves it, from what Locate says now (the replicas may have moved)."""
        if isinstance(source, dict) and (not version or source.get("version") == version):
            try:
                return client.get_bytes(name, source)
            except Exception as exc:  # noqa: BLE001 - stale or malformed locations: ask the coordinator
                log.info("reading %s from the Task's replicas failed (%s): asking Locate", name, exc)
        versions = client.locate(name, 1)
        v = next((x for x in versions if not version or x["version"] == version), None)
        if v is None:  # asked for a version that has been pruned: take the newest
            v = versions[0]
        return client.get_bytes(name, v)

    # -- compute stage -------------------------------------------------------------------------
    def _model(self, spec: WeightsSpec, preload: bool = False) -> Any:
        """The loaded classifier for ``spec``, loading it within the memory budget if needed."""
        from models import Classifier  # noqa: PLC0415

        if spec.error is not None:
            raise RuntimeError(spec.error)
        cache = self.cache
        for slot in self._take_gone():
            if cache.drop_slot(slot):
                self._update_loaded()

        def load() -> Any:
            t0 = time.perf_counter()
            clf = Classifier(spec.model, weights_path=spec.path, label=spec.label)
            log.info("loaded %s with weights from %s in %.1fs", spec.model, spec.label, time.perf_counter() - t0)
            return clf

        try:
            return cache.get(spec.key, spec.slot, spec.model, load, spec.label,
                             spare_used_within=self.cfg.model_in_use_window if preload else None)
        finally:
            self._update_loaded()

    def _update_loaded(self) -> None:
        # One assignment of a new list: the loop thread reads it without a lock.
        # Torch-free, or no real model asked for yet: no model cache (building one imports torchvision).
        has_cache = self.cfg.torch and self._cache is not None
        cached = self.cache.names() if has_cache else []
        entries = self.cache.entries() if has_cache else []
        sizes: dict[str, int] = {}
        for e in entries:  # a model loaded with two checkpoints counts both
            sizes[e.name] = sizes.get(e.name, 0) + round(e.nbytes / MB)
        self.model_mb = sizes
        self.loaded = cached + ([NOOP] if self._noop_used else [])

    def _take_gone(self) -> list[tuple[str, str]]:
        gone = []
        while not self.resolver.gone.empty():
            gone.append(self.resolver.gone.get_nowait())
        return gone

    def _compute_loop(self) -> None:
        lower_thread_priority(self.cfg.compute_nice)
        if self.cfg.torch:
            import torch  # noqa: PLC0415 - the worker imported it before its first Join

            torch.set_num_threads(self.cfg.torch_threads)  # process-wide: every model runs with it
        out = make_socket(self.ctx, zmq.PUSH, self.cfg.max_frame_bytes, secure=False)
        out.connect(self.results_endpoint)
        try:
            while not self.stop_event.is_set():
                prep = self.ready.get()
                if prep is None:
                    break
                if prep.task is None:
                    self._preload(prep)
                    continue
                for msg in self._run(prep):
                    out.send_multipart([str(prep.generation).encode(), msg.encode()])
        finally:
            out.close(0)

    def _preload(self, prep: Prepared) -> None:
        if prep.weights is None:  # noop
            self._noop_used = True
            self._update_loaded()
            return
        try:
            # Warmed on the compute thread, where the job's first task will run right after.
            self._model(prep.weights, preload=True).warm_up()
        except Exception as exc:  # the compute thread must survive it: tasks get the error instead
            log.warning("preloading %s failed: %s", prep.weights.model, exc)

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
            if prep.weights is None and not self.cfg.torch:
                # A torch-free worker (bench/scale.py): noop only, and never an import of torch.
                if not is_noop(task.model):
                    raise RuntimeError(f"cannot load model {task.model!r}: this worker runs without torch "
                                       "(config torch = false / IDUNNO_TORCH=0) and serves only noop")
                clf = _TorchFreeNoop()
                if not self._noop_used:
                    self._noop_used = True
                    self._update_loaded()
            elif prep.weights is None:
                # noop (nothing to decode, nothing to load): models.NoopClassifier's answers, without
                # importing models, whose torchvision import would hold the GIL from the loop for seconds.
                clf = _TorchFreeNoop()
                if not self._noop_used:
                    self._noop_used = True
                    self._update_loaded()
            else:
                clf = self._model(prep.weights)
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
            results = [[task.queries[k].get("index"), preds[k] if errors[k] is None else None, errors[k]]
                       for k in piece]
            yield TaskResult(task.task_id, task.job_id, self.node_id_fn(), elapsed, results, final=i >= n)
            if i >= n:
                return
