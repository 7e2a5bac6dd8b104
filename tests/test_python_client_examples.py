"""The Python client's examples (clients/python) run against a real daemon: the
endpoint submits a batch per request, the script waits for it and exports it."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
from typing import Any

from tests.daemon import ROOT, request, wait_for
from tests.pgharness import free_port

EXAMPLES = ROOT / "clients" / "python"


def test_the_endpoint_submits_and_the_script_waits_and_exports(
    daemons: Any, tmp_path: pathlib.Path
) -> None:
    d = daemons()
    env = {**os.environ, "BATCH_SUPERVISOR_URL": d.url, "PYTHONPATH": str(ROOT)}
    port = free_port()
    web = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "submit_endpoint.py")],
        env=env | {"PORT": str(port)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def accepted() -> Any:
            try:
                code, body, _ = request(
                    "POST", f"http://127.0.0.1:{port}/extract", {"files": ["a.pdf", "b.pdf"]}
                )
            except OSError:
                return None  # not listening yet
            assert code == 202, body
            return body

        batch_id = wait_for(accepted, 30, what="the example endpoint to accept a request")[
            "batch_id"
        ]
    finally:
        web.terminate()
        web.wait(10)
    out = tmp_path / "results.jsonl"
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "wait_and_export.py"), batch_id, str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["key"], r["status"]) for r in records] == [
        ("a.pdf", "succeeded"),
        ("b.pdf", "succeeded"),
    ]
    assert "completed: 2 results" in done.stderr
