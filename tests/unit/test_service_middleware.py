"""The server's HTTP protocol: each answer leaves as one send."""

from __future__ import annotations

import asyncio

import pytest

from service.middleware import TurnCoalescingTransport, header_timeout_protocol


class RecordingTransport(asyncio.Transport):
    """A socket's transport that records what is written to it."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data) -> None:
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name, default=None):
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 50000)}.get(
            name, default
        )

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def json_app(scope, receive, send) -> None:
    if scope["type"] != "http":
        return
    await receive()
    body = b'{"label": "card_arrival"}'
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def serve_requests(raw: bytes, answers: int) -> RecordingTransport:
    """Feeds ``raw`` to the server's protocol and waits for ``answers`` answers."""
    from uvicorn.config import Config
    from uvicorn.server import ServerState

    config = Config(app=json_app, lifespan="off", log_config=None)
    protocol = header_timeout_protocol(timeout=5.0)(config, ServerState(), {})
    transport = RecordingTransport()
    protocol.connection_made(transport)
    protocol.data_received(raw)
    for _ in range(200):
        await asyncio.sleep(0)
        if sum(write.count(b"HTTP/1.1 200") for write in transport.writes) == answers:
            break
    await asyncio.sleep(0)  # anything written after the last answer shows up too
    protocol.connection_lost(None)
    return transport


REQUEST = b"POST /v1/classify HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}"


def test_header_timeout_protocol_writes_each_answer_as_one_send():
    transport = asyncio.run(serve_requests(REQUEST, answers=1))

    # uvicorn writes the headers and the body with a write each; one send holds both.
    assert len(transport.writes) == 1
    head, _, body = transport.writes[0].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"content-length: 25" in head
    assert body == b'{"label": "card_arrival"}'


def test_header_timeout_protocol_answers_pipelined_requests_in_order():
    transport = asyncio.run(serve_requests(REQUEST * 2, answers=2))

    sent = b"".join(transport.writes)
    assert sent.count(b"HTTP/1.1 200") == 2
    assert sent.count(b'{"label": "card_arrival"}') == 2
    assert len(transport.writes) <= 2  # never more sends than answers


@pytest.mark.parametrize("closing", [False, True])
def test_turn_coalescing_transport_sends_what_is_held_before_it_closes(closing):
    async def scenario() -> RecordingTransport:
        inner = RecordingTransport()
        transport = TurnCoalescingTransport(inner, asyncio.get_running_loop())
        transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
        transport.write(b"body")
        assert inner.writes == []  # held until the end of the turn
        if closing:
            transport.close()
            assert inner.closed
        await asyncio.sleep(0)
        return inner

    inner = asyncio.run(scenario())

    assert inner.writes == [b"HTTP/1.1 200 OK\r\n\r\nbody"]


def test_turn_coalescing_transport_drops_what_is_held_once_the_connection_is_gone():
    async def scenario() -> RecordingTransport:
        inner = RecordingTransport()
        transport = TurnCoalescingTransport(inner, asyncio.get_running_loop())
        transport.write(b"late answer")
        inner.closed = True  # the client went away within the same turn
        await asyncio.sleep(0)
        assert transport.is_closing()  # everything else is the real transport's
        return inner

    assert asyncio.run(scenario()).writes == []
