"""The model workers, supervised from the server's main process.

Why not LitServe's own ``restart_workers``: its monitor runs in the main process
and fails the requests of a dead worker by scanning ``response_buffer``, but the
buffers that hold requests live in the forked HTTP processes (the main process's
copy is always empty), workers of different APIs share the same ``worker_id``
numbers, and requests reach the workers through one shared queue whose read lock a
worker killed while waiting on it holds forever, which stalls every other worker of
that API. So this module owns the path from the HTTP processes to the workers:

- each HTTP process writes its requests on a pipe of its own, read only by the main
  process (the main process is never the one killed): see :class:`RequestPipes`;
- per API, a dispatcher keeps the requests waiting; each worker has a pipe of its
  own, and the thread that watches it hands the worker everything that waits (up to
  the batch size) as soon as the worker is idle. Batches form only while every
  worker is busy; an idle worker runs a lone request at once;
- the answers come back over the same pipe, a batch's in one message, and go to the
  HTTP process that asked, over a pipe written only by the main process (one message
  per batch and HTTP process);
- a worker whose process ends, or whose heartbeat the supervisor sees unchanged for
  ``SUPPORTLENS_WORKER_HANG_TIMEOUT`` seconds (then it is killed), is replaced at
  once; the requests it held are answered 503 with ``Retry-After`` right away, and
  readiness is false only while an API has no live worker;
- a request's in-flight slots are released when its work really ends (answered,
  failed, or dropped for its deadline), not when its client stops waiting;
- each batch is sent with the torch threads to run it with: the worker's own share of
  the cores or, with ``SUPPORTLENS_ADAPTIVE_THREADS`` on (CPU only), more when other
  workers are idle, so that a lone request runs on every core as a single process
  would.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing as mp
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

from service import litserve_compat as compat
from service.config import Settings
from service.signals import start_thread
from service.worker import WORKER_NAME, Job, WorkerChannel, run_worker

logger = logging.getLogger("supportlens.supervisor")
POLL_S = 0.25
HANG_OBSERVATION_GAP_S = 2.0
MAX_RESTART_DELAY_S = 10.0


@dataclass
class QueuedRequest:
    """A validated request as an HTTP process queues it for the workers of ``api_path``."""

    api_path: str
    consumer: int  # which HTTP process waits for the answer
    uid: str
    request_id: str
    queued_at: float  # time.monotonic()
    deadline: float  # time.monotonic() after which the client has been answered 504
    payload: Any
    slots: tuple[str, ...]  # in-flight counters to release when the work ends


class RequestPipes:
    """Requests from each HTTP process to the main process, over a pipe of its own.

    A ``multiprocessing.Queue`` would hand each request to a feeder thread of the HTTP
    process, which then competes with the event loop for the GIL: that thread's wake-ups
    and switches were about a fifth of the HTTP process's samples under load, and a
    request's latency paid one more thread hand-off. Here the event loop writes the
    request itself (one writer per pipe, so no lock between processes) and the main
    process's intake thread waits on every pipe at once.

    Created in the main process before the HTTP processes fork (and after LitServe's
    manager process forked, so that no other process holds a write end): each HTTP
    process keeps only its own write end (:meth:`keep_only`), and the main process
    closes every write end once they run (:meth:`close_writers`), so that an HTTP
    process that dies reads as the end of its pipe.

    The requests an event loop queues in one turn go as one message, written at the end
    of that turn (``call_soon``): under load the HTTP process parses several requests
    per turn, and one write and one wake-up of the intake thread for all of them cut
    the HTTP process's and the main process's CPU per request
    (``benchmarks/results/backends.md``); a lone request waits for nothing. A write
    blocks the event loop only while a message larger than the pipe's buffer (64 KiB)
    is being read, and the intake thread does nothing but read.
    """

    def __init__(self, producers: int):
        pipes = [mp.Pipe(duplex=False) for _ in range(producers)]
        self._readers: list[Connection] = [reader for reader, _ in pipes]
        self._writers: list[Connection] = [writer for _, writer in pipes]
        self._lock = threading.Lock()  # an HTTP process's writers: its event loop, and tests
        self._pending: list[QueuedRequest] = []  # queued this turn of the event loop
        self._lost: Callable[[list[QueuedRequest]], None] = _log_lost

    def keep_only(
        self, producer: int, lost: Callable[[list[QueuedRequest]], None] | None = None
    ) -> None:
        """In an HTTP process: close the ends that belong to the main process and to others.

        ``lost`` is told of requests whose message could not be written (the main
        process is gone), so that their clients are answered rather than left waiting.
        """
        for index, (reader, writer) in enumerate(zip(self._readers, self._writers, strict=True)):
            reader.close()
            if index != producer:
                writer.close()
        if lost is not None:
            self._lost = lost

    def close_writers(self) -> None:
        """In the main process, once the HTTP processes hold their write ends."""
        for writer in self._writers:
            writer.close()

    def send(self, producer: int, request: QueuedRequest) -> None:
        """Queue ``request`` for the main process: at the end of this turn of the running
        event loop, with the others of the turn, or at once without a running loop."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        self._pending.append(request)
        if loop is None:
            self._flush(producer)
        elif len(self._pending) == 1:
            loop.call_soon(self._flush, producer)

    def _flush(self, producer: int) -> None:
        requests, self._pending = self._pending, []
        if not requests:
            return
        try:
            with self._lock:
                self._writers[producer].send(requests)
        except (OSError, ValueError):  # the main process is gone (or the pipe closed)
            self._lost(requests)
        except Exception:  # never leave them waiting: a callback's error would be only logged
            logger.exception("%d requests could not be queued", len(requests))
            self._lost(requests)

    def receive(self, timeout: float) -> list[QueuedRequest]:
        """What arrived within ``timeout`` seconds, from any HTTP process (maybe nothing)."""
        received = []
        for reader in wait(self._readers, timeout):
            try:
                received.extend(reader.recv())
            except (EOFError, OSError):  # that HTTP process is gone
                self._readers.remove(reader)
                reader.close()
        return received


