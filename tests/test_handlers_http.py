"""``type = "http"`` handlers through real daemons against a real local HTTP server."""

from __future__ import annotations

import hashlib
import hmac
import json
import pathlib
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from supervisor.handlers import http as http_handler
from tests.daemon import Daemon

TERMINAL = ("completed", "completed_with_errors", "failed", "cancelled")
Reply = tuple[int, dict[str, str], bytes] | None  # None: never answer


class Request:
    def __init__(self, t: float, path: str, headers: dict[str, str], body: bytes) -> None:
        self.t = t
        self.path = path
        self.headers = headers
        self.body = body

    @property
    def item(self) -> dict[str, Any]:
        return dict(json.loads(self.body)["item"])


class Server:
    """A threaded HTTP server answering each POST with ``responder(request, n)``,
    ``n`` counting this item's requests (1-based); every request is recorded."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.responder: Callable[[Request, int], Reply] = lambda r, n: json_reply(200, {})
        self.release = threading.Event()
        self._lock = threading.Lock()
        server = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                req = Request(time.monotonic(), self.path, dict(self.headers.items()), body)
                with server._lock:
                    server.requests.append(req)
                    n = sum(1 for r in server.requests if r.item["id"] == req.item["id"])
                reply = server.responder(req, n)
                if reply is None:
                    server.release.wait(30)
                    self.close_connection = True
                    return
                status, headers, payload = reply
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # keep test output quiet

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def for_item(self, item_id: str) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.item["id"] == item_id]

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)


def json_reply(status: int, body: Any, headers: dict[str, str] | None = None) -> Reply:
    return (
        status,
        {"Content-Type": "application/json", **(headers or {})},
        json.dumps(body).encode(),
    )


def text_reply(status: int, text: str, headers: dict[str, str] | None = None) -> Reply:
    return status, {"Content-Type": "text/plain; charset=utf-8", **(headers or {})}, text.encode()


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server()
    try:
        yield s
    finally:
        s.close()


def hook(url: str, **over: Any) -> dict[str, Any]:
    return {
        "type": "http",
        "url": url,
        "timeout": "2s",
        "max_attempts": 3,
        "retry_backoff": {"initial": "50ms", "max": "100ms", "jitter": 0.0},
        **over,
    }


def run_one(daemons: Any, server: Server, payload: Any, **over: Any) -> dict[str, Any]:
    d = daemons(handlers={"hook": hook(server.url, **over)})
    b = d.submit("hook", [payload])
    d.wait_status(b["id"], TERMINAL)
    (item,) = d.items(b["id"])
    return dict(item)


def test_http_2xx_response_json_or_text_is_the_result(daemons: Any, server: Server) -> None:
    def respond(req: Request, n: int) -> Reply:
        p = req.item["payload"]
        if p["kind"] == "json":
            return json_reply(200, {"seen": p, "attempt": req.item["attempt"]})
        return text_reply(201, "plain words")

    server.responder = respond
    d = daemons(handlers={"hook": hook(server.url, headers={"Authorization": "Bearer tok"})})
    b = d.submit("hook", [{"kind": "json"}, {"kind": "text"}], metadata={"run": 7})
    assert d.wait_status(b["id"], TERMINAL)["status"] == "completed"
    results = {i["payload"]["kind"]: i["result"] for i in d.items(b["id"])}
    assert results == {
        "json": {"seen": {"kind": "json"}, "attempt": 1},
        "text": "plain words",
    }
    req = server.requests[0]
    assert req.path == "/hook"
    assert req.headers["Authorization"] == "Bearer tok"
    assert req.headers["Content-Type"] == "application/json"
    assert "X-Supervisor-Signature" not in req.headers
    sent = req.item
    assert set(sent) == {
        "id",
        "batch_id",
        "key",
        "payload",
        "attempt",
        "max_attempts",
        "handler",
        "batch_metadata",
    }
    assert sent["batch_id"] == b["id"] and sent["handler"] == "hook"
    assert sent["batch_metadata"] == {"run": 7}


def test_http_503_then_200_succeeds_on_second_attempt(daemons: Any, server: Server) -> None:
    server.responder = lambda req, n: (
        text_reply(503, "overloaded, come back later") if n == 1 else json_reply(200, {"ok": n})
    )
    item = run_one(daemons, server, {"x": 1})
    assert item["status"] == "succeeded"
    assert item["attempts"] == 2
    assert item["result"] == {"ok": 2}
    assert len(server.for_item(item["id"])) == 2


def test_http_429_retry_after_seconds_delays_the_next_attempt(daemons: Any, server: Server) -> None:
    server.responder = lambda req, n: (
        text_reply(429, "slow down", {"Retry-After": "1"}) if n == 1 else json_reply(200, "ok")
    )
    d = daemons(handlers={"hook": hook(server.url)})
    b = d.submit("hook", [{"x": 1}])
    d.wait_status(b["id"], TERMINAL)
    (item,) = d.items(b["id"])
    assert item["status"] == "succeeded" and item["attempts"] == 2
    first, second = server.for_item(item["id"])
    # The backoff alone would retry after 50 ms; Retry-After asked for 1 s.
    assert second.t - first.t >= 1.0
    code, full, _ = d.api("GET", f"/v1/items/{item['id']}")
    assert code == 200, full
    err = full["errors"][0]
    assert err["type"] == "HTTPStatusError"
    assert "HTTP 429" in err["message"] and "slow down" in err["message"]


def test_http_429_to_a_keyed_handler_pauses_the_key_not_only_the_item(
    daemons: Any, server: Server
) -> None:
    """An LLM provider's 429 for one API key: that key's other items wait for its
    Retry-After too, the other keys do not, and the attempt is not counted."""
    first_of_k1: list[str] = []

    def respond(req: Request, n: int) -> Reply:
        if req.item["payload"]["api_key"] == "k1" and not first_of_k1:
            first_of_k1.append(req.item["id"])
            return text_reply(429, "rate limited", {"Retry-After": "1"})
        return json_reply(200, "ok")

    server.responder = respond
    keyed = hook(server.url, max_attempts=1, key_limit={"key": "/api_key", "concurrency": 1})
    d = daemons(handlers={"hook": keyed})
    b = d.submit("hook", [{"api_key": "k1", "n": i} for i in range(3)] + [{"api_key": "k2"}])
    d.wait_status(b["id"], TERMINAL)
    items = d.items(b["id"])
    assert [i["status"] for i in items] == ["succeeded"] * 4, items
    throttled = next(i for i in items if i["id"] == first_of_k1[0])
    assert (throttled["attempts"], throttled["max_attempts"]) == (2, 2), throttled
    t429 = server.for_item(throttled["id"])[0].t

    def sent(api_key: str) -> list[float]:
        mine = [i["id"] for i in items if i["payload"]["api_key"] == api_key]
        return [r.t for i in mine for r in server.for_item(i)]

    k1, (k2,) = sent("k1"), sent("k2")
    assert all(t >= t429 + 1.0 for t in k1 if t != t429), [t - t429 for t in k1]
    assert k2 < t429 + 1.0  # the other key did not wait
    code, full, _ = d.api("GET", f"/v1/items/{throttled['id']}")
    assert code == 200, full
    err = full["errors"][0]
    assert err["type"] == "Throttled" and "HTTP 429" in err["message"], err


def test_http_404_fails_at_once_with_the_status_in_the_error(daemons: Any, server: Server) -> None:
    server.responder = lambda req, n: text_reply(404, "no such route: /hook")
    item = run_one(daemons, server, {"x": 1})
    assert item["status"] == "failed"
    assert item["attempts"] == 1
    assert item["error"]["type"] == "HTTPRejectedError"
    assert "HTTP 404" in item["error"]["message"]
    assert "no such route" in item["error"]["message"]
    assert len(server.for_item(item["id"])) == 1


def test_http_unanswered_request_times_out_and_is_retried(daemons: Any, server: Server) -> None:
    server.responder = lambda req, n: None
    item = run_one(daemons, server, {"x": 1}, timeout="400ms", max_attempts=2)
    assert item["status"] == "failed"
    assert item["attempts"] == 2
    assert item["error"]["type"] == "Timeout"
    assert len(server.for_item(item["id"])) == 2


def test_http_connection_refused_is_retried_then_fails(daemons: Any) -> None:
    from tests.pgharness import free_port

    url = f"http://127.0.0.1:{free_port()}/nobody-listens"
    d = daemons(handlers={"hook": hook(url, max_attempts=2)})
    b = d.submit("hook", [{"x": 1}])
    assert d.wait_status(b["id"], TERMINAL)["status"] == "failed"
    (item,) = d.items(b["id"])
    assert item["attempts"] == 2
    assert item["error"]["type"] == "HTTPConnectionError"
    assert "nobody-listens" in item["error"]["message"]


def test_http_signature_verifies_with_the_secret(daemons: Any, server: Server) -> None:
    secret = "s3cret-for-tests"
    item = run_one(daemons, server, {"x": "ü"}, signing_secret=secret)
    assert item["status"] == "succeeded"
    (req,) = server.for_item(item["id"])
    header = req.headers["X-Supervisor-Signature"]
    assert header.startswith("sha256=")
    expected = hmac.new(secret.encode(), req.body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(header.removeprefix("sha256="), expected)
    forged = hmac.new(b"other secret", req.body, hashlib.sha256).hexdigest()
    assert not hmac.compare_digest(header.removeprefix("sha256="), forged)
    # Freshness (the signed sent_at): tests/security/test_webhook_replay.py


def test_retry_after_parses_seconds_and_http_dates() -> None:
    now = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
    assert http_handler.retry_after_seconds("7", now) == 7.0
    assert http_handler.retry_after_seconds("Wed, 01 May 2024 12:00:30 GMT", now) == 30.0
    assert http_handler.retry_after_seconds("Wed, 01 May 2024 11:00:00 GMT", now) == 0.0
    assert http_handler.retry_after_seconds("soon", now) is None
    assert http_handler.retry_after_seconds(None, now) is None


@pytest.mark.parametrize(
    ("handler", "needle"),
    [
        ({"type": "http", "url": "ftp://example.com/x"}, "ftp"),
        ({"type": "http", "url": "http:///nohost"}, "no host"),
        ({"type": "http", "url": "http://example.com/x", "headers": {"X-Count": 5}}, "X-Count"),
    ],
)
def test_check_rejects_bad_http_handler_naming_it(
    tmp_path: pathlib.Path, handler: dict[str, Any], needle: str
) -> None:
    d = Daemon(tmp_path, "postgresql://unused", handlers={"badhook": handler})
    proc = d.cli("check", "--config", str(d.config_path))
    assert proc.returncode == 78, proc
    assert "badhook" in proc.stderr and needle in proc.stderr, proc.stderr
