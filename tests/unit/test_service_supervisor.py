"""The dispatcher: an idle worker takes everything queued at once; nothing waits for a batch.
The threads a batch runs with: every core for a lone batch, one share each when all are busy."""

import asyncio
import multiprocessing as mp
import threading
import time
from types import SimpleNamespace

import pytest

from service.config import Settings
from service.supervisor import Dispatcher, QueuedRequest, RequestPipes, SharedState, Supervisor

pytestmark = pytest.mark.unit


def queued(uid: str, deadline_in: float = 30.0, waited: float = 0.0) -> QueuedRequest:
    now = time.monotonic()
    return QueuedRequest(
        "/v1/classify",
        0,
        uid,
        uid,
        now - waited,
        now + deadline_in,
        {"texts": ["hi"]},
        ("in_flight",),
    )


@pytest.fixture()
def dispatcher():
    return Dispatcher("/v1/classify", 0, SharedState({"/v1/classify": 1}), queue_timeout=10.0)


def test_dispatcher_hands_over_what_is_queued_without_waiting(dispatcher):
    for uid in "abc":
        dispatcher.add(queued(uid))
    started = time.monotonic()
    runnable, expired = dispatcher.take(limit=32, timeout=5.0)
    assert [r.uid for r in runnable] == ["a", "b", "c"] and expired == []
    assert time.monotonic() - started < 1.0  # not the 5 s timeout: the queue was not empty


def test_dispatcher_batches_up_to_the_limit_in_arrival_order(dispatcher):
    for uid in "abcde":
        dispatcher.add(queued(uid))
    first, _ = dispatcher.take(limit=2, timeout=0.1)
    second, _ = dispatcher.take(limit=32, timeout=0.1)
    assert [r.uid for r in first] == ["a", "b"] and [r.uid for r in second] == ["c", "d", "e"]


def test_dispatcher_separates_requests_past_their_deadline_or_queue_timeout(dispatcher):
    dispatcher.add(queued("late", deadline_in=-0.1))
    dispatcher.add(queued("stale", waited=11.0))
    dispatcher.add(queued("fine"))
    runnable, expired = dispatcher.take(limit=32, timeout=0.1)
    assert [r.uid for r in runnable] == ["fine"]
    assert sorted(r.uid for r in expired) == ["late", "stale"]


def test_shared_slots_are_bounded_and_released(dispatcher):
    shared = dispatcher.shared
    assert shared.try_acquire("in_flight", 2) and shared.try_acquire("in_flight", 2)
    assert not shared.try_acquire("in_flight", 2)
    shared.release(("in_flight",))
    assert shared.in_flight() == 1


def threads_supervisor(workers: int = 2, **settings) -> tuple[Supervisor, list]:
    settings.setdefault("adaptive_threads", True)
    config = Settings(
        device=settings.pop("device", "cpu"), workers=workers, torch_threads=1, **settings
    )
    supervisor = Supervisor(None, SharedState({"/v1/classify": workers}), config)
    handles = [SimpleNamespace(base_threads=1, threads=0) for _ in range(workers)]
    supervisor.handles = handles
    return supervisor, handles


def test_supervisor_gives_a_lone_batch_every_core():
    supervisor, (first, _) = threads_supervisor()
    assert supervisor.threads_for(first) == 2  # the other worker is idle: both cores


def test_supervisor_shares_cores_while_workers_are_busy():
    supervisor, (first, second, *_) = threads_supervisor(workers=4)
    assert supervisor.threads_for(first) == 4
    # The first still runs with every core: the next one gets its own share, no more.
    assert supervisor.threads_for(second) == 1
    supervisor.idle(first)
    assert supervisor.threads_for(first) == 3  # what the busy second worker leaves free
    supervisor.idle(first)
    supervisor.idle(second)
    assert supervisor.threads_for(second) == 4


def test_supervisor_keeps_threads_fixed_when_adaptive_threads_are_off_or_on_a_gpu():
    supervisor, (first, _) = threads_supervisor(adaptive_threads=False)
    assert supervisor.threads_for(first) == 1
    supervisor, (first, _) = threads_supervisor(device="cuda")
    assert supervisor.threads_for(first) == 1


def test_dispatcher_gives_work_to_the_idle_worker_of_lowest_rank(dispatcher):
    taken: dict[int, list[str]] = {}

    def worker(rank: int) -> None:
        runnable, _ = dispatcher.take(limit=32, timeout=1.0, rank=rank)
        taken[rank] = [r.uid for r in runnable]

    threads = [threading.Thread(target=worker, args=(rank,)) for rank in (1, 0)]
    for thread in threads:
        thread.start()
    while dispatcher.idle != {0, 1}:
        time.sleep(0.01)
    dispatcher.add(queued("a"))
    for thread in threads:
        thread.join()
    assert taken == {0: ["a"], 1: []}