def _log_lost(requests: list[QueuedRequest]) -> None:
    logger.error("the main process is gone: %d requests could not be queued", len(requests))


class SharedState:
    """Memory shared by the main process and the HTTP processes (created before they fork)."""

    def __init__(self, workers: dict[str, int]):
        self.requests: RequestPipes | None = None  # set by open_request_pipes
        self.counters = {"in_flight": mp.Value("i", 0), "explain": mp.Value("i", 0)}
        self.draining = mp.RawValue("b", 0)
        self.stopping = mp.RawValue("b", 0)
        self.api_paths = list(workers)
        self.worker_slots: dict[str, list[int]] = {}
        for path, count in workers.items():
            start = sum(len(v) for v in self.worker_slots.values())
            self.worker_slots[path] = list(range(start, start + count))
        self.ready = mp.RawArray("b", sum(workers.values()))
        self.queue_depth = mp.RawArray("i", len(workers))

    def open_request_pipes(self, producers: int) -> None:
        """One pipe per HTTP process, in the main process before they fork."""
        self.requests = RequestPipes(producers)

    def live_workers(self, api_path: str) -> int:
        return sum(self.ready[i] for i in self.worker_slots[api_path])

    def unready_apis(self) -> list[str]:
        """APIs with no live worker right now."""
        return [path for path in self.api_paths if self.live_workers(path) == 0]

    def try_acquire(self, name: str, limit: int) -> bool:
        """Take one slot of counter ``name`` unless ``limit`` are taken."""
        counter = self.counters[name]
        with counter.get_lock():
            if counter.value >= limit:
                return False
            counter.value += 1
            return True

    def release(self, names: tuple[str, ...]) -> None:
        for name in names:
            counter = self.counters[name]
            with counter.get_lock():
                counter.value -= 1

    def in_flight(self) -> int:
        return self.counters["in_flight"].value


