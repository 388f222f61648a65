"""Connection hygiene, on real sockets against a real API process: idle, slow-header and slow-body connections
are closed, and a process holds a bounded number of connections (api/http.py; the settings' defaults are in
the README). Short limits here, so each case takes a few seconds."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import orjson
import pytest
from cassandra.cluster import Session

from api.http import _HeadWithBody
from devstack import Profile
from tests.support import TEST_KEY, Service, start_api, view

IDLE_S, HEADER_S, BODY_S, MAX_CONNECTIONS = 2.0, 1.5, 1.5, 8


@pytest.fixture(scope="module")
def guarded_api(cassandra: Session, profile: Profile, log_dir: Path) -> Iterator[Service]:
    service = start_api(
        profile, log_dir, name="api-connections", SLUICE_API_PORT=str(profile.api_port + 4),
        SLUICE_REDIS_URL=f"redis://127.0.0.1:{profile.redis_port}/10",
        SLUICE_HTTP_IDLE_TIMEOUT_S=str(IDLE_S), SLUICE_HTTP_HEADER_TIMEOUT_S=str(HEADER_S),
        SLUICE_HTTP_BODY_TIMEOUT_S=str(BODY_S), SLUICE_HTTP_MAX_CONNECTIONS=str(MAX_CONNECTIONS),
    )  # fmt: skip
    yield service
    service.stop()


def connect(api: Service) -> socket.socket:
    host, port = api.base_url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def read_until_closed(sock: socket.socket, within: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and when it closed (seconds from now)."""
    started = time.monotonic()
    sock.settimeout(within)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        raise AssertionError(f"still open after {within} s; got {data[:200]!r}") from None
    except ConnectionResetError:
        pass
    return data, time.monotonic() - started


def trickle(sock: socket.socket, data: bytes, every: float, until: float) -> None:
    """Send ``data`` a byte at a time, one every ``every`` seconds, for at most ``until`` seconds (or until the
    server closes)."""
    deadline = time.monotonic() + until
    for byte in data:
        if time.monotonic() > deadline:
            return
        try:
            sock.send(bytes([byte]))
        except (BrokenPipeError, ConnectionResetError):
            return
        time.sleep(every)


def test_an_idle_connection_is_closed_new_or_kept_alive(guarded_api: Service) -> None:
    with connect(guarded_api) as fresh:
        data, after = read_until_closed(fresh, IDLE_S + 3)
    assert data == b""
    assert IDLE_S - 0.5 <= after <= IDLE_S + 1.5
    with connect(guarded_api) as kept:
        kept.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.3)
        assert kept.recv(65536).startswith(b"HTTP/1.1 200")
        data, after = read_until_closed(kept, IDLE_S + 3)
    assert data == b""
    assert after <= IDLE_S + 1.5


