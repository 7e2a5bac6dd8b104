"""Start-up while the database is away: the probes answer at once (healthz 200,
readyz 503 with the reason), the API says it is starting, and the daemon becomes
ready by itself once the database is reachable."""

from __future__ import annotations

from typing import Any

from tests.daemon import request, wait_for
from tests.pgharness import TestServer, free_port, with_database


def test_daemon_serves_probes_before_its_database_is_reachable(daemons: Any) -> None:
    port = free_port()
    server = TestServer(port=port)
    url = with_database(f"postgresql://postgres@127.0.0.1:{port}/postgres", "postgres")
    d = daemons("early", start=False, env={"BATCH_SUPERVISOR_DATABASE_URL": url})
    d.start(wait=False)
    try:
        wait_for(lambda: _status(d.url + "/healthz") == 200, 30, what="healthz")
        status, body, _ = request("GET", d.url + "/readyz")
        assert status == 503 and not body["ready"], body
        status, body, headers = request("GET", d.url + "/v1/batches")
        assert status == 503 and "starting" in body["detail"], body
        assert headers.get("Content-Type", "").startswith("application/problem+json")
        assert d.proc is not None and d.proc.poll() is None  # still running, waiting

        server.start()  # the database arrives
        d.wait_ready(60)
        b = d.submit("echo", [1, 2])
        assert d.wait_status(b["id"], "completed")["counts"]["succeeded"] == 2
    finally:
        d.kill()
        server.close()


def _status(url: str) -> int:
    try:
        return request("GET", url, timeout=2)[0]
    except OSError:
        return 0
