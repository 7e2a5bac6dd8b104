"""The TypeScript client (clients/typescript) builds and passes its own tests,
which run against real daemons started through clients/typescript/test/start_daemon.py.

Needs ``node`` (18 or later) and ``npm`` on PATH, and the npm registry (or npm's
cache) for ``npm ci``; skips, saying which is missing, without them.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "clients" / "typescript"


def _node_major(node: str) -> int:
    out = subprocess.run([node, "--version"], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().lstrip("v").split(".")[0])


# npm's codes for a registry it cannot reach (offline CI with an empty npm cache).
_OFFLINE = ("ENOTFOUND", "EAI_AGAIN", "ETIMEDOUT", "ECONNREFUSED", "ENETUNREACH", "ECONNRESET")


def _run(command: list[str], timeout: float, *, offline_skips: bool = False) -> None:
    env = {**os.environ, "BSV_PYTHON": sys.executable, "NO_COLOR": "1"}
    for name in ("BATCH_SUPERVISOR_URL", "BATCH_SUPERVISOR_TOKEN"):
        env.pop(name, None)  # the client's tests choose their own daemon
    proc = subprocess.run(
        command,
        cwd=PACKAGE,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    output = f"{proc.stdout[-20000:]}\n{proc.stderr[-5000:]}"
    if proc.returncode != 0 and offline_skips and any(code in output for code in _OFFLINE):
        pytest.skip(f"npm cannot reach its registry to install TypeScript: {output.strip()[-300:]}")
    assert proc.returncode == 0, f"{' '.join(command)} exited {proc.returncode}\n{output}"


_built: set[str] = set()


def build_client(*, examples: bool = False) -> str:
    """``npm ci`` and the build (once per session); skips without node and npm.
    Returns the npm executable."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip(f"{'node' if node is None else 'npm'} is not on PATH (the TypeScript client)")
    if _node_major(node) < 18:
        pytest.skip("the TypeScript client needs Node.js 18 or later")
    steps = [
        ("ci", [npm, "ci", "--no-audit", "--no-fund", "--prefer-offline"], 180.0),
        ("build", [npm, "run", "build"], 120.0),
    ]
    if examples:
        steps.append(("examples", [npm, "run", "build:examples"], 120.0))
    for name, command, timeout in steps:
        if name not in _built:
            _run(command, timeout, offline_skips=name == "ci")
            _built.add(name)
    return npm


def test_typescript_client_builds_and_passes_its_tests() -> None:
    npm = build_client()
    _run([npm, "test"], timeout=240)
