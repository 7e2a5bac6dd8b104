"""sd_notify without libsystemd: READY=1, STOPPING=1, WATCHDOG=1, STATUS=.

A no-op when ``NOTIFY_SOCKET`` is unset (not run by systemd)."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable

import anyio
import anyio.abc

log = logging.getLogger(__name__)


def notify(message: str) -> bool:
    """Send one datagram to $NOTIFY_SOCKET; False when there is none."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    addr = "\0" + path[1:] if path.startswith("@") else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            # Never block the event loop: a receiver that does not read (its queue
            # holds about ten datagrams) must not freeze the API and the heartbeats.
            s.setblocking(False)
            s.connect(addr)
            s.sendall(message.encode())
    except BlockingIOError:
        log.debug("systemd.notify_dropped message=%s: the receiver's queue is full", message)
        return False
    except OSError as exc:
        log.warning("systemd.notify_failed error=%s", exc)
        return False
    return True


def watchdog_interval() -> float | None:
    """Half of WatchdogSec when systemd asked for pings (and they are for us)."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(0.05, int(usec) / 2_000_000)
    except ValueError:
        return None


class Watchdog:
    """Pings WATCHDOG=1 from the event loop (a stuck loop stops the pings) while
    the daemon can make progress, and refreshes STATUS= with the in-flight summary.

    ``health`` gives the reasons the daemon cannot make progress by itself; while
    there are any, the pings stop and systemd restarts the daemon WatchdogSec later.
    """

    def __init__(self, status: Callable[[], str], health: Callable[[], list[str]]) -> None:
        self._status = status
        self._health = health

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        task_status.started()
        interval = watchdog_interval()
        last_status = ""
        while True:
            reasons = self._health()
            if interval is not None and not reasons:
                notify("WATCHDOG=1")
            text = "; ".join(reasons) or self._status()
            if text != last_status:
                notify(f"STATUS={text}")
                last_status = text
            await anyio.sleep(interval if interval is not None else 2.0)