def test_headers_sent_a_byte_at_a_time_get_408(guarded_api: Service) -> None:
    with connect(guarded_api) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        trickle(sock, b"X-Slow: " + b"a" * 100, every=0.2, until=HEADER_S + 1)
        data, _ = read_until_closed(sock, 5)
    took = time.monotonic() - started
    assert data.startswith(b"HTTP/1.1 408"), data[:200]
    assert orjson.loads(data.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"
    assert took <= HEADER_S + 1.5


def test_a_body_sent_a_byte_at_a_time_gets_408(guarded_api: Service) -> None:
    body = orjson.dumps(view())
    head = (f"POST /v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TEST_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()  # fmt: skip
    with connect(guarded_api) as sock:
        sock.sendall(head + body[:10])
        started = time.monotonic()
        trickle(sock, body[10:], every=0.2, until=BODY_S + 1)
        data, _ = read_until_closed(sock, 5)
    took = time.monotonic() - started
    assert data.startswith(b"HTTP/1.1 408"), data[:300]
    error = orjson.loads(data.split(b"\r\n\r\n", 1)[1])["error"]
    assert error["code"] == "request_timeout"
    assert "SLUICE_HTTP_BODY_TIMEOUT_S" in error["message"]
    assert took <= BODY_S + 1.5


def test_connections_over_the_cap_are_closed_at_once(guarded_api: Service) -> None:
    held = [connect(guarded_api) for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.2)  # all of them accepted
        with connect(guarded_api) as extra:
            data, after = read_until_closed(extra, 2)
        assert data == b""
        assert after < 0.5
        # The ones it holds still serve requests.
        held[0].sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data, _ = read_until_closed(held[0], 5)
        assert data.startswith(b"HTTP/1.1 200"), data[:200]
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.2)
    with connect(guarded_api) as again:  # room again once they are gone
        again.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data, _ = read_until_closed(again, 5)
    assert data.startswith(b"HTTP/1.1 200"), data[:200]


def test_head_pipelined_and_100_continue_requests_are_answered_whole(guarded_api: Service) -> None:
    """The response head waits for its body (api/http.py, _HeadWithBody): a response to HEAD (no body), two
    pipelined requests, and a ``100 Continue`` (written before the response starts) must all still go out."""
    with connect(guarded_api) as sock:
        sock.sendall(b"HEAD /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data, _ = read_until_closed(sock, 5)
    assert data.startswith(b"HTTP/1.1 "), data[:300]
    assert data.endswith(b"\r\n\r\n"), data[:300]
    with connect(guarded_api) as sock:
        sock.sendall(
            b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        data, _ = read_until_closed(sock, 5)
    assert data.count(b"HTTP/1.1 200") == 2, data[:600]
    assert data.count(b'{"status":"ok"}') == 2, data[:600]
    body = orjson.dumps(view())
    with connect(guarded_api) as sock:
        sock.sendall(f"POST /v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TEST_KEY}\r\nConnection: close\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n"
                     .encode())  # fmt: skip
        sock.settimeout(5)
        assert sock.recv(100).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")  # before the body is sent
        sock.sendall(body)
        data, _ = read_until_closed(sock, 5)
    assert data.startswith(b"HTTP/1.1 202"), data[:300]
    assert orjson.loads(data.split(b"\r\n\r\n", 1)[1])["accepted"] == 1


def _post(body: bytes, extra: str = "") -> bytes:
    return (f"POST /v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TEST_KEY}\r\n{extra}"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body  # fmt: skip


def test_ingest_requests_in_the_lane_are_answered_in_order_and_close_when_asked(guarded_api: Service) -> None:
    """The protocol answers plain ingest requests itself (api/http.py, the lane). Requests pipelined behind one
    still being answered wait for it, so answers come back in order; ``Connection: close`` closes after the
    answer; a request with a query string goes through ASGI and is answered the same."""
    first, second, third = view(), view(), view()
    with connect(guarded_api) as sock:
        sock.sendall(_post(orjson.dumps(first)) + _post(orjson.dumps(second))
                     + b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
                     + _post(orjson.dumps(third), "Connection: close\r\n"))  # fmt: skip
        data, _ = read_until_closed(sock, 10)
    answers = data.split(b"HTTP/1.1 ")[1:]
    assert [a[:3] for a in answers] == [b"202", b"202", b"200", b"202"], data[:1200]
    ids = [
        orjson.loads(a.split(b"\r\n\r\n", 1)[1])["results"][0]["event_id"] for a in (answers[0], answers[1], answers[3])
    ]
    assert ids == [first["event_id"], second["event_id"], third["event_id"]]
    assert b"connection: close" in answers[3].lower()
    with connect(guarded_api) as sock:
        sock.sendall(_post(orjson.dumps(view()), "Connection: close\r\n").replace(b"/v1/events", b"/v1/events?x=1", 1))
        data, _ = read_until_closed(sock, 5)
    assert data.startswith(b"HTTP/1.1 202"), data[:300]


class _Recorder:
    """A transport that records each write (what the kernel would get as one send)."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


def test_a_response_head_goes_out_with_its_body_in_one_write() -> None:
    cycle = SimpleNamespace(response_started=False)
    transport = _Recorder()
    view_ = _HeadWithBody(transport, cycle)  # type: ignore[arg-type]
    view_.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # before the response: at once
    assert transport.writes == [b"HTTP/1.1 100 Continue\r\n\r\n"]
    cycle.response_started = True
    view_.write(b"HTTP/1.1 202 Accepted\r\n\r\n")
    assert len(transport.writes) == 1  # the head waits for the body
    view_.write(b"{}")
    view_.write(b"more")  # later writes (chunks) go straight out
    assert transport.writes[1:] == [b"HTTP/1.1 202 Accepted\r\n\r\n{}", b"more"]
    # A response that ends without a body (the app failed after starting it): closing sends the head first.
    cycle, transport = SimpleNamespace(response_started=True), _Recorder()
    view_ = _HeadWithBody(transport, cycle)  # type: ignore[arg-type]
    view_.write(b"HTTP/1.1 200 OK\r\n\r\n")
    view_.close()
    assert transport.writes == [b"HTTP/1.1 200 OK\r\n\r\n"]
    assert transport.closed
