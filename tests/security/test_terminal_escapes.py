"""``submit --wait`` prints item keys and error texts with control characters
escaped (and ``results`` does, to a terminal). Failed before the fix: an item key
holding an OSC sequence (set the terminal's title) reached the operator's terminal
raw."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from typing import Any

from tests.daemon import ROOT

OSC = "\x1b]0;pwned\x07"


def test_submit_wait_escapes_control_characters_in_keys(daemons: Any, tmp_path: Any) -> None:
    d = daemons()
    items = tmp_path / "items.jsonl"
    items.write_text(json.dumps({"k": OSC + "\x1b[2J", "v": 1}) + "\n")
    out = d.cli("submit", "permanent", str(items), "--key-field", "k", "--wait")
    assert out.returncode == 1, out
    assert "failed item" in out.stdout, out.stdout
    assert "\x1b" not in out.stdout + out.stderr and "\x07" not in out.stdout
    assert "key=\\x1b]0;pwned\\x07\\x1b[2J" in out.stdout, out.stdout


def test_results_on_a_terminal_escape_control_characters(daemons: Any) -> None:
    """A CSV export writes keys as they are (raw bytes are the dataset), except to a
    terminal, where the key's escape sequences would act on it."""
    d = daemons()
    b = d.submit("echo", [{"key": OSC, "payload": 1}])
    d.wait_status(b["id"], "completed")
    piped = d.cli("results", b["id"], "--format", "csv")
    assert piped.returncode == 0 and OSC in piped.stdout, piped  # redirected: data intact
    master, slave = pty.openpty()
    try:
        run = subprocess.run(
            [sys.executable, "-m", "supervisor", "results", b["id"], "--format", "csv"],
            cwd=ROOT,
            env={**d.env, "BATCH_SUPERVISOR_URL": d.url},
            stdout=slave,
            stderr=subprocess.PIPE,
            timeout=60,
            check=False,
        )
        os.close(slave)
        slave = -1
        shown = b""
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: every writer of the terminal is gone
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    assert run.returncode == 0, run.stderr
    assert b"\x1b" not in shown and b"\x07" not in shown, shown
    assert b"\\x1b]0;pwned\\x07" in shown, shown
