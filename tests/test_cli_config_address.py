"""Client verbs talk to the API address of ``--config``. Failed before the fix:
they ignored its port and silently talked to whatever answered on 8080."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

from tests.daemon import ROOT


def test_client_verbs_use_the_config_files_port(daemons: Any) -> None:
    d = daemons()
    b = d.submit("echo", [1])
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCH_SUPERVISOR_")}
    out = subprocess.run(
        [sys.executable, "-m", "supervisor", "status", b["id"], "--config", str(d.config_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert b["id"] in out.stdout
