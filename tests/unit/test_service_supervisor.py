"""The dispatcher: an idle worker takes everything queued at once; nothing waits for a batch."""

import time

import pytest

from service.supervisor import Dispatcher, QueuedRequest, SharedState

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
