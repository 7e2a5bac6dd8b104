"""A real daemon for the TypeScript client's tests, started the way the Python
suite starts its own (tests/conftest.py, tests/daemon.py): an embedded
PostgreSQL with a fresh database and one ``batch-supervisor run`` subprocess.

    .venv/bin/python clients/typescript/test/start_daemon.py '{"handlers": {...}}'

The argument (JSON, optional) gives ``handlers`` (default: the suite's) and
``extra`` config sections. Prints one JSON line ``{"url", "config", "log"}`` once
the daemon is ready, then reads commands from stdin: ``restart`` (SIGTERM, wait,
start again on the same port; answers ``{"restarted": true}``), ``crash`` (the
same with SIGKILL), ``log`` (answers ``{"log": text}``). When stdin
closes, the daemon and the database server are stopped.
"""

from __future__ import annotations

import json
import pathlib
import sys
import tempfile
import uuid
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

from tests import pgharness  # noqa: E402
from tests.daemon import DEFAULT_HANDLERS, Daemon  # noqa: E402


def main() -> int:
    spec: dict[str, Any] = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
    pgharness.become_subreaper()
    server = pgharness.TestServer()
    daemon: Daemon | None = None
    with tempfile.TemporaryDirectory(prefix="bsv-ts-") as tmp:
        try:
            server.start()
            db_url = server.create_database(f"t_{uuid.uuid4().hex}")
            daemon = Daemon(
                pathlib.Path(tmp),
                db_url,
                handlers=spec.get("handlers", DEFAULT_HANDLERS),
                extra=spec.get("extra"),
            )
            daemon.start()
            reply(
                {"url": daemon.url, "config": str(daemon.config_path), "log": str(daemon.log_path)}
            )
            for line in sys.stdin:
                if line.strip() == "restart":
                    daemon.stop()
                    daemon.start()
                    reply({"restarted": True})
                elif line.strip() == "crash":
                    daemon.kill()  # SIGKILL: connections reset, nothing drained
                    daemon.start()
                    reply({"restarted": True})
                elif line.strip() == "log":
                    reply({"log": daemon.log()})
        finally:
            if daemon is not None:
                daemon.stop()
            server.close()
    return 0


def reply(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
