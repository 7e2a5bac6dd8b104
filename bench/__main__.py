"""``python -m bench [--runs N] [--quick] [--large] [--scenarios a,b] [--profile DIR]
[--scale F] [--clients N] [--peers a,b]``."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import importlib.metadata
import json
import math
import os
import pathlib
import platform
import shutil
import sys
import tempfile
from collections.abc import Awaitable, Callable

from bench import (
    claim_cost,
    export,
    horizon,
    iobound,
    latency,
    latency_small,
    memory,
    peers,
    small,
    status,
    streams,
    submission,
    throughput,
)
from bench.context import Ctx
from bench.harness import BenchServer, Results

SCENARIOS: dict[str, Callable[[Ctx, Results], Awaitable[None]]] = {
    "throughput": throughput.run,
    "submission": submission.run,
    "latency": latency.run,
    "status": status.run,
    "streams": streams.run,
    "memory": memory.run,
    "peers": peers.run,
    # The shapes users bring (not in the default run: --scenarios small,small1,...).
    "small": small.run,
    "small1": small.run_small1,
    "latency_small": latency_small.run,
    "io": iobound.run,
    "claim_cost": claim_cost.run,
    "claim_cost_keys": claim_cost.run_keys,
    "results": export.run,
    "horizon": horizon.run,
}
DEFAULT_SCENARIOS = ["throughput", "submission", "latency", "status", "streams", "memory", "peers"]

# (label, numerator key, denominator key, target or None) -- ratios of medians.
RATIOS: list[tuple[str, str, str, float | None]] = [
    ("processing with SSE streams open / without", "streams.loaded", "streams.base", 0.8),
    ("ours / PgQueuer, end to end", "throughput.e2e", "pgqueuer.e2e", 3.0),
    ("ours / PgQueuer, processing", "throughput.proc", "pgqueuer.proc", None),
    ("ours / Procrastinate, end to end", "throughput.e2e", "procrastinate.e2e", None),
    ("ours / Procrastinate, processing", "throughput.proc", "procrastinate.proc", None),
    ("ours / raw limit, 1 claimer (processing)", "throughput.proc", "raw1.proc", None),
    ("ours / raw limit, 4 claimers (processing)", "throughput.proc", "raw4.proc", 0.35),
    (
        "1,000,000 / 20,000-item throughput (processing)",
        "throughput_1m.proc",
        "throughput.proc",
        0.80,
    ),
    ("small: many 10-item batches / one batch of as many", "small.e2e", "small_single.e2e", None),
    ("small: ours / PgQueuer, end to end", "small.e2e", "small.pgqueuer.e2e", None),
    ("small: ours / Procrastinate, end to end", "small.e2e", "small.procrastinate.e2e", None),
    (
        "small: batches accepted / PgQueuer enqueue calls",
        "small.accepted",
        "small.pgqueuer.accepted",
        None,
    ),
    ("small1: many 1-item batches / one batch of as many", "small1.e2e", "small1_single.e2e", None),
    ("small1: ours / PgQueuer, end to end", "small1.e2e", "small1.pgqueuer.e2e", None),
    ("small1: ours / Procrastinate, end to end", "small1.e2e", "small1.procrastinate.e2e", None),
    (
        "small1: batches accepted / PgQueuer enqueue calls",
        "small1.accepted",
        "small1.pgqueuer.accepted",
        None,
    ),
    (
        "latency_small: busy / idle, submit -> finished_at p50",
        "latency_small.busy.terminal.p50",
        "latency_small.idle.terminal.p50",
        None,
    ),
    (
        "io 200 ms: ours / PgQueuer, % of ideal end to end",
        "io_200ms.ideal_e2e",
        "io_200ms.pgqueuer.ideal_e2e",
        None,
    ),
    (
        "io 1 s: ours / PgQueuer, % of ideal end to end",
        "io_1s.ideal_e2e",
        "io_1s.pgqueuer.ideal_e2e",
        None,
    ),
    ("io 1 s: daemon VmHWM / PgQueuer process peak RSS", "io_1s.hwm", "io_1s.pgqueuer.hwm", None),
    (
        "claim_cost: 10,000 / 100 active batches, per claim",
        "claim_cost.10000",
        "claim_cost.100",
        None,
    ),
]
# (metric key, limit, "max" or "min") -- the absolute targets.
TARGETS: list[tuple[str, float, str]] = [
    ("horizon1.hold_ratio", 1.5, "max"),
    ("horizon10.hold_ratio", 1.5, "max"),
    ("horizon1.recovery", 60.0, "max"),
    ("horizon10.recovery", 60.0, "max"),
    ("submission.post", 1.0, "max"),
    ("latency.p50", 20.0, "max"),
    ("latency.p99", 50.0, "max"),
    ("status.p99", 20.0, "max"),
    ("memory.hwm", 150.0, "max"),
]


def fmt(v: float) -> str:
    if math.isnan(v):
        return "-"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def machine() -> str:
    cpu = "?"
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass  # not Linux: the model name is only informative
    return f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}"


def versions() -> str:
    out = []
    for pkg in ("batch-supervisor", "asyncpg", "aiohttp", "anyio", "pgqueuer", "procrastinate"):
        try:
            out.append(f"{pkg} {importlib.metadata.version(pkg)}")
        except importlib.metadata.PackageNotFoundError:
            out.append(f"{pkg} (not installed)")
    return ", ".join(out)


def report(results: Results, header: list[str], judged: bool = True) -> str:
    """The tables; ``judged=False`` (``--quick``: small sizes, where the window and
    per-run costs have not amortised) shows the targets without a verdict."""

    def verdict(ok: bool) -> str:
        return ("ok" if ok else "MISSED") if judged else "not judged (--quick)"

    lines = [*header, ""]
    lines.append(f"| {'metric':<58} | {'median':>10} | {'min - max':>21} | unit    | n |")
    lines.append(f"|{'-' * 60}|{'-' * 11}:|{'-' * 23}|---------|---|")
    for m in results.metrics.values():
        rng = f"{fmt(min(m.values))} - {fmt(max(m.values))}"
        lines.append(
            f"| {m.name:<58} | {fmt(m.median):>10} | {rng:>21} | {m.unit:<7} | {len(m.values)} |"
        )
    lines += ["", "| ratio (of medians) | value | target |", "|---|---:|---|"]
    for label, num, den, target in RATIOS:
        a, b = results.median(num), results.median(den)
        if a is None or b is None:
            continue
        r = a / b
        t = "" if target is None else f">= {target:g} {verdict(r >= target)}"
        lines.append(f"| {label} | {r:.2f} | {t} |")
    lines += ["", "| target | median | limit | |", "|---|---:|---:|---|"]
    for key, limit, kind in TARGETS:
        v = results.median(key)
        if v is None:
            continue
        ok = v <= limit if kind == "max" else v >= limit
        lines.append(
            f"| {results.metrics[key].name} | {fmt(v)} {results.metrics[key].unit} | "
            f"{'<=' if kind == 'max' else '>='} {limit:g} | {verdict(ok)} |"
        )
    return "\n".join(lines)


def _print_new(results: Results, printed: set[str]) -> set[str]:
    """Print the metrics not printed yet (progress while the rounds run)."""
    for m in results.metrics.values():
        if m.name.split(":")[0] not in printed:
            print(
                f"    {m.name}: median {fmt(m.median)} {m.unit} "
                f"({', '.join(fmt(v) for v in m.values)})",
                flush=True,
            )
    return printed | {m.name.split(":")[0] for m in results.metrics.values()}


async def amain(args: argparse.Namespace) -> int:
    names = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        print(f"unknown scenarios {unknown}; known: {', '.join(SCENARIOS)}", file=sys.stderr)
        return 2
    if args.profile and shutil.which("py-spy") is None:
        print("--profile needs py-spy on PATH (pip install py-spy)", file=sys.stderr)
        return 2
    runs = args.runs if args.runs is not None else (1 if args.quick else 3)
    server = BenchServer(tcp=args.tcp)
    work = pathlib.Path(tempfile.mkdtemp(prefix="bsv-bench-work-"))
    results = Results()
    try:
        server.start()
        pg = await server.version()
        header = [
            f"batch-supervisor benchmark, {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC",
            f"machine: {machine()}",
            f"server: {pg}, over {'TCP (127.0.0.1)' if args.tcp else 'its unix socket'}",
            f"versions: {versions()}",
            "load average at start: {:.2f} {:.2f} {:.2f} (other work on the machine skews"
            " every number: run it on a quiet machine)".format(*os.getloadavg()),
            f"runs per scenario: {runs}{' (quick)' if args.quick else ''}"
            f"{' (large)' if args.large else ''}"
            f"{f' (scale {args.scale:g})' if args.scale is not None else ''}",
        ]
        print("\n".join(header), flush=True)
        printed: set[str] = set()
        ctx = Ctx(
            server,
            work,
            runs,
            args.quick,
            args.large,
            pathlib.Path(args.profile) if args.profile else None,
            scale=args.scale if args.scale is not None else (0.1 if args.quick else 1.0),
            clients=args.clients,
            peers=tuple(p.strip() for p in args.peers.split(",") if p.strip()),
            horizon_phases=args.horizon_phases,
            horizon_rate=args.horizon_rate,
        )
        if ctx.profile_dir is not None:
            ctx.profile_dir.mkdir(parents=True, exist_ok=True)
        # Rounds: every scenario once per round, so that a machine whose speed drifts
        # during the run (this one does, by up to 2x within the hour) weighs on ours
        # and on the peers alike, instead of on whichever scenario ran last.
        for r in range(runs):
            for name in names:
                print(f"... {name} (round {r + 1} of {runs})", flush=True)
                one = dataclasses.replace(
                    ctx, runs=1, profile_dir=ctx.profile_dir if r == 0 else None
                )
                await SCENARIOS[name](one, results)
                printed = _print_new(results, printed)
        header.append("load average at end: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
        text = report(results, header, judged=not args.quick)
        print()
        print(text)
        if args.json:
            samples = {
                k: {"name": m.name, "unit": m.unit, "values": m.values}
                for k, m in results.metrics.items()
            }
            out = pathlib.Path(args.json)
            out.write_text(json.dumps(samples, indent=2))  # noqa: ASYNC240 - once, at the end
        return 0
    finally:
        server.close()
        shutil.rmtree(work, ignore_errors=True)


def _phases(text: str) -> tuple[float, float, float]:
    parts = [float(x) for x in text.split(",")]
    if len(parts) != 3 or min(parts) <= 0:
        raise argparse.ArgumentTypeError("three positive numbers of seconds: CLEAN,HOLD,AFTER")
    return parts[0], parts[1], parts[2]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--runs", type=int, default=None, help="runs per scenario (default 3)")
    p.add_argument("--quick", action="store_true", help="small sizes, one run: a smoke test")
    p.add_argument(
        "--large",
        action="store_true",
        help="also 1,000,000 items (throughput, memory); takes minutes",
    )
    p.add_argument(
        "--scenarios",
        default=",".join(DEFAULT_SCENARIOS),
        help=f"comma-separated subset of: {', '.join(SCENARIOS)} "
        f"(default: {', '.join(DEFAULT_SCENARIOS)})",
    )
    p.add_argument(
        "--scale",
        type=float,
        default=None,
        help="multiply the item and batch counts of small, small1, latency_small, io, "
        "claim_cost and results, and the phase lengths of horizon (default 1; 0.1 with --quick)",
    )
    p.add_argument(
        "--clients",
        type=int,
        default=16,
        help="concurrent HTTP clients (peers: connections) of small, small1, latency_small",
    )
    p.add_argument(
        "--peers",
        default="pgqueuer,procrastinate",
        help="peers of small and small1 (io: pgqueuer only, when listed)",
    )
    p.add_argument(
        "--profile",
        metavar="DIR",
        help="py-spy (raw collapsed stacks) of the daemon's first throughput run",
    )
    p.add_argument(
        "--horizon-phases",
        type=_phases,
        default=(600.0, 600.0, 600.0),
        metavar="CLEAN,HOLD,AFTER",
        help="horizon: seconds of the clean, held-horizon and after-release phases at "
        "scale 1, multiplied by --scale (default 600,600,600)",
    )
    p.add_argument(
        "--horizon-rate",
        type=float,
        default=500.0,
        help="horizon: offered load in items/s, for both shapes (default 500)",
    )
    p.add_argument(
        "--tcp",
        action="store_true",
        help="reach PostgreSQL over TCP on 127.0.0.1 (daemons and peers; default: its "
        "unix socket, like the embedded default); a user's own server is usually on TCP",
    )
    p.add_argument("--json", metavar="PATH", help="also write every sample as JSON")
    return asyncio.run(amain(p.parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