class Dispatcher:
    """The requests of one API that wait for a worker."""

    def __init__(self, api_path: str, index: int, shared: SharedState, queue_timeout: float):
        self.api_path = api_path
        self.queue_timeout = queue_timeout
        self.index = index
        self.shared = shared
        self.waiting: deque[QueuedRequest] = deque()
        self.idle: set[int] = set()  # ranks of the workers waiting in take()
        self.changed = threading.Condition()

    def add(self, request: QueuedRequest) -> None:
        with self.changed:
            self.waiting.append(request)
            self.shared.queue_depth[self.index] = len(self.waiting)
            self.changed.notify_all()  # the idle worker of the lowest rank takes it

    def take(
        self, limit: int, timeout: float, rank: int = 0
    ) -> tuple[list[QueuedRequest], list[QueuedRequest]]:
        """Up to ``limit`` requests to run now, and those whose time ran out while waiting.

        Of the idle workers, the one of the lowest ``rank`` takes what waits: at low load
        the same worker serves every request (its caches and thread pool stay warm, and
        the others stay asleep instead of taking turns).
        """
        with self.changed:
            self.idle.add(rank)
            try:
                end = time.monotonic() + timeout
                while not self.waiting or min(self.idle) < rank:
                    left = end - time.monotonic()
                    if left <= 0 or not self.changed.wait(left):
                        break
            finally:
                self.idle.discard(rank)
            now = time.monotonic()
            runnable: list[QueuedRequest] = []
            expired: list[QueuedRequest] = []
            while self.waiting and len(runnable) < limit:
                request = self.waiting.popleft()
                late = now > request.deadline or now - request.queued_at > self.queue_timeout
                (expired if late else runnable).append(request)
            self.shared.queue_depth[self.index] = len(self.waiting)
            if self.waiting:
                self.changed.notify_all()  # more than one batch waits: the next idle worker
        return runnable, expired

    def take_all(self) -> list[QueuedRequest]:
        with self.changed:
            waiting = list(self.waiting)
            self.waiting.clear()
            self.shared.queue_depth[self.index] = 0
        return waiting

    def wake_all(self) -> None:
        with self.changed:
            self.changed.notify_all()


