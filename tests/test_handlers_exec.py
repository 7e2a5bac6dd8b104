"""``type = "exec"`` handlers through real daemons running real commands."""

from __future__ import annotations

import os
import pathlib
import signal
import sys
import textwrap
from typing import Any

import pytest

from tests.daemon import Daemon, wait_for

TERMINAL = ("completed", "completed_with_errors", "failed", "cancelled")
BACKOFF = {"initial": "50ms", "max": "100ms", "jitter": 0.0}

ECHO = """
import json, os, sys
payload = json.load(sys.stdin)
if isinstance(payload, dict) and "text" in payload:
    print(payload["text"])
else:
    env = {k: v for k, v in os.environ.items() if k.startswith("BSV_")}
    print(json.dumps({"payload": payload, "env": env}))
"""

TEMPFAIL_FIRST = """
import json, os, sys
if os.environ["BSV_ATTEMPT"] == "1":
    print("upstream busy", file=sys.stderr)
    sys.exit(75)
print(json.dumps({"attempt": int(os.environ["BSV_ATTEMPT"])}))
"""

EXIT_3 = """
import sys
sys.stderr.write("noise line\\n" * 400)
sys.stderr.write("boom: the real cause\\n")
sys.exit(3)
"""

BIG_STDOUT = """
import sys
sys.stdout.write("x" * (2 * 1024 * 1024))
"""

# Writes "<own pid> <grandchild pid>" to the pidfile named in the payload, then sleeps.
SLEEPER = """
import json, os, subprocess, sys, time
payload = json.load(sys.stdin)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
tmp = payload["pidfile"] + ".tmp"
with open(tmp, "w") as f:
    f.write(f"{os.getpid()} {child.pid}")
os.rename(tmp, payload["pidfile"])
time.sleep(120)
"""


def script(tmp_path: pathlib.Path, name: str, body: str) -> list[str]:
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(body))
    return [sys.executable, str(path)]


# Run as root, commands would run as an unprivileged account that cannot reach the
# scripts these tests write into their private tmp_path: say "root" explicitly.
AS_ROOT: dict[str, str] = {"user": "root"} if os.geteuid() == 0 else {}


def exec_handler(command: list[str], **over: Any) -> dict[str, Any]:
    return {
        "type": "exec",
        "command": command,
        "timeout": "10s",
        "max_attempts": 3,
        "retry_backoff": BACKOFF,
        **AS_ROOT,
        **over,
    }


