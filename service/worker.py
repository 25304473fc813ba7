"""The model worker process: one LitAPI's model, serving the batches the supervisor sends.

Each worker is started by :mod:`service.supervisor` with LitServe's own
``inference_worker`` as its body (setup, setup status, the setup callbacks), and
:class:`SupervisedLoop` as the API's loop. The loop reads its batches from a pipe of
its own (single reader, single writer: a killed worker can corrupt nothing that
another process uses) and writes the answers back on the same pipe; a heartbeat in
shared memory tells the supervisor that the process still runs.

Within a batch, one request's failure stays that request's failure: requests are
decoded and encoded one by one, and when the batched ``predict`` raises, its requests
are retried one at a time so that only the culprit gets the error.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from fastapi import HTTPException
from litserve.callbacks import EventTypes
from litserve.loops import LitLoop, inference_worker
from pydantic import ConfigDict, TypeAdapter

from service.heap import freeze_startup_heap
from service.logs import REQUEST_ID, configure_logging
from service.signals import ignore_shutdown_signals

logger = logging.getLogger(__name__)
WORKER_NAME = "supportlens-worker"
HEARTBEAT_S = 0.25

# Ctrl+C in a terminal signals the whole process group (SIGINT), and so do systemd's
# KillMode=control-group and `kill -TERM -<pgid>` (SIGTERM); the server's main process
# drives the shutdown and stops each worker once it has answered what it holds. So a
# worker ignores both from the moment its interpreter imports this module (the first
# import of a spawned worker: its target lives here), long before the model is loaded.
if mp.current_process().name.startswith(WORKER_NAME):
    ignore_shutdown_signals()


class Expired:
    """What ``predict`` returns for a request whose deadline passed before its turn."""


EXPIRED = Expired()


@dataclass
class Job:
    """One request as sent to a worker."""

    uid: str
    request_id: str
    deadline: float  # time.monotonic(): one clock for every process of the machine
    payload: Any


@dataclass
class WorkerChannel:
    """What a worker gets in place of LitServe's shared request queue."""

    conn: Connection
    heartbeat: Any  # multiprocessing RawValue("d"): the worker's last sign of life


def run_worker(*args) -> None:
    """Process target: LitServe's ``inference_worker`` with this service's logging."""
    ignore_shutdown_signals()
    lit_api = args[0]
    configure_logging(lit_api.settings.log_level, lit_api.settings.log_format)
    inference_worker(*args)


_JSON = TypeAdapter(Any, config=ConfigDict(ser_json_inf_nan="null"))  # strict JSON: no NaN


def to_json(response: Any) -> bytes:
    """The response body, serialized once, here.

    The HTTP process sends these bytes as they are (``service.app.dispatch``). Left to
    FastAPI, the route's ``response_model`` would dump the model, validate the dump
    again and serialize it, in the HTTP process that every request of the server shares
    and on the path of each answer; the worker's own pydantic validation (in
    ``encode_response``) already holds the response to that schema.
    """
    return _JSON.dump_json(response)


def _error(error: Exception) -> tuple[int, str]:
    if isinstance(error, HTTPException):
        return error.status_code, str(error.detail)
    # Never include the exception text: it may quote the user's message.
    logger.error("request failed: %s", type(error).__name__)
    return 500, "internal error while processing this request"