class WorkerHandle:
    """One model worker process and the thread in the main process that feeds and watches it."""

    def __init__(self, supervisor: Supervisor, lit_api, worker_id: int, slot: int, device):
        self.supervisor = supervisor
        self.lit_api = lit_api
        self.worker_id = worker_id
        self.slot = slot
        self.device = device
        self.dispatcher = supervisor.dispatchers[lit_api.api_path]
        self.process: mp.process.BaseProcess | None = None
        self.conn = None
        self.heartbeat = None
        self.pid: int | None = None
        self.restarts = 0
        # Torch threads when every worker is busy, and those of the batch it runs now
        # (0 while idle); see Supervisor.threads_for.
        self.base_threads = supervisor.settings.threads_per_worker(lit_api.workers)
        self.threads = 0

    @property
    def name(self) -> str:
        return (
            f"{WORKER_NAME}-{self.lit_api.api_path.strip('/').replace('/', '-')}-{self.worker_id}"
        )

    def spawn(self) -> mp.process.BaseProcess:
        context = mp.get_context("spawn")
        parent_end, child_end = context.Pipe()
        heartbeat = context.RawValue("d", time.monotonic())
        server = self.supervisor.server
        process = context.Process(
            target=run_worker,
            args=compat.inference_worker_args(
                server,
                self.lit_api,
                self.device,
                self.worker_id,
                WorkerChannel(child_end, heartbeat),
            ),
            name=self.name,
        )
        process.start()
        child_end.close()  # the worker holds the only other end: its death reads as EOF
        self.process, self.conn, self.heartbeat, self.pid = process, parent_end, heartbeat, None
        self.last_beat, self.last_change, self.last_check = heartbeat.value, time.monotonic(), 0.0
        return process

    # The thread ------------------------------------------------------------------

    def run(self) -> None:
        while not self.supervisor.stopping:
            try:
                self.step()
            except Exception:  # the thread must outlive any bug: its worker depends on it
                logger.exception("%s: supervision step failed", self.name)
                time.sleep(POLL_S)

    def step(self) -> None:
        if self.pid is None and not self.wait_ready():
            self.replace("exited while loading its model")
            return
        runnable, expired = self.dispatcher.take(
            self.lit_api.max_batch_size, POLL_S, self.worker_id
        )
        if expired:
            waited = (504, "request waited too long for a model worker; retry later")
            self.supervisor.answer_all([(request, "error", waited) for request in expired])
        if runnable:
            self.run_batch(runnable)
        elif not self.alive():
            self.replace("stopped")

    def wait_ready(self) -> bool:
        """Wait for the worker's ``ready``; False when it ended first."""
        while not self.supervisor.stopping:
            ready = wait([self.conn, self.process.sentinel], timeout=POLL_S)
            if self.conn in ready:
                try:
                    message = self.conn.recv()
                except (EOFError, OSError):
                    return False
                if message[0] == "ready":
                    self.pid = message[1]
                    self.supervisor.shared.ready[self.slot] = 1
                    logger.info("%s ready (pid %d)", self.name, self.pid)
                    self.restarts = 0
                    return True
            elif self.process.sentinel in ready:
                return False
        return False

    def alive(self) -> bool:
        if not self.process.is_alive():
            return False
        now, beat = time.monotonic(), self.heartbeat.value
        if beat != self.last_beat or now - self.last_check > HANG_OBSERVATION_GAP_S:
            # A new heartbeat, or this thread itself did not run for a while (the whole
            # server was paused, e.g. SIGSTOP to its process group): the clock restarts,
            # as a gap this thread did not watch proves nothing about the worker.
            self.last_beat, self.last_change = beat, now
        self.last_check = now
        if now - self.last_change > self.supervisor.settings.worker_hang_timeout:
            logger.error(
                "%s (pid %d) sent no heartbeat for %.0f s: killing it",
                self.name,
                self.process.pid,
                self.supervisor.settings.worker_hang_timeout,
            )
            self.process.kill()
            self.process.join(5)
            return False
        return True

    def run_batch(self, requests: list[QueuedRequest]) -> None:
        held = {request.uid: request for request in requests}
        threads = self.supervisor.threads_for(self)
        try:
            jobs = [Job(r.uid, r.request_id, r.deadline, r.payload) for r in requests]
            self.conn.send((threads, jobs))
            while True:
                ready = wait([self.conn, self.process.sentinel], timeout=POLL_S)
                if self.conn in ready:
                    _, answers = self.conn.recv()  # ("done", answers): the batch is over
                    self.supervisor.answer_all(
                        [
                            (held.pop(answer[1]), answer[0], answer[2] if len(answer) > 2 else None)
                            for answer in answers
                            if answer[1] in held
                        ]
                    )
                    break
                elif self.process.sentinel in ready or not self.alive():
                    raise EOFError
        except (EOFError, OSError, BrokenPipeError):
            stopped = self.supervisor.unavailable(
                "the model worker handling this request stopped; retry shortly"
            )
            self.supervisor.answer_all([(request, "error", stopped) for request in held.values()])
            held.clear()
            self.replace("stopped while handling requests")
        finally:
            self.supervisor.idle(self)
        if held:  # a worker that forgot one: never leave it hanging
            forgotten = (500, "internal error: no answer")
            self.supervisor.answer_all([(request, "error", forgotten) for request in held.values()])

    def replace(self, why: str) -> None:
        shared = self.supervisor.shared
        shared.ready[self.slot] = 0
        if self.supervisor.stopping:
            return
        if shared.live_workers(self.lit_api.api_path) == 0:
            # No worker left for this API until the new one has loaded its model: what
            # waits would only time out, so it is answered now (and retried elsewhere).
            unavailable = self.supervisor.unavailable()
            self.supervisor.answer_all(
                [(request, "error", unavailable) for request in self.dispatcher.take_all()]
            )
        with contextlib.suppress(OSError):
            self.conn.close()
        if self.process.is_alive():
            self.process.kill()
        self.process.join(5)
        logger.error(
            "%s %s (exit code %s); starting a new one", self.name, why, self.process.exitcode
        )
        if self.restarts:
            # A worker that cannot even load its model is not restarted in a tight loop.
            time.sleep(min(MAX_RESTART_DELAY_S, 0.5 * 2**self.restarts))
        self.restarts += 1
        self.supervisor.replaced(self, self.spawn())

    def ask_to_stop(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(None)

    def stop(self) -> None:
        self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)


