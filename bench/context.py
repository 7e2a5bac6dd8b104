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

    @property
    def throughput_items(self) -> int:
        return 5_000 if self.quick else 20_000