def test_supervisor_gives_a_lone_batch_every_core_by_default_on_cpu():
    config = Settings(device="cpu", workers=2, torch_threads=1)
    supervisor = Supervisor(None, SharedState({"/v1/classify": 2}), config)
    supervisor.handles = [SimpleNamespace(base_threads=1, threads=0) for _ in range(2)]
    assert supervisor.threads_for(supervisor.handles[0]) == 2


def _http_process(pipes: RequestPipes, producer: int, uids: str) -> None:
    pipes.keep_only(producer)
    for uid in uids:
        pipes.send(producer, queued(uid))


def test_request_pipes_bring_each_http_process_requests_in_order_and_end_with_it():
    pipes = RequestPipes(2)
    fork = mp.get_context("fork")
    senders = [
        fork.Process(target=_http_process, args=(pipes, producer, uids))
        for producer, uids in enumerate(["abc", "xyz"])
    ]
    for sender in senders:
        sender.start()
    pipes.close_writers()  # as the main process does once the HTTP processes run
    received: list[str] = []
    deadline = time.monotonic() + 10
    while len(received) < 6 and time.monotonic() < deadline:
        received += [request.uid for request in pipes.receive(0.5)]
    for sender in senders:
        sender.join(10)
    assert sorted(received) == list("abcxyz")
    assert [u for u in received if u in "abc"] == list("abc")  # one process's order kept
    # Both HTTP processes are gone: their pipes read as ended and are dropped, not polled.
    assert pipes.receive(0.5) == [] and pipes.receive(0.1) == []
    assert pipes._readers == []


def test_request_pipes_send_the_requests_of_one_event_loop_turn_as_one_message():
    pipes = RequestPipes(1)
    reader = pipes._readers[0]

    async def queue_three() -> bool:
        for uid in "abc":
            pipes.send(0, queued(uid))
        written_at_once = reader.poll()
        await asyncio.sleep(0)  # the end of this turn
        return written_at_once

    assert asyncio.run(queue_three()) is False
    assert [r.uid for r in reader.recv()] == ["a", "b", "c"]  # one message, in order
    assert not reader.poll()
    pipes.send(0, queued("d"))  # no running event loop: written at once
    assert [r.uid for r in pipes.receive(1.0)] == ["d"]


def test_request_pipes_report_requests_the_main_process_can_no_longer_read():
    pipes = RequestPipes(1)
    lost: list[str] = []
    pipes.keep_only(0, lost=lambda requests: lost.extend(r.uid for r in requests))

    async def queue_two() -> None:
        pipes.send(0, queued("a"))
        pipes.send(0, queued("b"))
        await asyncio.sleep(0)

    asyncio.run(queue_two())  # keep_only closed the read end: the main process is gone
    assert lost == ["a", "b"]


def test_request_pipes_report_requests_that_cannot_be_written_at_all():
    pipes = RequestPipes(1)
    lost: list[str] = []
    pipes._lost = lambda requests: lost.extend(r.uid for r in requests)
    unpicklable = queued("bad")
    unpicklable.payload = lambda: None

    async def queue_one() -> None:
        pipes.send(0, unpicklable)
        await asyncio.sleep(0)

    asyncio.run(queue_one())
    assert lost == ["bad"]


def test_supervisor_answers_a_batch_with_one_message_per_http_process():
    from service import litserve_compat

    transport = litserve_compat.PipeTransport(2)
    server = SimpleNamespace(_transport=transport)
    shared = SharedState({"/v1/classify": 1})
    supervisor = Supervisor(server, shared, Settings(device="cpu"))
    requests = [queued(uid) for uid in "abcd"]
    for request, consumer in zip(requests, (0, 1, 0, 0), strict=True):
        request.consumer = consumer
        assert shared.try_acquire("in_flight", 10)
    supervisor.answer_all(
        [
            (requests[0], "ok", b"{}"),
            (requests[1], "ok", b"{}"),
            (requests[2], "error", (422, "texts[0]: empty")),
            (requests[3], "expired", None),
        ]
    )
    assert shared.in_flight() == 0  # every slot released
    first = transport._readers[0].recv()
    assert [(uid, payload[0]) for uid, payload in first] == [
        ("a", b"{}"),
        ("c", (422, "texts[0]: empty", {})),
        ("d", (504, "no answer within the request timeout; try again later", {})),
    ]
    assert [uid for uid, _ in transport._readers[1].recv()] == ["b"]
    assert not transport._readers[0].poll() and not transport._readers[1].poll()