class Supervisor:
    """Starts, feeds, watches and replaces the model workers of a :class:`SupportLensServer`."""

    def __init__(self, server, shared: SharedState, settings: Settings):
        self.server = server
        self.shared = shared
        self.settings = settings
        self.dispatchers = {
            path: Dispatcher(path, index, shared, settings.queue_timeout)
            for index, path in enumerate(shared.api_paths)
        }
        self.handles: list[WorkerHandle] = []
        self.threads: list[threading.Thread] = []
        self.stopping = False
        self._lock = threading.Lock()
        self._threads_lock = threading.Lock()
        self.adaptive = settings.adaptive_threads and settings.accelerator() == "cpu"
        self.cores = settings.core_pool()

    def launch(self, lit_api) -> list[mp.process.BaseProcess]:
        """Start the workers of ``lit_api`` (before the HTTP processes fork)."""
        processes = []
        slots = self.shared.worker_slots[lit_api.api_path]
        for worker_id, device in enumerate(compat.worker_devices(self.server, lit_api)):
            handle = WorkerHandle(self, lit_api, worker_id, slots[worker_id], device)
            self.handles.append(handle)
            processes.append(handle.spawn())
        return processes

    def start(self) -> None:
        """Start feeding the workers (after the HTTP processes forked: no thread is forked)."""
        self.threads = [start_thread(self._intake, "intake")] + [
            start_thread(handle.run, handle.name) for handle in self.handles
        ]

    def _intake(self) -> None:
        while not self.stopping:
            for request in self.shared.requests.receive(POLL_S):
                self.dispatchers[request.api_path].add(request)

    def replaced(self, handle: WorkerHandle, process: mp.process.BaseProcess) -> None:
        with self._lock:
            compat.set_worker_processes(self.server, [h.process for h in self.handles])

    def threads_for(self, handle: WorkerHandle) -> int:
        """Torch threads for the batch ``handle`` is about to run.

        Its own share of the cores, or the cores the busy workers leave free if that is
        more: with every other worker idle, one request runs on every core (a single
        single-threaded worker would leave the others unused); while all are busy, each
        keeps one share and threads never outnumber cores. Threads already handed out
        are not taken back mid-batch, so at the moment a second worker starts, the two
        may briefly hold more threads than cores.
        """
        with self._threads_lock:
            threads = handle.base_threads
            if self.adaptive:
                used = sum(h.threads for h in self.handles if h is not handle)
                threads = max(threads, self.cores - used)
            handle.threads = threads
        return threads

    def idle(self, handle: WorkerHandle) -> None:
        with self._threads_lock:
            handle.threads = 0

    def unavailable(self, detail: str = "no live model worker for this route; retry shortly"):
        return 503, detail, {"Retry-After": str(self.settings.retry_after)}

    def answer_all(self, answers: list[tuple[QueuedRequest, str, Any]]) -> None:
        """Release each request's slots (its work is over), then answer its HTTP process:
        one message per HTTP process for all of ``answers`` (a batch's).

        Each answer is ``(request, kind, value)``: ``kind`` is ``ok`` (``value``: the
        body), ``error`` (``value``: status, detail and optionally headers) or
        ``expired`` (its client was answered 504 already).
        """
        by_consumer: dict[int, list[tuple[str, Any, bool]]] = {}
        for request, kind, value in answers:
            self.shared.release(request.slots)
            if kind == "ok":
                reply = (request.uid, value, True)
            else:
                if kind == "expired":
                    error = (504, "no answer within the request timeout; try again later", {})
                else:
                    error = value if len(value) == 3 else (*value, {})
                reply = (request.uid, error, False)
            by_consumer.setdefault(request.consumer, []).append(reply)
        for consumer, replies in by_consumer.items():
            compat.send_responses(self.server, consumer, replies)

    def stop(self) -> None:
        """Stop every worker; the HTTP processes must be gone already."""
        self.stopping = True  # the intake thread ends within POLL_S
        for dispatcher in self.dispatchers.values():
            dispatcher.wake_all()
        for thread in self.threads:
            thread.join(5)
        for handle in self.handles:
            handle.ask_to_stop()
        for handle in self.handles:
            handle.stop()
