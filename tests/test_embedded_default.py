"""README line 1: the daemon on its embedded PostgreSQL default, as root (the
server drops to its own account) — ready, serving, and leaving no process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from tests.daemon import ROOT, request, wait_for
from tests.pgharness import free_port, make_base_dir, postgres_pids


def test_embedded_default_serves_and_stops_cleanly() -> None:
    base = make_base_dir("bsv-embedded-")
    port = free_port()
    cfg = base / "config.toml"
    shipped = (ROOT / "config.toml").read_text()
    cfg.write_text(
        shipped.replace("port = 8080", f"port = {port}").replace(
            'data_dir = ".data/postgres"', 'data_dir = "pgdata"'
        )
    )
    env = {k: v for k, v in os.environ.items() if k != "BATCH_SUPERVISOR_DATABASE_URL"}
    env["PYTHONPATH"] = str(ROOT)
    data_dir = base / "pgdata"
    url = f"http://127.0.0.1:{port}"

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "supervisor", "run", "--config", str(cfg)],
            cwd=base,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=open(base / "daemon.log", "ab"),
        )

    def ready() -> bool:
        try:
            return request("GET", url + "/readyz")[0] == 200
        except OSError:
            return False

    proc = start()
    try:
        wait_for(ready, 90, 0.1, "embedded daemon ready")
        status, batch, _ = request(
            "POST", url + "/v1/batches", {"handler": "echo", "items": [1, 2, 3]}
        )
        assert status == 201
        wait_for(
            lambda: request("GET", f"{url}/v1/batches/{batch['id']}")[1]["status"] == "completed",
            20,
            what="batch completed",
        )
        assert postgres_pids(data_dir), "the embedded server should be running"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert not postgres_pids(data_dir), "the embedded server must stop with the daemon"
        assert (data_dir / "PG_VERSION").exists()
        if os.geteuid() == 0:
            assert data_dir.stat().st_uid != 0, "the server must not run as root"

        proc = start()  # kept across restarts: the batch is still there
        wait_for(ready, 90, 0.1, "embedded daemon ready again")
        status, again, _ = request("GET", f"{url}/v1/batches/{batch['id']}")
        assert status == 200 and again["status"] == "completed"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert not postgres_pids(data_dir)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log = (base / "daemon.log").read_text(errors="replace")
        # leave no server behind even when the test failed half-way
        from supervisor import embedded

        embedded.EmbeddedPostgres(data_dir, port=54329).stop("immediate")
        subprocess.run(["rm", "-rf", str(base)], check=False)
        assert "Traceback" not in log, log