class SupervisedLoop(LitLoop):
    """Serves batches from a :class:`WorkerChannel` until the supervisor sends ``None``.

    Each batch arrives as ``(threads, jobs)``: the torch threads to run it with, and
    the requests.

    Answers: one message per batch once it is over, ``("done", answers)``, an answer per
    request: ``("ok", uid, body)``, ``("error", uid, (status, detail))`` or
    ``("expired", uid)``. One message rather than one per request: each pipe message
    costs a pickle, a write and a wake-up of the reader in the worker, again in the main
    process that forwards the answers, and in the HTTP process; per batch, they cost
    far less than the request's own work (``benchmarks/results/backends.md``).
    """

    def __call__(
        self,
        lit_api,
        device,
        worker_id,
        request_queue,
        transport,
        workers_setup_status,
        callback_runner,
    ):
        channel: WorkerChannel = request_queue
        self.callbacks = callback_runner

        def beat() -> None:
            while True:
                channel.heartbeat.value = time.monotonic()
                time.sleep(HEARTBEAT_S)

        threading.Thread(target=beat, daemon=True, name="heartbeat").start()
        logger.info("model loaded on %s; serving %s", device, lit_api.api_path)
        freeze_startup_heap(f"model worker {lit_api.api_path} {worker_id}")
        channel.conn.send(("ready", os.getpid()))
        while True:
            try:
                message = channel.conn.recv()
            except (EOFError, OSError):
                return
            if message is None:
                return
            threads, jobs = message
            self.use_threads(lit_api, threads)
            channel.conn.send(("done", self.serve(lit_api, jobs)))

    def use_threads(self, lit_api, threads: int) -> None:
        """Run the next batch with ``threads`` torch threads (the supervisor's choice)."""
        import torch

        from service import metrics

        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
        metrics.BATCH_THREADS.labels(api=lit_api.api_path).observe(threads)

    def _event(self, event: EventTypes, lit_api) -> None:
        self.callbacks.trigger_event(event.value, lit_api=lit_api)

    def _predict(self, lit_api, inputs: list[Any]) -> list[Any]:
        self._event(EventTypes.BEFORE_PREDICT, lit_api)
        outputs = list(lit_api.unbatch(lit_api.predict(lit_api.batch(inputs))))
        self._event(EventTypes.AFTER_PREDICT, lit_api)
        return outputs

    def serve(self, lit_api, jobs: list[Job]) -> list[tuple]:
        """Run one batch; its answers, one per job (in no particular order)."""
        answers: list[tuple] = []
        decoded: list[tuple[Job, Any]] = []
        for job in jobs:
            if time.monotonic() > job.deadline:  # already answered 504: no work for it
                answers.append(("expired", job.uid))
                continue
            token = REQUEST_ID.set(job.request_id)
            try:
                self._event(EventTypes.BEFORE_DECODE_REQUEST, lit_api)
                context = {"deadline": job.deadline, "request_id": job.request_id}
                decoded.append((job, lit_api.decode_request(job.payload, context=context)))
                self._event(EventTypes.AFTER_DECODE_REQUEST, lit_api)
            except Exception as error:
                answers.append(("error", job.uid, _error(error)))
            finally:
                REQUEST_ID.reset(token)
        if not decoded:
            return answers
        try:
            outputs = self._predict(lit_api, [x for _, x in decoded])
            answered = list(zip(decoded, outputs, strict=True))
        except Exception as error:
            if len(decoded) == 1:
                answers.append(("error", decoded[0][0].uid, _error(error)))
                return answers
            logger.warning(
                "batch of %d failed (%s); retrying its requests one by one",
                len(decoded),
                type(error).__name__,
            )
            answered = []
            for item in decoded:
                token = REQUEST_ID.set(item[0].request_id)
                try:
                    answered.append((item, self._predict(lit_api, [item[1]])[0]))
                except Exception as single_error:
                    answers.append(("error", item[0].uid, _error(single_error)))
                finally:
                    REQUEST_ID.reset(token)
        for (job, _), output in answered:
            if output is EXPIRED:
                answers.append(("expired", job.uid))
                continue
            try:
                self._event(EventTypes.BEFORE_ENCODE_RESPONSE, lit_api)
                body = to_json(lit_api.encode_response(output))
                self._event(EventTypes.AFTER_ENCODE_RESPONSE, lit_api)
            except Exception as error:
                answers.append(("error", job.uid, _error(error)))
                continue
            answers.append(("ok", job.uid, body))
        return answers
