"""``submit --wait`` prints item keys and error texts with control characters
escaped. Failed before the fix: an item key holding an OSC sequence (set the
terminal's title) reached the operator's terminal raw."""

from __future__ import annotations

import json
from typing import Any

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
