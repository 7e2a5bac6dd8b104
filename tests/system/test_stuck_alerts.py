"""An operator can see a batch that is not moving, and README's alerts fire on it.

The daemon under test holds a stuck batch (one hung attempt, the rest queued
behind it) and a paused one, and has just been restarted: nothing it finishes
would show in a counter that does not exist yet. Its real /metrics page must
show each state apart, and README's shipped rules, evaluated by promtool over
that page held constant (nothing moves), must fire BatchWorkStuck.
"""

from __future__ import annotations

import pathlib
import re
import shutil
import subprocess
from typing import Any

import pytest

from tests.conftest import DaemonFactory
from tests.daemon import DEFAULT_HANDLERS, ROOT, wait_for
from tests.system.test_operations import all_running_on, metrics_of

HANDLERS = DEFAULT_HANDLERS | {"sleeper": {**DEFAULT_HANDLERS["sleeper"], "concurrency": 1}}
SAMPLE = {"server": {"metrics_sample_interval": "200ms"}}


def _stuck_daemon(daemons: DaemonFactory) -> tuple[Any, dict[str, float]]:
    d = daemons("a", handlers=HANDLERS, extra=SAMPLE)
    stuck = d.submit("sleeper", [{"sleep": 3600, "n": i} for i in range(5)])
    paused = d.submit("sleeper", [{"sleep": 3600, "n": i} for i in range(3)], priority=-1)
    status, _, _ = d.api("POST", f"/v1/batches/{paused['id']}/pause")
    assert status == 200
    wait_for(lambda: any(i["status"] == "running" for i in d.items(stuck["id"])), 10)
    # A restart: the attempt is reclaimed and runs again in a daemon with no history.
    d.kill()
    d = daemons("a2", handlers=HANDLERS, extra=SAMPLE, worker={"name": "a"})
    p = "batch_supervisor_"

    def stuck_sample() -> dict[str, float] | None:
        m = metrics_of(d)
        ok = (
            m.get(p + 'items_queued{handler="sleeper"}', 0) >= 1
            and m.get(p + 'items_paused{handler="sleeper"}') == 3
            and m.get(p + 'oldest_running_attempt_seconds{handler="sleeper"}', 0) > 0
            and m.get(p + 'oldest_unfinished_batch_seconds{status="paused"}', 0) > 0
        )
        return m if ok else None

    wait_for(lambda: all_running_on(d, stuck["id"], "a", 1) or True, 10)
    m = wait_for(stuck_sample, 20, 0.1, "a sample of the stuck and paused batches")
    return d, m


def test_a_stuck_batch_and_a_paused_one_are_visible_apart(daemons: DaemonFactory) -> None:
    _, m = _stuck_daemon(daemons)
    p = "batch_supervisor_"
    # A fresh daemon exports every counter at 0: rate() over it is 0, not absent.
    for outcome in ("succeeded", "failed", "retried", "cancelled", "released", "reclaimed"):
        assert f'{p}items_total{{handler="sleeper",outcome="{outcome}"}}' in m, outcome
    # Paused work is not queued work (it would look like lag that never clears).
    assert m[p + 'items_paused{handler="sleeper"}'] == 3.0, m
    # The stuck batch's five items: one running, the rest queued or claimed and
    # waiting for the (single) worker; each counted once, in its own gauge.
    running = m[p + 'items_in_flight{handler="sleeper"}']
    waiting = m[p + 'items_claimed_waiting{handler="sleeper"}']
    queued = m[p + 'items_queued{handler="sleeper"}']
    assert running == 1.0 and queued + waiting == 4.0, (running, waiting, queued)
    assert m[p + 'oldest_unfinished_batch_seconds{status="running"}'] > 0


def _readme_rules() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Metrics and alerts", 1)[1]
    block = section.split("```yaml", 1)[1].split("```", 1)[0]
    body = "\n".join("      " + line if line.strip() else line for line in block.splitlines())
    return "groups:\n  - name: batch-supervisor\n    rules:\n" + body + "\n"


def _series(metrics: dict[str, float]) -> str:
    """promtool input: every sample of the page, constant for 30 minutes."""
    lines = []
    for key, value in sorted(metrics.items()):
        if key.endswith("_created") or "_created{" in key:
            continue
        lines.append(f"      - series: '{key}'\n        values: '{value!r}+0x30'")
    return "\n".join(lines)


@pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool is not installed (Debian package prometheus; .ci/run installs it as root)",
)
def test_readme_rules_fire_on_the_stuck_daemon(
    daemons: DaemonFactory, tmp_path: pathlib.Path
) -> None:
    _, m = _stuck_daemon(daemons)
    rules = tmp_path / "rules.yml"
    rules.write_text(_readme_rules())
    check = subprocess.run(
        ["promtool", "check", "rules", str(rules)], capture_output=True, text=True, check=False
    )
    assert check.returncode == 0, check.stdout + check.stderr
    names = re.findall(r"- alert: (\w+)", rules.read_text())
    assert "BatchWorkStuck" in names, names
    tests = tmp_path / "tests.yml"
    tests.write_text(
        "rule_files: [rules.yml]\nevaluation_interval: 1m\ntests:\n"
        "  - interval: 1m\n    input_series:\n" + _series(m) + "\n"
        "    alert_rule_test:\n"
        "      - eval_time: 20m\n        alertname: BatchWorkStuck\n"
        "        exp_alerts:\n          - exp_labels: {}\n"
        "      - eval_time: 20m\n        alertname: BatchItemFailureRate\n        exp_alerts: []\n"
    )
    out = subprocess.run(
        ["promtool", "test", "rules", str(tests)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
