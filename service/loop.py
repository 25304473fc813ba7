"""A batched LitServe loop in which one request's failure stays that request's failure.

LitServe's ``BatchedLoop`` answers every request of a batch with the same error when
``decode_request``, ``predict`` or ``encode_response`` raises for any one of them, so
one bad input would fail the other clients sharing its batch. This loop decodes and
encodes request by request, and when the batched ``predict`` fails it retries the
requests one at a time so that only the culprit gets the error.

It also gathers batches differently: LitServe polls the request queue every
millisecond, and every poll is a round trip to the multiprocessing manager, so each
idle worker kept itself and the manager busy (about a tenth of a core on 2 cores,
taken from the workers that had requests). Here a worker blocks on the queue until a
request arrives, then gathers more for at most ``batch_timeout`` (the usual dynamic
batching delay, counted from the first request) or until the batch is full.
"""

from __future__ import annotations

import logging
import time
from queue import Empty
from typing import Any

from fastapi import HTTPException
from litserve.loops.base import _SENTINEL_VALUE, _StopLoopError
from litserve.loops.simple_loops import BatchedLoop
from litserve.utils import LitAPIStatus, LoopResponseType, PickleableHTTPException

logger = logging.getLogger(__name__)
# Longest single wait on an empty queue; the loop then checks again (and can be stopped).
IDLE_WAIT_S = 0.5


class PerRequestBatchedLoop(BatchedLoop):
    """``BatchedLoop`` with per-request error isolation (see the module docstring)."""

    def _fail(self, transport, response_queue_id, uid, error: Exception) -> None:
        if isinstance(error, HTTPException):
            self.put_response(
                transport,
                response_queue_id,
                uid,
                PickleableHTTPException.from_exception(error),
                LitAPIStatus.ERROR,
                LoopResponseType.REGULAR,
            )
        else:
            # Never include the exception text: it may quote the user's message.
            logger.error("request %s failed: %s", uid, type(error).__name__)
            self.put_response(
                transport,
                response_queue_id,
                uid,
                PickleableHTTPException(500, "internal error while processing this request"),
                LitAPIStatus.ERROR,
                LoopResponseType.REGULAR,
            )

    def get_batch_requests(self, lit_api, request_queue, transport):
        """Up to ``max_batch_size`` requests: (payloads, uids that waited too long)."""
        payloads: list[tuple[int, str, Any]] = []
        timed_out: list[tuple[int, str]] = []
        try:
            item = request_queue.get(timeout=IDLE_WAIT_S)
        except Empty:
            return payloads, timed_out
        deadline = time.monotonic() + lit_api.batch_timeout
        apply_timeout = lit_api.request_timeout not in (-1, False)
        while True:
            if item == _SENTINEL_VALUE:
                raise _StopLoopError()
            response_queue_id, uid, timestamp, payload = item
            if apply_timeout and time.monotonic() - timestamp > lit_api.request_timeout:
                timed_out.append((response_queue_id, uid))
            else:
                payloads.append((response_queue_id, uid, payload))
            if len(payloads) >= lit_api.max_batch_size:
                break
            remaining = deadline - time.monotonic()
            try:
                # Past the deadline, still take what is already queued.
                item = (
                    request_queue.get(timeout=remaining)
                    if remaining > 0
                    else request_queue.get_nowait()
                )
            except Empty:
                break
        return payloads, timed_out

    def _run_batch(self, lit_api, items: list[tuple[int, str, Any]]) -> list[Any]:
        batch = lit_api.batch([x for _, _, x in items])
        return list(lit_api.unbatch(lit_api.predict(batch)))

    def run_batched_loop(self, lit_api, request_queue, transport, callback_runner, lit_spec=None):
        while True:
            try:
                requests, timed_out = self.get_batch_requests(lit_api, request_queue, transport)
            except _StopLoopError:
                return
            for response_queue_id, uid in timed_out:
                self._fail(
                    transport,
                    response_queue_id,
                    uid,
                    HTTPException(504, "request waited in the queue longer than the queue timeout"),
                )
            if not requests:
                continue

            decoded = []
            for response_queue_id, uid, payload in requests:
                try:
                    decoded.append((response_queue_id, uid, lit_api.decode_request(payload)))
                except Exception as error:
                    self._fail(transport, response_queue_id, uid, error)
            if not decoded:
                continue

            try:
                outputs = self._run_batch(lit_api, decoded)
                groups = list(zip(decoded, outputs, strict=True))
            except Exception as error:
                if len(decoded) == 1:
                    self._fail(transport, decoded[0][0], decoded[0][1], error)
                    continue
                logger.warning(
                    "batch of %d failed (%s); retrying its requests one by one",
                    len(decoded),
                    type(error).__name__,
                )
                groups = []
                for item in decoded:
                    try:
                        groups.append((item, self._run_batch(lit_api, [item])[0]))
                    except Exception as single_error:
                        self._fail(transport, item[0], item[1], single_error)

            for (response_queue_id, uid, _), output in groups:
                try:
                    encoded = lit_api.encode_response(output)
                except Exception as error:
                    self._fail(transport, response_queue_id, uid, error)
                    continue
                self.put_response(
                    transport,
                    response_queue_id,
                    uid,
                    encoded,
                    LitAPIStatus.OK,
                    LoopResponseType.REGULAR,
                )
