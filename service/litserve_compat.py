"""Everything this service needs from LitServe's private internals, in one place.

LitServe is pinned to the version in ``LITSERVE_VERSION`` (pyproject.toml pins the
same); ``tests/unit/test_service_litserve_compat.py`` checks every name and signature
used here, so an upgrade that changes them fails loudly there instead of misbehaving
at run time. Everything else goes through LitServe's public API: ``LitAPI`` hooks
(``setup``, typed ``decode_request``/``encode_response``, ``batch``, ``predict``,
``unbatch``), ``LitServer(middlewares=..., callbacks=...)``, ``LitServer.run`` and
``litserve.loops.inference_worker``.

What is used, and why:

- ``LitServer._init_manager``: after LitServe created its manager and transport, the
  response transport is swapped for :class:`PipeTransport` (a pipe per HTTP process,
  written only by the main process; see :mod:`service.supervisor`), and the logging
  LitServe set up is taken over. ``MessageTransport`` is the interface LitServe's
  response task reads answers through (``areceive``).
- ``LitServer.launch_inference_worker`` (called by ``run``): starts the supervised
  workers instead of LitServe's; ``_inference_workers_config_for_api`` gives their
  devices; ``inference_workers`` is the list LitServe stops at shutdown.
- ``LitServer._start_worker_monitoring`` (called by ``run`` once the HTTP processes
  run): starts the supervisor instead of LitServe's monitor, which would shut the
  whole server down when a worker dies.
- ``LitServer._perform_graceful_shutdown``: stops the HTTP processes before the
  workers, so that in-flight requests are answered.
- ``LitServer._shutdown_event``, ``_transport``, ``_callback_runner``,
  ``workers_setup_status``, ``response_buffer`` and ``app.response_queue_id``: the
  state behind those steps; ``ResponseBufferItem`` and the message format of the
  transport, ``(uid, (payload, status, response_type, worker_id))``, read by the
  response task LitServe runs in each HTTP process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing as mp
import os
import threading
from collections import deque
from typing import Any

import litserve as ls
from litserve.callbacks import EventTypes
from litserve.transport.base import MessageTransport
from litserve.utils import LitAPIStatus, LoopResponseType, ResponseBufferItem, WorkerSetupStatus

LITSERVE_VERSION = "0.2.19"


class LitServerHooks(ls.LitServer):
    """``LitServer`` whose private steps call the public-named hooks below."""

    def on_manager(self, manager, num_api_servers: int) -> None:
        """After the manager and transport exist, before any worker starts."""

    def on_http_started(self, uvicorn_workers: dict) -> None:
        """After the HTTP processes were forked."""

    def on_shutdown(self, uvicorn_workers: dict) -> None:
        """Before LitServe's own shutdown (which stops what is left)."""

    # LitServe internals -------------------------------------------------------

    def _init_manager(self, num_api_servers: int):
        manager = super()._init_manager(num_api_servers)
        self.on_manager(manager, num_api_servers)
        return manager

    def _start_worker_monitoring(self, manager, uvicorn_workers):
        self.on_http_started(uvicorn_workers)

    def _perform_graceful_shutdown(self, manager, uvicorn_workers, shutdown_reason="normal"):
        if getattr(self, "_shutdown_done", False):
            return
        self._shutdown_done = True
        self.on_shutdown(uvicorn_workers)
        alive = {i: w for i, w in uvicorn_workers.items() if w.is_alive()}
        super()._perform_graceful_shutdown(manager, alive, shutdown_reason)


logger = logging.getLogger("supportlens.transport")


class PipeTransport(MessageTransport):
    """Answers from the main process to each HTTP process, over a pipe of its own.

    LitServe's ``MPQueueTransport`` reads a multiprocessing queue through
    ``asyncio.to_thread``: each answer crosses a feeder thread in the writer and a
    thread-pool round trip in the reader, the largest share of the time a lone request
    spends between processes. Here the main process writes the answers itself (one lock
    per pipe: several supervision threads answer), a batch's answers for one HTTP process
    as one message (:meth:`send_all`), and the HTTP process's event loop reads them as
    soon as the pipe is readable (``add_reader``) and hands them to LitServe's response
    task one by one: no thread on either side.

    Created in the main process before the HTTP processes fork. Each HTTP process
    keeps only its own read end (:meth:`keep_only`) and the main process closes every
    read end once they run (:meth:`close_readers`), so an answer for an HTTP process
    that has died fails at once (``BrokenPipeError``, logged and dropped) instead of
    filling a pipe nobody reads.
    """

    def __init__(self, consumers: int):
        pipes = [mp.Pipe(duplex=False) for _ in range(consumers)]
        self._readers = [reader for reader, _ in pipes]
        self._writers = [writer for _, writer in pipes]
        self._locks = [threading.Lock() for _ in pipes]
        self._received = [deque() for _ in pipes]  # answers read, not yet taken
        self._closed = False

    def keep_only(self, consumer_id: int) -> None:
        """In an HTTP process: close the ends that belong to the main process and to others."""
        for index, (reader, writer) in enumerate(zip(self._readers, self._writers, strict=True)):
            writer.close()
            if index != consumer_id:
                reader.close()

    def close_readers(self) -> None:
        """In the main process, once the HTTP processes hold their read ends."""
        for reader in self._readers:
            reader.close()

    def send(self, item: Any, consumer_id: int) -> None:
        self.send_all([item], consumer_id)

    def send_all(self, items: list[Any], consumer_id: int) -> None:
        """Several answers (a batch's) in one message: one write, one wake-up."""
        try:
            with self._locks[consumer_id]:
                self._writers[consumer_id].send(items)
        except (BrokenPipeError, OSError):
            logger.warning("HTTP process %d is gone: %d answers dropped", consumer_id, len(items))

    async def areceive(self, consumer_id: int, timeout: float | None = None, block: bool = True):
        """The next answer for this HTTP process, or None after ``timeout`` (at most 1 s)."""
        if self._closed:
            raise asyncio.CancelledError("transport closed")
        received = self._received[consumer_id]
        if received:
            return received.popleft()
        reader = self._readers[consumer_id]
        if not reader.poll():
            loop = asyncio.get_running_loop()
            readable = loop.create_future()
            loop.add_reader(reader.fileno(), lambda: readable.done() or readable.set_result(None))
            try:
                await asyncio.wait_for(readable, 1.0 if timeout is None else min(timeout, 1.0))
            except TimeoutError:
                return None
            finally:
                loop.remove_reader(reader.fileno())
        try:
            # uvloop's add_reader leaves the pipe non-blocking, and a message larger than
            # the pipe's buffer arrives in parts: read it whole (the main process writes
            # the rest at once), or a part not there yet would end this HTTP process's
            # answers for good.
            os.set_blocking(reader.fileno(), True)
            received.extend(reader.recv())
        except (EOFError, OSError):
            raise asyncio.CancelledError("transport closed") from None
        return received.popleft()

    def close(self, send_sentinel: bool = True) -> None:
        self._closed = True
        for writer in self._writers:
            with contextlib.suppress(OSError):
                writer.close()


