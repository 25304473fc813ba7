"""Contract with LitServe's private internals (service/litserve_compat.py).

Fails loudly when a LitServe upgrade renames or reshapes what the service relies on.
"""

import asyncio
import inspect
import os
import re
import struct
import threading
import time
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from types import SimpleNamespace

import litserve as ls
import pytest
import uvloop
from litserve import loops, server, utils
from litserve.transport.base import MessageTransport

from service import litserve_compat

pytestmark = pytest.mark.unit


def test_litserve_is_the_pinned_version():
    assert ls.__version__ == litserve_compat.LITSERVE_VERSION
    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    assert f'"litserve=={litserve_compat.LITSERVE_VERSION}"' in pyproject


def _params(function) -> list[str]:
    return list(inspect.signature(function).parameters)


def test_litserver_private_methods_keep_their_signatures():
    assert _params(ls.LitServer._init_manager) == ["self", "num_api_servers"]
    assert _params(ls.LitServer._start_worker_monitoring) == ["self", "manager", "uvicorn_workers"]
    assert _params(ls.LitServer._perform_graceful_shutdown) == [
        "self",
        "manager",
        "uvicorn_workers",
        "shutdown_reason",
    ]
    assert _params(ls.LitServer.launch_inference_worker) == ["self", "lit_api"]
    assert _params(ls.LitServer._inference_workers_config_for_api) == ["self", "api_path"]
    assert "lifespan" in vars(ls.LitServer)


def test_litserver_run_calls_the_hooked_steps_in_order():
    source = inspect.getsource(ls.LitServer.run)
    steps = [
        "self._init_manager(",
        "self.launch_inference_worker(",
        "self.verify_worker_status()",
        "self._start_server(",
        "self._start_worker_monitoring(",
        "self._shutdown_event.wait()",
        "self._perform_graceful_shutdown(",
    ]
    positions = [source.index(step) for step in steps]
    assert positions == sorted(positions)
    assert "if self._monitor_workers:" in source


def test_litserver_state_used_by_the_service_exists():
    source = inspect.getsource(ls.LitServer.__init__)
    for attribute in ("self.response_buffer", "self._callback_runner", "self._shutdown_event"):
        assert attribute in source
    manager_source = inspect.getsource(ls.LitServer._init_manager)
    assert "self.workers_setup_status = manager.dict()" in manager_source
    assert "self._transport = " in manager_source
    start_source = inspect.getsource(ls.LitServer._start_server)
    assert "self.app.response_queue_id = response_queue_id" in start_source


def test_inference_worker_signature_and_setup_status():
    assert _params(loops.inference_worker) == [
        "lit_api",
        "device",
        "worker_id",
        "request_queue",
        "transport",
        "workers_setup_status",
        "callback_runner",
        "restart_workers",
    ]
    source = inspect.getsource(loops.inference_worker)
    assert 'workers_setup_status[f"{endpoint}_{worker_id}"] = WorkerSetupStatus.READY' in source
    assert "loop(" in source


def test_response_task_reads_the_transport_format():
    source = inspect.getsource(server.response_queue_to_buffer)
    assert "uid, (*response, response_type, worker_id) = result" in source
    assert "response_item.response = response" in source
    assert "response_item.event.set()" in source  # as deliver_response does
    fields = {f for f in utils.ResponseBufferItem.__dataclass_fields__}
    assert {"event", "response"} <= fields
    assert {"OK", "ERROR"} <= set(vars(utils.LitAPIStatus))
    assert "await transport.areceive(consumer_id)" in source
    assert "if result is None:" in source  # a receive that timed out
    assert _params(MessageTransport.send) == ["self", "item", "consumer_id"]
    assert MessageTransport.__abstractmethods__ == {"send", "areceive"}
    shutdown = inspect.getsource(ls.LitServer._perform_graceful_shutdown)
    assert "self._transport.close(send_sentinel=" in shutdown


