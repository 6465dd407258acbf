"""`gorila-zmq status RUN_DIR`: ask every role of a run for its stats (shards on their request socket,
the other roles on their control socket), with a short timeout each; silent roles show as down."""
from __future__ import annotations

import argparse
import json
import os
import sys

import zmq

from gorila_zmq import config as C
from gorila_zmq.launch.program import make_program
from gorila_zmq.net import protocol as P, security
from gorila_zmq.net.rpc import Unavailable, request


def collect(cfg, program, ctx: zmq.Context, timeout_s: float = 0.5) -> dict[str, dict | None]:
    """name -> stats dict (None when the role did not answer)."""
    out = {}
    for spec in program:
        if spec.stats_endpoint is None:
            continue
        hdr = P.Header(P.Cmd.STATS, shard=spec.index if spec.role in ("ps", "replay") else 0, layout=spec.layout_hash)
        try:
            rhdr, body = request(ctx, spec.stats_endpoint, hdr, timeout_s=timeout_s, retries=0)
            out[spec.name] = P.as_json(rhdr, body, max_bytes=1 << 20)
        except (Unavailable, P.ProtocolError):
            out[spec.name] = None
    return out


def load_run(run_dir: str):
    path = os.path.join(run_dir, "config.json")
    if not os.path.exists(path):
        raise C.ConfigError(f"{run_dir} is not a run directory (no config.json)")
    return C.load(path)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="gorila-zmq status", description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--json", action="store_true", help="print the raw stats as JSON")
    p.add_argument("--timeout", type=float, default=1.0)
    a = p.parse_args(argv)
    cfg = load_run(a.run_dir)
    security.configure(cfg)
    program = make_program(cfg)
    ctx = zmq.Context()
    try:
        stats = collect(cfg, program, ctx, a.timeout)
    finally:
        ctx.destroy(linger=0)
    if a.json:
        print(json.dumps(stats, indent=2, default=str))
    else:
        for name, st in stats.items():
            if st is None:
                print(f"{name:<12} DOWN (no answer in {a.timeout:g}s)")
                continue
            keys = ("version", "updates_applied", "discarded_stale", "rejected_total", "env_frames", "episodes",
                    "recent_return", "epsilon", "updates", "updates_per_s", "outliers_dropped", "size",
                    "evaluations", "best_return")
            print(f"{name:<12} up  " + "  ".join(f"{k}={_fmt(st[k])}" for k in keys if k in st and st[k] is not None))
    return 0 if all(v is not None for v in stats.values()) else 1


def _fmt(v):
    return f"{v:.3g}" if isinstance(v, float) else str(v)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