def use_main_process_transport(server: ls.LitServer, num_api_servers: int) -> None:
    """Answers travel on one pipe per HTTP process, written only by the main process."""
    server._transport = PipeTransport(num_api_servers)


def transport(server: ls.LitServer) -> PipeTransport:
    return server._transport


def send_responses(
    server: ls.LitServer, consumer: int, replies: list[tuple[str, Any, bool]]
) -> None:
    """Answers ``(uid, payload, ok)`` for the HTTP process ``consumer``, in one message."""
    server._transport.send_all(
        [
            (
                uid,
                (
                    payload,
                    LitAPIStatus.OK if ok else LitAPIStatus.ERROR,
                    LoopResponseType.REGULAR,
                    0,
                ),
            )
            for uid, payload, ok in replies
        ],
        consumer,
    )


def register_response(server: ls.LitServer, uid: str) -> asyncio.Event:
    """In an HTTP process: the event set when the answer for ``uid`` arrives."""
    event = asyncio.Event()
    server.response_buffer[uid] = ResponseBufferItem(event)
    return event


def deliver_response(server: ls.LitServer, uid: str, payload: Any, ok: bool) -> None:
    """In an HTTP process: answer ``uid`` here, as LitServe's response task does."""
    item = server.response_buffer.get(uid)
    if item is None:
        return
    item.response = (payload, LitAPIStatus.OK if ok else LitAPIStatus.ERROR)
    item.event.set()


def take_response(server: ls.LitServer, uid: str) -> tuple[Any, bool] | None:
    """The answer for ``uid`` (payload, ok), or None; forgets ``uid`` either way."""
    item = server.response_buffer.pop(uid, None)
    if item is None or item.response is None:
        return None
    payload, status = item.response
    return payload, status == LitAPIStatus.OK


def response_queue_id(server: ls.LitServer) -> int:
    """Which HTTP process this is (LitServe numbers them when it forks them)."""
    return server.app.response_queue_id


def worker_devices(server: ls.LitServer, lit_api: ls.LitAPI) -> list:
    devices = []
    for device in server._inference_workers_config_for_api(lit_api.api_path):
        devices.append(device[0] if len(device) == 1 else device)
    return devices


def inference_worker_args(server: ls.LitServer, lit_api, device, worker_id: int, channel) -> tuple:
    """Arguments of ``litserve.loops.inference_worker`` for one supervised worker.

    ``channel`` goes where LitServe passes its request queue; the transport is unused
    (answers go back over the channel), and LitServe's restart protocol is off.
    The worker's setup status is registered as LitServe's launcher does: the worker
    reports READY or ERROR into it, and ``LitServer.run`` waits on it at start-up.
    """
    endpoint = lit_api.api_path.split("/")[-1]
    server.workers_setup_status[f"{endpoint}_{worker_id}"] = WorkerSetupStatus.STARTING
    return (
        lit_api,
        device,
        worker_id,
        channel,
        None,
        server.workers_setup_status,
        server._callback_runner,
        False,
    )


def trigger(server: ls.LitServer, event: EventTypes, **kwargs) -> None:
    """Fire a LitServe callback event (``LitServer(callbacks=...)``) from the HTTP process."""
    server._callback_runner.trigger_event(event.value, litserver=server, **kwargs)


def set_worker_processes(server: ls.LitServer, processes: list) -> None:
    """The worker processes LitServe's shutdown terminates if they are still there."""
    server.inference_workers = list(processes)


def request_shutdown(server: ls.LitServer) -> None:
    """Make ``LitServer.run`` return through its graceful shutdown."""
    server._shutdown_event.set()


def shutdown_requested(server: ls.LitServer) -> bool:
    return server._shutdown_event is not None