def test_deliver_response_answers_a_waiting_request_in_the_http_process():
    async def deliver() -> tuple:
        fake = SimpleNamespace(response_buffer={})
        event = litserve_compat.register_response(fake, "u1")
        litserve_compat.deliver_response(fake, "u1", (503, "retry", {}), ok=False)
        litserve_compat.deliver_response(fake, "gone", (503, "retry", {}), ok=False)  # no-op
        await asyncio.wait_for(event.wait(), 1)
        return litserve_compat.take_response(fake, "u1"), fake.response_buffer

    answer, left = asyncio.run(deliver())
    assert answer == ((503, "retry", {}), False)
    assert left == {}


def test_pipe_transport_delivers_answers_to_the_event_loop_in_order():
    transport = litserve_compat.PipeTransport(2)

    async def receive(consumer):
        return await transport.areceive(consumer)

    transport.send(("a", ("body-a", "ok", "regular", 0)), 1)
    transport.send(("b", ("body-b", "ok", "regular", 0)), 1)
    assert asyncio.run(receive(1))[0] == "a"
    assert asyncio.run(receive(1))[0] == "b"
    assert asyncio.run(transport.areceive(0, timeout=0.05)) is None  # nothing for consumer 0


def test_pipe_transport_sends_a_batch_of_answers_as_one_message():
    transport = litserve_compat.PipeTransport(1)
    transport.send_all([(uid, (uid, "ok", "regular", 0)) for uid in "abc"], 0)
    reader = transport._readers[0]

    async def receive_three():
        return [(await transport.areceive(0, timeout=1))[0] for _ in range(3)]

    assert asyncio.run(receive_three()) == ["a", "b", "c"]
    assert not reader.poll()  # all three came in the one message
    assert asyncio.run(transport.areceive(0, timeout=0.05)) is None


def _send_slowly(transport, items, consumer: int) -> None:
    """Write one message as a writer that is descheduled halfway through does."""
    payload = ForkingPickler.dumps(items)
    message = struct.pack("!i", len(payload)) + bytes(payload)
    fd = transport._writers[consumer].fileno()
    half = len(message) // 2
    os.write(fd, message[:half])
    time.sleep(0.3)
    while half < len(message):  # os.write may write less than asked
        half += os.write(fd, message[half:])


@pytest.mark.parametrize("loop_factory", [asyncio.new_event_loop, uvloop.new_event_loop])
def test_pipe_transport_reads_a_message_that_arrives_in_parts_on_any_event_loop(loop_factory):
    # uvicorn runs on uvloop when it is installed, and uvloop's add_reader makes the
    # pipe non-blocking: a message the main process is still writing (any message
    # larger than the pipe's buffer) must still be read whole, and the next one too.
    transport = litserve_compat.PipeTransport(1)
    first = [(f"u{i}", ("x" * 1000, "ok", "regular", 0)) for i in range(30)]

    async def receive_all() -> list[str]:
        threading.Timer(0.1, _send_slowly, (transport, first, 0)).start()  # while it waits
        uids = [(await transport.areceive(0, timeout=5))[0] for _ in first]
        threading.Timer(0.1, transport.send, (("after", ("y", "ok", "regular", 0)), 0)).start()
        uids.append((await transport.areceive(0, timeout=5))[0])
        return uids

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        assert runner.run(receive_all()) == [uid for uid, _ in first] + ["after"]


def test_pipe_transport_wakes_the_loop_when_an_answer_arrives():
    transport = litserve_compat.PipeTransport(1)

    async def receive_while_sent():
        later = threading.Timer(0.1, transport.send, (("late", ("x", "ok", "regular", 0)), 0))
        later.start()
        return await transport.areceive(0, timeout=5)

    assert asyncio.run(receive_while_sent())[0] == "late"


def test_pipe_transport_drops_answers_for_a_consumer_that_is_gone():
    transport = litserve_compat.PipeTransport(2)
    transport.close_readers()  # as after the HTTP processes forked, one of which then died
    transport.send(("a", ("x" * 200_000, "ok", "regular", 0)), 0)  # no hang, no exception


def test_compat_module_is_the_only_place_with_litserve_privates():
    service = Path(litserve_compat.__file__).parent
    private = re.compile(r"\._(init_manager|transport|callback_runner|shutdown_event|start_worker)")
    offenders = [
        path.name
        for path in service.glob("*.py")
        if path.name != "litserve_compat.py" and private.search(path.read_text())
    ]
    assert offenders == []
