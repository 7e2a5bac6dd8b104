"""What every scenario gets: the server, a scratch directory and the run options."""

from __future__ import annotations

import dataclasses
import pathlib

from bench.harness import BenchServer


@dataclasses.dataclass
class Ctx:
    server: BenchServer
    work_dir: pathlib.Path
    runs: int
    quick: bool
    large: bool
    profile_dir: pathlib.Path | None = None
    # The many-small-batches and I/O scenarios: their item and batch counts are
    # multiplied by ``scale`` (``--scale``; 0.1 with ``--quick``), their clients
    # and concurrency levels are not (they are the shape being measured).
    scale: float = 1.0
    clients: int = 16
    peers: tuple[str, ...] = ("pgqueuer", "procrastinate")
    # ``horizon``: clean, hold and after-release seconds at scale 1 (times ``scale``)
    # and the offered load in items/s.
    horizon_phases: tuple[float, float, float] = (600.0, 600.0, 600.0)
    horizon_rate: float = 500.0

    @property
    def throughput_items(self) -> int:
        return 5_000 if self.quick else 20_000

    def scaled(self, n: int, minimum: int = 1) -> int:
        return max(minimum, round(n * self.scale))
