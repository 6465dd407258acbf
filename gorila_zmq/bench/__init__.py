"""The benchmark harness: `gorila-zmq bench NAME [--json PATH] [options]`.

Each benchmark is a module `gorila_zmq.bench.NAME` with
    DESCRIPTION: str
    add_arguments(parser: argparse.ArgumentParser) -> None   (optional)
    run(args) -> Report
It measures our code *and* its baseline in the same run and reports ratios. Benchmarks never run in
the test suite; tests check correctness only.
"""
from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys
import time
from dataclasses import dataclass, field
from typing import Callable


@dataclass
class Report:
    """What a benchmark returns: headline metrics (numbers) and a table of raw measurements."""
    metrics: dict[str, float] = field(default_factory=dict)
    rows: list[tuple] = field(default_factory=list)          # (name, value, unit[, note])
    notes: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)                 # more JSON (e.g. every point of a sweep)

    def row(self, name: str, value: float, unit: str, note: str = "") -> None:
        self.rows.append((name, value, unit, note))


def available() -> list[str]:
    import gorila_zmq.bench as pkg
    return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_"))


def best_time(fn: Callable[[], object], repeat: int = 5, number: int | None = None,
              min_time: float = 0.05) -> float:
    """Best-of-`repeat` seconds per call of fn(); `number` calls per repeat (auto-sized if None)."""
    fn()  # warm-up
    if number is None:
        number = 1
        while True:
            t0 = time.perf_counter()
            for _ in range(number):
                fn()
            if time.perf_counter() - t0 >= min_time:
                break
            number *= 2
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter() - t0) / number)
    return best


def _fmt(v) -> str:
    if isinstance(v, float):
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.4g}"
        return f"{v:,.3f}"
    return str(v)


def print_report(name: str, rep: Report, out=sys.stdout) -> None:
    print(f"\n== bench {name} ==", file=out)
    if rep.rows:
        w = max(len(r[0]) for r in rep.rows)
        for r in rep.rows:
            note = f"  {r[3]}" if len(r) > 3 and r[3] else ""
            print(f"  {r[0]:<{w}}  {_fmt(r[1]):>14} {r[2]}{note}", file=out)
    if rep.metrics:
        print("  -- metrics --", file=out)
        w = max(len(k) for k in rep.metrics)
        for k, v in rep.metrics.items():
            print(f"  {k:<{w}}  {_fmt(v):>14}", file=out)
    for n in rep.notes:
        print(f"  note: {n}", file=out)


def main(argv: list[str]) -> int:
    names = available()
    parser = argparse.ArgumentParser(prog="gorila-zmq bench",
                                     description="Run one micro-benchmark against its baseline.")
    parser.add_argument("name", choices=names, help="which benchmark")
    parser.add_argument("--json", metavar="PATH", help='write {"bench": NAME, "metrics": {...}} here')
    # Parse the name first (without -h, so `bench NAME --help` lists the benchmark's own options).
    first = argparse.ArgumentParser(prog="gorila-zmq bench", add_help=False)
    first.add_argument("name", nargs="?", choices=names)
    first.add_argument("--json")
    known, _ = first.parse_known_args(argv)
    if known.name is None:
        parser.parse_args(argv)             # prints the usage (or the help) and exits
    mod = importlib.import_module(f"gorila_zmq.bench.{known.name}")
    parser.description = getattr(mod, "DESCRIPTION", parser.description)
    if hasattr(mod, "add_arguments"):
        mod.add_arguments(parser)
    args = parser.parse_intermixed_args(argv)      # overrides may follow the options
    rep: Report = mod.run(args)
    print_report(args.name, rep)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"bench": args.name, "metrics": rep.metrics,
                       "rows": [list(r) for r in rep.rows], "notes": rep.notes, **rep.extra}, f, indent=2)
        print(f"  wrote {args.json}")
    return 0