def alive(pid: int) -> bool:
    """Running (not gone, not a zombie); reaps it if it became our zombie child."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass  # not our child: its parent (the daemon or init) reaps it
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def read_pids(pidfile: pathlib.Path) -> list[int]:
    wait_for(pidfile.exists, 20, what="the command to write its pids")
    pids = [int(p) for p in pidfile.read_text().split()]
    assert all(alive(p) for p in pids)
    return pids


def kill_leftovers(pids: list[int]) -> None:
    for pid in pids:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_exec_stdout_json_or_text_is_the_result_with_bsv_env(
    daemons: Any, tmp_path: pathlib.Path
) -> None:
    d = daemons(handlers={"run": exec_handler(script(tmp_path, "echo", ECHO))})
    b = d.submit(
        "run",
        [{"key": "k1", "payload": {"n": 1}}, {"key": "k2", "payload": {"text": "hello there"}}],
    )
    assert d.wait_status(b["id"], TERMINAL)["status"] == "completed"
    by_key = {i["key"]: i for i in d.items(b["id"])}
    assert by_key["k2"]["result"] == "hello there"
    result = by_key["k1"]["result"]
    assert result["payload"] == {"n": 1}
    token = result["env"].pop("BSV_ATTEMPT_TOKEN")  # finds what the attempt leaves behind
    assert len(token) == 32 and int(token, 16) >= 0
    assert result["env"] == {
        "BSV_ITEM_ID": by_key["k1"]["id"],
        "BSV_BATCH_ID": b["id"],
        "BSV_ATTEMPT": "1",
        "BSV_MAX_ATTEMPTS": "3",
        "BSV_ITEM_KEY": "k1",
        "BSV_HANDLER": "run",
    }


def test_exec_exit_75_is_retried_and_succeeds_on_attempt_2(
    daemons: Any, tmp_path: pathlib.Path
) -> None:
    d = daemons(handlers={"run": exec_handler(script(tmp_path, "tempfail", TEMPFAIL_FIRST))})
    b = d.submit("run", [{}])
    assert d.wait_status(b["id"], TERMINAL)["status"] == "completed"
    (item,) = d.items(b["id"])
    assert item["attempts"] == 2 and item["result"] == {"attempt": 2}
    code, full, _ = d.api("GET", f"/v1/items/{item['id']}")
    assert code == 200, full
    (err,) = full["errors"]
    assert err["type"] == "ExecTempFail"
    assert "exit code 75" in err["message"] and "upstream busy" in err["message"]


def test_exec_other_exit_code_fails_at_once_with_stderr_tail(
    daemons: Any, tmp_path: pathlib.Path
) -> None:
    d = daemons(handlers={"run": exec_handler(script(tmp_path, "exit3", EXIT_3))})
    b = d.submit("run", [{}])
    assert d.wait_status(b["id"], TERMINAL)["status"] == "failed"
    (item,) = d.items(b["id"])
    assert item["status"] == "failed" and item["attempts"] == 1
    assert item["error"]["type"] == "ExecFailed"
    message = item["error"]["message"]
    assert message.startswith("exit code 3: ")
    assert message.rstrip().endswith("boom: the real cause")


def test_exec_stdout_beyond_the_cap_fails_the_item(daemons: Any, tmp_path: pathlib.Path) -> None:
    d = daemons(handlers={"run": exec_handler(script(tmp_path, "big", BIG_STDOUT))})
    b = d.submit("run", [{}])
    assert d.wait_status(b["id"], TERMINAL)["status"] == "failed"
    (item,) = d.items(b["id"])
    assert item["attempts"] == 1 and item["error"]["type"] == "ExecOutputTooLarge"


def test_exec_timeout_kills_the_process_group(daemons: Any, tmp_path: pathlib.Path) -> None:
    cmd = script(tmp_path, "sleeper", SLEEPER)
    d = daemons(handlers={"run": exec_handler(cmd, timeout="1s", max_attempts=1)})
    pidfile = tmp_path / "pids"
    b = d.submit("run", [{"pidfile": str(pidfile)}])
    pids = read_pids(pidfile)
    try:
        assert d.wait_status(b["id"], TERMINAL)["status"] == "failed"
        (item,) = d.items(b["id"])
        assert item["error"]["type"] == "Timeout"
        wait_for(lambda: not any(alive(p) for p in pids), 10, what="the process group to die")
    finally:
        kill_leftovers(pids)


# Leaves a background child (stdout closed, so the attempt can end) and exits 0.
def test_exec_batch_cancel_kills_the_process_group(daemons: Any, tmp_path: pathlib.Path) -> None:
    cmd = script(tmp_path, "sleeper", SLEEPER)
    d = daemons(handlers={"run": exec_handler(cmd, timeout="1h")})
    pidfile = tmp_path / "pids"
    b = d.submit("run", [{"pidfile": str(pidfile)}])
    pids = read_pids(pidfile)
    try:
        code, body, _ = d.api("POST", f"/v1/batches/{b['id']}/cancel")
        assert code == 200, body
        assert d.wait_status(b["id"], TERMINAL)["status"] == "cancelled"
        wait_for(lambda: not any(alive(p) for p in pids), 10, what="the process group to die")
    finally:
        kill_leftovers(pids)


def test_exec_drain_deadline_kills_the_process_group(daemons: Any, tmp_path: pathlib.Path) -> None:
    cmd = script(tmp_path, "sleeper", SLEEPER)
    d = daemons(handlers={"run": exec_handler(cmd, timeout="1h")}, worker={"drain_timeout": "1s"})
    pidfile = tmp_path / "pids"
    d.submit("run", [{"pidfile": str(pidfile)}])
    pids = read_pids(pidfile)
    try:
        d.signal(signal.SIGTERM)
        assert d.wait_exit(30) == 0, d.log()
        wait_for(lambda: not any(alive(p) for p in pids), 10, what="the process group to die")
        assert "released items=1" in d.log()
    finally:
        kill_leftovers(pids)


@pytest.mark.parametrize("command", [["no-such-command-bsv-test"], ["/nonexistent/bin/tool"]])
def test_check_rejects_missing_executable_naming_the_handler(
    tmp_path: pathlib.Path, command: list[str]
) -> None:
    d = Daemon(tmp_path, "postgresql://unused", handlers={"badexec": exec_handler(command)})
    proc = d.cli("check", "--config", str(d.config_path))
    assert proc.returncode == 78, proc
    assert "badexec" in proc.stderr and command[0] in proc.stderr, proc.stderr
