"""The worker loop: LitServe callbacks fire, one request's failure stays its own, expired
requests get no work, each batch runs with the threads it was sent."""

import gc
import multiprocessing as mp
import time

import pytest
import torch
from fastapi import HTTPException
from litserve.callbacks import Callback, CallbackRunner

from service.worker import Job, SupervisedLoop, WorkerChannel

pytestmark = pytest.mark.unit


class Recorder(Callback):
    def __init__(self):
        self.events = []

    def __getattribute__(self, name):
        if name.startswith("on_"):
            return lambda *args, **kwargs: object.__getattribute__(self, "events").append(name)
        return object.__getattribute__(self, name)


class EchoAPI:
    """Upper-cases texts; a text "bad" fails the whole batch, "refuse" is a 422."""

    api_path = "/v1/echo"

    def __init__(self):
        self.batches = []

    def decode_request(self, request, context=None):
        if request == "refuse":
            raise HTTPException(422, "texts[0]: refused")
        return request

    def batch(self, inputs):
        self.batches.append(list(inputs))
        return inputs

    def predict(self, batch):
        if "bad" in batch:
            raise RuntimeError("secret user text in the message")
        return [x.upper() for x in batch]

    def unbatch(self, output):
        return output

    def encode_response(self, output):
        return {"text": output}


def serve(jobs):
    api, recorder = EchoAPI(), Recorder()
    loop = SupervisedLoop()
    loop.callbacks = CallbackRunner([recorder])
    answers = {answer[1]: answer for answer in loop.serve(api, jobs)}
    return api, recorder, answers


def job(uid, payload, deadline_in=30.0):
    return Job(uid, f"rid-{uid}", time.monotonic() + deadline_in, payload)


def test_worker_loop_fires_litserve_callbacks_in_order():
    _, recorder, answers = serve([job("a", "hi")])
    assert answers["a"] == ("ok", "a", b'{"text":"HI"}')  # serialized in the worker
    assert recorder.events == [
        "on_before_decode_request",
        "on_after_decode_request",
        "on_before_predict",
        "on_after_predict",
        "on_before_encode_response",
        "on_after_encode_response",
    ]


def test_worker_loop_keeps_one_failure_to_its_request():
    api, _, answers = serve([job("a", "one"), job("b", "bad"), job("c", "refuse"), job("d", "two")])
    assert answers["a"] == ("ok", "a", b'{"text":"ONE"}')
    assert answers["d"] == ("ok", "d", b'{"text":"TWO"}')
    assert answers["c"] == ("error", "c", (422, "texts[0]: refused"))
    # The failing request gets a 500 without the exception's text (it may quote the user).
    assert answers["b"] == ("error", "b", (500, "internal error while processing this request"))
    assert api.batches[0] == ["one", "bad", "two"]  # batched first, then one by one


def test_worker_loop_gives_no_work_to_an_expired_request():
    api, _, answers = serve([job("late", "x", deadline_in=-1.0), job("fine", "y")])
    assert answers["late"] == ("expired", "late")
    assert answers["fine"][0] == "ok"
    assert api.batches == [["y"]]


def test_worker_loop_runs_each_batch_with_the_threads_it_was_sent():
    before = torch.get_num_threads()
    try:
        SupervisedLoop().use_threads(EchoAPI(), 1)
        assert torch.get_num_threads() == 1
        SupervisedLoop().use_threads(EchoAPI(), 2)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_worker_loop_answers_a_batch_in_one_message_and_freezes_its_startup_heap():
    """The loop as a worker process runs it: ready, then one message per batch; the
    objects of start-up (the loaded model) are frozen out of garbage collection first."""
    gc.unfreeze()
    parent, child = mp.Pipe()
    channel = WorkerChannel(child, mp.RawValue("d", 0.0))
    loop = SupervisedLoop()
    parent.send((1, [job("a", "one"), job("b", "refuse"), job("c", "two")]))
    parent.send(None)  # then stop
    before = torch.get_num_threads()
    try:
        loop(EchoAPI(), "cpu", 0, channel, None, None, CallbackRunner([]))
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        torch.set_num_threads(before)
    assert parent.recv()[0] == "ready"
    kind, answers = parent.recv()
    assert kind == "done"
    assert sorted(answers) == [
        ("error", "b", (422, "texts[0]: refused")),
        ("ok", "a", b'{"text":"ONE"}'),
        ("ok", "c", b'{"text":"TWO"}'),
    ]
    assert not parent.poll()
